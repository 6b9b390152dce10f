"""Hyperparameter search: Tune trials that are full rayfine Train runs (1 worker each, DeepSpeed ZeRO-2, CPU).

The tiny BERT only starts to separate the classes after ~20 steps at 5e-3, so "bad" trials here are ones whose
learning rate is far too high: their validation loss is clearly worse from the first evaluation on.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time

import pytest

from core.config import MlflowConfig
from core.ray_private import actor_table
from tests.integration.helpers import classification_config, read_metrics, wait_for_no_actors
from training.tune import tune_command

pytestmark = pytest.mark.integration
STEPS = 2 * (64 // 8)  # 2 epochs of 64 records, batch 8, one worker per trial
# The resumed search trains longer, so that the watcher's Ctrl+C lands while its second trial still runs.
RESUME_RECORDS = 128
RESUME_STEPS = 2 * (RESUME_RECORDS // 8)
DIVERGING = 1e6  # the loss is NaN within a few steps


def search_config(tmp_path, model, learning_rates, n_train=64, every=4, **tune):
    """Trials evaluate (ASHA's time unit) and log every ``every`` steps and checkpoint every 8."""
    return classification_config(
        tmp_path, model, n_train=n_train, n_val=32,
        training={"epochs": 2, "eval_every_steps": every, "log_every_steps": every, "checkpoint_every_steps": 8},
        scaling={"num_workers": 1, "threads_per_worker": 1},
        tune={"num_samples": 1, "metric": "eval_loss", "mode": "min",
              "search_space": {"training.learning_rate": {"grid": learning_rates}}, **tune})


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def wait_for_free_cpus(ray, want: float, timeout: float = 30.0) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < want:
        time.sleep(0.5)
    return ray.available_resources().get("CPU", 0)


def test_asha_search_stops_weak_trials_fails_a_diverging_one_and_exports_the_best(tmp_path, tiny_bert, ray_local):
    # Trials 0 and 1 run together. Trial 1's rate makes the loss NaN at its second step: it fails, and the
    # search goes on without it. Trial 2 starts in its place, a full start-up behind trial 0, so rung 1 already
    # holds trial 0's loss when trial 2's far-too-high rate reaches it: trial 2 is stopped at its first evaluation.
    cfg = search_config(tmp_path, tiny_bert, [5e-3, DIVERGING, 2e-1], scheduler="asha", every=8,
                        max_concurrent_trials=2)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={
        "mlflow": MlflowConfig(experiment="search"), "tensorboard": True})})
    result = tune_command(cfg)
    tune_dir = result.tune_dir

    rows = read_csv(tune_dir / "tune_results.csv")
    assert len(rows) == 3 and {r["trial_id"] for r in rows} == {t.trial_id for t in result.trials}
    [diverged] = [r for r in rows if float(r["training.learning_rate"]) == DIVERGING]
    assert diverged["status"] == "failed"
    assert "diverged" in diverged["error"] and "training.learning_rate" in diverged["error"]
    # It ended once, at its step, with a report: the run returned (no worker failure that scaling.max_failures
    # would retry into the same NaN).
    ends = [m for m in read_metrics(tune_dir / f"trial_{diverged['trial_id']}") if "diverged_at_step" in m]
    assert len(ends) == 1 and f"at step {ends[0]['diverged_at_step']};" in diverged["error"]
    rows = [r for r in rows if r is not diverged]
    assert {r["status"] for r in rows} <= {"finished", "stopped early"}
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped, f"ASHA stopped no trial: {rows}"
    for row in stopped:
        assert int(row["steps"]) < STEPS
        assert not any(m.get("final") for m in read_metrics(tune_dir / f"trial_{row['trial_id']}"))
    assert sum(int(r["steps"]) for r in rows) < 2 * STEPS
    # On a local instance no trial (and no other run of this session) started Ray Train's placement-group
    # cleaner: the search's sweeper removed what the stopped trials left.
    assert not [a for a in actor_table().values() if a["ActorClassName"] == "PlacementGroupCleaner"]

    # The best is the finished trial with the lowest final eval loss, and its model is the exported one.
    finished = [r for r in rows if r["status"] == "finished"]
    best = min(finished, key=lambda r: float(r["final_eval_loss"]))
    assert rows[0] == best and result.best.trial_id == best["trial_id"] and rows[0]["rank"] == "1"
    evaluation = json.loads((tune_dir / "eval.json").read_text())["validation"]
    assert evaluation["loss"] == pytest.approx(float(best["final_eval_loss"]), rel=1e-6)
    assert (tune_dir / "plots" / "tune_eval_loss.png").is_file()

    from transformers import AutoModelForSequenceClassification, pipeline

    assert result.model_dir == tune_dir / "model"
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    clf = pipeline("text-classification", model=str(result.model_dir), tokenizer=str(result.model_dir))
    assert clf("the movie was great")[0]["label"] in ("neg", "pos")
    card = (result.model_dir / "README.md").read_text()
    assert str(float(best["training.learning_rate"])) in card or best["training.learning_rate"] in card

    # Tracking: one parent run for the search, one child run per trial, the best one tagged; TensorBoard files per
    # trial, so that `tensorboard --logdir TUNE_DIR` compares them.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tune_dir.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["run_dir"].rsplit("trial_", 1)[1]: r for r in runs if r is not parent}
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial_id"] == best["trial_id"]
    assert set(children) == {r["trial_id"] for r in rows} | {diverged["trial_id"]}
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    assert [t for t, c in children.items() if c.data.tags.get("best_trial") == "true"] == [best["trial_id"]]
    assert children[best["trial_id"]].info.status == "FINISHED"
    assert children[diverged["trial_id"]].info.status == "FAILED"
    assert all(children[r["trial_id"]].info.status == "KILLED" for r in stopped)
    assert parent.data.metrics["final_validation_loss"] == pytest.approx(evaluation["loss"])
    assert (tune_dir / f"trial_{best['trial_id']}" / "tensorboard").is_dir()

    # Stopped trials' Train runs give their workers' CPUs back (no leaked placement groups), and leave no
    # PlacementGroupCleaner actor behind.
    # A killed trial's controller goes with its owner, which on a loaded machine can take a few seconds.
    assert wait_for_free_cpus(ray_local, 4) == 4
    assert not wait_for_no_actors(("TrainController", "PlacementGroupCleaner"))


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, tiny_bert, ray_local):
    cfg = search_config(tmp_path, tiny_bert, [5e-3, 1e-2], n_train=RESUME_RECORDS, scheduler="fifo",
                        max_concurrent_trials=1)
    tune_dir = cfg.run_dir.resolve()
    progress = {}

    def interrupt_when_second_trial_is_checkpointed():
        # Ctrl+C once trial 1 finished and trial 2 passed its step-8 checkpoint.
        while True:
            runs = {p.name: read_metrics(p) for p in tune_dir.glob("trial_*") if (p / "metrics.jsonl").exists()}
            done = [n for n, m in runs.items() if any(r.get("final") for r in m)]
            going = [n for n, m in runs.items() if n not in done and any(r["step"] >= 12 for r in m)]
            if done and going:
                progress.update(done=done[0], going=going[0])
                os.kill(os.getpid(), signal.SIGINT)  # Tune's handler: stop, save the experiment state
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=interrupt_when_second_trial_is_checkpointed, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        tune_command(cfg)
    watcher.join(timeout=5)
    assert progress, "the search ended before the watcher interrupted it"
    assert not (tune_dir / "model").exists() and not (tune_dir / "tune_results.csv").exists()
    first_run = (tune_dir / progress["done"] / "metrics.jsonl").read_text()

    result = tune_command(search_config(tmp_path, tiny_bert, [5e-3, 1e-2], n_train=RESUME_RECORDS, scheduler="fifo",
                                        max_concurrent_trials=1))
    assert result.tune_dir == tune_dir
    assert (tune_dir / progress["done"] / "metrics.jsonl").read_text() == first_run, "finished trial re-ran"
    rows = read_csv(tune_dir / "tune_results.csv")
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    # The interrupted trial continued from its Train checkpoint (step 8), not from the start.
    steps = [m["step"] for m in read_metrics(tune_dir / progress["going"]) if "loss" in m]
    assert steps.count(4) == 1 and steps[-1] == RESUME_STEPS
    assert (result.model_dir / "model.safetensors").is_file()
