"""`rayfine serve` as a process the way users and supervisors run it: a port already taken, and a SIGTERM to its
whole process group (what `timeout`, systemd's control-group kill and many supervisors send)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.ingress import LOCAL_ENV
from tests.integration.conftest import VENV_BIN
from tests.serve_fixtures import free_port

pytestmark = pytest.mark.integration


def cli_env() -> dict:
    """A user's shell: no Ray of this test session (its address, its ingress ports), the venv on PATH."""
    env = {key: value for key, value in os.environ.items() if key not in LOCAL_ENV and key != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_serving(port: int, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until the server says it serves (and waits for Ctrl-C) and its /healthz answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"rayfine serve exited early:\n{log.read_text()}"
        if "Ctrl-C to stop" in log.read_text():
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            return
        time.sleep(0.5)
    raise AssertionError(f"not serving on port {port} within {timeout}s:\n{log.read_text()}")


def session_processes(sid: int) -> list[tuple[int, str]]:
    """Live processes (pid, name) of a session (Ray's workers and Serve's HAProxy keep the session of the process
    that started the local instance, though each worker has a process group of its own)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append((proc.pid, proc.name()))
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def test_taken_port_and_a_process_group_sigterm(tiny_models, tmp_path):
    model, port, env = str(tiny_models["sequence_classification"]), free_port(), cli_env()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(VENV_BIN / "rayfine"), "serve", model, "--set", f"serve.port={port}"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_serving(port, server, log)

        # A second server on the same port: one line saying which port and how to pick another, before Ray starts.
        second = subprocess.run([str(VENV_BIN / "rayfine"), "serve", model, "--set", f"serve.port={port}"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"serve.port {port} on 127.0.0.1 is already in use" in second.stderr, second.stderr
        assert "--set serve.port=" in second.stderr and "Traceback" not in second.stderr, second.stderr
        assert "Serving" not in second.stdout

        # SIGTERM to the whole group: Ray's own daemons get it too. The server still stops within its deadline.
        started = time.monotonic()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=90)
        took = time.monotonic() - started
        output = log.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode == 0, output
    assert "stopping" in output and "Traceback" not in output, output
    assert took < 45, f"stopping took {took:.0f}s"
    # Processes that are not the server's children are reaped by init a moment after they die.
    deadline = time.monotonic() + 5
    while session_processes(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_processes(server.pid)
    assert left == [], f"processes of the stopped server's Ray instance are left: {left}"
    # Nothing holds the port: a new server listens on it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_a_finished_command_ends_its_instance_and_only_that(tmp_path):
    """``stop_local_ray`` at the end of a command kills every process of the local instance it started, at once,
    and none of the command's other children (here a stand-in for a tracker's service process)."""
    script = tmp_path / "child.py"
    script.write_text("""
import subprocess, sys, time
import ray
from cluster.ray_start import local_raylet_pids, start_ray, stop_local_ray
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
start_ray()
assert ray.get(ray.remote(lambda: 1).remote()) == 1
raylets = local_raylet_pids()
started = time.monotonic()
stop_local_ray()
print("took", time.monotonic() - started, "raylets", raylets, "other", other.pid, "alive", other.poll() is None)
other.kill()
""")
    proc = subprocess.Popen([str(VENV_BIN / "python"), str(script)], cwd=Path(__file__).resolve().parents[2],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    words = stdout.split()
    took, alive = float(words[words.index("took") + 1]), words[words.index("alive") + 1]
    assert alive == "True", stdout  # not the instance's
    assert took < 5, stdout  # killed at once: no grace period per process, no wait for init to reap them
    assert "Traceback" not in stderr, stderr
    deadline = time.monotonic() + 5  # processes that are not the script's children are reaped by init
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(proc.pid) == []
