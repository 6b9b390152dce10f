"""OpenAI hyperparameters -> the job's run config (pure functions, no server)."""

from __future__ import annotations

import pytest

from cluster.api.errors import APIError
from cluster.api.hyperparams import base_total_batch, build_job_config, resolve, split_batch
from core.config import load_config


def base_config(**training):
    return load_config(raw={
        "task": "sequence_classification",
        "model": {"name_or_path": "some-model"},
        "data": {"train": "/operator/train.jsonl", "validation": "/operator/val.jsonl", "test": "/operator/test.jsonl",
                 "format": "csv", "max_seq_length": 64},
        "training": {"epochs": 3, "learning_rate": 2e-4, "batch_size": 8, "gradient_accumulation_steps": 1,
                     "seed": 7, **training},
        "scaling": {"num_workers": 2},
        "tune": {"enabled": True, "search_space": {"training.learning_rate": {"loguniform": [1e-5, 1e-3]}}},
        "output": {"dir": "/operator/runs", "name": "operator-run"},
    })


def test_auto_keeps_the_base_values():
    base = base_config(gradient_accumulation_steps=2)
    hp = resolve(base)
    assert hp.public() == {"n_epochs": 3, "batch_size": 8 * 2 * 2, "learning_rate_multiplier": 1.0}
    assert (hp.per_worker_batch_size, hp.gradient_accumulation_steps, hp.learning_rate) == (8, 2, 2e-4)
    assert resolve(base, None, None, None) == hp


def test_learning_rate_multiplier_multiplies_the_base_rate():
    hp = resolve(base_config(), learning_rate_multiplier=0.5)
    assert hp.learning_rate == pytest.approx(1e-4)
    assert hp.learning_rate_multiplier == 0.5


def test_n_epochs_sets_training_epochs():
    assert resolve(base_config(), n_epochs=5).n_epochs == 5


@pytest.mark.parametrize("total, expected", [
    (8, (4, 1)),     # under the base micro batch: one micro-batch of 4 per worker
    (16, (8, 1)),    # exactly the base per-worker batch
    (32, (8, 2)),    # twice: accumulate two micro-batches of the base size
    (48, (8, 3)),
    (40, (5, 4)),    # 20 per worker: the fewest equal micro-batches no larger than 8
    (2, (1, 1)),
])
def test_batch_size_is_the_total_over_workers_and_accumulation(total, expected):
    micro, accumulation = split_batch(total, workers=2, max_micro=8)
    assert (micro, accumulation) == expected
    assert micro * accumulation * 2 == total
    assert micro <= 8


def test_batch_size_must_split_evenly_over_workers():
    with pytest.raises(APIError) as err:
        resolve(base_config(), batch_size=7)
    assert err.value.status == 400 and err.value.param == "hyperparameters.batch_size"
    assert "multiple of this model's 2 training workers" in err.value.message and "6 or 8" in err.value.message


def test_job_config_is_the_base_plus_hyperparameters_only():
    base = base_config()
    hp = resolve(base, n_epochs=1, batch_size=32, learning_rate_multiplier=2)
    cfg = build_job_config(base, hp, seed=123, train_path="/data/files/file-a.jsonl", validation_path=None,
                           storage="/data/runs", job_id="ftjob-abc", model_id="ft:base:s:ftjob-abc")
    assert cfg.training.epochs == 1
    assert cfg.training.learning_rate == pytest.approx(4e-4)
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (8, 2)
    assert base_total_batch(cfg) == 32
    assert cfg.training.seed == 123
    assert cfg.data.train == "/data/files/file-a.jsonl"
    assert cfg.data.validation is None and cfg.data.test is None and cfg.data.format == "jsonl"
    assert cfg.data.max_seq_length == 64  # the operator's data defaults stay
    assert not cfg.tune.enabled and cfg.tune.search_space == {}
    assert (cfg.output.dir, cfg.output.name, cfg.output.model_id) == ("/data/runs", "ftjob-abc", "ft:base:s:ftjob-abc")
    assert base.training.epochs == 3 and base.output.name == "operator-run"  # the base config is not changed


def test_a_base_with_auto_workers_trains_each_job_on_one_worker():
    auto = load_config(raw={**base_config().model_dump(mode="json"), "scaling": {"num_workers": "auto"}})
    assert base_total_batch(auto) == 8
    hp = resolve(auto, batch_size=24)  # not a multiple of 2: fine for one worker
    assert (hp.per_worker_batch_size, hp.gradient_accumulation_steps) == (8, 3)
    cfg = build_job_config(auto, hp, seed=1, train_path="/f/a.jsonl", validation_path=None, storage="/r",
                           job_id="ftjob-w", model_id="ft:m::ftjob-w")
    assert cfg.scaling.num_workers == 1  # the count the total batch was split for, whatever the cluster has


def test_method_dpo_sets_the_training_method_and_beta():
    base = load_config(raw={"task": "causal_lm", "model": {"name_or_path": "m"},
                            "data": {"train": "t.jsonl", "validation": "v.jsonl", "packing": True},
                            "training": {"beta": 0.2}})
    auto = resolve(base, method="dpo")
    assert auto.public()["beta"] == 0.2  # "auto": the base config's beta
    hp = resolve(base, method="dpo", beta=0.5)
    cfg = build_job_config(base, hp, seed=1, train_path="/f/a.jsonl", validation_path=None, storage="/r",
                           job_id="ftjob-d", model_id="ft:m::ftjob-d")
    assert (cfg.training.method, cfg.training.beta, cfg.data.packing) == ("dpo", 0.5, False)
    sft = build_job_config(base, resolve(base), seed=1, train_path="/f/a.jsonl", validation_path=None,
                           storage="/r", job_id="ftjob-s", model_id="ft:m::ftjob-s")
    assert sft.training.method == "sft" and sft.data.packing and "beta" not in resolve(base).public()
    with pytest.raises(APIError) as err:
        resolve(base_config(), method="dpo")
    assert err.value.status == 400 and "method dpo tunes a causal language model" in err.value.message


def test_a_base_that_holds_out_nothing_needs_a_validation_file():
    base = base_config()
    base = base.model_copy(update={"data": base.data.model_copy(update={"validation_split": 0.0})})
    with pytest.raises(APIError) as err:
        build_job_config(base, resolve(base), seed=1, train_path="/t.jsonl", validation_path=None, storage="/s",
                         job_id="ftjob-x", model_id="ft:b::ftjob-x")
    assert err.value.param == "validation_file"
