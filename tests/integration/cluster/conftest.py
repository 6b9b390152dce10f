"""The two-node cluster of the tests in this package, started the way users start one (``ray start --head`` and a
second ``ray start --address``), with the Jobs API and token authentication on.

Package-scoped: it stops as soon as the package's last test has run, so it never idles under the rest of the suite
(``tests/conftest.py`` runs this package first in its worker, before any in-process Ray starts there).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import VENV_BIN


@dataclass
class RayHead:
    address: str  # the Jobs API (dashboard), http://127.0.0.1:PORT
    gcs_address: str
    env: dict  # for subprocesses: the cluster's token and the venv's bin on PATH
    storage: Path  # a folder for run folders, reachable from both nodes
    token: str
    root: Path = Path()  # the cluster's temp folder (logs, Ray's session)
    procs: list = field(default_factory=list)  # `ray start --block` of the head, then of the worker node

    def replace_worker_node(self) -> None:
        """Lose the worker node the way a machine dies (every process of it killed at once: its raylet, agents
        and the Ray workers running there), then start a new worker node in its place, as an autoscaler or
        KubeRay would."""
        import psutil

        node = psutil.Process(self.procs[1].pid)
        for proc in [*node.children(recursive=True), node]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.procs[1].wait(timeout=30)
        self.procs[1] = _ray_start(["--address", self.gcs_address, "--node-ip-address", "127.0.0.1",
                                    "--num-cpus", "2"], self.env, self.root / "worker-2.log")

    def job_status(self, job_id: str) -> str:
        """A Ray job's status from the cluster's Jobs REST API (in-process: polling spawns no process)."""
        import httpx

        response = httpx.get(f"{self.address}/api/jobs/{job_id}", timeout=30,
                             headers={"Authorization": f"Bearer {self.token}"})
        assert response.status_code == 200, response.text
        return response.json()["status"]

    def wait_job(self, job_id: str, statuses: tuple[str, ...] = ("SUCCEEDED", "FAILED", "STOPPED"),
                 timeout: float = 300) -> str:
        """Poll until the job's status is one of ``statuses`` (or ``timeout`` passes); returns the last one."""
        deadline = time.time() + timeout
        while True:
            status = self.job_status(job_id)
            if status in statuses or time.time() >= deadline:
                return status
            time.sleep(1)


_PORTS: list[int] = []


def _free_port() -> int:
    """A free port not handed out before in this session: the kernel may hand the same one out twice in a row,
    and Ray refuses two of its components on one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS:
            _PORTS.append(port)
            return port


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    for flag in ports:
        args += [flag, str(_free_port())]
    return subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _count_nodes(dashboard: str, token: str) -> int:
    """Alive nodes, from the state API behind the dashboard (in-process: polling spawns no `ray status`)."""
    import httpx

    try:
        response = httpx.get(f"{dashboard}/api/v0/nodes", params={"limit": 100}, timeout=10,
                             headers={"Authorization": f"Bearer {token}"})
        nodes = response.json()["data"]["result"]["result"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return 0  # the dashboard is not up yet
    return sum(node.get("state") == "ALIVE" for node in nodes)


@pytest.fixture(scope="package")
def ray_head():
    # A short temp dir: Ray's socket paths must fit in 107 characters.
    root = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))
    token = secrets.token_hex(16)
    from core.ray_connect import prepare_local_env

    prepare_local_env()  # the cluster's processes get the same settings as a local instance's
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TOKENIZERS_PARALLELISM": "false",
           # A lost node is declared dead after 3 failed health checks 1 s apart (Ray's default: 5, 3 s apart);
           # a check still waits up to 10 s for a busy raylet's answer.
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = _free_port(), _free_port()
    gcs = f"127.0.0.1:{gcs_port}"
    procs = [_ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                         "--ray-client-server-port", str(_free_port()), "--num-cpus", "2",
                         "--temp-dir", str(root / "ray")], env, root / "head.log")]
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if procs[0].poll() is not None:
                raise RuntimeError(f"ray start --head exited: {(root / 'head.log').read_text()[-3000:]}")
            if _count_nodes(dashboard, token) >= 1:
                break
            time.sleep(0.5)
        procs.append(_ray_start(["--address", gcs, "--node-ip-address", "127.0.0.1", "--num-cpus", "2"],
                                env, root / "worker.log"))
        while time.time() < deadline and _count_nodes(dashboard, token) < 2:
            time.sleep(0.5)
        assert _count_nodes(dashboard, token) == 2, (root / "worker.log").read_text()[-3000:]
        storage = root / "storage"
        storage.mkdir()
        yield RayHead(address=dashboard, gcs_address=gcs, env=env, storage=storage,
                      token=token, root=root, procs=procs)
    finally:
        # A throwaway cluster: end every process of both nodes at once (a SIGTERM drains for 30 s).
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        _kill_matching(str(root), f"RAY_AUTH_TOKEN={token}".encode())
        shutil.rmtree(root, ignore_errors=True)


def _kill_matching(text: str, env_entry: bytes) -> None:
    """Processes of the cluster that left its process group: their command lines name its temp dir, or (Serve's
    HAProxy, whose files are elsewhere) their environment holds its token."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (text in cmdline or env_entry in environ) and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
