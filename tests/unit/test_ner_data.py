"""Token classification data: readers (JSONL, Parquet, CoNLL), tag checks with file and line, sub-word labels."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from core.config import load_config
from tests.conftest import minilm_dir
from training.data import expand_inputs, read_shard_rows
from training.tasks.base import ParseError
from training.tasks.token_classification import IGNORE, TokenClassification, align_labels, check_tags


def ner_cfg(train="train.jsonl", **data):
    return load_config(raw={"task": "token_classification", "model": {"name_or_path": "m"},
                            "data": {"train": str(train), **data}})


def rows_of(path, fmt, **data):
    out = []
    for chunk in read_shard_rows(str(path), fmt, ner_cfg(path, **data), carve=0.0, keep=None):
        out += [dict(zip(chunk, vals)) for vals in zip(*chunk.values())]
    return out


def errors_of(path, fmt="jsonl", **data):
    return [(r["_line"], r["_error"]) for r in rows_of(path, fmt, **data) if r["_error"]]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def test_bad_records_name_the_field_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [{"tokens": ["Ada", "Lovelace"], "tags": ["B-PER", "I-PER"]},
               {"tokens": ["Ada", "Lovelace"], "tags": ["B-PER"]},
               {"tokens": [], "tags": []},
               {"tokens": ["in", "Paris"], "tags": ["O", "I-LOC"]},
               {"tokens": ["Paris"], "tags": ["S-LOC"]},
               {"tokens": ["Paris"], "tags": ["LOC"]},
               {"words": ["Paris"], "tags": ["B-LOC"]},
               {"tokens": "Ada Lovelace", "tags": ["B-PER", "I-PER"]},
               {"tokens": ["Ada", " "], "tags": ["B-PER", "O"]},
               {"tokens": ["Ada", "Lovelace"], "tags": ["B-PER", "I-LOC"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    errors = dict(errors_of(path))
    assert 1 not in errors
    assert errors[2] == "'tokens' has 2 words but 'tags' has 1 tags; give exactly one tag per word"
    assert errors[3] == "'tokens' is empty: a sentence needs at least one word"
    assert errors[4].startswith("tags[1] 'I-LOC' follows 'O': IOB2 starts an entity with B-LOC")
    assert "data.tag_scheme: iob1" in errors[4]
    assert errors[5].startswith("tags[0] 'S-LOC' is not a BIO tag") and "IOBES" in errors[5]
    assert errors[6].startswith("tags[0] 'LOC' is not a BIO tag")
    assert errors[7] == "missing column 'tokens' (data.tokens_column); columns are tags, words"
    assert errors[8] == "'tokens' must be a list of strings (data.tokens_column), got str"
    assert errors[9] == "tokens[1] is an empty word; remove it and its tag"
    assert errors[10].startswith("tags[1] 'I-LOC' follows 'B-PER'")


def test_iob1_is_accepted_and_converted_to_iob2(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"tokens": ["in", "New", "York", "Paris"], "tags": ["O", "I-LOC", "I-LOC", "B-LOC"]})
                    + "\n")
    [row] = rows_of(path, "jsonl", tag_scheme="iob1")
    assert row["_error"] == "" and row["tags"] == ["O", "B-LOC", "I-LOC", "B-LOC"]
    assert check_tags(["I-PER", "I-LOC"], "iob1", "tags") == ["B-PER", "B-LOC"]


def test_custom_columns_and_parquet_lists(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"words": [["Ada", "Lovelace"], ["x"]], "ner": [["B-PER", "I-PER"], ["O", "O"]]}), path)
    rows = rows_of(path, "parquet", tokens_column="words", tags_column="ner")
    assert rows[0]["_error"] == "" and rows[0]["tokens"] == ["Ada", "Lovelace"]
    assert (rows[1]["_line"], rows[1]["_error"]) == (2, "'words' has 1 words but 'ner' has 2 tags; give exactly "
                                                        "one tag per word")


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

the DT B-NP O
Paris NNP I-NP I-LOC
visit NN I-NP O

BRUSSELS
1996-08-22 CD I-NP O
"""


def test_conll_sentences_and_line_numbers(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(CONLL)
    assert expand_inputs(str(path), "auto", "data.train") == [(str(path), "conll")]
    rows = rows_of(path, "conll")
    assert [(r["_line"], r["_error"] == "") for r in rows] == [(3, True), (9, True), (13, False), (16, False)]
    assert [r["_line"] for r in rows_of(path, "conll", tag_scheme="iob1")] == [3, 9, 12, 16]
    assert rows[0]["tokens"] == ["EU", "rejects", "German", "call"]
    assert rows[0]["tags"] == ["B-ORG", "O", "B-MISC", "O"]
    assert rows[1]["tags"] == ["B-PER", "I-PER"]
    # the stray I-LOC is reported at its own line (13), not at the sentence's first (12)
    errors = errors_of(path, "conll")
    assert errors[0][0] == 13 and errors[0][1].startswith("tags[1] 'I-LOC' follows 'O'")
    assert errors[1] == (16, "expected a word and its tag separated by whitespace, got 'BRUSSELS'")


def test_first_subtoken_carries_the_label(tokenizer):
    # [CLS] johan ##son lives in kuala lumpur [SEP]
    adapter = TokenClassification(ner_cfg())
    space = adapter.build_label_space({"B-PER": 1, "O": 2, "B-LOC": 1, "I-LOC": 1})
    assert space.names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    batch = {"tokens": np.array([None], object), "tags": np.array([None], object)}
    batch["tokens"][0] = ["Johanson", "lives", "in", "Kuala", "Lumpur"]
    batch["tags"][0] = ["B-PER", "O", "O", "B-LOC", "I-LOC"]
    out = adapter.tokenize(batch, tokenizer, space)
    pieces = tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
    assert pieces == ["[CLS]", "johan", "##son", "lives", "in", "kuala", "lumpur", "[SEP]"]
    assert out["labels"][0].tolist() == [IGNORE, 3, IGNORE, 0, 0, 1, 2, IGNORE]
    assert out["word_starts"][0].tolist() == [1, 3, 4, 5, 6] and out["gold"][0].tolist() == [3, 0, 0, 1, 2]

    every = TokenClassification(ner_cfg(label_all_subtokens=True)).tokenize(batch, tokenizer, space)
    assert every["labels"][0].tolist() == [IGNORE, 3, 4, 0, 0, 1, 2, IGNORE]  # ##son of a B-PER word: I-PER

    cut = TokenClassification(ner_cfg(max_seq_length=8)).tokenize(
        {"tokens": np.array([["a"] * 10], object), "tags": np.array([["O"] * 10], object)}, tokenizer, space)
    assert len(cut["input_ids"][0]) == 8 and len(cut["word_starts"][0]) == 6 and len(cut["gold"][0]) == 10

    padded = adapter.collate({k: np.array(v + cut[k], dtype=object) for k, v in out.items()
                              if k in ("input_ids", "token_type_ids", "labels")}, pad_id=0)
    assert padded["labels"].shape == (2, 8) and padded["labels"][0, -1] == IGNORE
    assert padded["attention_mask"][0].tolist() == [1] * 8


def test_align_labels_marks_words_without_tokens():
    labels, starts = align_labels([None, 0, 2, 2, None], [5, 6, 7], continuation=None)
    assert labels.tolist() == [IGNORE, 5, 7, IGNORE, IGNORE]
    assert starts.tolist() == [1, -1, 2]


def test_parse_error_is_a_parse_error():
    with pytest.raises(ParseError):
        TokenClassification(ner_cfg()).parse_record({"tokens": ["a"], "tags": [1]})
