"""The two-node cluster tests (test_jobs.py, test_finetune_api.py), when they ran beside the suite in a child
pytest (tests/conftest.py): their outcome, reported here at the end of the session."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.integration


def test_the_cluster_tests_pass_beside_the_suite(request):
    started = getattr(request.config, "rayfine_background", None)
    if started is None:
        pytest.skip("the cluster tests run in this session itself (or were not selected)")
    child, log, count = started
    try:
        child.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    output = log.read_text()
    print(output[-4000:])  # their durations, in the captured output
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert child.returncode == 0, f"the cluster tests failed (full log: {log}):\n{output[-12000:]}"
    assert f"{count} passed" in summary, summary
