"""Fault tolerance and invariants of the distributed loop: configurations that must train the same do.

A worker failure inside a run (restart from the last checkpoint) is checked on the session's shared
classification run (``trained_classifier``, which fails once at step 10); a failed run that the same command
resumes, in test_train_dpo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import FAIL_AT, SHARED_CHECKPOINT_EVERY, SHARED_LOG_EVERY
from tests.integration.helpers import classification_config, read_metrics, wait_for_no_actors
from training.driver import train

pytestmark = pytest.mark.integration


def test_worker_failure_restarts_from_checkpoint_and_finishes(trained_classifier):
    cfg, result = trained_classifier
    metrics = read_metrics(result.run_dir)
    logged = [(m["step"], m["resumed_from_step"]) for m in metrics if "loss" in m]
    total = [m for m in metrics if m.get("final")][-1]["step"]
    restart = FAIL_AT // SHARED_CHECKPOINT_EVERY * SHARED_CHECKPOINT_EVERY  # the last checkpoint before it
    # The failure hit at step 10; the worker group restarted from the step-8 checkpoint and trained on to the
    # end without skipping a logged step: every step up to the failure came from the first attempt, every
    # later one from the restarted group.
    steps = [s for s, _ in logged]
    assert sorted(set(steps)) == list(range(SHARED_LOG_EVERY, total + 1, SHARED_LOG_EVERY)), steps
    assert {r for s, r in logged if s <= restart} == {0}
    assert {r for s, r in logged if s > restart} == {restart}
    assert (result.model_dir / "model.safetensors").is_file()
    # The token count resumed with the checkpoint: the steps redone after the restart are counted once. By hand:
    # every training record's tokens (truncated at max_seq_length), once per epoch.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    texts = [json.loads(line)["text"] for line in Path(cfg.data.train).read_text().splitlines()]
    lengths = tokenizer(texts, truncation=True, max_length=cfg.data.max_seq_length)["input_ids"]
    counts = [m["trained_tokens"] for m in metrics if "trained_tokens" in m]
    assert counts == sorted(counts) and counts[-1] == cfg.training.epochs * sum(len(ids) for ids in lengths)


def test_worker_counts_and_zero_stages_train_the_same(tmp_path, tiny_bert, ray_local):
    """Every step sees the whole 8-record training set, so 1 worker x batch 8 under ZeRO-0, 2 workers x batch 4
    under ZeRO-2 and under ZeRO-3 must compute the same losses and weights. ZeRO-3 is asked for the way a native
    DeepSpeed key asks for it (``deepspeed.config.zero_optimization.stage``): the derived config owns the stage,
    so the workers build, report and export a ZeRO-3 engine (its weights gathered from every rank)."""
    from ray._private.state import state

    def data_actors() -> int:
        return sum(a["ActorClassName"] in ("DatasetManager", "SplitCoordinator")
                   for a in state.actor_table(None).values())

    runs, data_actors_before = {}, data_actors()
    for name, workers, batch, deepspeed in (
            ("1x8-zero0", "auto", 8, {"stage": 0}),  # auto: one worker on this CPU-only local instance
            ("2x4-zero2", 2, 4, {"stage": 2}),
            ("2x4-zero3", 2, 4, {"stage": 2, "config": {"zero_optimization": {"stage": 3}}})):
        cfg = classification_config(
            tmp_path / name, tiny_bert, n_train=8, n_val=16,
            training={"batch_size": batch, "epochs": 2, "log_every_steps": 1, "learning_rate": 1e-3},
            scaling={"num_workers": workers}, deepspeed=deepspeed)
        runs[name] = train(cfg)
    # A finished run leaves no actor behind (Ray Train's Ctrl+C handler held the controller until replaced), and
    # runs on small data, held in the object store, start no Ray Data actor at all.
    assert not wait_for_no_actors(("TrainController", "DatasetManager", "SplitCoordinator"), timeout=20)
    assert data_actors() == data_actors_before
    metrics = {name: read_metrics(run.run_dir) for name, run in runs.items()}
    reference = [m["loss"] for m in metrics["2x4-zero2"] if "loss" in m]
    assert len(reference) == 2
    for name, records in metrics.items():
        np.testing.assert_allclose([m["loss"] for m in records if "loss" in m], reference, rtol=2e-4, atol=2e-5,
                                   err_msg=name)
        final = [m["eval_loss"] for m in records if m.get("final")][-1]
        assert final == pytest.approx([m["eval_loss"] for m in metrics["2x4-zero2"] if m.get("final")][-1],
                                      rel=2e-4), name
    assert "DeepSpeed ZeRO-3" in (runs["2x4-zero3"].model_dir / "README.md").read_text()
    from core.config import load_config

    assert load_config(runs["1x8-zero0"].run_dir / "config.yaml").scaling.num_workers == 1  # what it ran with

    from transformers import AutoModelForSequenceClassification

    zero0, zero3, base = (AutoModelForSequenceClassification.from_pretrained(path, num_labels=2) for path in
                          (runs["1x8-zero0"].model_dir, runs["2x4-zero3"].model_dir, tiny_bert))
    for (name, a), b in zip(zero3.named_parameters(), zero0.parameters()):
        assert a.shape == b.shape and a.numel() > 0, name  # a full tensor, not a rank's ZeRO-3 partition
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=1e-5, err_msg=name)
    assert any(not np.allclose(a.detach().numpy(), c.detach().numpy())
               for a, c in zip(zero3.bert.parameters(), base.bert.parameters()))


def test_a_worker_process_starts_with_the_cycle_collector_paused(ray_local):
    """Ray runs ``core.collector``'s setup hook first thing in a process started with ``setup_hook_env`` (a private
    Ray variable, as Ray Train's workers get it); ``resume`` turns the collector back on with what exists frozen."""
    from core import collector
    from core.ray_private import setup_hook_env

    @ray_local.remote(runtime_env=setup_hook_env(collector.SETUP_HOOK))
    def collector_state():
        import gc

        paused = not gc.isenabled()
        collector.resume()
        return paused, gc.isenabled(), gc.get_freeze_count()

    paused, enabled, frozen = ray_local.get(collector_state.remote())
    assert paused and enabled and frozen > 10_000
