"""The SQLite store: persistence across reopen, cursor pagination, compare-and-set status changes."""

from __future__ import annotations

import re

import pytest

from cluster.api.store import BadCursor, Store, new_id


def job_row(job_id: str, status: str = "validating_files") -> dict:
    return {"id": job_id, "model": "base", "training_file": "file-a", "validation_file": None,
            "hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0}, "suffix": "s",
            "seed": 1, "metadata": {"team": "x"}, "status": status, "error": None,
            "fine_tuned_model": f"ft:base:s:{job_id}", "created_at": 1, "finished_at": None,
            "ray_job_id": f"rayfine-{job_id}", "submitted": 0, "run_dir": None, "metrics_offset": 0,
            "total_steps": None, "trained_tokens": None, "config": {"task": "sequence_classification"}}


def file_row(file_id: str, purpose: str = "fine-tune") -> dict:
    return {"id": file_id, "filename": "t.jsonl", "purpose": purpose, "bytes": 10, "records": 1, "created_at": 1,
            "path": f"/data/files/{file_id}.jsonl"}


def test_ids_are_random_and_prefixed():
    ids = {new_id("ftjob") for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"ftjob-[A-Za-z0-9]{24}", i) for i in ids)


def test_everything_survives_reopening(tmp_path):
    db = tmp_path / "api.sqlite3"
    store = Store(db)
    store.add_file(file_row("file-a"))
    store.add_job(job_row("ftjob-1"))
    store.add_event("ftjob-1", "Created fine-tuning job: ftjob-1")
    store.add_metrics("ftjob-1", [("Step 1/4: training loss=0.7000", {"step": 1, "train_loss": 0.7})], 120, 4)
    store.add_checkpoint({"id": "ftckpt-1", "job_id": "ftjob-1", "name": "checkpoint_0", "step": 1,
                          "created_at": 5, "metrics": {"step": 1}})
    store.update_job("ftjob-1", status="running", submitted=1, run_dir="/runs/ftjob-1")
    store.close()

    again = Store(db)
    job = again.get_job("ftjob-1")
    assert (job["status"], job["submitted"], job["run_dir"], job["metrics_offset"], job["total_steps"]) == (
        "running", 1, "/runs/ftjob-1", 120, 4)
    assert job["hyperparameters"]["batch_size"] == 8 and job["metadata"] == {"team": "x"}
    assert again.get_file("file-a")["path"] == "/data/files/file-a.jsonl"
    events, _ = again.list_events("ftjob-1", None, 10)
    assert [e["message"] for e in events] == ["Step 1/4: training loss=0.7000", "Created fine-tuning job: ftjob-1"]
    assert events[0]["data"] == {"step": 1, "train_loss": 0.7} and events[0]["step"] == 1
    assert again.checkpoint_names("ftjob-1") == {"checkpoint_0"}
    assert not again.add_checkpoint({"id": "ftckpt-2", "job_id": "ftjob-1", "name": "checkpoint_0", "step": 1,
                                     "created_at": 5, "metrics": {}})  # seen once, recorded once


def test_pages_newest_first_with_after_and_has_more(tmp_path):
    store = Store(tmp_path / "db")
    for i in range(5):
        store.add_job(job_row(f"ftjob-{i}"))
    page, more = store.list_jobs(None, 2)
    assert [j["id"] for j in page] == ["ftjob-4", "ftjob-3"] and more
    page, more = store.list_jobs("ftjob-3", 2)
    assert [j["id"] for j in page] == ["ftjob-2", "ftjob-1"] and more
    page, more = store.list_jobs("ftjob-1", 2)
    assert [j["id"] for j in page] == ["ftjob-0"] and not more
    with pytest.raises(BadCursor):
        store.list_jobs("ftjob-nope", 2)


def test_files_filter_by_purpose_and_order(tmp_path):
    store = Store(tmp_path / "db")
    for i, purpose in enumerate(["fine-tune", "batch", "fine-tune"]):
        store.add_file(file_row(f"file-{i}", purpose))
    assert [f["id"] for f in store.list_files("fine-tune", None, 10, True)[0]] == ["file-2", "file-0"]
    assert [f["id"] for f in store.list_files(None, None, 10, False)[0]] == ["file-0", "file-1", "file-2"]
    with pytest.raises(BadCursor):  # a cursor from outside the filtered list
        store.list_files("fine-tune", "file-1", 10, True)


def test_events_pages_stay_within_their_job(tmp_path):
    store = Store(tmp_path / "db")
    other = store.add_event("ftjob-other", "elsewhere")
    for i in range(3):
        store.add_event("ftjob-1", f"event {i}")
    with pytest.raises(BadCursor):
        store.list_events("ftjob-1", other, 10)
    first, more = store.list_events("ftjob-1", None, 2)
    rest, more_after = store.list_events("ftjob-1", first[-1]["id"], 2)
    assert [e["message"] for e in first + rest] == ["event 2", "event 1", "event 0"]
    assert more and not more_after


def test_status_changes_are_compare_and_set(tmp_path):
    store = Store(tmp_path / "db")
    store.add_job(job_row("ftjob-1", status="running"))
    assert store.update_job("ftjob-1", only_if=("queued", "running"), status="cancelled")
    assert not store.update_job("ftjob-1", only_if=("queued", "running"), status="succeeded")
    assert store.get_job("ftjob-1")["status"] == "cancelled"


def test_a_file_is_in_use_while_an_active_job_reads_it(tmp_path):
    store = Store(tmp_path / "db")
    store.add_job(job_row("ftjob-1", status="running"))
    assert store.file_in_use("file-a") == "ftjob-1"
    store.update_job("ftjob-1", status="succeeded")
    assert store.file_in_use("file-a") is None


def test_lookups_never_interpret_ids(tmp_path):
    store = Store(tmp_path / "db")
    store.add_file(file_row("file-a"))
    for hostile in ("../../etc/passwd", "file-a' OR '1'='1", "%", "file-%"):
        assert store.get_file(hostile) is None
