"""The job runner: one background thread that moves every active job along.

    validating_files --(files pass)--> queued --(Ray job RUNNING)--> running --(Ray job ends)--> succeeded | failed
    validating_files --(a bad file)--> failed
    validating_files | queued | running --(cancel, or the Ray job stopped elsewhere)--> cancelled

Each tick walks the active jobs in the store: validates files, submits queued jobs as Ray jobs (through
``cluster.jobs.JobsClient``, the same path as ``rayfine submit``), and follows submitted ones: their Ray job
status, new lines of ``metrics.jsonl`` (events) and new checkpoints. All state is in SQLite, so a restarted
server simply carries on: the first tick reconciles jobs whose Ray job finished while it was down.

The Ray submission id is derived from the job id (``rayfine-ftjob-...``): a job submitted just before a crash
is found again instead of being submitted twice. Status changes are compare-and-set on the job's current
status, so a cancel and the runner never overwrite each other.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from cluster.api import progress
from cluster.api.errors import APIError
from cluster.api.store import ACTIVE, TERMINAL, Store, new_id
from cluster.api.validation import check_job_files
from cluster.jobs import ClusterUnreachable, JobNotFound
from core.config import RunConfig
from core.errors import UserError
from core.model_folder import MODEL_INFO
from core.run_folder import RunFolder, read_records

logger = logging.getLogger("cluster.api")
SUBMIT_ATTEMPTS = 5  # consecutive failed submissions before a job fails (the cluster may be restarting)
LOST_AFTER_S = 300.0  # a submitted job whose Ray job cannot be read for this long fails (cluster gone)
MAX_ERROR_CHARS = 2000


class JobRunner:
    """Validates, submits and follows jobs; ``cancel`` is called from request threads."""

    def __init__(self, store: Store, storage: Path, poll_interval_s: float = 2.0,
                 client_factory: Optional[Callable[[], Any]] = None,
                 base_models: Optional[dict[str, Optional[str]]] = None, driver_cpus: float = 1.0,
                 on_succeeded: Optional[Callable[[], None]] = None):
        """``base_models``: the served base model names, each with its ``package:`` model reference or None.
        ``driver_cpus``: CPUs each job's driver reserves (its entrypoint resources), so that drivers queue for
        the cluster's CPUs instead of piling up on the head node. ``on_succeeded``: called after a job succeeded
        (its model is then served)."""
        self.store, self.storage, self.poll_interval_s = store, storage, poll_interval_s
        self.driver_cpus = driver_cpus
        self.on_succeeded = on_succeeded
        self._client_factory = client_factory or default_client_factory(None)
        self._client = None
        self._cluster_problem: Optional[str] = None
        self._submit_failures: dict[str, int] = {}
        self._unreadable_since: dict[str, float] = {}
        self._told_waiting: set[str] = set()
        self._first_report: dict[str, tuple[int, float]] = {}  # per job: (step, time) of the first report read
        self.base_models = base_models
        self._lock = threading.RLock()  # held for status transitions shared with cancel; never around a Ray call
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rayfine-api-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.tick()
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        """One pass over the active jobs and the Ray jobs still to stop (also the startup reconciliation)."""
        try:
            self.stop_pending()
        except Exception:  # noqa: BLE001 - the jobs below must still move
            logger.exception("unexpected error while stopping the Ray jobs of cancelled jobs")
        for job in self.store.active_jobs():
            if self._stopping.is_set():
                return
            try:
                self.advance(job)
            except Exception:  # noqa: BLE001 - one job's surprise must not stop the others
                logger.exception("%s: unexpected error while following the job", job["id"])

    def advance(self, job: dict[str, Any]) -> None:
        if job["status"] == "validating_files":
            self.validate(job)
        elif not job["submitted"]:
            self.submit(job)
        else:
            self.follow(job)

    # ---- the cluster ---------------------------------------------------------------------------------------
    def client(self):
        """The JobsClient, created on first use; raises UserError while the cluster cannot be reached."""
        if self._client is None:
            try:
                self._client = self._client_factory()
            except UserError as exc:
                if self._cluster_problem != str(exc):
                    logger.warning("cannot reach the Ray cluster (jobs wait until it is back): %s", exc)
                self._cluster_problem = str(exc)
                raise
            if self._cluster_problem:
                logger.info("Ray cluster reachable again")
            self._cluster_problem = None
        return self._client

    # ---- transitions ---------------------------------------------------------------------------------------
    def transition(self, job: dict[str, Any], status: str, message: str, *, level: str = "info",
                   **fields: Any) -> bool:
        """Move ``job`` to ``status`` if it is still active; records an event and logs the change."""
        with self._lock:
            if status in TERMINAL:
                fields.setdefault("finished_at", int(time.time()))
            if not self.store.update_job(job["id"], only_if=ACTIVE, status=status, **fields):
                return False
            self.store.add_event(job["id"], message, level=level)
        logger.info("%s: %s -> %s: %s", job["id"], job["status"], status, message)
        job.update(status=status, **fields)
        return True

    def fail(self, job: dict[str, Any], code: str, message: str, param: Optional[str] = None) -> None:
        message = message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."
        self.transition(job, "failed", message, level="error",
                        error={"code": code, "message": message, "param": param})

    # ---- validating_files -> queued ------------------------------------------------------------------------
    def validate(self, job: dict[str, Any]) -> None:
        if self.base_models is not None and job["model"] not in self.base_models:
            return self.fail(job, "model_not_available", f"The base model '{job['model']}' is no longer served by "
                             "this server (restart rayfine api with its config to run this job).", "model")
        train = self.store.get_file(job["training_file"])
        validation = self.store.get_file(job["validation_file"]) if job["validation_file"] else None
        if train is None or (job["validation_file"] and validation is None):
            missing, param = ((job["training_file"], "training_file") if train is None
                              else (job["validation_file"], "validation_file"))
            return self.fail(job, "file_not_found", f"The file {missing} was deleted before the job started.", param)
        problem = check_job_files(RunConfig.model_validate(job["config"]), train, validation)
        if problem is not None:
            return self.fail(job, problem.code, problem.message, problem.param)
        if self.transition(job, "queued", "Files validated, moving job to queued state"):
            self.submit(job)

    # ---- queued: submit ------------------------------------------------------------------------------------
    def submit(self, job: dict[str, Any]) -> None:
        """Submit a queued job as its Ray job. No lock is held while Ray is called: a cancel that lands meanwhile
        wins the compare-and-set below, and the Ray job just submitted is stopped (``stop_pending``)."""
        try:
            client = self.client()
        except UserError as exc:
            return self._waiting(job, exc)
        current = self.store.get_job(job["id"])
        if current is None or current["status"] != "queued" or current["submitted"]:
            return
        try:
            run_dir = self._find_submitted(client, job) or self._submit(client, job)
        except ClusterUnreachable as exc:  # not the job's fault: it waits, however long the cluster is away
            self._client = None
            return self._waiting(job, exc)
        except UserError as exc:
            self._submit_failed(job, str(exc))
            return
        self._told_waiting.discard(job["id"])
        self._submit_failures.pop(job["id"], None)
        if not self.store.update_job(job["id"], only_if=("queued",), submitted=1, run_dir=run_dir):
            logger.info("%s: cancelled while it was being submitted; its Ray job will be stopped", job["id"])
            return
        self.store.add_event(job["id"], f"Submitted to the Ray cluster as Ray job {job['ray_job_id']}")
        logger.info("%s: submitted as Ray job %s (run folder %s)", job["id"], job["ray_job_id"], run_dir)
        job.update(submitted=1, run_dir=run_dir)

    def _waiting(self, job: dict[str, Any], exc: UserError) -> None:
        if job["id"] not in self._told_waiting:  # once, so the events say why the job is not moving
            self._told_waiting.add(job["id"])
            self.store.add_event(job["id"], f"Waiting for the Ray cluster: {exc}", level="warn")

    def _find_submitted(self, client, job: dict[str, Any]) -> Optional[str]:
        """The run folder of a Ray job submitted before a restart, or None if there is none."""
        try:
            client.status(job["ray_job_id"])
        except JobNotFound:
            return None
        return str(self.storage / job["id"])

    def _submit(self, client, job: dict[str, Any]) -> str:
        cfg = RunConfig.model_validate(job["config"])
        extra = {}
        reference = (self.base_models or {}).get(job["model"])
        if reference:  # a package: model is resolved where the job runs
            extra["model_name_or_path"] = reference
        submitted = client.submit(cfg, "train", storage=str(self.storage), data_on_cluster=True,
                                  submission_id=job["ray_job_id"], entrypoint_num_cpus=self.driver_cpus,
                                  metadata={"rayfine_job_id": job["id"], "model": job["model"]}, **extra)
        return str(submitted.run_dir)

    def _submit_failed(self, job: dict[str, Any], message: str) -> None:
        failures = self._submit_failures.get(job["id"], 0) + 1
        self._submit_failures[job["id"]] = failures
        logger.warning("%s: submitting to Ray failed (attempt %d of %d): %s", job["id"], failures,
                       SUBMIT_ATTEMPTS, message)
        if failures >= SUBMIT_ATTEMPTS:
            self._submit_failures.pop(job["id"], None)
            self.fail(job, "submit_failed", f"Could not submit the job to the Ray cluster: {message}")

    # ---- queued/running: follow the Ray job ----------------------------------------------------------------
    def follow(self, job: dict[str, Any]) -> None:
        try:
            client = self.client()
        except UserError:
            self._unreadable_since.pop(job["id"], None)  # the cluster is away, not the job
            return
        try:
            state = client.status(job["ray_job_id"])
        except ClusterUnreachable:
            self._client = None  # the cluster is away (a head restart), not the job: wait for it
            self._unreadable_since.pop(job["id"], None)
            return
        except UserError as exc:
            self._client = None  # the next tick checks that the cluster itself is reachable
            self._unreadable(job, str(exc))
            return
        self._unreadable_since.pop(job["id"], None)
        self.ingest(job, finished=state.status in ("SUCCEEDED", "FAILED", "STOPPED"))
        if state.status == "RUNNING" and job["status"] == "queued":
            self.transition(job, "running", "Fine-tuning job started")
        elif state.status == "SUCCEEDED":
            self._succeeded(job, state)
        elif state.status == "FAILED":
            self.fail(job, "training_failed", self._failure_message(job, state))
        elif state.status == "STOPPED":
            self.transition(job, "cancelled", f"The Ray job {job['ray_job_id']} was stopped outside this API",
                            finished_at=_timestamp(state.end_time))

    def _unreadable(self, job: dict[str, Any], message: str) -> None:
        if job["id"] not in self._unreadable_since:
            logger.warning("%s: cannot read Ray job %s (retrying): %s", job["id"], job["ray_job_id"], message)
        since = self._unreadable_since.setdefault(job["id"], time.monotonic())
        if time.monotonic() - since >= LOST_AFTER_S:
            self._unreadable_since.pop(job["id"], None)
            self.fail(job, "ray_job_lost", f"The Ray job {job['ray_job_id']} could not be read for "
                      f"{LOST_AFTER_S:.0f}s: {message}")

    def _succeeded(self, job: dict[str, Any], state) -> None:
        meta = RunFolder(Path(job["run_dir"] or "")).model / MODEL_INFO
        if not meta.is_file():
            return self.fail(job, "no_model_exported", f"The Ray job {job['ray_job_id']} succeeded but {meta} does "
                             "not exist; is the run folder on storage this server shares with the cluster?")
        with self._lock:
            self.store.add_event(job["id"], f"New fine-tuned model created: {job['fine_tuned_model']}")
            self.transition(job, "succeeded", "The job has successfully completed",
                            finished_at=_timestamp(state.end_time))
        if self.on_succeeded is not None:
            self.on_succeeded()

    def _failure_message(self, job: dict[str, Any], state) -> str:
        """The ``error:`` lines rayfine printed (a user-facing problem), else Ray's own message."""
        try:
            logs = self.client().logs(job["ray_job_id"])
        except UserError:
            logs = ""
        lines = logs.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("error:"):
                block = [lines[i].removeprefix("error:").strip()]
                block += [ln.strip() for ln in lines[i + 1: i + 12] if ln.startswith(" ")]
                return "Training failed: " + " ".join(block)
        return f"Training failed: {state.message or 'the Ray job failed'} (Ray job {job['ray_job_id']})"

    # ---- events and checkpoints from the run folder --------------------------------------------------------
    def ingest(self, job: dict[str, Any], finished: bool = False) -> None:
        if not job["run_dir"]:
            return
        run_dir = Path(job["run_dir"])
        records, offset = read_records(RunFolder(run_dir).metrics, job["metrics_offset"])
        if records:
            total, tokens = job["total_steps"], None
            events = []
            for record in records:
                total = record.get("total_steps") or total
                tokens = record.get("trained_tokens", tokens)
                data = progress.metrics_data(record, total)
                events.append((progress.metrics_message(data), data))
            finish = self._estimate_finish(job["id"], records, total)
            self.store.add_metrics(job["id"], events, offset, total, tokens, finish)
            job.update(metrics_offset=offset, total_steps=total)
        known = self.store.checkpoint_names(job["id"])
        for ckpt in progress.scan_checkpoints(run_dir):
            if ckpt.name in known:
                continue
            metrics = progress.checkpoint_metrics(self.store.metrics_at(job["id"], ckpt.step), ckpt.step,
                                                  wait=not finished)
            if metrics is None:
                continue  # its report is not in metrics.jsonl yet
            row = {"id": new_id("ftckpt"), "job_id": job["id"], "name": ckpt.name, "step": ckpt.step,
                   "created_at": ckpt.created_at, "metrics": metrics}
            if self.store.add_checkpoint(row):
                self.store.add_event(job["id"], f"Checkpoint created at step {ckpt.step}")

    def _estimate_finish(self, job_id: str, records: list[dict[str, Any]], total: Optional[int]) -> Optional[int]:
        """When the run should end, at the pace it has kept since the first report this server read."""
        timed = [r for r in records if isinstance(r.get("step"), int) and isinstance(r.get("time"), (int, float))]
        if not timed or not total:
            return None
        first = self._first_report.setdefault(job_id, (timed[0]["step"], timed[0]["time"]))
        return progress.estimate_finish(first, (timed[-1]["step"], timed[-1]["time"]), total)

    # ---- cancel (request threads) --------------------------------------------------------------------------
    def cancel(self, job_id: str) -> dict[str, Any]:
        """Mark the job cancelled and stop its Ray job; APIError when it has already finished.

        Ray is called without the lock. A Ray job that cannot be stopped now (the cluster is away), or that a
        submission in flight may yet create, is recorded as ``stop_pending``: the runner stops it at its next
        ticks, also after a restart of the server."""
        job = self.store.get_job(job_id)
        if job is None:
            raise APIError(404, f"No such fine-tuning job: '{job_id}'.", param="fine_tuning_job_id",
                           code="not_found")
        stopped = False
        if job["submitted"] and job["status"] in ACTIVE:
            try:
                stopped = self._stop_ray_job(job) != "absent"
            except ClusterUnreachable as exc:
                logger.warning("%s: cannot reach the Ray cluster to stop its job now (retrying): %s", job_id, exc)
        with self._lock:
            if job["status"] in ACTIVE:
                pending = int(job["status"] != "validating_files" and not stopped)
                if self.transition(job, "cancelled", "The job has been cancelled", stop_pending=pending):
                    return self.store.get_job(job_id)
                job = self.store.get_job(job_id)
        raise APIError(400, f"The job {job_id} has already ended with status '{job['status']}'; only "
                            "validating_files, queued or running jobs can be cancelled.",
                       param="fine_tuning_job_id", code="invalid_job_status")

    def _stop_ray_job(self, job: dict[str, Any]) -> str:
        """Stop the job's Ray job: "stopped", "ended" (it had finished; ``follow`` recorded how) or "absent"
        (never submitted: a cancel before the submission). Raises ClusterUnreachable."""
        try:
            if self.client().stop(job["ray_job_id"]):
                return "stopped"
            if job["status"] in ACTIVE:
                self.follow(job)
            return "ended"
        except JobNotFound:
            return "absent"
        except ClusterUnreachable:
            self._client = None
            raise
        except UserError as exc:
            raise ClusterUnreachable(str(exc)) from None

    def stop_pending(self) -> None:
        """Stop the Ray jobs of cancelled jobs that could not be stopped when they were cancelled."""
        for job in self.store.jobs_to_stop():
            try:
                outcome = self._stop_ray_job(job)
            except ClusterUnreachable:
                return  # the next tick tries again
            self.store.update_job(job["id"], stop_pending=0)
            if outcome == "stopped":
                self.store.add_event(job["id"], f"Stopped the Ray job {job['ray_job_id']}")
                logger.info("%s: stopped its Ray job %s after the cancel", job["id"], job["ray_job_id"])


def _timestamp(value: Optional[float]) -> int:
    """Ray reports times in milliseconds since the epoch; None -> now."""
    if not value:
        return int(time.time())
    return int(value / 1000) if value > 1e11 else int(value)


def default_client_factory(address: Optional[str]) -> Callable[[], Any]:
    def make():
        from cluster.jobs import JobsClient

        return JobsClient(address)

    return make
