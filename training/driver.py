"""The driver of one training run: pre-flight, run folder, TorchTrainer, and the finished run folder.

    summarize_data -> TrainPlan -> TorchTrainer(train_loop_per_worker).fit() -> model/, eval.json, plots/

Ray Tune wraps ``fit_run`` (the driver function), never the trainer object. Ray is up already (the CLI starts
or joins it); progress goes to this module's logger, which the CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ray.train import UserCallback

from core import collector, timings
from core.config import RunConfig, dump_config
from core.errors import UserError
from core.ray_private import TorchBackendConfig, setup_hook_env, start_train_coordinator, started_here, trimmed_trainer
from core.run_folder import CHECKPOINTS, RunFolder, read_records
from training.ds_config import single_rank_runs_zero_0
from training.loop import TrainPlan, train_loop_per_worker
from training.scaling import resolve_use_gpu, resolve_workers, workers_text
from training.tracking import RunTracker

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    metrics: dict


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line to metrics.jsonl. A last line cut short (a crash or a full disk before a resume) is
    ended first, so that it stays one unreadable line and never swallows this record."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


class MetricsLogCallback(UserCallback):
    """Runs in the Ray Train controller: appends rank 0's report to metrics.jsonl and exports the
    training gauges (``ray_rayfine_train_*`` on Ray's Prometheus endpoint)."""

    GAUGES = {"loss": "rayfine_train_loss", "samples_per_second": "rayfine_train_samples_per_second",
              "step": "rayfine_train_step", "eval_loss": "rayfine_train_eval_loss"}

    def __init__(self, run_dir: Path):
        self.path = RunFolder(Path(run_dir)).metrics
        self.run_name = Path(run_dir).name
        self._gauges = None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = dict(metrics[0]) if metrics else {}
        if not m:
            return
        record = {k: v for k, v in m.items() if not k.endswith("_report")}
        record["time"] = round(time.time(), 3)
        append_record(self.path, record)
        self._export(record)

    def _export(self, record: dict) -> None:
        from ray.util.metrics import Gauge

        if self._gauges is None:
            self._gauges = {key: Gauge(name, description=f"rayfine training {key}", tag_keys=("run",))
                            for key, name in self.GAUGES.items()}
        for key, gauge in self._gauges.items():
            if isinstance(record.get(key), (int, float)):
                gauge.set(float(record[key]), tags={"run": self.run_name})


class ProgressPrinter(threading.Thread):
    """Follows metrics.jsonl from the driver and logs one line per report (workers' logs stay in Ray's
    log folder, so the terminal shows the run's progress and not Ray's internals); hands the records to the
    run's trackers (``training.tracking``) too. ``show=False``: trackers only (a Tune trial prints nowhere)."""

    def __init__(self, path: Path, total_steps: int, tracker=None, show: bool = True):
        super().__init__(daemon=True)
        self.path, self.total_steps = path, total_steps
        self.tracker, self.show = tracker, show
        self.offset = path.stat().st_size if path.exists() else 0
        self.started = time.time()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self.flush()

    def flush(self) -> None:
        records, self.offset = read_records(self.path, self.offset)
        for record in records if self.show else ():
            logger.info(format_progress(record, self.total_steps, time.time() - self.started))
        if records and self.tracker is not None:
            self.tracker.log(records)

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        self.flush()


COUNTS = ("eval_num_examples", "eval_num_pairs")  # sizes, not scores: left out of the progress line


def format_progress(m: dict, total_steps: int, elapsed: float) -> str:
    step = m.get("step", 0)
    parts = [f"step {step:>5}/{total_steps}"]
    if "epoch" in m:
        parts.append(f"epoch {m['epoch']:.2f}")
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    if "reward_accuracy" in m:  # DPO
        parts.append(f"reward acc {m['reward_accuracy']:.2f} margin {m['reward_margin']:.3f}")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    if "samples_per_second" in m:
        parts.append(f"{m['samples_per_second']:.1f} samples/s")
    evals = [f"{k.removeprefix('eval_')} {v:.4f}" for k, v in m.items()
             if k.startswith("eval_") and isinstance(v, (int, float)) and k not in COUNTS]
    if evals:
        parts.append("eval: " + ", ".join(evals))
    if step and total_steps and not m.get("final"):
        eta = elapsed / step * (total_steps - step)
        parts.append(f"eta {eta:.0f}s")
    return "  " + " | ".join(parts)


def prepare_run_dir(cfg: RunConfig) -> tuple[RunConfig, Path, bool]:
    """Pick the run folder: resume an unfinished one, never overwrite a finished one. Returns the config of
    the run (``output.name`` changed when the folder is taken), its folder, and whether it resumes."""
    base = Path(cfg.output.dir).expanduser().resolve()
    name = cfg.output.name
    run_dir = base / name
    suffix = 1
    while RunFolder(run_dir).model.exists():
        suffix += 1
        run_dir = base / f"{name}-{suffix}"
    resume = RunFolder(run_dir).checkpoints.exists()
    if run_dir.name != name:
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"name": run_dir.name})})
        logger.info(f"{base / name} holds a finished run; this run goes to {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir, resume


# A split whose tokens fit in this many is tokenized once, before training, and kept in Ray's object store
# (about 4 bytes a token): each epoch and each evaluation then reads the stored blocks instead of reading and
# tokenizing the files again, which on small data costs more than the pass itself. Larger splits stream.
MATERIALIZE_MAX_TOKENS = 20_000_000


def build_datasets(cfg: RunConfig, labels, summary=None) -> dict:
    """The tokenized splits of a run: for small local data read by the pre-flight (``summary``), each an object
    ref of the split held whole (``training.data.held_split``); else Ray Datasets, the small ones materialized."""
    from training.data import Splits, held_split, tokenized
    from training.tasks import get_adapter

    splits = Splits(cfg)
    records = summary.records_for(cfg) if summary is not None else None
    if records is not None:  # small local data, read by the pre-flight
        names = ["train", "validation"] + (["test"] if splits.test else [])
        datasets = {name: held_split(records.get(name, []), cfg, labels) for name in names}
    else:
        datasets = {"train": tokenized(splits.records("train"), cfg, labels),
                    "validation": tokenized(splits.records("validation"), cfg, labels)}
        test = splits.records("test")
        if test is not None:
            datasets["test"] = tokenized(test, cfg, labels)
        if summary is not None:
            for split, dataset in datasets.items():
                tokens = summary.tokens(split, cfg.data.max_seq_length)
                if tokens is not None and tokens <= MATERIALIZE_MAX_TOKENS:
                    datasets[split] = dataset.materialize()
    if get_adapter(cfg).reference_pass:  # DPO: every rank scores a share of the whole train split once
        datasets["reference"] = datasets["train"]
    return datasets


def build_trainer(cfg: RunConfig, plan: TrainPlan, labels, run_dir: Path, callbacks=(), summary=None,
                  spread: bool = False, local: bool = False):
    """The TorchTrainer of one run (its splits from ``build_datasets``: held ones travel in the loop's config,
    Ray Datasets through Ray Train's ingest); ``spread``: one worker per node (``training.scaling``); ``local``:
    the run is on a local instance, whose placement groups need no cleaner (``core.ray_private.trimmed_trainer``,
    which also leaves out Ray Train's dataset actor when no split is a Ray Dataset)."""
    from ray.data import Dataset
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    splits = build_datasets(cfg, labels, summary)
    timings.mark("datasets: tokenize, hold or materialize small splits")
    datasets = {name: split for name, split in splits.items() if isinstance(split, Dataset)}
    held = {name: split for name, split in splits.items() if name not in datasets}
    train_options = DataConfig.default_ingest_options()
    train_options.preserve_order = True  # same order after a restart, so the skipped batches are the seen ones
    resources = cfg.scaling.resources_per_worker or ({"CPU": 1, "GPU": 1} if plan.use_gpu else {"CPU": 1})
    return trimmed_trainer(TorchTrainer, local)(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "plan": plan, "labels": labels, "held": held},
        torch_config=TorchBackendConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy="SPREAD" if spread else "PACK"),
        run_config=RayRunConfig(
            name=CHECKPOINTS, storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            worker_runtime_env=setup_hook_env(collector.SETUP_HOOK)),
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=["train"] if "train" in datasets else [],
                                  execution_options={"train": train_options}),
    )


