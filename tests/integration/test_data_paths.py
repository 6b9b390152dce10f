"""Small local data is read, checked and tokenized in the driver (training.data.IN_PROCESS_MAX_BYTES) and held in
Ray's object store; larger or remote data is read in Ray Data tasks. Both paths must report the same pre-flight and
hand the workers the same rows in the same order. (The session's shared classification run,
conftest.trained_classifier, trains on the Ray Data path.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.config import load_config
from core.errors import UserError
from tests.conftest import chat_rows, sentiment_rows, write_jsonl
from training import data
from training.driver import build_datasets
from training.preflight import summarize_data

pytestmark = pytest.mark.integration


def config(tmp_path, case: str, tiny_bert, tiny_llama, rows=None):
    if case == "classification":  # validation carved out of train, and a test file
        raw = {"task": "sequence_classification", "model": {"name_or_path": str(tiny_bert)},
               "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows or sentiment_rows(120, seed=3))),
                        "test": str(write_jsonl(tmp_path / "test.jsonl", sentiment_rows(20, seed=4))),
                        "validation_split": 0.2, "max_seq_length": 16}}
    else:  # chat records, two shards, a validation file
        raw = {"task": "causal_lm", "model": {"name_or_path": str(tiny_llama)},
               "data": {"train": [str(write_jsonl(tmp_path / "a.jsonl", chat_rows(30, seed=1))),
                                  str(write_jsonl(tmp_path / "b.jsonl", rows or chat_rows(30, seed=2)))],
                        "validation": str(write_jsonl(tmp_path / "val.jsonl", chat_rows(8, seed=5))),
                        "max_seq_length": 64}}
    raw["output"] = {"dir": str(tmp_path / "runs")}
    return load_config(raw=raw)


def plain(rows: list[dict]) -> list[str]:
    return [json.dumps({k: np.asarray(v).tolist() for k, v in sorted(r.items())}) for r in rows]


@pytest.mark.parametrize("case", ["classification", "chat"])
def test_the_driver_reads_small_data_as_ray_data_does(case, tmp_path, tiny_bert, tiny_llama, ray_local, monkeypatch):
    cfg = config(tmp_path, case, tiny_bert, tiny_llama)
    in_driver = summarize_data(cfg)
    assert in_driver.records is not None and in_driver.records_for(cfg) is in_driver.records
    monkeypatch.setattr(data, "IN_PROCESS_MAX_BYTES", 0)
    in_ray = summarize_data(cfg)
    assert in_ray.records is None

    assert in_driver.counts == in_ray.counts and set(in_driver.counts) == {"train", "validation"} | (
        {"test"} if case == "classification" else set())
    assert in_driver.label_counts == in_ray.label_counts and in_driver.stats == in_ray.stats
    assert in_driver.where == in_ray.where
    assert (in_driver.labels.names if in_driver.labels else None) == (in_ray.labels.names if in_ray.labels else None)
    for split, lengths in in_ray.lengths.items():
        assert in_driver.lengths[split].tolist() == lengths.tolist(), split

    # The workers' rows: the same, in the same order (a restart skips the batches it has seen by their order).
    ours, theirs = build_datasets(cfg, in_driver.labels, in_driver), build_datasets(cfg, in_ray.labels, in_ray)
    assert set(ours) == set(theirs)
    for split in theirs:
        expected = plain(theirs[split].take_all())
        assert expected and plain(data.HeldSplit(ray_local.get(ours[split])).take_all()) == expected, split


def test_a_tune_trial_that_reads_differently_reads_again(tmp_path, tiny_bert, tiny_llama, ray_local):
    cfg = config(tmp_path, "classification", tiny_bert, tiny_llama)
    summary = summarize_data(cfg)
    assert summary.records_for(cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"learning_rate": 1e-3})})) is summary.records  # a training key: the same records
    carved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"validation_split": 0.5})})
    assert summary.records_for(carved) is None
    datasets = build_datasets(carved, summary.labels, summary)  # read again, with the trial's own carve
    assert datasets["validation"].count() > summary.counts["validation"]


@pytest.mark.parametrize("case", ["classification", "chat"])
def test_bad_records_are_reported_alike_on_both_paths(case, tmp_path, tiny_bert, tiny_llama, ray_local, monkeypatch):
    rows = (sentiment_rows(20, seed=3) + [{"text": "no label"}, {"label": "pos"}] if case == "classification"
            else chat_rows(5, seed=2) + [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "x"}])
    cfg = config(tmp_path, case, tiny_bert, tiny_llama, rows=rows)
    with pytest.raises(UserError) as in_driver:
        summarize_data(cfg)
    monkeypatch.setattr(data, "IN_PROCESS_MAX_BYTES", 0)
    with pytest.raises(UserError) as in_ray:
        summarize_data(cfg)
    assert in_driver.value.problems == in_ray.value.problems and len(in_ray.value.problems) == 2
    bad = "train.jsonl:21" if case == "classification" else "b.jsonl:6"
    assert bad in in_driver.value.problems[0]
