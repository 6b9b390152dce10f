"""Ray Jobs: submit a rayfine run to a cluster, follow it, ask its status, stop it.

A submitted job carries its own package, ``rayfine_job_<id>``: ``config.yaml`` (the resolved config, with
``--set`` applied) and ``data/``, a copy of every local data file the config names, so the cluster needs nothing
from the submitting machine. Object-store URIs (``s3://``, ``gs://``, ...) pass through, and ``data_on_cluster``
passes local paths through unchanged (files on a volume the cluster mounts). The entrypoint runs
``rayfine <command> package:rayfine_job_<id>/config.yaml`` after checking that ``rayfine`` is on the PATH of the
cluster's processes (else it says so and exits 127): nothing in it comes from user strings. Ray starts a job's
entrypoint with the PATH of the ``ray start`` that started the head node; no interpreter path is exposed to it, so
the check is the dependable part.

The package travels as a ``py_modules`` entry of the job's runtime environment rather than as its
``working_dir``: with torch 2.13's CPU wheel, a job driver started in a ``working_dir`` was seen to die in oneMKL
("Cannot load libtorch_cpu.so") when building the model, while the same run as a ``py_modules`` job trains.

The run folder is written on the cluster under ``storage`` (``output.dir``): a folder every node can reach
(a shared volume on Kubernetes). Ray's token authentication (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``) is honoured by Ray's own client, which reads those variables.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import yaml

from core import collector
from core.config import RunConfig
from core.errors import UserError
from core.ray_private import RUNTIME_ENV_PACKAGING_LOGGER, timed_job_submission_client

COMMANDS = ("train", "tune", "run")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_STORAGE = "~/rayfine/runs"  # expanded on the cluster, by the job itself
# Ray refuses working_dir packages above 500 MiB; stay well under it and say what to do instead.
MAX_PACKAGE_BYTES = 400 * 1024 * 1024
_GLOB_CHARS = set("*?[")


@dataclass
class SubmittedJob:
    job_id: str
    run_dir: str  # where the run folder goes on the cluster (``NAME-2`` if a finished run already holds NAME)


@dataclass
class JobState:
    job_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str = ""
    start_time: Optional[float] = None  # seconds since the epoch
    end_time: Optional[float] = None
    entrypoint: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def run_storage(cfg: RunConfig, storage: str | None) -> str:
    """Where the run folder goes on the cluster: ``--storage``, else the config's ``output.dir`` when absolute
    (written for the cluster), else RAYFINE_STORAGE, else ``~/rayfine/runs`` (expanded on the cluster)."""
    if storage:
        return storage
    if cfg.output.dir.startswith(("/", "~")) or "://" in cfg.output.dir:
        return cfg.output.dir
    return os.environ.get("RAYFINE_STORAGE") or DEFAULT_STORAGE


def display_entrypoint(entrypoint: str) -> str:
    """``rayfine COMMAND ...`` out of a job's entrypoint (it is wrapped in a PATH check)."""
    start = entrypoint.find("exec rayfine ")
    return entrypoint[start + 5:].split(";")[0] if start >= 0 else entrypoint


