"""``rayfine tune``: a Ray Tune search whose trials are full rayfine training runs.

    summarize_data (once) -> Tuner(run_trial) -> per trial: fit_run (Ray Train + DeepSpeed workers)
        -> tune_results.csv, plots/tune_<metric>.png, the best trial's model/ and eval.json

Tune wraps the driver function ``run_trial`` (the Ray Train V2 pattern), never the trainer object. Each trial's
Train run reports to Tune only at evaluations (the reports that carry ``tune.metric``), numbered so that ASHA's
time unit is one evaluation in every trial, also across a resume.

Resources: a trial is only the driver of its Train run and holds a token CPU; its workers take
scaling.num_workers x resources_per_worker, and Ray Data one CPU more. ``max_concurrent_trials`` bounds how many
Train runs compete at once (lowered to what fits a local instance, which is started with room for them).

The tune folder (output.dir/output.name) holds Tune's experiment state and one ``trial_<id>`` run folder per
trial (config.yaml, metrics.jsonl, checkpoints/, and Tune's result.json / error.txt). Running the same command
again restores an interrupted search (``Tuner.restore``): finished, stopped and failed trials are kept, the
unfinished ones continue from their own Train checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from core import collector
from core.config import RunConfig, dump_config, load_config, parse_search_space
from core.errors import UserError
from core.ray_private import actor_table, placement_groups_of_dead_actors, start_train_coordinator
from core.run_folder import CHECKPOINTS, RunFolder
from training.driver import finalize_run, fit_run, prepare_run_dir
from training.plots import load_metrics
from training.scaling import resolve_workers, workers_text
from training.tracking import RunTracker
from training.tune_results import (
    EVALUATION,
    FINISHED,
    STOPPED,
    TrialRow,
    collect_trials,
    error_line,
    format_params,
    format_ranked_table,
    write_results_csv,
    write_tune_plot,
)

logger = logging.getLogger(__name__)
# The Tune trial is only the driver of a Train run (its workers take the CPUs/GPUs); it holds a token CPU
# so Tune can schedule it, and max_concurrent_trials bounds how many Train runs compete for the cluster.
TRIAL_DRIVER_RESOURCES = {"CPU": 0.01}
# Ray Data reads and tokenizes next to each trial's workers: one CPU per trial on top of the workers.
DATA_CPUS_PER_TRIAL = 1
# Trials end on their own (epochs / max_steps); ASHA's max_t only has to exceed any trial's evaluations.
ASHA_MAX_EVALUATIONS = 10_000


@dataclass
class TuneResult:
    tune_dir: Path
    model_dir: Path
    best: TrialRow
    trials: list[TrialRow]


class ReportToTune(TuneReportCallback):
    """Runs in the Train controller: forwards rank 0's reports that carry the tune metric (evaluations) to
    Tune, numbered by ``evaluation``, ASHA's time unit. Log-only reports stay in metrics.jsonl.

    The number counts distinct evaluated steps, including those in metrics.jsonl from before an interrupted
    search was resumed: Tune's own training_iteration starts again at 1 when a trial restarts, this does not.
    """

    def __init__(self, metric: str, run_dir: Path):
        super().__init__()
        self.metric = metric
        self.evaluated = {r["step"] for r in load_metrics(RunFolder(Path(run_dir)).metrics) if metric in r}

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and self.metric in metrics[0]:
            report = {k: v for k, v in metrics[0].items() if not k.endswith("_report")}  # JSON blobs
            self.evaluated.add(report["step"])
            report[EVALUATION] = sum(1 for s in self.evaluated if s <= report["step"])
            super().after_report(run_context, [report], checkpoint)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_config(base: RunConfig, params: dict, trial_dir: Path) -> RunConfig:
    """The base config with a trial's sampled values; its run folder is the trial's folder."""
    raw = base.model_dump()
    for path, value in params.items():
        *sections, key = path.split(".")
        node = raw
        for part in sections:
            node = node[part]
        node[key] = value.item() if hasattr(value, "item") else value  # numpy scalars from the sampler
    raw["output"] = {"dir": str(trial_dir.parent), "name": trial_dir.name}
    return load_config(raw=raw)  # a bad combination fails the trial with the key and the fix


def run_trial(params: dict, base: RunConfig, summary, tune_dir: str, parent_run_id: Optional[str] = None,
              tracking_uri: Optional[str] = None, local: bool = False) -> None:
    """The Tune trainable: one rayfine training run (Ray Train workers with DeepSpeed, as ``rayfine train``);
    tracked as a child run of the search's (``parent_run_id``, in its store ``tracking_uri``) when ``tracking:``
    is on. ``local``: the search runs on a local instance (its sweeper removes what stopped trials leave)."""
    import ray.tune

    collector.pause()  # resumed by fit_run once the trial's Train run is built (core.collector)
    trial_dir = Path(tune_dir) / f"trial_{ray.tune.get_context().get_trial_id()}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    cfg = trial_config(base, params, trial_dir)
    RunFolder(trial_dir).config.write_text(dump_config(cfg))
    metric = base.tune.metric
    tracker = RunTracker(cfg, trial_dir, parent_run_id=parent_run_id, tracking_uri=tracking_uri)
    if tracker.enabled:
        tracker.start()
    try:
        result, _ = fit_run(cfg, summary, trial_dir, callbacks=[ReportToTune(metric, trial_dir)], progress=False,
                            tracker=tracker, local=local)
    except BaseException:  # a failed trial, or one ASHA stopped (Tune ends its actor)
        tracker.finish(failed=True)
        raise
    tracker.finish({"validation": json.loads((result.metrics or {}).get("eval_report") or "{}")})
    if metric not in (result.metrics or {}):
        reported = ", ".join(k for k in result.metrics or {} if k.startswith(("eval_", "test_")))
        raise UserError(f"tune.metric: {metric!r} is not reported at evaluations; they report {reported}")


def build_param_space(space: dict) -> dict:
    from ray import tune

    samplers = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
                "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}
    parsed, problems = parse_search_space(space)
    if problems or not parsed:
        raise UserError(problems or ["tune.search_space: empty; add at least one key, e.g. "
                                     "training.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}"])
    return {path: samplers[kind](args) for path, (kind, args) in parsed.items()}


def build_tune_config(cfg: RunConfig, max_concurrent: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = cfg.tune
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr=EVALUATION, max_t=ASHA_MAX_EVALUATIONS,
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # Tune wraps a Searcher in a ConcurrencyLimiter of max_concurrent_trials.
        search_alg, limit = OptunaSearch(seed=cfg.training.seed), max_concurrent
    else:
        # The random/grid generator limits itself (Tune ignores max_concurrent_trials for it, with a warning).
        search_alg, limit = BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.training.seed), None
    return tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=scheduler, search_alg=search_alg,
                           num_samples=t.num_samples, max_concurrent_trials=limit, trial_dirname_creator=trial_dirname)


def cpus_per_trial(cfg: RunConfig) -> float:
    per_worker = (cfg.scaling.resources_per_worker or {}).get("CPU", 1)
    return cfg.scaling.workers() * per_worker + DATA_CPUS_PER_TRIAL  # auto: 1, until Ray runs


def fit_concurrency(cfg: RunConfig, local: bool) -> int:
    """max_concurrent_trials, lowered on a local instance that cannot hold that many Train runs at once (a
    Train run waits for all its workers, so extra trials would only queue; on a cluster the autoscaler may add
    nodes, so there it stays as configured)."""
    import ray

    wanted = cfg.tune.max_concurrent_trials
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 0) // cpus_per_trial(cfg))
    if cfg.scaling.use_gpu is True or (cfg.scaling.use_gpu == "auto" and total.get("GPU", 0) >= 1):
        gpus = (cfg.scaling.resources_per_worker or {}).get("GPU", 1) * cfg.scaling.num_workers
        fits = min(fits, int(total.get("GPU", 0) // gpus))
    if fits >= wanted:
        return wanted
    note = (f"  The cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; a trial takes "
            f"{cpus_per_trial(cfg):g} CPUs ({workers_text(cfg.scaling.num_workers)} + {DATA_CPUS_PER_TRIAL} "
            "for Ray Data)")
    if not local:
        logger.info(note + f": trials beyond {max(fits, 1)} wait for resources.")
        return wanted
    logger.info(note + f": running {max(fits, 1)} trial(s) at once instead of {wanted}.")
    return max(fits, 1)


class TuneProgress(Callback):
    """Runs in the tune driver: one line per evaluation and per finished trial (Tune's own table is off)."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_start(self, iteration, trials, trial, **info):
        logger.info(f"  trial {trial.trial_id} started: {format_params(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else value
        logger.info(f"  trial {trial.trial_id} eval {result.get(EVALUATION)} step {result.get('step')}/"
                    f"{result.get('total_steps', '?')}: {self.metric} {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("final")
        logger.info(f"  trial {trial.trial_id} {FINISHED if done else STOPPED}")

    def on_trial_error(self, iteration, trials, trial, **info):
        path = trial.error_file  # the driver's local copy, written just before this call
        text = Path(path).read_text() if path and Path(path).exists() else ""
        logger.info(f"  trial {trial.trial_id} failed: {error_line(text)}")


class TrainRunSweeper(Callback):
    """Frees what a stopped trial's Train run leaves behind (see ``sweep_stopped_train_runs``), at most every
    ``interval_s`` for a while after a trial ends."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s, self.last, self.pending_until = interval_s, 0.0, 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.pending_until = time.time() + 120  # the controller dies a moment after its trial

    on_trial_error = on_trial_complete

    def on_step_begin(self, iteration, trials, **info):
        if time.time() < self.pending_until and time.time() - self.last > self.interval_s:
            self.sweep()

    def sweep(self, wait_s: float = 0.0, end_leftovers: bool = False) -> None:
        self.last = time.time()
        try:
            sweep_stopped_train_runs(wait_s, end_leftovers)
        except Exception:  # a private GCS view: never let it stop the search
            logger.warning("could not sweep stopped Train runs", exc_info=True)


def sweep_stopped_train_runs(wait_s: float = 0.0, end_leftovers: bool = False) -> int:
    """Remove the worker placement groups of Train runs whose controller died; returns how many. With
    ``wait_s``, keep sweeping (each second, up to that long) until no Train controller of this job is alive.
    With ``end_leftovers`` (once the search is over, so no trial is running), a controller of this job on this
    node that is still alive after that wait is ended, then swept like the others: under load, the controller
    of a trial stopped in the search's last moments was seen to outlive its trial.

    A trial that ASHA stops is killed, and its Train controller with it, but a placement group lives until
    both its creator actor and the job are gone: the workers' CPUs would stay reserved and later trials wait
    forever (ray #54305). Ray Train's own PlacementGroupCleaner (a detached actor per run) asks the state API,
    which needs the dashboard that rayfine's local instances run without, so it never sees the controller die
    and stays alive too. This asks the GCS directly and does both clean-ups.
    """
    import ray

    here = ray.get_runtime_context()
    deadline, removed = time.time() + wait_s, 0
    while True:
        actors = actor_table()
        removed += _sweep_once(actors, here)
        alive = [a for a in actors.values() if a["ActorClassName"] == "TrainController" and a["State"] != "DEAD"
                 and a["JobID"] == here.get_job_id()]
        if not alive:
            return removed
        if time.time() >= deadline:
            if not end_leftovers:
                return removed
            end_leftovers = False
            deadline = time.time() + 10
            for info in alive:
                pid = info.get("Pid") or 0
                if info["Address"].get("NodeID") == here.get_node_id() and int(pid) > 0 and pid != os.getpid():
                    try:
                        os.kill(int(pid), signal.SIGTERM)
                    except (ProcessLookupError, ValueError):
                        pass
        time.sleep(1.0)


def _sweep_once(actors: dict, here) -> int:
    import ray

    dead = {aid: info for aid, info in actors.items()
            if info["ActorClassName"] == "TrainController" and info["State"] == "DEAD"}
    removed = 0
    for group in placement_groups_of_dead_actors(set(dead)):
        ray.util.remove_placement_group(group)
        removed += 1
    # Each cleaner is owned by the worker of the controller that started it. It has no name, so no handle can
    # be had from here: end its process, only on this node and in this job (our own search's runs).
    where = {(c["Address"].get("IPAddress"), c["Address"].get("Port")) for c in dead.values()}
    for info in actors.values():
        owner = (info["OwnerAddress"].get("IPAddress"), info["OwnerAddress"].get("Port"))
        if (info["ActorClassName"] == "PlacementGroupCleaner" and info["State"] == "ALIVE" and owner in where
                and info["Address"].get("NodeID") == here.get_node_id() and info["JobID"] == here.get_job_id()):
            try:
                os.kill(int(info["Pid"]), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    return removed


def check_same_search(cfg: RunConfig, tune_dir: Path) -> None:
    """Tuner.restore cannot change the search: refuse to resume a folder written with another config."""
    import yaml

    saved_path = RunFolder(tune_dir).config
    if not saved_path.exists():
        return
    saved, now = _flatten(yaml.safe_load(saved_path.read_text())), _flatten(yaml.safe_load(dump_config(cfg)))
    changed = [k for k in now if saved.get(k) != now[k]]
    if changed:
        raise UserError(f"{tune_dir} holds an unfinished search with another config (changed: "
                        f"{', '.join(changed[:6])}); restore those values to resume it, or set output.name to "
                        "start a new search")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not prefix.startswith("tune.search_space"):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def export_best(best: TrialRow, base: RunConfig, tune_dir: Path):
    """The best trial's final checkpoint -> tune_dir/model and eval.json (the run-folder contract)."""
    from ray.train import Result

    train_result = Result.from_path(tune_dir / f"trial_{best.trial_id}" / CHECKPOINTS)
    # The model card names the best trial's values and the tune folder the model is in.
    return finalize_run(trial_config(base, best.params, tune_dir), tune_dir, train_result)


@contextlib.contextmanager
def quiet_tune():
    """Tune's own status tables and trial tracebacks off (TuneProgress prints one line per event; each trial's
    error stays in its error.txt), unless RAYFINE_VERBOSE=1."""
    if os.environ.get("RAYFINE_VERBOSE", "") not in ("", "0"):
        yield
        return
    tune_logger = logging.getLogger("ray.tune")
    saved_env, saved_level = os.environ.get("RAY_AIR_NEW_OUTPUT"), tune_logger.level
    # The new output engine prints its tables at verbose=0 too; the classic one is silent at 0.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tune_logger.setLevel(saved_level)
        if saved_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_env


@contextlib.contextmanager
def interrupt_marker():
    """Tells whether Tune's Ctrl+C handler fired during ``tuner.fit()``.

    On the first Ctrl+C (or SIGUSR1) Tune stops the trials, saves the experiment with the running trials still
    unfinished (so a restore continues them), and puts back the SIGINT handler it found: this marker. The
    ResultGrid then shows those trials as terminated, so the marker is what says the search was cut short.
    Tune never puts its handler back otherwise; this does, so Ctrl+C works again after the search.
    """
    if threading.current_thread() is not threading.main_thread():  # Tune catches no signal there either
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def marker(signum, frame):  # a Ctrl+C before Tune starts, or a second one after its first
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, marker)
    try:
        yield lambda: signal.getsignal(signal.SIGINT) is marker
    finally:
        signal.signal(signal.SIGINT, previous)


def local_workers(cfg: RunConfig) -> int:
    """Workers a local Ray instance is started for: max_concurrent_trials Train runs (workers + Ray Data each)."""
    return int(cfg.tune.max_concurrent_trials * cpus_per_trial(cfg)) - 1


def tune_command(cfg: RunConfig, local: bool = True) -> TuneResult:
    """``rayfine tune``: search, stop weak trials early, export the best; logs progress and a ranked table.

    ``local``: Ray is a local instance (trials beyond what it holds would only queue, so fewer run at once).
    Raises UserError when no trial finished, KeyboardInterrupt when the search was interrupted (its state
    is saved: the same command resumes it).
    """
    from ray import tune

    from training.evaluate import format_metrics_table
    from training.preflight import summarize_data

    param_space = build_param_space(cfg.tune.search_space)  # config problems before anything starts
    cfg, workers = resolve_workers(cfg)  # every trial gets the same count
    start_train_coordinator()  # the first trial's controller would wait for its process to start
    logger.info(f"Workers per trial: {cfg.scaling.num_workers} ({workers.reason})")
    t = cfg.tune
    logger.info("Checking the data ...")
    summary = summarize_data(cfg)  # once for every trial
    logger.info("  records: " + ", ".join(f"{k} {v:,}" for k, v in summary.counts.items()))
    cfg, tune_dir, _ = prepare_run_dir(cfg)  # a finished search (model/) is never overwritten
    concurrent = fit_concurrency(cfg, local)
    search = RunTracker(cfg, tune_dir, search=True)  # the parent run of the trials' (MLflow)
    if search.enabled:
        search.start()
    try:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg, summary=summary, tune_dir=str(tune_dir),
                                 parent_run_id=search.run_id, tracking_uri=search.uri, local=local),
            TRIAL_DRIVER_RESOURCES)
        if tune.Tuner.can_restore(tune_dir):
            check_same_search(cfg, tune_dir)
            logger.info(f"Resuming the search in {tune_dir}")
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=False)
        else:
            RunFolder(tune_dir).config.write_text(dump_config(cfg))
            logger.info(f"Starting the search in {tune_dir}: {t.num_samples} sample(s), {t.scheduler} scheduler, "
                        f"{t.search_alg} search, {concurrent} trial(s) at once of {cfg.scaling.num_workers} worker(s)")
            tuner = tune.Tuner(
                trainable, param_space=param_space, tune_config=build_tune_config(cfg, concurrent),
                run_config=tune.RunConfig(name=tune_dir.name, storage_path=str(tune_dir.parent), verbose=0,
                                          callbacks=[TuneProgress(t.metric), TrainRunSweeper()],
                                          failure_config=tune.FailureConfig(max_failures=0)))
        started = time.time()
        collector.resume()  # the rayfine command's start-up ends here (core.collector)
        with quiet_tune(), interrupt_marker() as interrupted:
            results = tuner.fit()
            was_interrupted = interrupted()
        # The last trials' runs, before export, serving or a restore.
        TrainRunSweeper().sweep(wait_s=30, end_leftovers=True)
        if was_interrupted or results.num_terminated + results.num_errors < len(results):
            logger.info(f"\nSearch interrupted after {time.time() - started:.0f}s; its state is saved in {tune_dir}. "
                        "Run the same command again to resume it (finished trials are not re-run).")
            raise KeyboardInterrupt
        run = RunFolder(tune_dir)
        rows = collect_trials(results, t.metric, t.mode)
        write_results_csv(rows, run.tune_results, t.metric)
        write_tune_plot(rows, run.plots, t.metric)
        logger.info(f"\nSearch finished in {time.time() - started:.0f}s. Trials, best first:\n"
                    f"{format_ranked_table(rows, t.metric)}")
        finished = [r for r in rows if r.status == FINISHED]
        if not finished:
            raise UserError([f"trial {r.trial_id}: {r.status}{': ' + r.error if r.error else ''}" for r in rows],
                            header=f"no trial of the search in {tune_dir} finished:")
        best = finished[0]
        done = export_best(best, cfg, tune_dir)
        search.end_children([tune_dir / f"trial_{r.trial_id}" for r in rows],
                            stopped=[tune_dir / f"trial_{r.trial_id}" for r in rows if r.status == STOPPED])
        best_run = RunTracker(cfg, tune_dir / f"trial_{best.trial_id}").saved_run_id()  # in the search's store
        if best_run:
            search.tag("best_trial", "true", best_run)
            search.tag("best_trial_id", best.trial_id)
        search.finish(done.metrics)
        for split, m in done.metrics.items():
            logger.info(f"\nBest trial {best.trial_id} ({format_params(best.params)}), {split} metrics:\n"
                        f"{format_metrics_table(m)}")
        logger.info(f"\nResults: {run.tune_results}\nModel exported to {done.model_dir}")
    except BaseException:
        search.finish(failed=True)
        raise
    return TuneResult(tune_dir, done.model_dir, best, rows)
