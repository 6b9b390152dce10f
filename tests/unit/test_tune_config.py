"""The tune section: search-space validation against the schema, and the search's bookkeeping (no Ray cluster)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from core.config import load_config, parse_search_space
from core.errors import ConfigError, UserError
from tests.conftest import REPO

BASE = {"model": {"name_or_path": "some/model"}, "data": {"train": "train.jsonl"}}


def with_space(space_yaml: str, **tune) -> dict:
    return {**BASE, "tune": {"search_space": yaml.safe_load(space_yaml), **tune}}


def problems_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(raw=raw)
    return err.value.render()


def test_issue_search_space_is_valid_and_typed():
    # The issue's own example: YAML reads 1e-5 (no dot) as a string; it is accepted as the number it means.
    cfg = load_config(raw=with_space("""
        training.learning_rate: {loguniform: [1e-5, 1e-3]}
        training.batch_size: {choice: [8, 16]}
        model.lora.r: {choice: [8, 16]}
        training.warmup_ratio: {uniform: [0.0, 0.2]}
        training.epochs: {randint: [1, 4]}
        deepspeed.stage: {grid: [0, 2]}
    """))
    parsed, problems = parse_search_space(cfg.tune.search_space)
    assert problems == []
    assert parsed["training.learning_rate"] == ("loguniform", [1e-5, 1e-3])
    assert parsed["training.batch_size"] == ("choice", [8, 16])
    assert all(isinstance(v, int) for v in parsed["training.batch_size"][1])
    assert parsed["training.epochs"] == ("randint", [1, 4])
    assert parsed["deepspeed.stage"] == ("grid", [0, 2])


def test_dpo_beta_is_searchable():
    parsed, problems = parse_search_space({"training.beta": {"loguniform": [0.05, 0.5]},
                                           "training.method": {"choice": ["dpo"]}})
    assert problems == [] and parsed["training.beta"] == ("loguniform", [0.05, 0.5])
    assert problems_of(with_space("training.beta: {uniform: [-1.0, 0.5]}")) != ""


@pytest.mark.parametrize("space, expected", [
    ("training.lr: {loguniform: [1.0e-5, 1.0e-3]}",
     "tune.search_space.training.lr: not a config path; valid keys under training are method, beta, epochs"),
    ("model.lora: {choice: [8]}", "tune.search_space.model.lora: not a config path"),
    ("deepspeed.config.zero_optimization: {choice: [1]}", "tune.search_space.deepspeed.config.zero_optimization:"),
    ("tune.num_samples: {choice: [1, 2]}", "tune.search_space.tune.num_samples: not a searchable config path"),
    ("learning_rate: {choice: [0.1]}", "tune.search_space.learning_rate: not a searchable config path"),
    ("training.batch_size: {uniform: [8, 16]}",
     "tune.search_space.training.batch_size: uniform: samples real numbers but this key takes integers"),
    ("training.batch_size: {loguniform: [8, 32]}", "training.batch_size: loguniform: samples real numbers"),
    ("training.batch_size: {choice: [8, 16.5]}", "training.batch_size: choice: 16.5 does not fit this key"),
    ("training.batch_size: {choice: [0, 8]}", "greater than or equal to 1"),
    ("training.epochs: {randint: [1.5, 4]}", "training.epochs: randint: expected [low, high] integers"),
    ("training.epochs: {randint: [4, 4]}", "training.epochs: randint: expected [low, high] integers"),
    ("training.warmup_ratio: {uniform: [0.0, 2.0]}", "training.warmup_ratio: uniform: 2.0 does not fit this key"),
    ("training.learning_rate: {loguniform: [0, 1.0e-3]}", "loguniform: expected [low, high] with 0 < low < high"),
    ("training.learning_rate: {uniform: [1.0e-3, 1.0e-5]}", "uniform: expected [low, high] with low < high"),
    ("training.learning_rate: {loguniform: [fast, slow]}", "loguniform: expected [low, high]"),
    ("training.learning_rate: {loguniform: [1.0e-5]}", "loguniform: expected [low, high]"),
    ("training.learning_rate: 0.001", "tune.search_space.training.learning_rate: expected one distribution of"),
    ("training.learning_rate: {normal: [0, 1]}", "expected one distribution of loguniform, uniform, randint"),
    ("training.learning_rate: {choice: [1.0e-4], grid: [1.0e-3]}", "expected one distribution"),
    ("training.lr_scheduler: {choice: [linear, exponential]}", "choice: 'exponential' does not fit this key"),
    ("deepspeed.stage: {grid: [0, 5]}", "deepspeed.stage: grid: 5 does not fit this key"),
    ("model.lora.enabled: {choice: [maybe]}", "model.lora.enabled: choice: 'maybe' does not fit"),
    ("training.seed: {choice: []}", "training.seed: choice: expected a list"),
])
def test_bad_search_space_is_rejected_with_the_key(space, expected):
    assert expected in problems_of(with_space(space))


def test_every_search_space_problem_is_listed_once_per_line():
    text = problems_of(with_space("""
        training.lr: {loguniform: [1.0e-5, 1.0e-3]}
        training.batch_size: {uniform: [8, 16]}
    """))
    assert "2 problem(s)" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("  - ")]
    assert any(ln.startswith("  - tune.search_space.training.lr:") for ln in lines)
    assert any(ln.startswith("  - tune.search_space.training.batch_size:") for ln in lines)


def test_optuna_takes_no_grid_and_only_plain_choices():
    text = problems_of(with_space("""
        deepspeed.stage: {grid: [0, 2]}
        model.lora.target_modules: {choice: [[query, value], [key]]}
    """, search_alg="optuna"))
    assert "tune.search_space.deepspeed.stage: optuna does not take grid" in text
    assert "tune.search_space.model.lora.target_modules: optuna chooses among plain values" in text
    load_config(raw=with_space("model.lora.target_modules: {choice: [[query, value], [key]]}"))  # random: fine


def test_other_tune_keys_are_checked_like_every_section():
    text = problems_of({**BASE, "tune": {"scheduler": "hyperband", "mode": "up", "reduction_factor": 1,
                                         "num_sample": 4}})
    for key in ("tune.scheduler:", "tune.mode:", "tune.reduction_factor:", "tune.num_sample: unknown key"):
        assert key in text


def test_validate_cli_reports_a_bad_search_space_without_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(with_space("training.batch_size: {uniform: [8, 16]}")))
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "validate", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "tune.search_space.training.batch_size: uniform: samples real numbers" in proc.stderr


def test_example_tune_config_parses():
    cfg = load_config(REPO / "examples" / "minilm_sequence_classification_tune.yaml")
    assert (REPO / "examples" / "minilm_sequence_classification_tune.yaml").read_text().startswith(
        "# `.venv/bin/rayfine tune examples/minilm_sequence_classification_tune.yaml`")
    parsed, problems = parse_search_space(cfg.tune.search_space)
    assert problems == [] and cfg.tune.enabled and "training.learning_rate" in parsed


# ---- the search's bookkeeping (training.tune imports Ray's Tune library, but starts nothing) ---------------

def test_param_space_uses_tune_samplers():
    from ray.tune.search.sample import Categorical, Float, Integer

    from training.tune import build_param_space

    space = build_param_space(yaml.safe_load("""
        training.learning_rate: {loguniform: [1e-5, 1e-3]}
        training.batch_size: {choice: [8, 16]}
        training.epochs: {randint: [1, 4]}
        deepspeed.stage: {grid: [0, 2]}
    """))
    assert isinstance(space["training.learning_rate"], Float)
    assert space["training.learning_rate"].lower == 1e-5 and space["training.learning_rate"].upper == 1e-3
    assert isinstance(space["training.batch_size"], Categorical)
    assert isinstance(space["training.epochs"], Integer)
    assert space["deepspeed.stage"] == {"grid_search": [0, 2]}
    with pytest.raises(UserError, match="tune.search_space: empty"):
        build_param_space({})


def test_trial_config_applies_sampled_values_and_owns_the_trial_folder(tmp_path):
    from training.tune import trial_config

    base = load_config(raw=with_space("training.batch_size: {choice: [8, 16]}"))
    cfg = trial_config(base, {"training.batch_size": np.int64(8), "training.learning_rate": np.float64(3e-4),
                              "model.lora.r": 4}, tmp_path / "trial_abc_00001")
    assert cfg.training.batch_size == 8 and type(cfg.training.batch_size) is int
    assert cfg.training.learning_rate == 3e-4 and cfg.model.lora.r == 4
    assert cfg.run_dir == tmp_path / "trial_abc_00001"
    assert base.training.batch_size == 16  # the base config is untouched
    with pytest.raises(ConfigError, match="deepspeed.offload_params: needs deepspeed.stage: 3"):
        trial_config(base, {"deepspeed.offload_params": True, "deepspeed.stage": 2}, tmp_path / "t")


def test_trials_are_ranked_finished_first_then_by_final_metric():
    from training.tune_results import FAILED, FINISHED, STOPPED, TrialRow, rank_trials

    rows = [TrialRow("a", STOPPED, {}, final=0.2), TrialRow("b", FINISHED, {}, final=0.5),
            TrialRow("c", FAILED, {}, final=None, error="boom"), TrialRow("d", FINISHED, {}, final=0.3),
            TrialRow("e", FINISHED, {}, final=float("nan"))]
    assert [r.trial_id for r in rank_trials(rows, "min")] == ["d", "b", "e", "a", "c"]
    assert [r.trial_id for r in rank_trials(rows, "max")] == ["b", "d", "e", "a", "c"]


def test_results_csv_has_a_row_per_trial_with_params_metrics_and_status(tmp_path):
    from training.tune_results import FAILED, FINISHED, TrialRow, format_ranked_table, write_results_csv

    rows = [TrialRow("x_00000", FINISHED, {"training.learning_rate": 5e-3}, final=0.31, best=0.3, iterations=4,
                     steps=32, wall_time_s=12.5),
            TrialRow("x_00001", FAILED, {"training.learning_rate": 1e3}, final=None, best=None, iterations=2,
                     steps=8, wall_time_s=4.0, error="training failed: loss is nan at step 9")]
    write_results_csv(rows, tmp_path / "tune_results.csv", "eval_loss")
    with open(tmp_path / "tune_results.csv") as f:
        out = list(csv.DictReader(f))
    assert list(out[0]) == ["rank", "trial_id", "status", "training.learning_rate", "final_eval_loss",
                            "best_eval_loss", "iterations", "steps", "wall_time_s", "error"]
    assert out[0]["trial_id"] == "x_00000" and float(out[0]["final_eval_loss"]) == 0.31
    assert out[1]["status"] == "failed" and out[1]["final_eval_loss"] == "" and "nan" in out[1]["error"]
    table = format_ranked_table(rows, "eval_loss")
    assert table.splitlines()[0].split()[:4] == ["rank", "trial", "status", "learning_rate"]
    assert "x_00001: training failed: loss is nan at step 9" in table


def test_error_line_finds_the_message_inside_rays_traceback():
    from training.tune_results import error_line

    text = ("ray.exceptions.RayTaskError(UserError): ray::ImplicitFunc.train() (pid=1)\n"
            '  File "training/driver.py", line 211, in fit_run\n'
            '    raise UserError(f"training failed: {_root_cause(exc)}\\n  The run folder {run_dir} keeps "\n'
            "core.errors.UserError: training failed: loss is nan at step 10: training diverged; lower "
            "training.learning_rate\n  The run folder /x keeps its checkpoints\n")
    assert error_line(text) == ("training failed: loss is nan at step 10: training diverged; lower "
                                "training.learning_rate")
    assert error_line("something odd") == "something odd"


def test_resuming_refuses_a_changed_search(tmp_path):
    from core.config import dump_config
    from training.tune import check_same_search

    cfg = load_config(raw=with_space("training.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}"))
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    check_same_search(cfg, tmp_path)
    changed = load_config(raw={**with_space("training.learning_rate: {loguniform: [1.0e-5, 1.0e-2]}"),
                               "training": {"epochs": 5}})
    with pytest.raises(UserError) as err:
        check_same_search(changed, tmp_path)
    assert "training.epochs" in str(err.value) and "tune.search_space.training.learning_rate" in str(err.value)


def test_reports_reach_tune_only_at_evaluations_numbered_across_a_resume(tmp_path, monkeypatch):
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.tune import ReportToTune

    sent = []
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)  # needs a Tune session otherwise
    monkeypatch.setattr(TuneReportCallback, "after_report", lambda self, ctx, metrics, ckpt: sent.append(metrics[0]))
    # metrics.jsonl of an interrupted trial: evaluations at steps 4 and 8 (and a log-only record at 6).
    records = [{"step": 4, "loss": 0.7, "eval_loss": 0.6}, {"step": 6, "loss": 0.7},
               {"step": 8, "loss": 0.7, "eval_loss": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cb = ReportToTune("eval_loss", tmp_path)
    cb.after_report(None, [{"step": 10, "loss": 0.5}], None)  # log only: not for Tune
    cb.after_report(None, [{"step": 12, "loss": 0.5, "eval_loss": 0.4, "eval_report": "{...}"}], None)
    cb.after_report(None, [{"step": 12, "eval_loss": 0.4}], None)  # the same step again (a worker restart)
    cb.after_report(None, [{"step": 16, "eval_loss": 0.3, "final": True}], None)
    assert [(m["step"], m["evaluation"]) for m in sent] == [(12, 3), (12, 3), (16, 4)]
    assert "eval_report" not in sent[0]


def test_tune_config_wires_scheduler_searcher_and_concurrency():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from training.tune import EVALUATION, build_param_space, build_tune_config

    space = "training.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}\ntraining.batch_size: {choice: [8, 16]}"
    asha = build_tune_config(load_config(raw=with_space(space, grace_period=2, reduction_factor=3)), 2)
    assert isinstance(asha.scheduler, ASHAScheduler) and asha.scheduler._time_attr == EVALUATION
    assert asha.scheduler._reduction_factor == 3
    assert [milestone for milestone, _ in asha.scheduler._brackets[0]._rungs][-3:] == [18, 6, 2]  # grace 2, x3
    # The random/grid generator limits concurrency itself; Tune would ignore max_concurrent_trials for it.
    assert isinstance(asha.search_alg, BasicVariantGenerator) and asha.search_alg.max_concurrent == 2
    assert asha.max_concurrent_trials is None

    optuna = build_tune_config(load_config(raw=with_space(space, scheduler="fifo", search_alg="optuna")), 3)
    assert isinstance(optuna.scheduler, FIFOScheduler) and isinstance(optuna.search_alg, OptunaSearch)
    assert optuna.max_concurrent_trials == 3  # Tune wraps a Searcher in a ConcurrencyLimiter
    searcher = optuna.search_alg
    assert searcher.set_search_properties("eval_loss", "min", build_param_space(yaml.safe_load(space)))
    sample = searcher.suggest("t0")
    assert 1e-5 <= sample["training.learning_rate"] <= 1e-3 and sample["training.batch_size"] in (8, 16)