def jobs_address(address: str | None) -> str:
    """The Jobs API address: ``--address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard's Jobs API) "
                        "or set RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address}: job submission talks to the Ray dashboard's Jobs API; give its "
                        "HTTP address, e.g. http://HEAD:8265")
    return address.rstrip("/")


class ClusterUnreachable(UserError):
    """The Jobs API did not answer (refused, reset or timed out): the cluster may be restarting."""


class JobNotFound(UserError):
    """The cluster has no job of that id."""


REQUEST_TIMEOUT_S = 30.0  # each call to the Jobs API; a job's submission uploads its data within it


class JobsClient:
    """rayfine's view of Ray's ``JobSubmissionClient``: user errors instead of tracebacks, and a timeout on every
    call (``ClusterUnreachable`` when it passes or the connection fails)."""

    def __init__(self, address: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S):
        self.address = jobs_address(address)
        import logging

        for name in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk",
                     RUNTIME_ENV_PACKAGING_LOGGER):
            logging.getLogger(name).setLevel(logging.WARNING)

        try:
            self.client = timed_job_submission_client(self.address, timeout_s)
        except Exception as exc:  # ConnectionError, auth errors (RuntimeError), bad URLs
            kind = ClusterUnreachable if _unreachable(exc) else UserError
            raise kind(f"cannot reach the Ray Jobs API at {self.address}: {_first_line(exc)}"
                       f"{_auth_hint(exc)}") from None

    # -- submitting ------------------------------------------------------------------------------------------

    def submit(self, cfg: RunConfig, command: str = "train", *, storage: str | None = None,
               data_on_cluster: bool = False, submission_id: str | None = None,
               metadata: dict[str, str] | None = None, model_name_or_path: str | None = None,
               entrypoint_num_cpus: float | None = None) -> SubmittedJob:
        """Submit ``rayfine COMMAND package:rayfine_job_<id>/config.yaml``, the config and its local data shipped with it.

        ``model_name_or_path`` overrides the model reference written into the job's config (the CLI passes the
        config file's own ``package:`` form, which load_config resolved to a folder on this machine).
        ``entrypoint_num_cpus``: CPUs the job's driver reserves (Ray schedules it on a node that has them).
        """
        if command not in COMMANDS:
            raise UserError(f"--command {command}: choose one of {', '.join(COMMANDS)}")
        storage = run_storage(cfg, storage)
        with tempfile.TemporaryDirectory(prefix="rayfine-job-") as tmp:
            module = f"rayfine_job_{uuid.uuid4().hex[:12]}"
            package = Path(tmp) / module
            package.mkdir()
            (package / "__init__.py").write_text('"""A rayfine job: config.yaml and its data."""\n')
            raw = cfg.model_dump(mode="json")
            if not data_on_cluster:
                raw["data"] = _package_data(raw["data"], package / "data")
            if model_name_or_path:
                raw["model"]["name_or_path"] = model_name_or_path
            raw["output"]["dir"] = storage
            if not raw["output"].get("name"):
                raw["output"]["name"] = "run"
            (package / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
            if size > MAX_PACKAGE_BYTES:
                raise UserError(f"the job's data is {size / 2**20:.0f} MiB, more than Ray carries with a job "
                                f"({MAX_PACKAGE_BYTES // 2**20} MiB); put it on object storage (s3://, gs://) or "
                                "a volume the cluster mounts and pass --data-on-cluster")
            entrypoint = job_entrypoint(command, module)
            run_dir = f"{storage.rstrip('/')}/{raw['output']['name']}"
            meta = {"rayfine_command": command, "rayfine_run_dir": run_dir, "rayfine_task": cfg.task,
                    **(metadata or {})}
            job_id = self._submit_job(
                entrypoint=entrypoint, submission_id=submission_id, metadata=meta,
                entrypoint_num_cpus=entrypoint_num_cpus or None,
                runtime_env={"py_modules": [str(package)],
                             "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}})
        return SubmittedJob(job_id=job_id, run_dir=run_dir)

    def submit_rayfine(self, args: list[str], *, submission_id: str | None = None,
                       metadata: dict[str, str] | None = None, env_vars: dict[str, str] | None = None,
                       entrypoint_num_cpus: float | None = None) -> str:
        """Submit ``rayfine ARGS...`` (each argument shell-quoted) as a Ray job; returns its id. For commands that
        need no package (``rayfine serve REGISTRY --detach``); ``env_vars`` travel in the job's runtime_env."""
        import shlex

        return self._submit_job(
            entrypoint=rayfine_entrypoint(" ".join(shlex.quote(a) for a in args)), submission_id=submission_id,
            metadata=metadata, entrypoint_num_cpus=entrypoint_num_cpus or None,
            runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})}})

    def _submit_job(self, **job) -> str:
        """``JobSubmissionClient.submit_job``, its failures as ClusterUnreachable or UserError."""
        try:
            return self.client.submit_job(**job)
        except Exception as exc:
            if _unreachable(exc):
                raise ClusterUnreachable(f"the Ray Jobs API at {self.address} did not answer: "
                                         f"{_first_line(exc)}") from None
            raise UserError(f"the Ray Jobs API at {self.address} refused the job: {_first_line(exc)}"
                            f"{_auth_hint(exc)}") from None

    # -- following -------------------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobState:
        try:
            info = self.client.get_job_info(job_id)
        except Exception as exc:
            raise self._job_error(job_id, exc) from None
        return JobState(
            job_id=info.submission_id or job_id, status=str(getattr(info.status, "value", info.status)),
            message=info.message or "", entrypoint=info.entrypoint or "", metadata=dict(info.metadata or {}),
            start_time=info.start_time / 1000 if info.start_time else None,
            end_time=info.end_time / 1000 if info.end_time else None)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already finished."""
        try:
            return bool(self.client.stop_job(job_id))
        except Exception as exc:
            raise self._job_error(job_id, exc) from None

    def logs(self, job_id: str) -> str:
        try:
            return self.client.get_job_logs(job_id)
        except Exception as exc:
            raise self._job_error(job_id, exc) from None

    def follow(self, job_id: str) -> Iterator[str]:
        """The job's log as it is written, until the job ends."""
        agen = self.client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> JobState:
        deadline = None if timeout is None else time.time() + timeout
        while True:
            state = self.status(job_id)
            if state.finished or (deadline is not None and time.time() >= deadline):
                return state
            time.sleep(poll_s)

    def _job_error(self, job_id: str, exc: Exception) -> UserError:
        text = _first_line(exc)
        if _unreachable(exc):
            return ClusterUnreachable(f"the Ray Jobs API at {self.address} did not answer for job {job_id}: {text}")
        if "404" in text or "does not exist" in text or "not found" in text.lower():
            return JobNotFound(f"no job {job_id} on the cluster at {self.address} (list them with: ray job list "
                               f"--address {self.address})")
        return UserError(f"the Ray Jobs API at {self.address} failed for job {job_id}: {text}{_auth_hint(exc)}")


