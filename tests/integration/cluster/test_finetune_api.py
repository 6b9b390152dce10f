"""``rayfine api`` end to end: the real server process, a real Ray cluster (head + worker node, token auth) and
the official ``openai`` package.

A tiny BERT base model and a tiny Llama (LoRA). In order: a malformed upload is refused naming its line; a job whose
validation file has a label the training file lacks fails in validating_files; a DPO job on the Llama is
validated, submitted and cancelled (and its Ray job is stopped); a job runs to succeeded while the server is
restarted mid-run (the restarted server reconciles it from Ray and the run folder); its fine-tuned model, run
folder and checkpoints are checked; two LoRA jobs on the Llama succeed and their ``ft:`` models answer chat
completions at the same base URL, from one replica holding one copy of the base, next to the classifier answering
/v1/classify; a deleted model stops answering; a final restart lists every job with the same status and the models
still answer. DPO training itself is tested in test_train_dpo.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, sentiment_rows, write_jsonl

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.integration

API_KEY = "sk-rayfine-test"
BASE = "tiny"
LM = "tiny-lm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """``rayfine api`` as a subprocess; ``restart`` keeps its data dir and port."""

    def __init__(self, base_config: Path, lm_config: Path, ray_head, data_dir: Path, log: Path):
        self.port = free_port()
        serve_port = free_port()
        self.log = log
        self.cmd = [str(Path(sys.executable).parent / "rayfine"), "api", f"{BASE}={base_config}", f"{LM}={lm_config}",
                    "--address", ray_head.address, "--data-dir", str(data_dir),
                    "--storage", str(ray_head.storage / "api-runs"), "--port", str(self.port),
                    "--driver-cpus", "0.5", "--serve-url", f"http://127.0.0.1:{serve_port}", "--wandb-mode", "offline",
                    "--set", f"serve.port={serve_port}", "--set", "serve.cpus_per_replica=0.5",
                    "--set", "serve.threads_per_replica=1", "--set", "serve.max_new_tokens=16"]
        self.env = dict(ray_head.env) | {"RAYFINE_API_KEYS": API_KEY}
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        out = open(self.log, "a")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.time() + 90
        import httpx

        while time.time() < deadline:
            assert self.proc.poll() is None, f"rayfine api exited:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"rayfine api did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def api(ray_head, tiny_bert, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune-api")
    default_train = write_jsonl(tmp / "default-train.jsonl", sentiment_rows(32, seed=9))
    base = tmp / "tiny.yaml"
    base.write_text(yaml.safe_dump({
        "task": "sequence_classification",
        "model": {"name_or_path": str(tiny_bert)},
        "data": {"train": str(default_train), "max_seq_length": 32},
        "training": {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8, "warmup_ratio": 0.0,
                     "log_every_steps": 2, "eval_every_steps": 0, "checkpoint_every_steps": 0},
        "deepspeed": {"stage": 2},
        "scaling": {"num_workers": 1, "use_gpu": False},
    }))
    lm = tmp / "tiny-lm.yaml"
    lm.write_text(yaml.safe_dump({
        "task": "causal_lm", "model": {"name_or_path": str(tiny_llama), "lora": {"enabled": True, "r": 4}},
        "data": {"train": str(default_train), "max_seq_length": 48},
        "training": {"epochs": 1, "learning_rate": 5e-3, "batch_size": 8, "warmup_ratio": 0.0, "log_every_steps": 1},
        "deepspeed": {"stage": 2}, "scaling": {"num_workers": 1, "use_gpu": False},
    }))
    server = ApiServer(base, lm, ray_head, tmp / "data", tmp / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdk(api):
    return openai.OpenAI(base_url=api.url, api_key=API_KEY, max_retries=2)


@pytest.fixture(scope="module")
def jobs_client(ray_head):
    """The Ray job's own status, from the cluster's Jobs REST API."""
    return RayJobs(ray_head)


class RayJobs:
    def __init__(self, ray_head):
        self.ray_head = ray_head

    def wait(self, job_id: str, timeout: float) -> str:
        return self.ray_head.wait_job(job_id, timeout=timeout)


def upload(sdk, rows: list[dict], name: str):
    return sdk.files.create(file=(name, io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())),
                            purpose="fine-tune")


def wait_for(sdk, job_id: str, statuses: set[str], timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    events = [e.message for e in sdk.fine_tuning.jobs.list_events(job_id, limit=100)]
    raise AssertionError(f"{job_id} is {job.status} after {timeout}s; events: {events}")


def test_a_malformed_upload_is_refused_naming_the_line(sdk):
    content = b'{"text": "fine", "label": "pos"}\n{"text": "no closing brace", "label": "neg"\n'
    with pytest.raises(openai.BadRequestError) as err:
        sdk.files.create(file=("broken.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert err.value.status_code == 400 and err.value.code == "invalid_file"
    assert "broken.jsonl" in err.value.message and "line 2: malformed JSON" in err.value.message


def test_a_bad_validation_file_fails_the_job_in_validating_files(sdk):
    train = upload(sdk, sentiment_rows(32, seed=1), "train.jsonl")
    val = upload(sdk, sentiment_rows(2, seed=2) + [{"text": "the show was fine", "label": "neutral"}], "val.jsonl")
    job = sdk.fine_tuning.jobs.create(model=BASE, training_file=train.id, validation_file=val.id)
    assert job.status == "validating_files"
    failed = wait_for(sdk, job.id, {"failed"}, timeout=30)
    assert failed.error.code == "invalid_validation_file" and failed.error.param == "validation_file"
    assert "line 3: label 'neutral' never appears in the training file" in failed.error.message
    assert failed.fine_tuned_model is None


def test_a_dpo_job_is_validated_submitted_and_cancelled(sdk, jobs_client):
    from tests.conftest import preference_rows

    # A DPO job on the Llama base: its preference records pass the upload and job checks, it is submitted as a
    # Ray job, and cancel stops that Ray job.
    train = upload(sdk, preference_rows(32, seed=6), "pairs.jsonl")
    val = upload(sdk, preference_rows(8, seed=7), "pairs-val.jsonl")
    job = sdk.fine_tuning.jobs.create(model=LM, training_file=train.id, validation_file=val.id, suffix="dpo", method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 20}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    deadline = time.time() + 60
    while not any(e.message.startswith("Submitted to the Ray cluster")
                  for e in sdk.fine_tuning.jobs.list_events(job.id, limit=50)):
        assert time.time() < deadline, "the job was never submitted"
        time.sleep(0.5)
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert cancelled.method.type == "dpo" and cancelled.fine_tuned_model is None
    assert jobs_client.wait(f"rayfine-{job.id}", timeout=60) == "STOPPED"
    with pytest.raises(openai.BadRequestError):
        sdk.fine_tuning.jobs.cancel(job.id)
    assert "The job has been cancelled" in [e.message for e in sdk.fine_tuning.jobs.list_events(job.id)]


def test_a_job_runs_to_succeeded_across_a_server_restart(api, sdk, jobs_client, ray_head):
    rows = sentiment_rows(48, seed=4)
    train = upload(sdk, rows, "train.jsonl")
    val = upload(sdk, sentiment_rows(16, seed=5), "val.jsonl")
    job = sdk.fine_tuning.jobs.create(
        model=BASE, training_file=train.id, validation_file=val.id, suffix="e2e", seed=11,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0}}},
        integrations=[{"type": "wandb", "wandb": {"project": "e2e", "tags": ["api"]}}])
    assert job.integrations[0].wandb.project == "e2e"
    running = wait_for(sdk, job.id, {"running"}, timeout=90)
    assert running.trained_tokens is None  # as OpenAI: known once the job has succeeded

    api.stop()  # the job goes on without the server; the restarted server reconciles it
    assert jobs_client.wait(f"rayfine-{job.id}", timeout=240) == "SUCCEEDED"
    api.start()

    done = wait_for(sdk, job.id, {"succeeded", "failed"}, timeout=60)
    assert done.status == "succeeded", done.error
    expected = f"ft:{BASE}:e2e:{job.id}"
    assert done.fine_tuned_model == expected and done.finished_at >= done.created_at
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.batch_size == 8 and done.seed == 11

    run_dir = ray_head.storage / "api-runs" / job.id
    assert json.loads((run_dir / "model" / "rayfine.json").read_text())["model_id"] == expected
    # trained_tokens by hand: every training record's tokens (truncated at max_seq_length), once per epoch.
    from transformers import AutoTokenizer

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(config["model"]["name_or_path"])
    lengths = tokenizer([r["text"] for r in rows], truncation=True, max_length=config["data"]["max_seq_length"])
    assert done.trained_tokens == 2 * sum(len(ids) for ids in lengths["input_ids"])
    assert done.estimated_finish is None
    assert expected in [m.id for m in sdk.models.list()]

    events = [e for e in sdk.fine_tuning.jobs.list_events(job.id, limit=5)]  # paged 5 at a time
    messages = [e.message for e in reversed(events)]  # oldest first
    for text in ("Created fine-tuning job", "Validating training file", "Files validated",
                 "Submitted to the Ray cluster", "Fine-tuning job started", "Step 2/12: training loss=",
                 "final validation loss=", "Checkpoint created at step", "New fine-tuned model created",
                 "The job has successfully completed"):
        assert any(text in m for m in messages), f"no event with {text!r}:\n" + "\n".join(messages)
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(isinstance(e.data["step"], int) for e in metrics)

    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints, "no checkpoints recorded"
    for ckpt in checkpoints:
        assert ckpt.id.startswith("ftckpt-") and ckpt.fine_tuning_job_id == job.id
        assert ckpt.fine_tuned_model_checkpoint == f"{expected}:ckpt-step-{ckpt.step_number}"
        assert ckpt.metrics.step == ckpt.step_number
    assert max(c.step_number for c in checkpoints) == 12  # 48 records / 8 per step x 2 epochs
    assert checkpoints[0].metrics.full_valid_loss is not None

    # The wandb integration was applied to the run (rayfine api --wandb-mode offline: W&B files in the run folder).
    from tests.conftest import read_wandb_run

    history, _ = read_wandb_run(run_dir)
    assert [h["_step"] for h in history if "loss" in h][-1] == 12
    assert done.integrations[0].wandb.project == "e2e"

    log = api.log.read_text()
    assert f"{job.id}: queued -> running" in log and f"{job.id}: running -> succeeded" in log


def served(api, path: str, body: dict):
    import httpx

    return httpx.post(f"{api.url}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def test_fine_tuned_models_answer_at_the_same_base_url(api, sdk):
    from tests.conftest import chat_rows

    train = upload(sdk, chat_rows(32, seed=3), "chat.jsonl")
    # A validation file of its own: 10% held out of 32 records by a hash of the (random) file id holds none out
    # for about one upload in thirty, which fails the job by design (tests/unit/test_api_http.py).
    val = upload(sdk, chat_rows(4, seed=4), "chat-val.jsonl")
    jobs = [sdk.fine_tuning.jobs.create(model=LM, training_file=train.id, validation_file=val.id, suffix=suffix,
                                        seed=seed, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}})
        for suffix, seed in (("a", 1), ("b", 2))]
    done = [wait_for(sdk, job.id, {"succeeded", "failed", "cancelled"}, timeout=300) for job in jobs]
    assert [j.status for j in done] == ["succeeded", "succeeded"], [j.error for j in done]
    model_a, model_b = (j.fine_tuned_model for j in done)
    ids = [m.id for m in sdk.models.list()]
    assert model_a in ids and model_b in ids and sdk.models.retrieve(model_a).owned_by == "user"

    question = [{"role": "user", "content": "what is the capital of peru?"}]
    started = time.time()
    first = sdk.chat.completions.create(model=model_a, messages=question, max_tokens=8, temperature=0)
    first_answer_s = time.time() - started  # the model server deploys at start; this loads base + adapter
    assert first.model == model_a and first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 8
    again = sdk.chat.completions.create(model=model_a, messages=question, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content  # greedy: the same text
    stream = sdk.chat.completions.create(model=model_b, messages=question, max_tokens=8, temperature=0,
                                         stream=True)
    chunks = list(stream)
    assert chunks and all(c.model == model_b for c in chunks) and chunks[-1].choices[0].finish_reason
    print(f"first answer of {model_a}: {first_answer_s:.1f}s")

    # Both adapters sit on one replica, on one copy of the base model.
    import httpx

    status = httpx.get(f"{api.url}/serving", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()
    assert status["state"] == "ready"
    replica = status["replica"]
    assert {model_a, model_b} <= set(replica["models_loaded"])
    assert [sorted(b["models"]) for b in replica["base_models_loaded"]] == [sorted([model_a, model_b])]

    # The classifier of the earlier job answers /v1/classify by its id; a causal LM's id there is refused.
    classifier = next(j.fine_tuned_model for j in sdk.fine_tuning.jobs.list() if j.model == BASE
                      and j.status == "succeeded")
    labels = served(api, "/classify", {"model": classifier, "input": ["the movie was great", "the hotel was awful"]})
    assert labels.status_code == 200, labels.text
    data = labels.json()["data"]
    assert len(data) == 2 and all(set(d["scores"]) == {"pos", "neg"} and d["label"] in d["scores"] for d in data)
    assert labels.json()["model"] == classifier
    wrong = served(api, "/classify", {"model": model_a, "input": "fine"})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "unsupported_endpoint"

    with pytest.raises(openai.NotFoundError) as err:
        sdk.chat.completions.create(model="ft:tiny-lm:nope:ftjob-missing", messages=question)
    assert err.value.code == "model_not_found"
    deleted = sdk.models.delete(model_b)
    assert deleted.deleted and deleted.id == model_b
    with pytest.raises(openai.NotFoundError) as err:
        sdk.chat.completions.create(model=model_b, messages=question)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve(model_b)
    assert model_b not in [m.id for m in sdk.models.list()]
    run_b = Path(api.cmd[api.cmd.index("--storage") + 1]) / done[1].id
    assert (run_b / "model" / "adapter_config.json").is_file()  # deleting a model keeps its run folder


def test_a_restart_keeps_every_job_and_status(api, sdk):
    before = {j.id: (j.status, j.fine_tuned_model) for j in sdk.fine_tuning.jobs.list(limit=100)}
    assert sorted(s for s, _ in before.values()) == ["cancelled", "failed", "succeeded", "succeeded", "succeeded"]
    api.restart()
    after = {j.id: (j.status, j.fine_tuned_model) for j in sdk.fine_tuning.jobs.list(limit=100)}
    assert after == before
    assert len(list(sdk.files.list())) == 8
    assert os.path.isfile(Path(api.cmd[api.cmd.index("--data-dir") + 1]) / "api.sqlite3")
    # The models still answer after the restart (the models app kept running on the cluster).
    model_a = next(m for _, m in after.values() if m and m.startswith(f"ft:{LM}:a:"))
    answer = sdk.chat.completions.create(model=model_a, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.model == model_a
