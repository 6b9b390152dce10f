"""Question answering data: SQuAD records (JSONL and nested JSON) with file and line, windows and answer tokens."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from core.config import load_config
from core.errors import ConfigError
from tests.conftest import minilm_dir
from training.data import read_shard_rows
from training.preflight import DataSummary, _format_rows_and_checks
from training.tasks.question_answering import QuestionAnswering

CONTEXT = ("The Eiffel Tower is in Paris. It was built in 1889 by the company of Gustave Eiffel for the World's "
           "Fair held in Paris that year, and it was the tallest structure in the world until 1930.")


def qa_cfg(train="train.jsonl", **data):
    return load_config(raw={"task": "question_answering", "model": {"name_or_path": "m"},
                            "data": {"train": str(train), **data}})


def rows_of(path, fmt="jsonl", **data):
    out = []
    for chunk in read_shard_rows(str(path), fmt, qa_cfg(path, **data), carve=0.0, keep=None):
        out += [dict(zip(chunk, vals)) for vals in zip(*chunk.values())]
    return out


def errors_of(path, fmt="jsonl", **data):
    return [(r["_line"], r["_error"]) for r in rows_of(path, fmt, **data) if r["_error"]]


def answer(text, context=CONTEXT):
    return {"text": [text], "answer_start": [context.index(text)]}


def batch_of(records):
    """Parsed records as the Ray Data numpy batch the adapter gets (list columns become object arrays)."""
    adapter = QuestionAnswering(qa_cfg())
    parsed = [adapter.parse_record(r) for r in records]
    batch = {}
    for key in parsed[0]:
        batch[key] = np.empty(len(parsed), dtype=object)
        for i, p in enumerate(parsed):
            batch[key][i] = p[key]
    batch["_file"] = np.array(["t.jsonl"] * len(parsed))
    batch["_line"] = np.arange(1, len(parsed) + 1)
    return batch


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def test_bad_records_name_the_field_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [{"id": "a", "question": "Where?", "context": CONTEXT, "answers": answer("Paris")},
               {"question": "Where?", "context": CONTEXT, "answers": {"text": ["Paris"], "answer_start": [5]}},
               {"question": "When?", "context": CONTEXT, "answers": {"text": ["1999"], "answer_start": [3]}},
               {"context": CONTEXT, "answers": answer("Paris")},
               {"question": "Where?", "context": CONTEXT},
               {"question": "Where?", "context": CONTEXT, "answers": {"text": ["Paris"], "answer_start": []}},
               {"question": "Where?", "context": CONTEXT, "answers": {"text": ["Paris"], "answer_start": ["23"]}},
               {"question": "Where?", "context": CONTEXT, "answers": "Paris"},
               {"question": "Who?", "context": CONTEXT, "answers": {"text": [], "answer_start": []}},
               {"question": "Who?", "context": CONTEXT, "answers": [{"text": "Gustave Eiffel",
                                                                      "answer_start": CONTEXT.index("Gustave")}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    errors = dict(errors_of(path))
    assert errors[2] == ("answers.text[0] 'Paris' is not at answer_start 5 in the context (found 'iffel'); "
                         "the text occurs at 23")
    assert errors[3].startswith("answers.text[0] '1999' is not at answer_start 3") and "does not occur" in errors[3]
    assert errors[4] == "missing column 'question' (data.question_column); columns are answers, context"
    assert errors[5] == "missing column 'answers' (data.answers_column); columns are context, question"
    assert errors[6] == "'answers' has 1 texts but 0 answer_start values; give one start per text"
    assert errors[7].startswith("answers.answer_start[0] must be a character offset")
    assert errors[8].startswith("'answers' must be {\"text\": [...], \"answer_start\": [...]}")
    assert set(errors) == {2, 3, 4, 5, 6, 7, 8}  # unanswerable (9) and SQuAD's list of answers (10) are fine
    rows = rows_of(path)
    assert rows[8]["answer_texts"] == [] and rows[9]["answer_texts"] == ["Gustave Eiffel"]


def squad_document():
    qas = [{"id": "q1", "question": "Where is the tower?", "answers": [{"text": "Paris", "answer_start": 23}]},
           {"id": "q2", "question": "When?", "answers": [{"text": "1889", "answer_start": 4}]},
           {"id": "q3", "question": "Who?", "answers": [], "is_impossible": True}]
    return {"version": "v2.0", "data": [{"title": "Eiffel", "paragraphs": [{"qas": qas, "context": CONTEXT}]}]}


def test_nested_squad_json_gives_each_question_its_line(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad_document(), indent=2))
    lines = path.read_text().splitlines()
    opening = [n for n, line in enumerate(lines, start=1) if line.strip() == "{" and '"id"' in lines[n]]
    rows = rows_of(path, "json")  # auto: a .json document is read as nested SQuAD
    assert [r["_line"] for r in rows] == opening and len(opening) == 3
    assert rows[0]["_error"] == "" and rows[0]["answer_texts"] == ["Paris"] and rows[0]["context"] == CONTEXT
    assert rows[1]["_error"].startswith("answers.text[0] '1889' is not at answer_start 4")
    assert rows[2]["_error"] == "" and rows[2]["answer_texts"] == []
    path.write_text(json.dumps(squad_document()))  # the official files are one line
    assert [r["_line"] for r in rows_of(path, "json")] == [1, 1, 1]


def test_broken_squad_json_names_the_line(tmp_path):
    path = tmp_path / "dev.json"
    text = json.dumps(squad_document(), indent=2).replace('"When?"', '"When?" oops')
    path.write_text(text)
    [(line, problem)] = errors_of(path, "squad")
    assert line == next(n for n, x in enumerate(text.splitlines(), 1) if "oops" in x)
    assert problem.startswith("not a SQuAD JSON file")
    path.write_text(json.dumps({"version": 1, "articles": []}, indent=2))
    assert errors_of(path, "squad") == [(1, "not a SQuAD JSON file: no top-level 'data' (data -> paragraphs -> "
                                            "qas)")]


def test_windows_map_answers_to_tokens_and_others_to_cls(tokenizer):
    adapter = QuestionAnswering(qa_cfg(max_seq_length=32, doc_stride=8))
    batch = batch_of([{"question": "When was it built?", "context": CONTEXT, "answers": answer("1889")},
                      {"question": "What was the tallest structure?", "context": CONTEXT, "answers": answer(
                          "the tallest structure in the world")},
                      {"question": "Who?", "context": CONTEXT, "answers": {"text": [], "answer_start": []}}])
    out = adapter.tokenize(batch, tokenizer, None)
    examples = np.array(out["example"])
    assert (np.bincount([int(e.split(":")[1]) for e in examples]) > 1).sum() == 3  # every context split
    hits = {key: 0 for key in ("t.jsonl:1", "t.jsonl:2")}
    for i, key in enumerate(examples):
        start, end = out["start_positions"][i], out["end_positions"][i]
        assert len(out["input_ids"][i]) <= 32
        if start == 0:
            assert end == 0
            continue
        text = out["context"][i][out["offset_start"][i][start]: out["offset_end"][i][end]]
        assert text == json.loads(out["answers"][i])[0]
        hits[key] += 1
    assert hits["t.jsonl:1"] >= 1 and hits["t.jsonl:2"] >= 1
    assert all(out["start_positions"][examples == "t.jsonl:3"] == 0)  # unanswerable: CLS in every window

    stats = adapter.record_stats(batch, tokenizer)
    assert stats["rows"].tolist() == np.bincount([int(e.split(":")[1]) for e in examples])[1:].tolist()
    assert stats["unanswerable"].tolist() == [0, 0, 1]
    assert stats["answer_outside_windows"].tolist() == [0, 0, 0]
    assert adapter.tokenize(batch, tokenizer, None, truncate=False)["length"].min() > 32


def test_answer_longer_than_a_window_and_long_questions(tokenizer):
    adapter = QuestionAnswering(qa_cfg(max_seq_length=16, doc_stride=4))
    long_answer = "It was built in 1889 by the company of Gustave Eiffel"
    batch = batch_of([{"question": "What happened?", "context": CONTEXT, "answers": answer(long_answer)},
                      {"question": "which year " * 20 + "?", "context": CONTEXT, "answers": answer("1889")}])
    stats = adapter.record_stats(batch, tokenizer)
    assert stats["answer_outside_windows"].tolist() == [1, 0]  # training sees that answer only as CLS
    assert stats["question_truncated"].tolist() == [0, 1]  # cut, instead of the tokenizer panicking
    out = adapter.tokenize(batch, tokenizer, None)
    assert max(len(x) for x in out["input_ids"]) <= 16


def test_collate_gives_the_model_its_targets(tokenizer):
    adapter = QuestionAnswering(qa_cfg(max_seq_length=32, doc_stride=8))
    out = adapter.tokenize(batch_of([{"question": "When?", "context": CONTEXT, "answers": answer("1889")}]),
                           tokenizer, None)
    inputs = adapter.collate({k: np.asarray(v, dtype=object) if isinstance(v, list) else v for k, v in out.items()},
                             pad_id=0)
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
    assert inputs["start_positions"].dtype == np.int64 and inputs["input_ids"].shape[0] == len(out["example"])


def test_doc_stride_must_leave_windows_room():
    with pytest.raises(ConfigError, match="data.doc_stride: 64 must be less than half data.max_seq_length"):
        qa_cfg(max_seq_length=128, doc_stride=64)


def test_report_shows_rows_and_checks_when_records_become_windows():
    summary = DataSummary(counts={"train": 10, "validation": 4},
                          stats={"train": {"rows": 25, "unanswerable": 2, "answer_outside_windows": 1},
                                 "validation": {"rows": 4, "unanswerable": 0, "answer_outside_windows": 0}})
    text = "\n".join(_format_rows_and_checks(summary))
    assert "train              25  (2.50 per record)" in text
    assert "answer outside windows" in text and "unanswerable" in text
    assert summary.rows("train") == 25 and DataSummary(counts={"train": 3}).rows("train") == 3
    assert _format_rows_and_checks(DataSummary(counts={"train": 3}, stats={"train": {"rows": 3}})) == []


def test_json_lines_in_a_json_file_stay_json_lines(tmp_path):
    path = tmp_path / "train.json"
    good = {"question": "Where?", "context": CONTEXT, "answers": answer("Paris")}
    path.write_text(json.dumps(good) + "\n" + '{"question": "broken, "context": "x"}\n')
    rows = rows_of(path, "json")
    assert rows[0]["_error"] == "" and rows[1]["_line"] == 2 and rows[1]["_error"].startswith("malformed JSON")


def test_parquet_answers_struct(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["Where?", "Who?"], "context": [CONTEXT, CONTEXT],
                             "answers": [answer("Paris"), {"text": [], "answer_start": []}]}), path)
    rows = rows_of(path, "parquet")
    assert [(r["_error"], r["answer_texts"], r["answer_starts"]) for r in rows] == [
        ("", ["Paris"], [23]), ("", [], [])]