NOT_ON_PATH = 127  # the shell's "command not found"
NOT_ON_PATH_HELP = (
    "rayfine is not installed on the cluster, or not on the PATH of the process that ran `ray start` on the head "
    "node: install the same rayfine there (pip install -e . in a clone, or the image built from k8s/Dockerfile) and start Ray from the "
    "environment that has it (activate the virtualenv first, or run its bin/ray start)")


def job_entrypoint(command: str, module: str) -> str:
    """The job's shell command: ``rayfine COMMAND package:MODULE/config.yaml``, or a clear error when the cluster's
    PATH has no rayfine (Ray's own message would be a bare "exit code 127")."""
    return rayfine_entrypoint(f"{command} package:{module}/config.yaml" + (" --detach" if command == "run" else ""))


def rayfine_entrypoint(args: str) -> str:
    """``rayfine ARGS`` (already shell-safe) when the cluster's PATH has rayfine, else a clear error and exit 127."""
    return (f"if command -v rayfine >/dev/null 2>&1; then exec rayfine {args}; fi; "
            f"echo 'error: {NOT_ON_PATH_HELP} (PATH='\"$PATH\"')' >&2; exit {NOT_ON_PATH}")


def _package_data(data: dict, dest: Path) -> dict:
    """Copy every local data path into ``dest`` and point the config at the copies (relative paths)."""
    data = dict(data)
    counter = 0
    for split in ("train", "validation", "test"):
        value = data.get(split)
        if value is None:
            continue
        entries = value if isinstance(value, list) else [value]
        packed = []
        for entry in entries:
            if "://" in entry:
                packed.append(entry)
                continue
            counter += 1
            packed.append(_copy_entry(entry, dest / f"{split}-{counter}", f"data/{split}-{counter}"))
        data[split] = packed if isinstance(value, list) else packed[0]
    return data


