"""Tiny BERT trained for NER and extractive QA with 2 Ray Train workers under DeepSpeed ZeRO-2 on CPU.

Same pipeline as classification (Ray Data -> Ray Train + DeepSpeed -> export -> evaluate): only the task
adapter differs. The data are easy templates, so a 2-layer BERT moves in a few dozen steps.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from core.config import load_config
from tests.conftest import write_jsonl
from tests.integration.helpers import evaluate_endpoint_cli, read_metrics, served
from training.driver import train
from training.evaluate import evaluate_model

pytestmark = pytest.mark.integration

PEOPLE = ["Alice", "Bob", "Carol", "Dmitri", "Erik", "Fatima", "Grace", "Hiro"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Tokyo", "Lima", "Oslo", "Cairo"]
VERBS = ["lives in", "moved to", "works in", "visited", "loves"]
FILLER = ["the", "weather", "was", "nice", "and", "we", "talked", "about", "food", "music", "today"]


def ner_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lead = rng.sample(FILLER, rng.randint(0, 3))
        words = [*lead, rng.choice(PEOPLE), *rng.choice(VERBS).split(), rng.choice(CITIES)]
        tags = ["O"] * len(lead) + ["B-PER"] + ["O"] * (len(words) - len(lead) - 2) + ["B-LOC"]
        rows.append({"tokens": words, "tags": tags})
    return rows


def write_conll(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join("".join(f"{w} {t}\n" for w, t in zip(r["tokens"], r["tags"])) for r in rows))
    return path


def qa_rows(n: int, seed: int) -> list[dict]:
    """A person's city in a context padded with filler, so contexts need 2-3 windows of 48 tokens."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        person, city = rng.choice(PEOPLE), rng.choice(CITIES)
        before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(10, 40)))
        after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(5, 20)))
        fact = f"{person} was born in {city}."
        context = f"{before}. {fact} {after}."
        start = context.index(fact) + len(f"{person} was born in ")
        rows.append({"id": f"q{seed}-{i}", "question": f"Where was {person} born?", "context": context,
                     "answers": {"text": [city], "answer_start": [start]}})
    return rows


