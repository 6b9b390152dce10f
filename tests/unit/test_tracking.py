"""Experiment tracking without a training run: a tracking server that does not answer never fails a run, and
what is logged is read back (MLflow's SQLite store with MlflowClient, TensorBoard's event reader)."""

from __future__ import annotations

import socket
import time

import pytest

from core.config import load_config
from training.tracking import RunTracker, flatten


def config(tmp_path, **tracking):
    return load_config(raw={"model": {"name_or_path": "some-model"}, "data": {"train": "x.jsonl"},
                            "output": {"dir": str(tmp_path / "runs"), "name": "r"}, "tracking": tracking})


def test_config_flattens_to_parameters():
    assert flatten({"training": {"learning_rate": 1e-4, "epochs": 2}, "model": {"lora": {"target_modules": ["q", "v"]},
                                                                              "revision": None}}) == {
        "training.learning_rate": "0.0001", "training.epochs": "2", "model.lora.target_modules": '["q", "v"]'}


def test_an_mlflow_server_that_does_not_answer_never_fails_the_run(tmp_path, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path, mlflow={"tracking_uri": f"http://127.0.0.1:{port}"}, tensorboard=True)
    started = time.monotonic()
    tracker = RunTracker(cfg, tmp_path / "runs" / "r").start()
    tracker.log([{"step": 1, "loss": 0.5, "time": time.time()}])
    tracker.finish({"validation": {"accuracy": 0.9}})
    assert time.monotonic() - started < 60
    assert tracker.mlflow is None
    assert "MLflow tracking failed and is off for the rest of this run" in caplog.text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "r" / "tensorboard"))  # the other tracker went on
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    cfg = config(tmp_path, mlflow={})
    run_dir = tmp_path / "runs" / "r"
    first = RunTracker(cfg, run_dir).start()
    first.log([{"step": 1, "loss": 0.9, "time": time.time()}])
    first.finish(failed=True)  # interrupted
    second = RunTracker(cfg, run_dir).start()
    assert second.run_id == first.run_id
    second.log([{"step": 2, "loss": 0.4, "time": time.time()}])
    second.finish({"validation": {"accuracy": 1.0}})
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("rayfine").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["final_validation_accuracy"] == pytest.approx(1.0)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 0.9), (2, 0.4)]


def test_wandb_offline_keeps_the_history_in_the_run_folder(tmp_path):
    from tests.conftest import read_wandb_run

    cfg = config(tmp_path, wandb={"project": "rayfine-tests", "mode": "offline", "tags": ["unit"]})
    run_dir = tmp_path / "runs" / "r"
    tracker = RunTracker(cfg, run_dir).start()
    assert tracker.wandb is not None
    tracker.log([{"step": s, "loss": 1.0 / s, "lr": 1e-3, "time": time.time()} for s in (1, 2, 3)])
    tracker.finish({"validation": {"accuracy": 0.75, "per_class": {"a": 1}}})
    history, summary = read_wandb_run(run_dir)
    assert [(h["_step"], h["loss"]) for h in history if "loss" in h] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert summary["final_validation_accuracy"] == 0.75
