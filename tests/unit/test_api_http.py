"""The HTTP API without a cluster: uploads, limits, auth, ids, pagination, job creation and validation.

The app runs with its real store and runner thread; its Ray address points at a closed port, so jobs that
pass validation wait in ``queued`` (the runner retries) and everything before submission is real.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from cluster.api.app import build_app
from cluster.api.settings import ApiSettings, load_base_models
from tests.conftest import sentiment_rows

NO_CLUSTER = "http://127.0.0.1:9"


def make_settings(tmp_path: Path, **overrides) -> ApiSettings:
    base = tmp_path / "minilm.yaml"
    base.write_text(yaml.safe_dump({
        "task": "sequence_classification", "model": {"name_or_path": "some-model"},
        "data": {"train": "unused.jsonl"}, "training": {"batch_size": 8, "learning_rate": 1e-4},
        "scaling": {"num_workers": 2}}))
    values = dict(base_models=load_base_models([str(base)]), data_dir=tmp_path / "data", storage=tmp_path / "runs",
                  address=NO_CLUSTER, poll_interval_s=0.1)
    return ApiSettings(**(values | overrides))


@pytest.fixture
def client(tmp_path):
    with TestClient(build_app(make_settings(tmp_path))) as c:
        yield c


def jsonl(rows: list[dict]) -> bytes:
    # Jobs without a validation file hold out 10% of the training records (data.validation_split) by a hash of
    # file name and line: 100 records hold some out for any file id (0.9 ** 100 < 0.003%); 20 could miss (12%).
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(client: TestClient, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune"):
    return client.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})


def chunked_upload(size: int):
    """A multipart upload body as a generator (sent with Transfer-Encoding: chunked)."""
    yield b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    yield b'--XX\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
    line = b'{"text": "x", "label": "a"}\n'
    for _ in range(size // len(line) + 1):
        yield line
    yield b"\r\n--XX--\r\n"


def wait_for_status(client: TestClient, job_id: str, statuses: set[str], timeout: float = 20.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {job['status']}")


def test_upload_list_retrieve_download_delete(client):
    content = jsonl(sentiment_rows(10))
    created = upload(client, content).json()
    assert created["object"] == "file" and created["id"].startswith("file-")
    assert (created["bytes"], created["filename"], created["purpose"], created["status"]) == (
        len(content), "train.jsonl", "fine-tune", "processed")
    assert client.get(f"/v1/files/{created['id']}").json() == created
    assert client.get(f"/v1/files/{created['id']}/content").content == content
    listed = client.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [created["id"]]
    assert client.delete(f"/v1/files/{created['id']}").json() == {"id": created["id"], "object": "file",
                                                                  "deleted": True}
    assert client.get(f"/v1/files/{created['id']}").status_code == 404


def test_a_malformed_upload_is_refused_naming_the_line(client, tmp_path):
    content = jsonl(sentiment_rows(3)) + b'{"text": "broken", "label": \n'
    r = upload(client, content, name="mine.jsonl")
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "file", "invalid_file")
    assert err["message"].startswith("Invalid file 'mine.jsonl'") and "line 4: malformed JSON" in err["message"]
    assert list((tmp_path / "data" / "files").iterdir()) == []  # nothing kept


@pytest.mark.parametrize("bad_line, problem", [
    (b'{"text": "t", "label": ' + b"9" * 5000 + b"}", "line 3: a number with too many digits"),
    (b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "line 3: JSON nested too deeply"),
    (b'{"text": "' + b"a" * (5 * 2**20) + b'", "label": "pos"}', "line 3: the line is longer than 4 MiB"),
])
def test_hostile_lines_are_refused_naming_the_line(client, tmp_path, bad_line, problem):
    content = jsonl(sentiment_rows(2)) + bad_line + b"\n" + jsonl(sentiment_rows(1))
    r = upload(client, content)
    assert r.status_code == 400 and problem in r.json()["error"]["message"], r.text
    assert list((tmp_path / "data" / "files").iterdir()) == []


def test_a_last_line_without_a_newline_still_counts(client):
    rows = sentiment_rows(12)
    content = jsonl(rows).rstrip(b"\n")
    r = upload(client, content)
    assert r.status_code == 200 and r.json()["bytes"] == len(content)
    assert upload(client, b'{"text": "x", "label"').status_code == 400  # a cut-off last line names line 1


def test_only_fine_tune_uploads(client):
    r = upload(client, jsonl(sentiment_rows(3)), purpose="batch")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = client.post("/v1/files", data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_uploads_over_the_cap_get_413(tmp_path):
    settings = make_settings(tmp_path, max_upload_bytes=1024)
    with TestClient(build_app(settings)) as c:
        kept = upload(c, jsonl(sentiment_rows(5))).json()["id"]  # under the cap
        small_over = jsonl(sentiment_rows(100))  # a few KB: over the file cap, caught while copying
        r = upload(c, small_over)
        assert r.status_code == 413
        assert r.json()["error"]["message"] == ("The file is larger than this server's upload limit of 1,024 bytes "
                                                "(rayfine api --max-upload-mb).")
        assert r.json()["error"]["code"] == "file_too_large"
        big = b"x" * (200 * 1024)  # over the request cap: refused from Content-Length
        r = upload(c, big)
        assert r.status_code == 413 and r.json()["error"]["param"] == "file"
        r = c.post("/v1/files", content=chunked_upload(200 * 1024),  # no Content-Length: counted as it streams
                   headers={"content-type": "multipart/form-data; boundary=XX"})
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert [p.name for p in (tmp_path / "data" / "files").iterdir()] == [f"{kept}.jsonl"]


@pytest.mark.parametrize("path", ["/v1/files/../../etc/passwd", "/v1/files/..%2F..%2Fetc%2Fpasswd",
                                  "/v1/files/%2e%2e", "/v1/files/file-x'%20OR%20'1'='1",
                                  "/v1/files/..%2F..%2Fetc%2Fpasswd/content", "/v1/fine_tuning/jobs/..%2Fapi.sqlite3"])
def test_ids_never_reach_the_file_system(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "root:" not in r.text


def test_api_keys(tmp_path):
    with TestClient(build_app(make_settings(tmp_path, api_keys=frozenset({"k1", "k2"})))) as c:
        r = c.get("/v1/files")
        assert r.status_code == 401
        assert r.json()["error"] == {"message": "Missing or invalid API key: send 'Authorization: Bearer KEY'.",
                                     "type": "authentication_error", "param": None, "code": "invalid_api_key"}
        assert c.get("/v1/files", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/files", headers={"Authorization": "Basic k1"}).status_code == 401
        assert c.get("/v1/files", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.post("/v1/files", files={"file": ("t.jsonl", b"{}")}, data={"purpose": "fine-tune"}).status_code == 401
        assert c.get("/healthz").status_code == 200  # probes need no key
        # Any bytes in the header are a wrong key (401), never a server error.
        for raw in ("Bearer sk-é".encode(), b"Bearer \xff\xfe", "Bearer k1é".encode("latin-1")):
            r = c.get("/v1/files", headers={"Authorization": raw})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", raw
    with TestClient(build_app(make_settings(tmp_path, api_keys=frozenset({"clé-1"})))) as c:
        assert c.get("/v1/files", headers={"Authorization": "Bearer clé-1".encode()}).status_code == 200


def test_unknown_model_names_the_available_ones(client):
    file_id = upload(client, jsonl(sentiment_rows(10))).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": file_id})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "The model 'gpt-4o-mini' does not exist; available base models: minilm.",
                                 "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


@pytest.mark.parametrize("body, param", [
    ({"training_file": "file-missing"}, "training_file"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"batch_size": 5}}, "hyperparameters.batch_size"),
    ({"suffix": "has:colon"}, "suffix"),
    ({"runtime_env": {"working_dir": "/"}}, "runtime_env"),
    ({"method": {"type": "dpo"}}, "method.type"),
])
def test_bad_job_requests_name_the_parameter(client, body, param):
    file_id = upload(client, jsonl(sentiment_rows(10))).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": file_id} | body)
    assert r.status_code in (400, 404)
    assert r.json()["error"]["param"] == param


def test_a_job_reports_its_resolved_hyperparameters_and_runs_only_its_own_config(client, tmp_path):
    file_id = upload(client, jsonl(sentiment_rows(100))).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": "minilm", "training_file": file_id, "suffix": "reviews", "seed": 3,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 32}}},
    }).json()
    assert job["status"] == "validating_files" and job["fine_tuned_model"] is None
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 32, "learning_rate_multiplier": 1.0}
    assert job["seed"] == 3 and job["user_provided_suffix"] == "reviews"
    row = client.app.state.store.get_job(job["id"])
    assert row["fine_tuned_model"] == f"ft:minilm:reviews:{job['id']}"
    cfg = row["config"]
    assert cfg["output"] == {"dir": str(tmp_path / "runs"), "name": job["id"], "model_id": row["fine_tuned_model"]}
    assert cfg["data"]["train"] == str(tmp_path / "data" / "files" / f"{file_id}.jsonl")
    assert (cfg["training"]["batch_size"], cfg["training"]["gradient_accumulation_steps"]) == (8, 2)
    assert wait_for_status(client, job["id"], {"queued"})["status"] == "queued"  # no cluster: it waits


def test_a_bad_validation_file_fails_the_job_naming_file_and_line(client):
    train = upload(client, jsonl(sentiment_rows(100)), name="train.jsonl").json()["id"]
    val = upload(client, jsonl([{"text": "ok", "label": "pos"}, {"text": "meh", "label": "neutral"}]),
                 name="val.jsonl").json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": train,
                                                    "validation_file": val}).json()
    failed = wait_for_status(client, job["id"], {"failed"})
    assert failed["error"]["code"] == "invalid_validation_file" and failed["error"]["param"] == "validation_file"
    assert f"{val} (val.jsonl)" in failed["error"]["message"]
    assert "line 2: label 'neutral' never appears in the training file" in failed["error"]["message"]
    assert failed["finished_at"] is not None
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[0]["level"] == "error" and "line 2" in events[0]["message"]
    assert events[-1]["message"] == f"Created fine-tuning job: {job['id']}"
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_job_status"


def test_cancel_a_waiting_job_and_delete_its_file_afterwards(client):
    file_id = upload(client, jsonl(sentiment_rows(100))).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": file_id}).json()
    r = client.delete(f"/v1/files/{file_id}")
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_in_use"
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert client.delete(f"/v1/files/{file_id}").status_code == 200
    assert client.post("/v1/fine_tuning/jobs/ftjob-none/cancel").status_code == 404


def test_job_and_event_pagination(client):
    file_id = upload(client, jsonl(sentiment_rows(100))).json()["id"]
    ids = [client.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": file_id}).json()["id"]
           for _ in range(3)]
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    r = client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-unknown"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 0}).status_code == 400
    events = client.get(f"/v1/fine_tuning/jobs/{ids[0]}/events", params={"limit": 1}).json()
    assert len(events["data"]) == 1 and events["has_more"]


def test_state_survives_a_restart(tmp_path):
    settings = make_settings(tmp_path)
    with TestClient(build_app(settings)) as c:
        file_id = upload(c, jsonl(sentiment_rows(100))).json()["id"]
        job = c.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": file_id}).json()
        c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        events = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    with TestClient(build_app(make_settings(tmp_path))) as c:
        assert c.get(f"/v1/files/{file_id}").json()["id"] == file_id
        again = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert again["status"] == "cancelled"
        # Every event listed before the restart is still there (the first server's runner may have added one
        # more, "Waiting for the Ray cluster", between that listing and its shutdown).
        kept = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
        assert [e for e in kept if e in events] == events and "The job has been cancelled" in [
            e["message"] for e in kept]
        assert [j["id"] for j in c.get("/v1/fine_tuning/jobs").json()["data"]] == [job["id"]]


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["minilm"]
    assert client.get("/healthz").json()["models"] == ["minilm"]


def test_keys_are_checked_by_digest_from_either_env_var(monkeypatch):
    from core.openai_errors import bearer_key_ok, key_digest, read_api_key_digests

    monkeypatch.setenv("TEST_KEYS", " a-key, b-key ")
    monkeypatch.setenv("TEST_KEYS_SHA256", key_digest("c-key").upper())
    digests = read_api_key_digests("TEST_KEYS")
    assert digests == {key_digest("a-key"), key_digest("b-key"), key_digest("c-key")}
    for key, ok in (("a-key", True), ("b-key", True), ("c-key", True), ("d-key", False), (key_digest("c-key"), False)):
        assert bearer_key_ok({b"authorization": f"Bearer {key}".encode()}, digests) is ok, key
    assert not bearer_key_ok({b"authorization": b"Bearer \xff"}, digests)
    assert read_api_key_digests("UNSET_KEYS_VAR") == frozenset()


def succeeded_job(client, tmp_path) -> dict:
    """A job created through the API, then marked succeeded with a run folder (as the runner does)."""
    file_id = upload(client, jsonl(sentiment_rows(10))).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": file_id,
                                                    "suffix": "s"}).json()
    run_dir = tmp_path / "runs" / job["id"]
    (run_dir / "model").mkdir(parents=True)
    store = client.app.state.store
    store.update_job(job["id"], status="succeeded", run_dir=str(run_dir), finished_at=123)
    client.app.state.serving.sync()
    return store.get_job(job["id"])


def test_fine_tuned_models_are_listed_retrieved_deleted_and_kept_out_of_the_registry(tmp_path):
    with TestClient(build_app(make_settings(tmp_path, serve_url="http://127.0.0.1:9"))) as c:
        job = succeeded_job(c, tmp_path)
        model = job["fine_tuned_model"]
        registry = json.loads((tmp_path / "runs" / "models.json").read_text())
        assert registry["models"] == {model: {"path": f"{job['run_dir']}/model", "owned_by": "user",
                                              "created": 123}}  # a classification base model is not served
        assert registry["serve"]["route_prefix"] == "/rayfine-models"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["minilm", model]
        assert c.get(f"/v1/models/{model}").json() == {"id": model, "object": "model", "created": 123,
                                                       "owned_by": "user", "parent": "minilm"}
        # Known model, model server not up (nothing listens at --serve-url): 503 with Retry-After, not a hang.
        r = c.post("/v1/classify", json={"model": model, "input": "fine"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "model_server_unavailable"
        for body, status, code in (({"model": "ft:minilm:x:ftjob-nope", "input": "x"}, 404, "model_not_found"),
                                   ({"input": "x"}, 400, "missing_model")):
            r = c.post("/v1/classify", json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code)
        assert c.post("/v1/chat/completions", content=b"{not json").json()["error"]["code"] == "invalid_json"
        r = c.delete("/v1/models/minilm")
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_deletable"
        assert c.delete(f"/v1/models/{model}").json() == {"id": model, "object": "model", "deleted": True}
        assert json.loads((tmp_path / "runs" / "models.json").read_text())["models"] == {}
        assert Path(job["run_dir"]).is_dir()  # kept without ?purge=true
        for call in (lambda: c.get(f"/v1/models/{model}"), lambda: c.delete(f"/v1/models/{model}"),
                     lambda: c.post("/v1/classify", json={"model": model, "input": "x"})):
            r = call()
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["minilm"]
        other = succeeded_job(c, tmp_path)
        assert c.delete(f"/v1/models/{other['fine_tuned_model']}?purge=true").status_code == 200
        assert not Path(other["run_dir"]).exists() and (tmp_path / "runs").is_dir()


def test_with_an_mlflow_uri_every_job_is_tracked_under_its_id(tmp_path, monkeypatch):
    import json as _json

    from mlflow import MlflowClient

    from core.config import RunConfig
    from training.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with TestClient(build_app(make_settings(tmp_path, mlflow_uri=uri))) as c:
        file_id = upload(c, jsonl(sentiment_rows(10))).json()["id"]
        job = c.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": file_id}).json()
        row = c.app.state.store.get_job(job["id"])
    cfg = RunConfig.model_validate(row["config"])
    assert cfg.tracking.mlflow.tracking_uri == uri and cfg.tracking.mlflow.run_name == job["id"]
    # What the job's driver logs: run named after the job, tagged with its model and its Ray job.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", _json.dumps({"metadata": {
        "job_submission_id": row["ray_job_id"]}}))
    tracker = RunTracker(cfg, tmp_path / "runs" / job["id"]).start()
    tracker.finish({})
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("rayfine-api").experiment_id])
    assert run.info.run_name == job["id"] and run.data.tags["model_id"] == row["fine_tuned_model"]
    assert run.data.tags["ray_job_id"] == f"rayfine-{job['id']}" and run.info.status == "FINISHED"
