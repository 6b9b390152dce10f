"""Tiny BERT trained once (2 Ray Train workers, DeepSpeed ZeRO-2, gloo on CPU), then checked from every side:
the run folder, the export in plain transformers, rayfine's evaluation and the CLI's. ZeRO-0 and ZeRO-3 are
checked against this run step by step in test_resume_and_invariants.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.integration.helpers import evaluate_endpoint_cli, read_metrics, served
from training.evaluate import evaluate_model

pytestmark = pytest.mark.integration


def test_loss_falls_and_the_run_folder_is_complete(trained_classifier):
    cfg, result = trained_classifier
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
    checkpoints = list((run_dir / "checkpoints").glob("checkpoint_*"))
    assert checkpoints
    # Each rank moved its own ZeRO shard into the checkpoint's one folder (training checkpoints: a "ds" folder).
    for engine_files in [c / "ds" for c in checkpoints if (c / "ds").is_dir()]:
        shards = sorted(p.name for p in engine_files.glob("*optim_states.pt"))
        assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], shards
    assert any((c / "ds").is_dir() for c in checkpoints)
    # Checkpoints were staged in the run's storage (not the container's /tmp), and nothing staged is left.
    staging = run_dir / "checkpoints" / ".staging"
    assert staging.is_dir() and not any(staging.iterdir())
    evaluation = json.loads((run_dir / "eval.json").read_text())["validation"]
    assert evaluation["accuracy"] > 0.8 and set(evaluation["per_class"]) == {"neg", "pos"}
    assert "DeepSpeed ZeRO-2" in (result.model_dir / "README.md").read_text()


def test_the_run_is_tracked_in_mlflow_and_tensorboard(trained_classifier):
    """The run's config, every metric of metrics.jsonl at its step and its results, read back from MLflow's
    embedded SQLite store (with MlflowClient) and from the TensorBoard event files (with tensorboard's reader)."""
    from pathlib import Path

    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, result = trained_classifier
    store = Path(cfg.output.dir).resolve() / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == result.run_dir.name
    assert run.data.params["training.learning_rate"] == str(cfg.training.learning_rate)
    assert run.data.params["deepspeed.stage"] == "2" and run.data.params["scaling.num_workers"] == "2"
    assert {k: run.data.tags[k] for k in ("task", "base_model", "zero_stage")} == {
        "task": "sequence_classification", "base_model": cfg.model.name_or_path, "zero_stage": "2"}
    records = read_metrics(result.run_dir)  # rank 0's reports, a restarted stretch included
    for key in ("loss", "lr", "eval_accuracy"):
        expected = sorted((r["step"], r[key]) for r in records if key in r)
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert expected and [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected]), key
    evaluation = json.loads((result.run_dir / "eval.json").read_text())["validation"]
    assert run.data.metrics["final_validation_accuracy"] == pytest.approx(evaluation["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "config.yaml", "plots", "model"} <= artifacts
    assert "plots/loss.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert (store.parent / "mlartifacts").is_dir()  # the embedded store keeps artifacts beside it
    # The registered model (transformers flavour) loads as a pipeline that predicts what evaluation counted.
    import mlflow.transformers

    [version] = client.search_model_versions("name = 'tiny-sentiment'")
    assert version.run_id == run.info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    registered = mlflow.transformers.load_model(f"models:/tiny-sentiment/{version.version}")
    val_rows = [json.loads(x) for x in open(cfg.data.validation)]
    predicted = [p["label"] for p in registered([r["text"] for r in val_rows])]
    assert np.mean([p == r["label"] for p, r in zip(predicted, val_rows)]) == pytest.approx(evaluation["accuracy"])

    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    expected = sorted((r["step"], r["loss"]) for r in records if "loss" in r)
    scalars = sorted((e.step, e.value) for e in events.Scalars("loss"))
    assert [s for s, _ in scalars] == [s for s, _ in expected]
    assert [v for _, v in scalars] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    assert "eval_accuracy" in events.Tags()["scalars"]

    # W&B (offline): its run folder holds the history. W&B keeps steps increasing, so the stretch the restart
    # after the injected failure reported again is logged once.
    from tests.conftest import read_wandb_run

    history, summary = read_wandb_run(result.run_dir)
    logged = [(h["_step"], h["loss"]) for h in history if "loss" in h]
    assert [s for s, _ in logged] == sorted({s for s, _ in logged}) and logged[-1] == expected[-1]
    assert set(logged) <= set(expected) and len(logged) >= len(expected) - 4
    assert summary["final_validation_accuracy"] == pytest.approx(evaluation["accuracy"])

def test_the_export_loads_and_predicts_what_evaluation_counted(trained_classifier, tiny_bert):
    cfg, result = trained_classifier
    evaluation = json.loads((result.run_dir / "eval.json").read_text())["validation"]
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
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    assert tok("hello")["input_ids"]


def test_evaluation_of_the_export_matches_the_run(trained_classifier, tmp_path, ray_local, capsys, monkeypatch):
    cfg, result = trained_classifier
    evaluation = json.loads((result.run_dir / "eval.json").read_text())["validation"]
    from training import data

    # Through Ray Data (an actor pool), as for data too large or too remote to read in the command's process.
    monkeypatch.setattr(data, "IN_PROCESS_MAX_BYTES", 0)
    again = evaluate_model(cfg, result.model_dir)
    monkeypatch.undo()
    assert again["accuracy"] == pytest.approx(evaluation["accuracy"])
    assert again["f1"] == pytest.approx(evaluation["f1"])
    assert again["loss"] == pytest.approx(evaluation["loss"], rel=1e-3)

    # `rayfine evaluate` (called in-process; the small validation file is read and scored without Ray) prints the
    # table and writes the same numbers.
    from cluster.cli import main

    config = tmp_path / "run.yaml"
    config.write_text((result.run_dir / "config.yaml").read_text())
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(config), "--model", str(result.model_dir), "--output", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(evaluation["accuracy"])


def test_the_served_model_scores_what_evaluation_scored(trained_classifier, tmp_path, ray_local):
    """`rayfine evaluate --endpoint`: the metrics of /v1/classify's answers over the validation file equal the
    ones in eval.json (the plain-transformers pipeline's are checked above)."""
    cfg, result = trained_classifier
    evaluation = json.loads((result.run_dir / "eval.json").read_text())["validation"]
    with served(result.model_dir, "parity-cls") as url:
        served_metrics = evaluate_endpoint_cli(cfg, url, tmp_path)
    assert served_metrics["accuracy"] == pytest.approx(evaluation["accuracy"], abs=0.01)
    assert served_metrics["f1"] == pytest.approx(evaluation["f1"], abs=0.01)
    assert served_metrics["per_class"].keys() == evaluation["per_class"].keys()


def test_a_second_run_with_the_same_name_never_overwrites_a_finished_one(trained_classifier, ray_local):
    cfg, result = trained_classifier
    from training.driver import prepare_run_dir

    renamed, run_dir, resume = prepare_run_dir(cfg)
    assert run_dir == result.run_dir.parent / f"{result.run_dir.name}-2" and not resume
    assert renamed.output.name == run_dir.name and cfg.output.name == result.run_dir.name  # cfg is unchanged
    run_dir.rmdir()