def _root_cause(exc: BaseException) -> str:
    errors = getattr(exc, "worker_failures", None) or getattr(exc, "worker_exceptions", None)
    if isinstance(errors, dict) and errors:
        exc = next(iter(errors.values()))
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def fit_run(cfg: RunConfig, summary, run_dir: Path, callbacks=(), progress: bool = True, tracker=None,
            spread: bool = False, local: bool | None = None):
    """Build and fit the trainer; returns Ray's Result. Raises UserError on a failed run.

    ``progress=False`` skips the per-report lines (a Tune trial's driver prints nowhere a user looks).
    ``tracker``: a started ``training.tracking.RunTracker`` that gets every report.
    ``local``: Ray is a local instance (default: whether this process started the one it is connected to).
    ``cfg.scaling.num_workers`` is a number here (``training.scaling.resolve_workers``)."""
    import ray
    import ray.train

    labels = summary.labels
    use_gpu = resolve_use_gpu(cfg)
    # Rows, not records: a QA record becomes one row per window of its context. The parameter count is the
    # workers' (``Worker.configure_engine``), where the model's code is imported anyway.
    plan = TrainPlan.build(cfg, summary.rows("train"), cfg.scaling.num_workers, use_gpu,
                           packed_sequences=estimate_packed_sequences(cfg, summary))
    if progress and single_rank_runs_zero_0(cfg, plan.world_size):
        logger.info(f"DeepSpeed: ZeRO-{plan.zero_stage} (deepspeed.stage {cfg.deepspeed.stage} partitions nothing "
                    "with one worker; the same training without its bookkeeping)")
    trainer = build_trainer(cfg, plan, labels, run_dir, [MetricsLogCallback(run_dir), *callbacks], summary,
                            spread=spread, local=started_here() if local is None else local)
    printer = (ProgressPrinter(RunFolder(run_dir).metrics, plan.total_steps, tracker, show=progress)
               if progress or tracker is not None else None)
    if printer:
        printer.start()
    metrics_file = RunFolder(run_dir).metrics
    offset = metrics_file.stat().st_size if metrics_file.exists() else 0
    try:
        collector.resume()  # the rayfine command's start-up ends here: it waits for the workers from now on
        with _sigint_handler_restored():
            result = trainer.fit()
        check_divergence(run_dir, offset)
        return result, plan
    except ray.train.TrainingFailedError as exc:
        raise UserError(f"training failed: {_root_cause(exc)}\n  The run folder {run_dir} keeps its "
                        "checkpoints: run the same command again to resume from the last one.\n  Worker "
                        "logs: /tmp/ray/session_latest/logs (or run with RAYFINE_VERBOSE=1).") from None
    finally:
        if printer:
            printer.stop()