def _copy_entry(entry: str, dest: Path, rel: str) -> str:
    path = Path(entry)
    if _GLOB_CHARS & set(entry):
        matches = sorted(glob.glob(entry, recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise UserError(f"data: {entry} matches no file")
        dest.mkdir(parents=True)
        for f in files:
            if (dest / f.name).exists():
                raise UserError(f"data: {entry} matches two files named {f.name}; name shards uniquely or "
                                "give their folder")
            shutil.copy2(f, dest / f.name)
        return f"{rel}/{Path(entry).name}"
    if path.is_dir():
        shutil.copytree(path, dest / path.name)
        return f"{rel}/{path.name}"
    if path.is_file():
        dest.mkdir(parents=True)
        shutil.copy2(path, dest / path.name)
        return f"{rel}/{path.name}"
    raise UserError(f"data: {entry} not found on this machine (if it is on the cluster, pass --data-on-cluster)")


def _unreachable(exc: Exception) -> bool:
    """A connection that failed or timed out (the head is down or restarting), not an answer from Ray."""
    import requests

    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def _auth_hint(exc: Exception) -> str:
    text = str(exc).lower()
    if "401" in text or "403" in text or "unauthorized" in text or "authentication" in text or "token" in text:
        return ("\n  the cluster uses token authentication (the default for `ray start` clusters): export "
                "RAY_AUTH_MODE=token, and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH unless the cluster's token is in "
                "~/.ray/auth_token (on the head node: ray get-auth-token)")
    return ""


# -- the CLI verbs -----------------------------------------------------------------------------------------------

def submit_command(cfg: RunConfig, config_path: str, overrides: list[str], address: str | None, command: str,
                   wait: bool, storage: str | None, data_on_cluster: bool) -> int:
    client = JobsClient(address)
    model_ref = _model_reference(config_path, cfg, overrides)
    job = client.submit(cfg, command, storage=storage, data_on_cluster=data_on_cluster,
                        model_name_or_path=model_ref)
    print(f"submitted job {job.job_id} to {client.address}: rayfine {command} ({cfg.task})")
    print(f"  run folder on the cluster: {job.run_dir}")
    if not wait:
        print(f"  follow it:  ray job logs {job.job_id} --address {client.address} --follow")
        print(f"  status:     rayfine status {job.job_id} --address {client.address}")
        print(f"  stop it:    rayfine stop {job.job_id} --address {client.address}")
        return 0
    return follow_command(client, job.job_id)


def follow_command(client: JobsClient, job_id: str) -> int:
    collector.resume()  # the command's start-up is over: it follows the job's log from now on (core.collector)
    try:
        for chunk in client.follow(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        state = client.wait(job_id, timeout=30)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (rayfine stop {job_id} --address "
              f"{client.address} stops it)", file=sys.stderr)
        return 130
    return _report_end(state)


def _report_end(state: JobState) -> int:
    took = f" after {state.end_time - state.start_time:.0f}s" if state.start_time and state.end_time else ""
    if state.status == "SUCCEEDED":
        print(f"job {state.job_id} succeeded{took}")
        return 0
    print(f"job {state.job_id} {state.status.lower()}{took}{failure_reason(state)}", file=sys.stderr)
    return 1


def failure_reason(state: JobState) -> str:
    """The first line of Ray's message and the job's own ``error:`` lines (Ray appends the log's tail)."""
    if not state.message:
        return ""
    lines = state.message.splitlines()
    if f"exit code {NOT_ON_PATH}" in lines[0] and not any(line.startswith("error:") for line in lines):
        lines.append(f"error: {NOT_ON_PATH_HELP}")
    errors, inside = [], False
    for line in lines[1:]:  # "error: ..." and the indented lines that belong to it
        inside = line.startswith("error:") or (inside and line.startswith(" ") and line.strip() != "")
        if inside:
            errors.append(line)
    return ": " + lines[0].split(", last available logs")[0] + "".join(f"\n  {line}" for line in errors)


def status_command(address: str | None, job_id: str) -> int:
    client = JobsClient(address)
    state = client.status(job_id)
    print(f"job {state.job_id}: {state.status}")
    if state.entrypoint:
        print(f"  entrypoint: {display_entrypoint(state.entrypoint)}")
    if state.metadata.get("rayfine_run_dir"):
        print(f"  run folder: {state.metadata['rayfine_run_dir']}")
    if state.start_time:
        end = state.end_time or time.time()
        print(f"  started:    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state.start_time))} "
              f"({end - state.start_time:.0f}s {'in all' if state.end_time else 'so far'})")
    if state.message:
        print(f"  message{failure_reason(state)}")
    return 0


def stop_command(address: str | None, job_id: str, wait_s: float = 30.0) -> int:
    client = JobsClient(address)
    if not client.stop(job_id):
        state = client.status(job_id)
        print(f"job {job_id} had already ended: {state.status}")
        return 0
    state = client.wait(job_id, timeout=wait_s)
    print(f"job {job_id}: {state.status}" + ("" if state.finished else " (stop requested)"))
    return 0


def _model_reference(config_path: str, cfg: RunConfig, overrides: list[str]) -> str:
    """The model as the config names it when that is a ``package:`` reference (resolved per machine)."""
    for pair in reversed(overrides):
        key, _, value = pair.partition("=")
        if key.strip() == "model.name_or_path":
            return value.strip() if value.strip().startswith("package:") else cfg.model.name_or_path
    try:
        raw = yaml.safe_load(Path(config_path).read_text()) or {}
        name = (raw.get("model") or {}).get("name_or_path")
    except (OSError, yaml.YAMLError, AttributeError):
        return cfg.model.name_or_path
    return name if isinstance(name, str) and name.startswith("package:") else cfg.model.name_or_path
