"""Experiment tracking: a run's config, metrics and results sent to MLflow, TensorBoard and Weights & Biases
(``tracking:``).

The driver follows metrics.jsonl (rank 0's reports, which the Train controller appends) and hands every record to
the trackers, so only rank 0 is logged, once, whatever the number of workers. A tracker that fails (a server that
does not answer, a full disk) warns once and is dropped for the rest of the run: the run itself never fails for it.

MLflow (``tracking.mlflow``): one MLflow run per training run, named after the run folder; a resumed run folder
continues its MLflow run (the id is kept in RUN/tracking.json). Logged: the resolved config as parameters
(flattened keys, e.g. ``training.learning_rate``), every numeric metric of metrics.jsonl with its step, tags for
the task, the base model, the ZeRO stage and the Ray job's submission id when there is one; at the end eval.json
(as metrics ``final_<split>_<name>`` and as an artifact), config.yaml, the plots and the model card as artifacts.
The embedded default store is ``sqlite:///OUTPUT_DIR/mlflow.db`` with artifacts in ``OUTPUT_DIR/mlartifacts``.
A Tune search is one parent run; each trial is a child run, and the best trial is tagged ``best_trial=true``.

TensorBoard (``tracking.tensorboard``): event files in RUN/tensorboard, one scalar series per metric, so that
``tensorboard --logdir OUTPUT_DIR`` compares runs (and a Tune folder's trials).

Weights & Biases (``tracking.wandb``): one W&B run per training run, its files in RUN/wandb (``mode: offline``
writes only those; ``wandb sync`` uploads them later), the resolved config as its config, every metric at its step,
eval.json's metrics in its summary; a resumed run folder resumes its W&B run; a Tune search's trials are one W&B
group (the tune folder's name).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any, Optional

from core.config import RunConfig
from core.run_folder import RunFolder

logger = logging.getLogger(__name__)

PIPELINE_TASKS = {"sequence_classification": "text-classification", "token_classification": "token-classification",
                  "question_answering": "question-answering", "causal_lm": "text-generation"}
STATE_FILE = "tracking.json"  # in the run folder: the MLflow run id, so that a resumed run continues it
# A tracking server that does not answer costs a run seconds, not minutes: MLflow's own defaults retry for long.
_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def default_tracking_uri(cfg: RunConfig) -> str:
    return f"sqlite:///{Path(cfg.output.dir).expanduser().resolve() / 'mlflow.db'}"


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """``{"training": {"lr": 1e-4}}`` -> ``{"training.lr": "0.0001"}`` (lists as JSON); None values are left out."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if value is None:
        return {}
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return {prefix.rstrip("."): text[:6000]}


def numeric_metrics(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}


