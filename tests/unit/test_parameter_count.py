"""The parameter count started before the label count is known (a thread during the pre-flight pass)."""

from __future__ import annotations

import pytest

from core.config import load_config
from training.preflight import count_parameters, start_parameter_count


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification", "question_answering"])
def test_the_early_count_equals_the_meta_device_count(task, tiny_bert):
    cfg = load_config(raw={"task": task, "model": {"name_or_path": str(tiny_bert)}, "data": {"train": "t.jsonl"}})
    count = start_parameter_count(cfg)
    labels = None if task == "question_answering" else 5
    assert count(labels) == count_parameters(cfg, labels)
    if labels:
        assert count(9) == count_parameters(cfg, 9) > count(labels)
