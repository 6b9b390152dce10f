"""A run folder read back as events and checkpoints (metrics.jsonl, checkpoints/*/trainer_state.json)."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.api import progress
from cluster.api.runner import JobRunner
from cluster.api.store import Store
from core.run_folder import read_records
from tests.unit.test_api_store import job_row


def write_run(run_dir: Path, records: list[dict], checkpoints: dict[str, dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, state in checkpoints.items():
        (run_dir / "checkpoints" / name).mkdir(parents=True)
        (run_dir / "checkpoints" / name / "trainer_state.json").write_text(json.dumps(state))


REPORTS = [
    {"step": 2, "epoch": 0.5, "loss": 0.69, "lr": 1e-4, "samples_per_second": 30.0, "total_steps": 4},
    {"step": 4, "epoch": 1.0, "loss": 0.41, "lr": 5e-5, "total_steps": 4, "eval_accuracy": 0.9, "eval_loss": 0.38},
    {"step": 4, "final": True, "eval_accuracy": 0.92, "eval_loss": 0.37, "eval_num_examples": 8},
]


def test_metrics_messages_read_like_openai_events():
    data = progress.metrics_data(REPORTS[0], 4)
    assert progress.metrics_message(data) == "Step 2/4: training loss=0.6900"
    assert data == {"step": 2, "total_steps": 4, "epoch": 0.5, "train_loss": 0.69, "learning_rate": 1e-4,
                    "samples_per_second": 30.0}
    data = progress.metrics_data(REPORTS[1], 4)
    assert progress.metrics_message(data) == \
        "Step 4/4: training loss=0.4100, validation loss=0.3800, accuracy=0.9000"
    final = progress.metrics_data(REPORTS[2], 4)
    assert progress.metrics_message(final) == "Step 4/4: final validation loss=0.3700, accuracy=0.9200"
    assert "full_valid_num_examples" not in final


def test_only_complete_lines_are_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(REPORTS[0]) + "\n" + '{"step": 3, "lo')
    records, offset = read_records(path, 0)
    assert [r["step"] for r in records] == [2]
    with open(path, "a") as f:
        f.write('ss": 0.5}\n')
    more, offset = read_records(path, offset)
    assert more == [{"step": 3, "loss": 0.5}] and offset == path.stat().st_size
    assert read_records(tmp_path / "missing.jsonl", 7) == ([], 7)


def test_checkpoints_are_found_by_their_trainer_state(tmp_path):
    write_run(tmp_path, [], {"checkpoint_b": {"global_step": 4, "finished": True},
                             "checkpoint_a": {"global_step": 2}})
    (tmp_path / "checkpoints" / "checkpoint_c").mkdir()  # still being copied: no state yet
    found = progress.scan_checkpoints(tmp_path)
    assert [(c.name, c.step, c.finished) for c in found] == [("checkpoint_a", 2, False), ("checkpoint_b", 4, True)]


def test_the_runner_turns_a_run_folder_into_events_and_checkpoints(tmp_path):
    """What the runner records while a job runs, from a run folder as training writes it."""
    store = Store(tmp_path / "db")
    run_dir = tmp_path / "runs" / "ftjob-1"
    store.add_job(job_row("ftjob-1", status="running") | {"submitted": 1, "run_dir": str(run_dir)})
    runner = JobRunner(store, tmp_path / "runs")
    write_run(run_dir, REPORTS[:1], {"checkpoint_a": {"global_step": 2}})
    runner.ingest(store.get_job("ftjob-1"))
    events = [e["message"] for e in store.list_events("ftjob-1", None, 50)[0]]
    assert events == ["Checkpoint created at step 2", "Step 2/4: training loss=0.6900"]

    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in REPORTS[1:]))
    (run_dir / "checkpoints" / "checkpoint_b").mkdir()
    (run_dir / "checkpoints" / "checkpoint_b" / "trainer_state.json").write_text('{"global_step": 4, "finished": true}')
    runner.ingest(store.get_job("ftjob-1"))
    runner.ingest(store.get_job("ftjob-1"))  # nothing new: nothing recorded twice
    events = [e["message"] for e in store.list_events("ftjob-1", None, 50)[0]]
    assert events[:3] == ["Checkpoint created at step 4", "Step 4/4: final validation loss=0.3700, accuracy=0.9200",
                          "Step 4/4: training loss=0.4100, validation loss=0.3800, accuracy=0.9000"]
    assert len(events) == 5
    checkpoints, _ = store.list_checkpoints("ftjob-1", None, 10)
    assert [c["step"] for c in checkpoints] == [4, 2]
    assert checkpoints[0]["metrics"] == {"step": 4, "train_loss": 0.41, "full_valid_accuracy": 0.92,
                                         "full_valid_loss": 0.37, "valid_loss": 0.37}
    assert checkpoints[1]["metrics"] == {"step": 2, "train_loss": 0.69}


def test_a_checkpoint_waits_for_its_report(tmp_path):
    store = Store(tmp_path / "db")
    run_dir = tmp_path / "run"
    store.add_job(job_row("ftjob-1", status="running") | {"submitted": 1, "run_dir": str(run_dir)})
    write_run(run_dir, REPORTS[:1], {"checkpoint_b": {"global_step": 4}})
    runner = JobRunner(store, tmp_path)
    runner.ingest(store.get_job("ftjob-1"))
    assert store.list_checkpoints("ftjob-1", None, 10)[0] == []  # step 4 is not in metrics.jsonl yet
    runner.ingest(store.get_job("ftjob-1"), finished=True)  # the job ended: record it with what there is
    assert [c["metrics"] for c in store.list_checkpoints("ftjob-1", None, 10)[0]] == [{"step": 4, "train_loss": 0.69}]


def test_running_jobs_estimate_their_finish_and_succeeded_ones_report_their_tokens(tmp_path):
    from cluster.api.protocol import job_object

    store = Store(tmp_path / "db")
    run_dir = tmp_path / "run"
    store.add_job(job_row("ftjob-1", status="running") | {"submitted": 1, "run_dir": str(run_dir)})
    runner = JobRunner(store, tmp_path)
    reports = [{"step": 2, "loss": 0.7, "total_steps": 10, "trained_tokens": 300, "time": 1000.0},
               {"step": 4, "loss": 0.6, "total_steps": 10, "trained_tokens": 610, "time": 1010.0}]
    write_run(run_dir, reports[:1], {})
    runner.ingest(store.get_job("ftjob-1"))
    job = job_object(store.get_job("ftjob-1"))
    assert job["estimated_finish"] is None  # one report gives no pace yet
    assert job["trained_tokens"] is None  # OpenAI: null until the job has succeeded

    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(reports[1]) + "\n")
    runner.ingest(store.get_job("ftjob-1"))
    # 2 steps in 10 s; 6 steps to go after t=1010: 1010 + 30
    assert job_object(store.get_job("ftjob-1"))["estimated_finish"] == 1040

    store.update_job("ftjob-1", status="succeeded")
    done = job_object(store.get_job("ftjob-1"))
    assert done["trained_tokens"] == 610 and done["estimated_finish"] is None


def test_an_older_database_gains_the_new_columns(tmp_path):
    import sqlite3

    from cluster.api.store import SCHEMA

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA.replace(", estimated_finish INTEGER", ""))
        db.execute("INSERT INTO jobs (id, model, training_file, hyperparameters, seed, status, fine_tuned_model, "
                   "created_at, ray_job_id, config) VALUES ('ftjob-old', 'm', 'f', '{}', 1, 'running', 'ft:m::x', "
                   "1, 'r', '{}')")
    store = Store(path)
    assert store.get_job("ftjob-old")["estimated_finish"] is None
    assert store.update_job("ftjob-old", estimated_finish=5) and store.get_job("ftjob-old")["estimated_finish"] == 5
