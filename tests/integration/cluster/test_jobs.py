"""`rayfine submit / status / stop` against a real two-node cluster (``ray start``) with token auth on."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from core.run_folder import RunFolder, read_records
from tests.conftest import sentiment_rows, write_jsonl
from tests.integration.conftest import VENV_BIN

pytestmark = pytest.mark.integration


def rayfine(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "rayfine"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp_path: Path, model: Path, n_train: int = 64, epochs: int = 1, train_rows=None) -> Path:
    data = tmp_path / "data"
    train = write_jsonl(data / "train.jsonl", train_rows or sentiment_rows(n_train, seed=1))
    val = write_jsonl(data / "val.jsonl", sentiment_rows(16, seed=2))
    raw = {
        "task": "sequence_classification",
        "model": {"name_or_path": str(model)},
        "data": {"train": str(train), "validation": str(val), "max_seq_length": 32},
        "training": {"epochs": epochs, "learning_rate": 5e-3, "batch_size": 8, "log_every_steps": 2,
                     "eval_every_steps": 0, "checkpoint_every_steps": 0},
        "deepspeed": {"stage": 2},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "output": {"name": "sentiment"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def job_id_of(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("submitted job "):
            return line.split()[2]
    raise AssertionError(f"no job id in: {stdout}")


STEPS_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY = 128 // (2 * 8), 3, 4  # 128 records, 2 workers x batch 8


def test_submitted_job_carries_its_data_and_finishes_after_losing_a_node(tmp_path, tiny_bert, ray_head):
    """A job on both nodes (one worker each) loses the worker node mid-run, after its step-4 checkpoint; a new node
    takes its place. Ray Train restarts the worker group from the last checkpoint (scaling.max_failures) and the
    job finishes: every step of the finished model trained once, none skipped."""
    config = write_config(tmp_path, tiny_bert, n_train=128, epochs=EPOCHS)
    storage = ray_head.storage / "submit"
    # An absolute output.dir is where the run goes on the cluster when no --storage is given.
    # scaling.num_workers: auto on the two CPU-only nodes: one worker on each.
    out = rayfine(["submit", str(config), "--address", ray_head.address, "--set", f"output.dir={storage}",
                   "--set", "scaling.num_workers=auto", "--set", "scaling.max_failures=1",
                   "--set", f"training.checkpoint_every_steps={CHECKPOINT_EVERY}",
                   "--set", "training.log_every_steps=1"], ray_head.env)
    assert out.returncode == 0, out.stderr
    assert f"run folder on the cluster: {storage}/sentiment" in out.stdout, out.stdout
    job_id = job_id_of(out.stdout)
    # The job carries copies: the local files can go as soon as it is submitted.
    for path in (tmp_path / "data").iterdir():
        path.unlink()

    follow = rayfine(["status", job_id, "--address", ray_head.address], ray_head.env)
    assert follow.returncode == 0 and f"job {job_id}:" in follow.stdout
    run = storage / "sentiment"
    lost_at = wait_for_step(run, CHECKPOINT_EVERY + 2, job_id, ray_head)  # the step-4 checkpoint is persisted
    ray_head.replace_worker_node()
    assert ray_head.wait_job(job_id, timeout=420) == "SUCCEEDED", ray_head.job_status(job_id)
    status = rayfine(["status", job_id, "--address", ray_head.address], ray_head.env).stdout
    assert f"job {job_id}: SUCCEEDED" in status, status
    assert f"run folder: {storage}/sentiment" in status

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    total = STEPS_PER_EPOCH * EPOCHS
    assert metrics[-1]["step"] == total
    # The first attempt logged steps 1.. up to the loss of the node; the restarted group resumed from a
    # checkpoint at or after step 4 and logged every later step once: none skipped, none trained twice in the
    # finished model (the steps between that checkpoint and the loss were redone, as Ray Train restarts do).
    first = [m["step"] for m in metrics if "loss" in m and m["resumed_from_step"] == 0]
    resumed = {m["resumed_from_step"] for m in metrics if "loss" in m} - {0}
    assert len(resumed) == 1, resumed
    restart = resumed.pop()
    second = [m["step"] for m in metrics if "loss" in m and m["resumed_from_step"] == restart]
    assert first == list(range(1, len(first) + 1)) and len(first) >= lost_at
    assert restart % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= restart <= first[-1]
    assert second == list(range(restart + 1, total + 1))
    tokens = [m["trained_tokens"] for m in metrics if "trained_tokens" in m and m.get("resumed_from_step") == restart]
    per_epoch = [m["trained_tokens"] for m in metrics if m.get("step") == STEPS_PER_EPOCH and "trained_tokens" in m]
    assert tokens[-1] == EPOCHS * per_epoch[0]  # the redone steps counted once
    print(f"node lost after step {first[-1]}; resumed from step {restart}; "
          f"{first[-1] - restart} step(s) redone, {total} in all")

    assert json.loads((run / "model" / "rayfine.json").read_text())["task"] == "sequence_classification"
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    # The run's config points at the copies shipped with the job, not at this machine's (deleted) files.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "rayfine_job_" in saved["data"]["train"] and str(tmp_path) not in saved["data"]["train"]
    assert saved["scaling"]["num_workers"] == 2  # auto, as the job chose it
    logs = httpx.get(f"{ray_head.address}/api/jobs/{job_id}/logs", timeout=30,
                     headers={"Authorization": f"Bearer {ray_head.token}"}).json()["logs"]
    assert "Workers: 2 (auto: no GPU, so one worker on each of 2 nodes using every core" in logs, logs[-2000:]


def wait_for_step(run: Path, step: int, job_id: str, ray_head, timeout: float = 300) -> int:
    """Wait until the run has logged ``step``; returns the last step logged then."""
    deadline, offset, last = time.time() + timeout, 0, 0
    while time.time() < deadline:
        records, offset = read_records(RunFolder(run).metrics, offset)  # complete lines only, each read once
        last = max([last, *(r.get("step", 0) for r in records)])
        if last >= step:
            return last
        assert ray_head.job_status(job_id) in ("PENDING", "RUNNING"), ray_head.job_status(job_id)
        time.sleep(0.1)
    raise AssertionError(f"the job did not reach step {step} in {timeout:.0f}s")


def test_wait_streams_the_log_and_a_failed_job_exits_1_with_its_error(tmp_path, tiny_bert, ray_head):
    rows = sentiment_rows(32, seed=3)
    config = write_config(tmp_path, tiny_bert, train_rows=rows)
    lines = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    lines[4] = '{"text": "cut off'
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")

    out = rayfine(["submit", str(config), "--address", ray_head.address, "--storage", str(ray_head.storage),
                   "--wait"], ray_head.env)
    assert out.returncode == 1, out.stdout
    assert "Checking the data" in out.stdout  # the job's own log, streamed
    assert "failed" in out.stderr and "train.jsonl:5" in out.stderr, out.stderr
    assert not (ray_head.storage / "sentiment").exists()  # bad data is refused before a run folder exists


def test_a_cluster_without_rayfine_on_its_path_says_so(tmp_path, tiny_bert, ray_head):
    """The job's processes get the PATH of `ray start`; here it lacks the venv (as when it was not activated)."""
    from ray.job_submission import JobSubmissionClient

    from cluster.jobs import job_entrypoint

    client = JobSubmissionClient(ray_head.address, headers={"Authorization": f"Bearer {ray_head.token}"})
    job_id = client.submit_job(entrypoint=job_entrypoint("train", "rayfine_job_missing"),
                               runtime_env={"env_vars": {"PATH": "/usr/bin:/bin"}})
    assert ray_head.wait_job(job_id, timeout=120) == "FAILED"
    out = rayfine(["status", job_id, "--address", ray_head.address], ray_head.env)
    assert out.returncode == 0 and "exit code 127" in out.stdout, out.stdout
    assert "rayfine is not installed on the cluster, or not on the PATH of the process that ran `ray start`" \
        in out.stdout, out.stdout
    assert "entrypoint: rayfine train package:rayfine_job_missing/config.yaml" in out.stdout, out.stdout


