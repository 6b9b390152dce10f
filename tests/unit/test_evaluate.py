"""``rayfine evaluate`` on small local data: read, checked and scored in the command's own process (the Ray Data
path for larger data is checked against the same numbers in tests/integration/test_train_classification.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cluster.cli import main
from tests.conftest import write_jsonl
from tests.serve_fixtures import CLS_LABELS

ROWS = [{"text": "the movie was great", "label": "positive"}, {"text": "the meal was awful", "label": "negative"},
        {"text": "a lovely hotel", "label": "positive"}, {"text": "the show was poor", "label": "negative"},
        {"text": "an excellent book and a fine album", "label": "positive"}]


def config_file(tmp_path, model_dir, validation) -> str:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"task": "sequence_classification", "model": {"name_or_path": str(model_dir)},
                                    "data": {"train": str(validation), "validation": str(validation),
                                             "max_seq_length": 32}}))
    return str(path)


def test_metrics_of_small_local_data_equal_a_pipeline_run_by_hand(tmp_path, tiny_models, capsys):
    model_dir = tiny_models["sequence_classification"]
    data = write_jsonl(tmp_path / "val.jsonl", ROWS)
    out = tmp_path / "metrics.json"
    assert main(["evaluate", config_file(tmp_path, model_dir, data), "--model", str(model_dir),
                 "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert "accuracy" in capsys.readouterr().out

    from transformers import pipeline

    clf = pipeline("text-classification", model=str(model_dir), tokenizer=str(model_dir))
    predicted = [p["label"] for p in clf([r["text"] for r in ROWS])]
    assert set(predicted) <= set(CLS_LABELS)
    assert metrics["num_examples"] == len(ROWS)
    assert metrics["accuracy"] == pytest.approx(np.mean([p == r["label"] for p, r in zip(predicted, ROWS)]))


def test_bad_records_and_unknown_labels_name_their_line(tmp_path, tiny_models, capsys):
    model_dir = tiny_models["sequence_classification"]
    good = write_jsonl(tmp_path / "val.jsonl", ROWS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps({"label": "positive"}) + "\n")
    config = config_file(tmp_path, model_dir, good)
    out = tmp_path / "metrics.json"
    assert main(["evaluate", config, "--model", str(model_dir), "--data", str(bad), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and f"{bad}:3:" in err and "Traceback" not in err, err
    assert not out.exists()

    unknown = write_jsonl(tmp_path / "unknown.jsonl", ROWS[:2] + [{"text": "so so", "label": "meh"}])
    assert main(["evaluate", config, "--model", str(model_dir), "--data", str(unknown)]) == 1
    err = capsys.readouterr().err
    assert f"{unknown}:3: label 'meh' is not one the model knows (negative, positive)" in err, err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["evaluate", config, "--model", str(model_dir), "--data", str(empty)]) == 1
    assert "no records" in capsys.readouterr().err
