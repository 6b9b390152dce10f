"""Tiny BERT trained with 2 Ray Train workers under DeepSpeed ZeRO 0, 2 and 3 on CPU (gloo)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.integration.helpers import classification_config, read_metrics
from training.driver import train
from training.evaluate import evaluate_model

pytestmark = pytest.mark.integration


def _train(tmp_path, tiny_bert, stage):
    cfg = classification_config(tmp_path, tiny_bert, deepspeed={"stage": stage})
    return cfg, train(cfg)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stage_trains_exports_and_loads(stage, tmp_path, tiny_bert, ray_local):
    cfg, result = _train(tmp_path, tiny_bert, stage)
    run_dir = result.run_dir
    metrics = read_metrics(run_dir)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 3
    assert np.mean(losses[-2:]) < losses[0] - 0.05, f"loss did not fall: {losses}"
    final = [m for m in metrics if m.get("final")][-1]
    assert final["step"] == 2 * (320 // 2 // 8)  # epochs x per-worker batches

    # The run folder of DESIGN.md, complete.
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "model/model.safetensors", "model/config.json",
                 "model/tokenizer.json", "model/rayfine.json", "model/README.md", "plots/loss.png",
                 "plots/learning_rate.png", "plots/eval_metrics.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("checkpoint_*"))
    evaluation = json.loads((run_dir / "eval.json").read_text())["validation"]
    assert evaluation["accuracy"] > 0.8 and set(evaluation["per_class"]) == {"neg", "pos"}

    # Plain transformers loads the export, and predicts what rayfine's own evaluation counted.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    moved = [not torch.equal(a, b) for a, b in zip(model.bert.parameters(), base.bert.parameters())]
    assert all(moved), "every encoder weight should have been trained"
    clf = pipeline("text-classification", model=str(result.model_dir), tokenizer=str(result.model_dir))
    val_rows = [json.loads(x) for x in open(cfg.data.validation)]
    predicted = [p["label"] for p in clf([r["text"] for r in val_rows])]
    accuracy = np.mean([p == r["label"] for p, r in zip(predicted, val_rows)])
    assert accuracy == pytest.approx(evaluation["accuracy"])

    again = evaluate_model(cfg, result.model_dir)
    assert again["accuracy"] == pytest.approx(evaluation["accuracy"])
    assert again["f1"] == pytest.approx(evaluation["f1"])
    assert again["loss"] == pytest.approx(evaluation["loss"], rel=1e-3)
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    assert tok("hello")["input_ids"]