def test_stop_ends_a_running_job(tmp_path, tiny_bert, ray_head):
    config = write_config(tmp_path, tiny_bert, n_train=512, epochs=20)
    out = rayfine(["submit", str(config), "--address", ray_head.address, "--storage",
                   str(ray_head.storage / "stop")], ray_head.env)
    assert out.returncode == 0, out.stderr
    job_id = job_id_of(out.stdout)
    assert ray_head.wait_job(job_id, ("RUNNING", "SUCCEEDED", "FAILED", "STOPPED"), timeout=120) == "RUNNING"
    stop = rayfine(["stop", job_id, "--address", ray_head.address], ray_head.env)
    assert stop.returncode == 0 and f"job {job_id}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert "STOPPED" in rayfine(["status", job_id, "--address", ray_head.address], ray_head.env).stdout


def test_token_auth_and_unknown_jobs_are_user_errors(ray_head):
    no_token = {k: v for k, v in ray_head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    out = rayfine(["status", "raysubmit_x", "--address", ray_head.address], no_token)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "RAY_AUTH_TOKEN" in out.stderr, out.stderr

    out = rayfine(["status", "raysubmit_nope", "--address", ray_head.address], ray_head.env)
    assert out.returncode == 1 and "no job raysubmit_nope" in out.stderr, out.stderr

    out = rayfine(["stop", "raysubmit_nope", "--address", "127.0.0.1:6379"], ray_head.env)
    assert out.returncode == 1 and "http://HEAD:8265" in out.stderr, out.stderr