def ray_submission_id() -> Optional[str]:
    """The Ray job's submission id when this process is a Ray job's driver (``rayfine submit``, the jobs API)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return (config.get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


class RunTracker:
    """The trackers of one training run (or, with ``search=True``, the parent run of a Tune search)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, parent_run_id: Optional[str] = None, search: bool = False,
                 tracking_uri: Optional[str] = None):
        """``tracking_uri``: the store of the parent run (a Tune trial's config names its trial folder as output
        dir, which would put the embedded default store elsewhere)."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.parent_run_id, self.search = parent_run_id, search
        self.uri = tracking_uri
        self.mlflow = None  # the MlflowClient while it works
        self.run_id: Optional[str] = None
        self.writer = None  # the TensorBoard SummaryWriter while it works
        self.wandb = None  # the W&B run while it works

    @property
    def enabled(self) -> bool:
        t = self.cfg.tracking
        return t.mlflow is not None or t.tensorboard or t.wandb is not None

    # ---- start ------------------------------------------------------------------------------------------------
    def start(self) -> "RunTracker":
        if self.cfg.tracking.mlflow is not None:
            self._guard("MLflow", self._start_mlflow)
        if self.cfg.tracking.tensorboard and not self.search:
            self._guard("TensorBoard", self._start_tensorboard)
        if self.cfg.tracking.wandb is not None and not self.search:
            self._guard("W&B", self._start_wandb)
        return self

    def _start_mlflow(self) -> None:
        for key, value in _MLFLOW_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        settings = self.cfg.tracking.mlflow
        uri = self.uri or settings.tracking_uri or default_tracking_uri(self.cfg)
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(settings.experiment)
        if experiment is None:
            artifacts = None
            if uri.startswith("sqlite:///") and settings.tracking_uri is None:  # artifacts beside the store
                artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            experiment_id = client.create_experiment(settings.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        state = self._state()
        run_id = state.get("mlflow_run_id")
        if run_id and state.get("tracking_uri") == uri:
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {"task": self.cfg.task, "base_model": self.cfg.model.name_or_path,
                    "zero_stage": str(self.cfg.deepspeed.stage), "run_dir": str(self.run_dir),
                    "mlflow.source.name": "rayfine tune" if self.search else "rayfine train"}
            if self.cfg.output.model_id:  # the served id (the jobs API's ft:BASE:SUFFIX:JOBID)
                tags["model_id"] = self.cfg.output.model_id
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            if ray_submission_id():
                tags["ray_job_id"] = ray_submission_id()
            run = client.create_run(experiment_id, run_name=settings.run_name or self.run_dir.name, tags=tags)
            run_id = run.info.run_id
            params = [Param(k, v) for k, v in flatten(self.cfg.model_dump(mode="json")).items()]
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i:i + 100])
            self._save_state({**state, "mlflow_run_id": run_id, "tracking_uri": uri})
        self.mlflow, self.run_id, self.uri = client, run_id, uri
        logger.info(f"MLflow: run {run_id} in experiment {settings.experiment!r} at {uri}")

    def _start_tensorboard(self) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), flush_secs=5)

    def _start_wandb(self) -> None:
        import wandb

        settings = self.cfg.tracking.wandb
        state = self._state()
        run_id = state.get("wandb_run_id") or "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                       for _ in range(8))
        if "wandb_run_id" not in state:
            self._save_state({**state, "wandb_run_id": run_id})
        tags = [*settings.tags, self.cfg.task]
        group = self.run_dir.parent.name if self.parent_run_id is not None or _is_trial(self.run_dir) else None
        self.wandb = wandb.init(
            project=settings.project, entity=settings.entity, name=settings.name or self.run_dir.name, tags=tags,
            mode=settings.mode, dir=str(self.run_dir), id=run_id, resume="allow", group=group,
            config=self.cfg.model_dump(mode="json"), reinit="create_new",
            settings=wandb.Settings(init_timeout=60, silent=True))
        logger.info(f"W&B: run {run_id} in project {settings.project!r} ({settings.mode})")

    # ---- metrics ----------------------------------------------------------------------------------------------
    def log(self, records: list[dict]) -> None:
        """Records of metrics.jsonl, in order (each with its ``step``)."""
        if self.mlflow is not None:
            self._guard("MLflow", self._log_mlflow, records)
        if self.writer is not None:
            self._guard("TensorBoard", self._log_tensorboard, records)
        if self.wandb is not None:
            self._guard("W&B", self._log_wandb, records)

    def _log_mlflow(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, int(r.get("time", time.time()) * 1000), int(r.get("step", 0)))
                   for r in records for key, value in numeric_metrics(r).items()]
        for i in range(0, len(metrics), 1000):
            self.mlflow.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _log_wandb(self, records: list[dict]) -> None:
        for record in records:
            metrics = numeric_metrics(record)
            if metrics:
                self.wandb.log(metrics, step=int(record.get("step", 0)))

    def _log_tensorboard(self, records: list[dict]) -> None:
        for record in records:
            for key, value in numeric_metrics(record).items():
                self.writer.add_scalar(key, value, int(record.get("step", 0)), walltime=record.get("time"))
        self.writer.flush()

    # ---- end --------------------------------------------------------------------------------------------------
    def finish(self, evaluation: Optional[dict] = None, failed: bool = False) -> None:
        """Log the results (eval.json, artifacts) and end the run; ``failed`` marks it FAILED."""
        if self.mlflow is not None:
            self._guard("MLflow", self._finish_mlflow, evaluation, failed)
        if self.writer is not None:
            self._guard("TensorBoard", self.writer.close)
            self.writer = None
        if self.wandb is not None:
            self._guard("W&B", self._finish_wandb, evaluation, failed)
            self.wandb = None

    def _finish_mlflow(self, evaluation: Optional[dict], failed: bool) -> None:
        from mlflow.entities import Metric

        client, run_id, run = self.mlflow, self.run_id, RunFolder(self.run_dir)
        now = int(time.time() * 1000)
        finals = [Metric(f"final_{split}_{name}", float(value), now, 0)
                  for split, values in (evaluation or {}).items()
                  for name, value in numeric_metrics(values).items()]
        if finals:
            client.log_batch(run_id, metrics=finals)
        for path, folder in ((run.eval, None), (run.config, None), (run.model / "README.md", "model")):
            if path.is_file():
                client.log_artifact(run_id, str(path), folder)
        if run.plots.is_dir() and any(run.plots.iterdir()):
            client.log_artifacts(run_id, str(run.plots), "plots")
        register = self.cfg.tracking.mlflow.register_model
        if register and not failed and not self.search and (run.model / "config.json").is_file():
            self._guard("MLflow model registry", self._register_model,
                        register if isinstance(register, str) else self.run_dir.name)
        client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        self.mlflow = None

    def _register_model(self, name: str) -> None:
        """The exported model as a transformers pipeline, logged to this run and registered as ``name``."""
        import mlflow
        import mlflow.transformers
        import torch
        import transformers

        model_dir = RunFolder(self.run_dir).model
        pipe = transformers.pipeline(PIPELINE_TASKS[self.cfg.task], model=str(model_dir), tokenizer=str(model_dir),
                                     device="cpu")
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.transformers.log_model(
                transformers_model=pipe, name="model", registered_model_name=name,
                # given, not inferred: inference imports every package transformers might use (torchvision, ...)
                pip_requirements=[f"transformers=={transformers.__version__}",
                                  f"torch=={torch.__version__.split('+')[0]}"])
        logger.info(f"MLflow: registered {name!r} version {info.registered_model_version}")

    def _finish_wandb(self, evaluation: Optional[dict], failed: bool) -> None:
        for split, values in (evaluation or {}).items():
            for name, value in numeric_metrics(values).items():
                self.wandb.summary[f"final_{split}_{name}"] = value
        self.wandb.finish(exit_code=1 if failed else 0)

    def end_children(self, trial_dirs: list[Path], stopped: list[Path]) -> None:
        """Mark KILLED the child runs left RUNNING (a trial's process ended before its run did) and those of the
        ``stopped`` trials (ASHA stopped them: Tune ends their process, which may have ended the run FAILED, or
        FINISHED when its Train run returned, on its way out)."""
        if self.mlflow is None:
            return

        def end() -> None:
            for trial_dir in trial_dirs:
                run_id = RunTracker(self.cfg, trial_dir).saved_run_id()
                status = self.mlflow.get_run(run_id).info.status if run_id else None
                if status == "RUNNING" or (status not in (None, "KILLED") and trial_dir in stopped):
                    self.mlflow.set_terminated(run_id, "KILLED")

        self._guard("MLflow", end)

    def tag(self, key: str, value: str, run_id: Optional[str] = None) -> None:
        if self.mlflow is not None:
            self._guard("MLflow", self.mlflow.set_tag, run_id or self.run_id, key, value)

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _guard(self, name: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            logger.warning(f"warning: {name} tracking failed and is off for the rest of this run: "
                           f"{type(exc).__name__}: {first[:300]}")
            if name == "MLflow":
                self.mlflow = None
            elif name == "MLflow model registry":
                pass  # the run itself is still logged
            elif name == "W&B":
                self.wandb = None
            else:
                self.writer = None

    def saved_run_id(self) -> Optional[str]:
        """The MLflow run id this run folder was tracked under (RUN/tracking.json), if any."""
        return self._state().get("mlflow_run_id")

    def _state(self) -> dict:
        try:
            return json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / STATE_FILE).write_text(json.dumps(state))


def _is_trial(run_dir: Path) -> bool:
    return run_dir.name.startswith("trial_")
