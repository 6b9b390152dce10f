"""The jobs API under faults: a second server on the same state, a per-key job cap, a Jobs API that does not
answer, and a cancel while the cluster is away (the Ray job is stopped later, also after a restart)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from cluster.api.app import build_app
from cluster.api.store import Store
from cluster.jobs import ClusterUnreachable, JobsClient
from core.errors import UserError
from tests.conftest import sentiment_rows
from tests.unit.test_api_http import jsonl, make_settings, upload


def test_a_second_server_on_the_same_state_refuses_to_start(tmp_path):
    settings = make_settings(tmp_path)
    with TestClient(build_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        with pytest.raises(UserError, match="another rayfine api server \\(pid \\d+ on .+\\) uses this state"):
            build_app(make_settings(tmp_path))
    with TestClient(build_app(make_settings(tmp_path))) as c:  # the first one stopped: its lock went with it
        assert c.get("/healthz").status_code == 200


def test_db_path_puts_the_state_apart_from_the_data(tmp_path):
    db = tmp_path / "local-disk" / "state.sqlite3"
    with TestClient(build_app(make_settings(tmp_path, db_file=db))) as c:
        file_id = upload(c, jsonl(sentiment_rows(100))).json()["id"]
    assert db.is_file() and (tmp_path / "local-disk" / "state.sqlite3.lock").is_file()
    assert not (tmp_path / "data" / "api.sqlite3").exists()
    assert (tmp_path / "data" / "files" / f"{file_id}.jsonl").is_file()
    assert Store(db).get_file(file_id)["id"] == file_id


def test_each_key_has_a_cap_on_active_jobs(tmp_path):
    settings = make_settings(tmp_path, api_keys=frozenset({"k1", "k2"}), max_active_jobs_per_key=2)
    with TestClient(build_app(settings)) as c:
        k1, k2 = ({"Authorization": f"Bearer {k}"} for k in ("k1", "k2"))
        file_id = c.post("/v1/files", files={"file": ("t.jsonl", jsonl(sentiment_rows(100)))},
                         data={"purpose": "fine-tune"}, headers=k1).json()["id"]
        body = {"model": "minilm", "training_file": file_id}
        first, second = (c.post("/v1/fine_tuning/jobs", json=body, headers=k1).json() for _ in range(2))
        # The same key spelled otherwise is the same key.
        r = c.post("/v1/fine_tuning/jobs", json=body, headers={"Authorization": "bearer k1"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_active_jobs"
        r = c.post("/v1/fine_tuning/jobs", json=body, headers=k1)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_active_jobs"
        assert "already has 2 active fine-tuning jobs" in r.json()["error"]["message"]
        assert c.post("/v1/fine_tuning/jobs", json=body, headers=k2).status_code == 200  # another key
        assert c.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel", headers=k1).json()["status"] == "cancelled"
        assert c.post("/v1/fine_tuning/jobs", json=body, headers=k1).status_code == 200  # a slot is free again


def test_a_jobs_api_that_never_answers_times_out():
    # A real TCP server that accepts connections and never answers, as a hung head does.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(8)), daemon=True).start()
    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="cannot reach the Ray Jobs API"):
        JobsClient(f"http://127.0.0.1:{server.getsockname()[1]}", timeout_s=1.0)
    assert time.monotonic() - started < 10
    server.close()


def test_a_cancel_while_the_cluster_is_away_stops_the_ray_job_later(tmp_path):
    """A running job whose cluster does not answer: the cancel succeeds, and the Ray job stays to stop (kept
    in the state, so a restarted server still stops it)."""
    settings = make_settings(tmp_path)  # its address refuses connections
    with TestClient(build_app(settings)) as c:
        file_id = upload(c, jsonl(sentiment_rows(100))).json()["id"]
        job = c.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": file_id}).json()
        store = c.app.state.store
        deadline = time.time() + 10
        while store.get_job(job["id"])["status"] != "queued":  # validated; not submitted (no cluster)
            assert time.time() < deadline
            time.sleep(0.05)
        # As if it had been submitted before the cluster went away.
        store.update_job(job["id"], status="running", submitted=1, run_dir=str(tmp_path / "runs" / job["id"]))
        started = time.monotonic()
        r = c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert time.monotonic() - started < 10
        assert store.get_job(job["id"])["stop_pending"] == 1
        time.sleep(0.3)  # a few runner ticks: the cluster still refuses, the stop stays pending
        assert [j["id"] for j in store.jobs_to_stop()] == [job["id"]]
    with TestClient(build_app(make_settings(tmp_path))) as c:  # restarted: still to stop
        assert [j["id"] for j in c.app.state.store.jobs_to_stop()] == [job["id"]]
        assert c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
