from pathlib import Path

import pytest
import yaml

from core.config import load_config, parse_overrides
from core.errors import ConfigError
from tests.conftest import REPO

SHIPPED = sorted([REPO / "ray_config.yaml", *REPO.glob("examples/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.task
    assert cfg.output.name


def test_default_config_resolves_packaged_model_and_data_relative_to_file():
    cfg = load_config(REPO / "ray_config.yaml")
    assert Path(cfg.model.name_or_path, "config.json").is_file()
    assert Path(cfg.data.train).is_file() and Path(cfg.data.train).is_absolute()
    assert cfg.output.name == "minilm-sentiment"


def _write(tmp_path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"model": {"name_or_path": "some/model"}, "data": {"train": "train.jsonl"}}


def test_unknown_keys_listed_with_valid_ones(tmp_path):
    bad = {**BASE, "training": {"lr": 0.1, "epochs": 2}, "bogus": 1}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, bad))
    text = err.value.render()
    assert "training.lr: unknown key; valid keys here are method, beta, epochs, learning_rate" in text
    assert "bogus: unknown key" in text
    assert "2 problem(s)" in text


def test_bad_values_are_all_reported_with_their_key(tmp_path):
    bad = {**BASE, "training": {"learning_rate": "fast", "batch_size": 0}, "deepspeed": {"stage": 5}}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, bad))
    text = err.value.render()
    assert "training.learning_rate:" in text and "'fast'" in text
    assert "training.batch_size:" in text and "greater than or equal to 1" in text
    assert "deepspeed.stage:" in text


def test_num_workers_is_auto_by_default_and_otherwise_a_count(tmp_path):
    assert load_config(_write(tmp_path, BASE)).scaling.num_workers == "auto"
    assert load_config(_write(tmp_path, {**BASE, "scaling": {"num_workers": 3}})).scaling.workers() == 3
    for bad in (0, "many", 1.5, True):
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, {**BASE, "scaling": {"num_workers": bad}}))
        assert err.value.render().splitlines()[-1] == (
            f"  - scaling.num_workers: give auto or a whole number of workers, 1 or more (got {bad!r})")


def test_missing_required_sections(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, {"task": "sequence_classification"}))
    assert "model: required" in err.value.render()
    assert "data: required" in err.value.render()


def test_contradictions(tmp_path):
    bad = {**BASE, "deepspeed": {"stage": 2, "offload_params": True},
           "serve": {"num_replicas": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 3},
                     "max_queued_requests": 0}}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, bad))
    text = err.value.render()
    assert "deepspeed.offload_params: needs deepspeed.stage: 3" in text
    assert "serve.num_replicas: set either num_replicas or autoscaling" in text
    assert "serve.max_queued_requests: 0 would refuse every request" in text


def test_a_config_shipped_in_a_package_loads_with_paths_relative_to_it(tmp_path, monkeypatch):
    pkg = tmp_path / "rayfine_job_test"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "t.jsonl").write_text('{"text": "a", "label": 0}\n')
    (pkg / "config.yaml").write_text(yaml.safe_dump({**BASE, "data": {"train": "data/t.jsonl"}}))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config("package:rayfine_job_test/config.yaml")
    assert cfg.data.train == str((pkg / "data" / "t.jsonl").resolve())
    assert cfg.output.name == "config"


def test_set_overrides_parse_yaml_scalars_and_win(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["training.epochs=7", "deepspeed.stage=3",
                                               "training.learning_rate=1e-3", "output.name=x"])
    assert (cfg.training.epochs, cfg.deepspeed.stage, cfg.training.learning_rate) == (7, 3, 1e-3)
    assert cfg.output.name == "x"
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_bad_override_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(_write(tmp_path, BASE), ["training.epochs"])
    path = tmp_path / "broken.yaml"
    path.write_text("task: x\nmodel: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_model_package_is_a_clear_error(tmp_path):
    bad = {**BASE, "model": {"name_or_path": "package:no_such_pkg_xyz/model"}}
    with pytest.raises(ConfigError, match="'no_such_pkg_xyz' is not installed"):
        load_config(_write(tmp_path, bad))


def test_a_loaded_config_cannot_change():
    """Checked once, as a whole: code that needs another value builds another config."""
    import pydantic

    cfg = load_config(raw={"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}})
    with pytest.raises(pydantic.ValidationError):
        cfg.output.name = "other"
    with pytest.raises(pydantic.ValidationError):
        cfg.training = cfg.training
    assert cfg.output.name == "run"


def test_serve_rules_apply_to_a_model_folder_served_with_overrides():
    """`rayfine serve MODEL_DIR --set serve...` is checked by the serve section's own rules."""
    from cluster.serve_command import serve_config_from_overrides

    with pytest.raises(ConfigError) as err:
        serve_config_from_overrides(["serve.num_replicas=2", "serve.autoscaling.max_replicas=3",
                                     "serve.autoscaling.min_replicas=4"])
    text = err.value.render()
    assert "serve.num_replicas: set either num_replicas or autoscaling, not both" in text
    assert "serve.autoscaling.min_replicas: must not exceed max_replicas" in text
    assert serve_config_from_overrides(["serve.num_replicas=2"]).num_replicas == 2
