"""What a submitted job carries: local data copied into its package, URIs untouched, clear errors."""

from __future__ import annotations

import pytest

from cluster.jobs import JobState, _package_data, failure_reason, jobs_address
from core.errors import UserError


def test_files_folders_and_globs_are_copied_and_uris_pass_through(tmp_path):
    (tmp_path / "shards").mkdir()
    for i in range(3):
        (tmp_path / "shards" / f"part-{i}.jsonl").write_text(f'{{"text": "t{i}", "label": 0}}\n')
    (tmp_path / "val.csv").write_text("text,label\na,0\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.parquet").write_bytes(b"PAR1")
    data = {"train": [str(tmp_path / "shards" / "part-*.jsonl"), "s3://bucket/more/*.jsonl"],
            "validation": str(tmp_path / "val.csv"), "test": str(tmp_path / "folder"), "format": "auto"}
    dest = tmp_path / "pkg" / "data"

    packed = _package_data(data, dest)

    assert packed["train"] == ["data/train-1/part-*.jsonl", "s3://bucket/more/*.jsonl"]
    assert sorted(p.name for p in (dest / "train-1").iterdir()) == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    assert packed["validation"] == "data/validation-2/val.csv"
    assert (dest / "validation-2" / "val.csv").read_text() == "text,label\na,0\n"
    assert packed["test"] == "data/test-3/folder"
    assert (dest / "test-3" / "folder" / "a.parquet").read_bytes() == b"PAR1"
    assert packed["format"] == "auto" and data["validation"] == str(tmp_path / "val.csv")  # input untouched


def test_missing_local_data_names_the_path_and_the_way_out(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl not found on this machine.*--data-on-cluster"):
        _package_data({"train": str(tmp_path / "nope.jsonl")}, tmp_path / "pkg")
    with pytest.raises(UserError, match="matches no file"):
        _package_data({"train": str(tmp_path / "*.jsonl")}, tmp_path / "pkg2")


def test_the_jobs_api_needs_an_http_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(UserError, match="--address http://HEAD:8265"):
        jobs_address(None)
    with pytest.raises(UserError, match="HTTP address"):
        jobs_address("10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert jobs_address(None) == "http://head:8265"


def test_failure_reason_keeps_the_jobs_own_error_lines():
    message = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
               "Checking the data ...\nerror: 1 problem(s) in the data:\n  train.jsonl:5: not valid JSON\n\n"
               "later noise\n")
    reason = failure_reason(JobState(job_id="j", status="FAILED", message=message))
    assert reason == (": Job entrypoint command failed with exit code 1\n  error: 1 problem(s) in the data:\n"
                      "    train.jsonl:5: not valid JSON")


def test_the_run_folder_goes_where_the_user_said(monkeypatch):
    from cluster.jobs import run_storage
    from core.config import RunConfig

    def cfg(out_dir: str) -> RunConfig:
        return RunConfig.model_validate({"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                                         "output": {"dir": out_dir, "name": "r"}})

    monkeypatch.delenv("RAYFINE_STORAGE", raising=False)
    assert run_storage(cfg("/mnt/shared/runs"), None) == "/mnt/shared/runs"  # absolute: meant for the cluster
    assert run_storage(cfg("/mnt/shared/runs"), "/elsewhere") == "/elsewhere"  # --storage wins
    assert run_storage(cfg("runs"), None) == "~/rayfine/runs"  # relative to this machine: the cluster default
    monkeypatch.setenv("RAYFINE_STORAGE", "/env/runs")
    assert run_storage(cfg("runs"), None) == "/env/runs"


def test_a_cluster_without_rayfine_gets_an_explanation_not_a_bare_exit_code(tmp_path):
    import subprocess

    from cluster.jobs import display_entrypoint, job_entrypoint

    entrypoint = job_entrypoint("run", "rayfine_job_x")
    assert display_entrypoint(entrypoint) == "rayfine run package:rayfine_job_x/config.yaml --detach"
    done = subprocess.run(entrypoint, shell=True, env={"PATH": str(tmp_path)}, capture_output=True, text=True)
    assert done.returncode == 127
    assert done.stderr.startswith("error: rayfine is not installed on the cluster, or not on the PATH")
    assert f"PATH={tmp_path}" in done.stderr
    # Ray's message when the job's log has no such line (another entrypoint): the same explanation.
    bare = JobState(job_id="j", status="FAILED", message="Job entrypoint command failed with exit code 127")
    assert "rayfine is not installed on the cluster" in failure_reason(bare)