def squad_document(rows: list[dict]) -> dict:
    paragraphs = [{"context": r["context"], "qas": [{"id": r["id"], "question": r["question"], "answers": [
        {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for r in rows]
    return {"version": "1.1", "data": [{"title": "people", "paragraphs": paragraphs}]}


def run_config(tmp_path: Path, model: Path, task: str, train_path: Path, val_path: Path, epochs: int = 2, **data):
    raw = {"task": task, "model": {"name_or_path": str(model)},
           "data": {"train": str(train_path), "validation": str(val_path), **data},
           "training": {"epochs": epochs, "learning_rate": 5e-3, "batch_size": 8, "warmup_ratio": 0.0,
                        "log_every_steps": 4, "eval_every_steps": 0, "checkpoint_every_steps": 0},
           "deepspeed": {"stage": 2}, "scaling": {"num_workers": 2, "use_gpu": False},
           "output": {"dir": str(tmp_path / "runs"), "name": task}}
    return load_config(raw=raw)


def run_model_card_snippet(model_dir: Path, capsys, namespace: dict | None = None) -> str:
    """Run the usage snippet of the exported model card (its names land in ``namespace``); returns what it
    printed."""
    readme = (model_dir / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert str(model_dir) in code
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {} if namespace is None else namespace)
    return capsys.readouterr().out


def assert_loss_falls(run_dir: Path) -> list[dict]:
    metrics = read_metrics(run_dir)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 3 and np.mean(losses[-2:]) < losses[0] - 0.05, f"loss did not fall: {losses}"
    return metrics


def test_token_classification_trains_exports_and_tags(tmp_path, tiny_bert, ray_local, capsys):
    train_path = write_jsonl(tmp_path / "data" / "train.jsonl", ner_rows(320, seed=1))
    val_path = write_conll(tmp_path / "data" / "val.conll", ner_rows(40, seed=2))
    cfg = run_config(tmp_path, tiny_bert, "token_classification", train_path, val_path, max_seq_length=32,
                     epochs=1)
    result = train(cfg)
    metrics = assert_loss_falls(result.run_dir)
    assert [m for m in metrics if m.get("final")][-1]["step"] == 320 // 2 // 8

    evaluation = json.loads((result.run_dir / "eval.json").read_text())["validation"]
    for key in ("f1", "precision", "recall", "accuracy"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert {k: v["support"] for k, v in evaluation["per_type"].items()} == {"LOC": 40, "PER": 40}
    assert evaluation["f1"] > 0.5, evaluation

    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert json.loads((result.model_dir / "rayfine.json").read_text())["labels"] == labels
    assert json.loads((result.model_dir / "rayfine.json").read_text())["aggregation_strategy"] == "first"
    from transformers import AutoConfig, pipeline

    assert AutoConfig.from_pretrained(result.model_dir).id2label == dict(enumerate(labels))
    assert 'aggregation_strategy="first"' in (result.model_dir / "README.md").read_text()
    assert "entity_group" in run_model_card_snippet(result.model_dir, capsys)

    # What is served is what was evaluated: the model card's pipeline and /v1/ner (through `rayfine evaluate
    # --endpoint`) score the validation file as eval.json does.
    from cluster.evaluate_endpoint import word_tags
    from training.span_metrics import entity_metrics

    val_rows = ner_rows(40, seed=2)
    ner = pipeline("token-classification", model=str(result.model_dir), aggregation_strategy="first")
    answers = ner([" ".join(r["tokens"]) for r in val_rows])
    predicted = [word_tags(r["tokens"], [{**e, "entity": e["entity_group"]} for e in entities])
                 for r, entities in zip(val_rows, answers)]
    pipeline_metrics = entity_metrics([r["tags"] for r in val_rows], predicted)
    assert pipeline_metrics["f1"] == pytest.approx(evaluation["f1"], abs=0.01)
    with served(result.model_dir, "parity-ner") as url:
        served_metrics = evaluate_endpoint_cli(cfg, url, tmp_path)
    for key in ("f1", "precision", "recall"):
        assert served_metrics[key] == pytest.approx(evaluation[key], abs=0.01), key

    again = evaluate_model(cfg, result.model_dir)
    for key in ("f1", "precision", "recall", "accuracy"):
        assert again[key] == pytest.approx(evaluation[key]), key
    assert again["per_type"] == evaluation["per_type"]
    assert again["loss"] == pytest.approx(evaluation["loss"], rel=0.1)  # token-mean loss, batched differently


def test_question_answering_trains_on_windows_exports_and_answers(tmp_path, tiny_bert, ray_local, capsys):
    train_rows = qa_rows(128, seed=1)
    train_path = write_jsonl(tmp_path / "data" / "train.jsonl", train_rows)
    val_path = tmp_path / "data" / "dev.json"  # nested SQuAD JSON
    val_path.write_text(json.dumps(squad_document(qa_rows(24, seed=2)), indent=1))
    cfg = run_config(tmp_path, tiny_bert, "question_answering", train_path, val_path, max_seq_length=48,
                     doc_stride=12)
    result = train(cfg)
    metrics = assert_loss_falls(result.run_dir)

    # The plan counts windows, not records: 2 epochs over every window.
    from transformers import AutoTokenizer

    from training.tasks.question_answering import QuestionAnswering

    adapter = QuestionAnswering(cfg)
    parsed = [adapter.parse_record(r) for r in train_rows]
    batch = {k: np.array([p[k] for p in parsed] + [None], dtype=object)[:-1] for k in parsed[0]}
    windows = int(adapter.record_stats(batch, AutoTokenizer.from_pretrained(tiny_bert))["rows"].sum())
    assert windows > 1.5 * len(train_rows)
    assert [m for m in metrics if m.get("final")][-1]["step"] == 2 * math.ceil(windows // 2 / 8)

    evaluation = json.loads((result.run_dir / "eval.json").read_text())["validation"]
    assert 0.0 <= evaluation["exact_match"] <= evaluation["f1"] <= 1.0
    assert evaluation["num_examples"] == 24

    meta = json.loads((result.model_dir / "rayfine.json").read_text())
    assert meta["task"] == "question_answering" and meta["labels"] is None
    card: dict = {}
    assert run_model_card_snippet(result.model_dir, capsys, card).strip() in "Ada was born in London."
    context = "the weather was nice today. Grace was born in Oslo. we talked about music."
    answer = card["answer"]("Where was Grace born?", context)
    assert answer and answer in context
    # The model card's plain-transformers decoding scores the validation set as eval.json does.
    from training.span_metrics import squad_metrics

    val_rows = qa_rows(24, seed=2)
    card_metrics = squad_metrics([card["answer"](r["question"], r["context"]) for r in val_rows],
                                 [r["answers"]["text"] for r in val_rows])
    assert card_metrics["exact_match"] == pytest.approx(evaluation["exact_match"], abs=0.01)
    assert card_metrics["f1"] == pytest.approx(evaluation["f1"], abs=0.01)
    info = json.loads((result.model_dir / "rayfine.json").read_text())
    assert (info["doc_stride"], info["max_answer_length"], info["n_best"]) == (12, 30, 20)
    with served(result.model_dir, "parity-qa") as url:  # /v1/qa reads contexts in the training windows
        served_metrics = evaluate_endpoint_cli(cfg, url, tmp_path)
    assert served_metrics["exact_match"] == pytest.approx(evaluation["exact_match"], abs=0.01)
    assert served_metrics["f1"] == pytest.approx(evaluation["f1"], abs=0.01)
    from transformers.pipelines import get_supported_tasks

    if "question-answering" in get_supported_tasks():  # transformers 5 removed this pipeline
        from transformers import pipeline

        qa = pipeline("question-answering", model=str(result.model_dir))
        assert qa(question="Where was Grace born?", context=context)["answer"] == answer

    again = evaluate_model(cfg, result.model_dir)
    assert again["exact_match"] == pytest.approx(evaluation["exact_match"])
    assert again["f1"] == pytest.approx(evaluation["f1"])
    # The QA head's loss spans pad positions too, so it moves a little with how windows are batched.
    assert again["loss"] == pytest.approx(evaluation["loss"], rel=0.1)