@contextmanager
def _sigint_handler_restored():
    """Put this process's Ctrl+C handler back after ``trainer.fit()``. Ray Train's ``fit()`` (checked against Ray
    2.60) installs its own in the main thread, and that handler holds the run's controller actor: the controller,
    and the DatasetManager and SplitCoordinator actors it owns, outlived the run until another handler replaced
    it (in ``rayfine run``, all the time the model was served)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)


def check_divergence(run_dir: Path, offset: int) -> None:
    """Raise UserError when the workers ended this fit on a non-finite loss (their last report, in metrics.jsonl
    after byte ``offset``; a Ray result only carries the metrics of a checkpoint)."""
    records, _ = read_records(RunFolder(run_dir).metrics, offset)
    ended = [r for r in records if r.get("diverged_at_step")]
    if ended:
        step, loss = ended[-1]["diverged_at_step"], ended[-1].get("diverged_loss", "nan")
        raise UserError(f"training diverged: the loss is {loss} at step {step}; lower training.learning_rate or "
                        "raise training.warmup_ratio (not retried: scaling.max_failures restarts only after "
                        f"faults).\n  Start again in a new output.name: {run_dir} would resume from its last "
                        "checkpoint.")


def _worker_startup(run_dir: Path, offset: int = 0) -> dict[str, float]:
    """Rank 0's start-up timestamps, from the first metrics.jsonl record after byte ``offset`` that carries them
    (this command's run: a resumed run folder holds earlier ones)."""
    records, _ = read_records(RunFolder(run_dir).metrics, offset)
    return next((r["startup"] for r in records if isinstance(r.get("startup"), dict)), {})


def estimate_packed_sequences(cfg: RunConfig, summary) -> int | None:
    """With data.packing: packed sequences per epoch, from the token count at a typical 85% fill."""
    if not cfg.data.packing:
        return None
    tokens = summary.length_stats("train", cfg.data.max_seq_length).get("tokens", 0)
    return max(1, math.ceil(tokens / (cfg.data.max_seq_length * 0.85)))


def finalize_run(cfg: RunConfig, run_dir: Path, result) -> TrainResult:
    """Copy the exported model out of the final checkpoint and write eval.json, plots and the model card."""
    from training.export import write_model_card
    from training.plots import write_plots

    metrics = dict(result.metrics or {})
    run = RunFolder(run_dir)
    model_dir = run.model
    staging = run_dir / ".model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "model", staging)
        if RunFolder(Path(ckpt)).adapter.is_dir():  # LoRA: the peft adapter folder beside the model
            shutil.rmtree(run.adapter, ignore_errors=True)
            shutil.copytree(RunFolder(Path(ckpt)).adapter, run.adapter)
    evaluation = {"validation": json.loads(metrics.get("eval_report", "{}"))}
    if "test_report" in metrics:
        evaluation["test"] = json.loads(metrics["test_report"])
    write_model_card(staging, cfg, evaluation)
    write_plots(run.metrics, run.plots)
    if cfg.task == "causal_lm":
        from training.samples import write_samples

        write_samples(cfg, staging, run.samples)
    staging.rename(model_dir)  # atomic: a model/ folder only ever appears complete
    run.eval.write_text(json.dumps(evaluation, indent=2))
    return TrainResult(run_dir, model_dir, evaluation)


def train(cfg: RunConfig, checks=None) -> TrainResult:
    """``rayfine train``: check the data, train, export; logs progress and the evaluation table. ``checks``:
    ``preflight.start_checks(cfg, count=False)``, called before Ray started (else here)."""
    from training.evaluate import format_metrics_table
    from training.preflight import start_checks

    checks = checks or start_checks(cfg, count=False)
    cfg, workers = resolve_workers(cfg)
    start_train_coordinator()  # its process starts while the data is checked
    logger.info(f"Workers: {cfg.scaling.num_workers} ({workers.reason})")
    logger.info("Checking the data ...")
    summary = checks.summary()  # before the run folder exists: bad data leaves nothing behind
    timings.mark("pre-flight data pass")
    logger.info("  records: " + ", ".join(f"{k} {v:,}" for k, v in summary.counts.items()))
    if any(summary.rows(k) != v for k, v in summary.counts.items()):
        logger.info("  rows after tokenization: " + ", ".join(f"{k} {summary.rows(k):,}" for k in summary.counts))
    cfg, run_dir, resume = prepare_run_dir(cfg)
    logger.info(("Resuming" if resume else "Starting") + f" run in {run_dir}")
    RunFolder(run_dir).config.write_text(dump_config(cfg))
    started = time.time()
    timings.mark("run folder")
    metrics_before = RunFolder(run_dir).metrics.stat().st_size if RunFolder(run_dir).metrics.exists() else 0
    tracker = RunTracker(cfg, run_dir)
    if tracker.enabled:
        tracker.start()
    try:
        result, plan = fit_run(cfg, summary, run_dir, tracker=tracker, spread=workers.spread)
        if timings.enabled():
            logger.info(timings.startup_table(_worker_startup(run_dir, metrics_before)))
            timings.reset()
        logger.info(f"Training finished in {time.time() - started:.0f}s ({plan.total_steps} steps, "
                    f"{workers_text(cfg.scaling.num_workers)}, ZeRO-{plan.zero_stage}).")
        done = finalize_run(cfg, run_dir, result)
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish(done.metrics)
    for split, m in done.metrics.items():
        logger.info(f"\n{split} metrics:\n{format_metrics_table(m)}")
    logger.info(f"\nModel exported to {done.model_dir}")
    return done
