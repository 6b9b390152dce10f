"""How /v1/ner and /v1/qa read a model's outputs: the way its evaluation read them (hand-made logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.encoders import Reader, Tagger
from serving.model_folder import load_model_spec
from tests.serve_fixtures import NER_LABELS


@pytest.fixture(scope="module")
def tagger(tiny_models):
    return Tagger(load_model_spec(tiny_models["token_classification"]), "cpu", 128, False)


def logits_for(labels: list[str]) -> torch.Tensor:
    out = torch.full((len(labels), len(NER_LABELS)), -5.0)
    for pos, label in enumerate(labels):
        out[pos, NER_LABELS.index(label)] = 5.0
    return out


def test_a_word_takes_its_first_sub_tokens_label(tagger):
    text = "Ada Lovelace visited Paris"
    item = tagger.encode(text)
    pieces = tagger.runner.tokenizer.convert_ids_to_tokens(item.ids)
    assert pieces == ["[CLS]", "ada", "love", "##lace", "visited", "paris", "[SEP]"]
    # "##lace" is not a word's first sub-token: training ignored it, so its (here: wrong) label must not count.
    labels = ["O", "B-PER", "I-PER", "B-LOC", "O", "B-LOC", "O"]
    entities = tagger._entities(item, logits_for(labels))
    assert [(e["entity"], e["word"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Ada Lovelace", 0, 12), ("LOC", "Paris", 21, 26)]
    assert entities[0]["score"] == pytest.approx(float(torch.softmax(logits_for(["B-PER"])[0], -1).max()))


def test_b_starts_a_new_entity_and_an_i_after_o_starts_one_too(tagger):
    item = tagger.encode("Paris London Oslo")
    entities = tagger._entities(item, logits_for(["O", "B-LOC", "B-LOC", "I-LOC", "O"]))
    assert [(e["word"], e["start"]) for e in entities] == [("Paris", 0), ("London Oslo", 6)]
    entities = tagger._entities(item, logits_for(["O", "B-LOC", "O", "I-LOC", "O"]))
    assert [e["word"] for e in entities] == ["Paris", "Oslo"]


def test_qa_reads_long_contexts_in_the_windows_of_its_evaluation(tiny_models, tmp_path):
    import json
    import shutil

    folder = tmp_path / "qa"
    shutil.copytree(tiny_models["question_answering"], folder)
    info = json.loads((folder / "rayfine.json").read_text())
    info.update(max_seq_length=32, doc_stride=8, max_answer_length=4, n_best=5)
    (folder / "rayfine.json").write_text(json.dumps(info))
    reader = Reader(load_model_spec(folder), "cpu", 512, False)
    context = " ".join(f"word{i}" for i in range(40)) + " Grace was born in Oslo ."
    item = reader.encode("Where was Grace born?", context)
    assert len(item.windows) > 2 and all(len(w.ids) <= 32 for w in item.windows)
    # Each window's context tokens map back into the context; consecutive windows overlap by the stride.
    first, second = item.windows[:2]
    shared = set(zip(first.offset_start, first.offset_end)) & set(zip(second.offset_start, second.offset_end))
    assert len(shared - {(-1, -1)}) == 8
    # The answer is the best span of any window by start + end logit, at most 4 tokens long.
    outputs = []
    for w in item.windows:
        start, end = torch.full((len(w.ids),), -3.0), torch.full((len(w.ids),), -3.0)
        outputs.append({"start_logits": start, "end_logits": end})
    last = item.windows[-1]
    oslo = next(i for i, (a, b) in enumerate(zip(last.offset_start, last.offset_end))
                if a >= 0 and context[a:b].lower() == "oslo")
    outputs[-1]["start_logits"][oslo] = outputs[-1]["end_logits"][oslo] = 4.0
    answer = reader._answer(item, outputs)
    assert answer["answer"] == "Oslo" and context[answer["start"]:answer["end"]] == "Oslo"
    context_tokens = np.asarray(last.offset_start) >= 0
    n = int(context_tokens.sum())
    expected = (np.exp(4.0) / (np.exp(4.0) + (n - 1) * np.exp(-3.0))) ** 2
    assert answer["score"] == pytest.approx(expected, rel=1e-4)


def test_entities_map_back_to_word_tags():
    from cluster.evaluate_endpoint import word_tags

    words = ["Ada", "Lovelace", "visited", "New", "York", "."]  # "Ada Lovelace visited New York ."
    entities = [{"entity": "PER", "start": 0, "end": 12}, {"entity": "LOC", "start": 21, "end": 29}]
    assert word_tags(words, entities) == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
    assert word_tags(words, []) == ["O"] * 6


def test_evaluate_endpoint_errors_are_one_line_each(tmp_path, capsys):
    from cluster.cli import main
    from tests.unit.test_api_settings import write_config

    cfg = write_config(tmp_path / "lm.yaml")
    text = cfg.read_text().replace("sequence_classification", "causal_lm")
    cfg.write_text(text)
    assert main(["evaluate", str(cfg), "--endpoint", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "causal_lm's metrics (loss, perplexity) need the model's logits" in err and "Traceback" not in err

    cfg = write_config(tmp_path / "cls.yaml")
    assert main(["evaluate", str(cfg), "--endpoint", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "--endpoint http://127.0.0.1:9: ConnectError" in err and "rayfine serve prints the URL" in err


def test_a_temperature_near_zero_samples_the_greedy_token():
    from serving.sampling import sample

    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(1)
    for temperature in (1e-9, 1e-300, 5e-324):
        assert sample(logits, temperature, 1.0, rng) == int(logits.argmax())
        assert sample(logits, temperature, 0.5, rng) == int(logits.argmax())
    counts = torch.bincount(torch.tensor([sample(logits, 1.0, 1.0, rng) for _ in range(200)]), minlength=64)
    assert (counts > 0).sum() > 5  # at temperature 1 it still samples
