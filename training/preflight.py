"""Pre-flight: one streaming pass over every record before anything heavy starts.

Each Ray Data batch is reduced to a small summary (counts, label counts, token lengths, the first problems);
the driver only merges summaries. ``rayfine validate`` prints the report; ``rayfine train`` runs the same
pass and stops on the first bad record, before it writes anything to the run folder.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from core.config import RunConfig
from core.errors import UserError
from training.data import MAX_PROBLEMS, Splits, build_records, process_tokenizer, read_in_process
from training.scaling import resolve_workers, workers_text
from training.tasks.base import LabelSpace

logger = logging.getLogger(__name__)


def summarize_batch(batch: dict[str, np.ndarray], cfg: RunConfig) -> dict[str, list]:
    """Ray Data UDF: reduce a batch of records to one summary row (the process's tokenizer, see
    ``training.data.process_tokenizer``)."""
    from training.tasks import get_adapter

    adapter, tokenizer = get_adapter(cfg), process_tokenizer(cfg)
    errors = [f"{f}:{n}: {e}" if n else f"{f}: {e}"
              for f, n, e in zip(batch["_file"], batch["_line"], batch["_error"]) if e]
    ok = np.asarray(batch["_error"]) == ""
    summary = {"errors": errors[:MAX_PROBLEMS], "num_errors": len(errors),
               "counts": {}, "labels": {}, "first_seen": {}, "lengths": {}, "stats": {}, "where": {}}
    clean = {k: np.asarray(v)[ok] for k, v in batch.items()}
    if ok.any():
        lengths = adapter.tokenize(clean, tokenizer, None, truncate=False)["length"]
        stats = adapter.record_stats(clean, tokenizer)
        labels = adapter.record_labels(clean) if adapter.has_labels else None
        for split in np.unique(clean["_split"]):
            mask = clean["_split"] == split
            summary["counts"][split] = int(mask.sum())
            summary["lengths"][split] = [int(x) for x in np.asarray(lengths)[mask]]
            summary["stats"][split] = {k: int(np.asarray(v)[mask].sum()) for k, v in stats.items()}
            summary["where"][split] = {  # the first records each task check counted, as file:line
                k: [f"{clean['_file'][i]}:{clean['_line'][i]}" for i in np.flatnonzero(mask & (np.asarray(v) > 0))
                    ][:WHERE_LINES] for k, v in stats.items() if k not in COUNTS and (np.asarray(v)[mask] > 0).any()}
            if labels is not None:
                counts, where = Counter(), {}
                for i in np.flatnonzero(mask):
                    counts.update(labels[i])
                    for lab in labels[i]:
                        where.setdefault(lab, f"{clean['_file'][i]}:{clean['_line'][i]}")
                summary["labels"][split], summary["first_seen"][split] = dict(counts), where
    return {"summary": [json.dumps(summary)]}


WHERE_LINES = 5  # records named per task check in the pre-flight report
COUNTS = ("rows", "tokens")  # record_stats keys that are sizes, not checks


@dataclass
class SplitCheck:
    """The checks across records that training stops on, decided once for ``rayfine validate``, ``rayfine
    train`` and the jobs API's file checks (each words the problems for its own audience)."""

    labels: LabelSpace | None = None  # built from the training split's labels (tasks with labels)
    no_train_records: bool = False
    held_out_none: bool = False  # data.validation_split carved nothing out of train
    too_few_labels: bool = False  # a classifier needs at least 2
    unseen: dict[str, list[str]] = field(default_factory=dict)  # split -> labels train never has


def check_splits(adapter, counts: dict[str, int], label_counts: dict[str, dict[str, int]],
                 carved: bool) -> SplitCheck:
    """``counts``: usable records per split; ``label_counts``: label -> count per split (tasks with labels);
    ``carved``: validation is held out of train (data.validation_split) rather than given."""
    check = SplitCheck(no_train_records=not counts.get("train"),
                       held_out_none=carved and bool(counts.get("train")) and not counts.get("validation"))
    train_labels = label_counts.get("train")
    if adapter.has_labels and train_labels is not None:
        check.labels = adapter.build_label_space(train_labels)
        check.too_few_labels = len(train_labels) < 2
        known = set(check.labels.names)
        for split in ("validation", "test"):
            unseen = [lab for lab in label_counts.get(split, {}) if lab not in known]
            if unseen:
                check.unseen[split] = unseen
    return check


def _read_as(cfg: RunConfig) -> str:
    return f"{cfg.task}:{cfg.data.model_dump_json()}"


@dataclass
class DataSummary:
    counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    labels: LabelSpace | None = None
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # per split: rows and task checks
    where: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # per split and check: first file:line
    # Small local data, read in the driver (training.data.IN_PROCESS_MAX_BYTES): each split's record batches,
    # tokenized for training from here instead of being read again. None when Ray Data read the data.
    records: dict[str, list[dict[str, np.ndarray]]] | None = None
    read_as: str = ""  # the task and data section the records were read with (a Tune trial may change them)

    def records_for(self, cfg: RunConfig) -> dict[str, list[dict[str, np.ndarray]]] | None:
        """The record batches read in the driver, when ``cfg`` reads its data as they were read; else None."""
        return self.records if self.records is not None and self.read_as == _read_as(cfg) else None

    def rows(self, split: str) -> int:
        """Rows the tokenizer makes of a split (what training steps over); records when not counted."""
        return self.stats.get(split, {}).get("rows", self.counts.get(split, 0))

    def tokens(self, split: str, max_len: int) -> int | None:
        """Tokens of a split after truncation: the task's own count (DPO: both outputs of a pair) or the sum of
        the row lengths; None for a split without records."""
        if "tokens" in self.stats.get(split, {}):
            return self.stats[split]["tokens"]
        return self.length_stats(split, max_len).get("tokens")

    def length_stats(self, split: str, max_len: int) -> dict[str, float]:
        x = self.lengths.get(split, np.zeros(0))
        if not len(x):
            return {}
        p = np.percentile(x, [50, 90, 95, 99])
        return {"p50": p[0], "p90": p[1], "p95": p[2], "p99": p[3], "max": float(x.max()),
                "truncated": int((x > max_len).sum()), "tokens": int(np.minimum(x, max_len).sum())}


def _summaries(ds, cfg: RunConfig):
    from ray.data import TaskPoolStrategy

    out = ds.map_batches(summarize_batch, batch_size=1024, fn_kwargs={"cfg": cfg},
                         compute=TaskPoolStrategy(size=2), num_cpus=0.5)
    for row in out.iter_rows():
        yield json.loads(row["summary"])


def _in_process_summaries(files, cfg: RunConfig, carve: float, source: str, held: dict[str, list]):
    """``_summaries`` of ``files`` read in this process; their batches go to ``held``, by split."""
    for batch in read_in_process(files, cfg, carve):
        for split in np.unique(batch["_split"]):
            mask = batch["_split"] == split
            held.setdefault(split if source == "train" else source, []).append({k: v[mask] for k, v in batch.items()})
        yield json.loads(summarize_batch(batch, cfg)["summary"][0])


def summarize_data(cfg: RunConfig) -> DataSummary:
    """Read every record of every split once; raise UserError listing the problems found. Small local data is
    read in this process and kept (``DataSummary.records``); the rest in Ray Data tasks."""
    splits = Splits(cfg)
    sources = [("train", splits.train, splits.carve)]
    if splits.validation:
        sources.append(("validation", splits.validation, 0.0))
    if splits.test:
        sources.append(("test", splits.test, 0.0))
    held: dict[str, dict] | None = {} if splits.read_in_driver() else None
    problems, num_problems = [], 0
    result = DataSummary()
    lengths: dict[str, list[int]] = defaultdict(list)
    labels: dict[str, Counter] = defaultdict(Counter)
    first_seen: dict[str, dict[str, str]] = defaultdict(dict)
    stats: dict[str, Counter] = defaultdict(Counter)
    places: dict[str, dict[str, list[str]]] = defaultdict(dict)  # per split and task check: first file:line
    for source, files, carve in sources:
        summaries = (_in_process_summaries(files, cfg, carve, source, held.setdefault(source, {}))
                     if held is not None else _summaries(build_records(files, cfg, carve), cfg))
        for s in summaries:
            problems += s["errors"][: MAX_PROBLEMS - len(problems)]
            num_problems += s["num_errors"]
            for split, n in s["counts"].items():
                name = split if source == "train" else source
                result.counts[name] = result.counts.get(name, 0) + n
                lengths[name] += s["lengths"][split]
                stats[name].update(s["stats"][split])
                for key, lines in s.get("where", {}).get(split, {}).items():
                    known = places[name].setdefault(key, [])
                    known += lines[: WHERE_LINES - len(known)]
                if split in s["labels"]:
                    labels[name].update(s["labels"][split])
                for lab, where in s["first_seen"].get(split, {}).items():
                    first_seen[name].setdefault(lab, where)
    if num_problems > len(problems):
        problems.append(f"... and {num_problems - len(problems)} more problem(s)")
    if problems:
        raise UserError(problems, header=f"{num_problems} problem(s) in the data:")
    result.lengths = {k: np.asarray(v) for k, v in lengths.items()}
    result.label_counts = {k: dict(v) for k, v in labels.items()}
    result.stats = {k: dict(v) for k, v in stats.items()}
    result.where = dict(places)
    if held is not None:
        result.records = {split: batches for by_split in held.values() for split, batches in by_split.items()}
        result.read_as = _read_as(cfg)
    _check_splits(cfg, splits, result, first_seen)
    return result


def _check_splits(cfg: RunConfig, splits: Splits, result: DataSummary, first_seen) -> None:
    from training.tasks import get_adapter

    adapter = get_adapter(cfg)
    check = check_splits(adapter, result.counts, result.label_counts, carved=bool(splits.carve))
    result.labels = check.labels
    problems = []
    if check.no_train_records:
        problems.append("data.train: no usable training records")
    if check.held_out_none:
        problems.append(f"data.validation_split: {cfg.data.validation_split} of {result.counts.get('train', 0)} "
                        "records held out none; raise it or set data.validation")
    if check.too_few_labels:
        problems.append(f"{adapter.label_option}: training data has {len(result.label_counts['train'])} distinct "
                        "label(s); a classifier needs at least 2")
    for split, unseen in check.unseen.items():
        for lab in sorted(unseen):
            problems.append(f"{first_seen[split][lab]}: label '{lab}' in {split} never appears in train; "
                            "add training examples for it or remove it")
    if problems:
        raise UserError(problems, header="Problems with the data splits:")


def count_parameters(cfg: RunConfig, num_labels: int | None) -> int:
    """Parameter count of the model with its task head, built on the meta device (no weights loaded)."""
    import torch
    import transformers
    from transformers import AutoConfig

    from training.tasks import get_adapter

    adapter = get_adapter(cfg)
    model_config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if num_labels:
        model_config.num_labels = num_labels
    with torch.device("meta"):
        model = getattr(transformers, adapter.auto_model).from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def _parameter_counts(cfg: RunConfig) -> dict[int | None, int]:
    """The parameter counts ``_count_for`` needs: with 1 and 2 labels for a task head (it is linear in the label
    count, so these two give every other exactly), else the one count."""
    from training.tasks import get_adapter

    return {n: count_parameters(cfg, n) for n in ((1, 2) if get_adapter(cfg).has_labels else (None,))}


def _count_for(counts: dict[int | None, int], num_labels: int | None) -> int:
    if None in counts:
        return counts[None]
    return counts[1] + (max(num_labels or 1, 1) - 1) * (counts[2] - counts[1])


def start_parameter_count(cfg: RunConfig) -> Callable[[int | None], int]:
    """Count the parameters in a background thread (importing the model's code and building it on the meta
    device takes seconds) while the pre-flight data pass runs in Ray; returns ``count(num_labels)``, which waits
    for it (the label count is not known yet)."""
    return start_checks(cfg, in_process=False).parameter_count


@dataclass
class Checks:
    """The pre-flight's two results, being computed: the data summary and the parameter count."""

    summary: Callable[[], DataSummary]
    parameter_count: Callable[[int | None], int]


def start_checks(cfg: RunConfig, in_process: bool | None = None, count: bool = True) -> Checks:
    """Start the parameter count in a background thread, and for small local data (read in this process,
    ``summarize_data``; ``in_process`` forces the choice) the data pass before it in the same thread: called
    before Ray starts, both run while it does. One thread, because transformers' lazily loaded modules are not
    safe to load from two threads at once. Larger data is read by ``summary()``, in Ray Data tasks, while the
    count goes on. A problem with the data is raised by ``summary()``. ``count=False``: no parameter count (a
    training run's workers count the model they build, ``training.loop.Worker.configure_engine``)."""
    import threading

    if in_process is None:
        in_process = Splits(cfg).read_in_driver()
    found: dict[str, Any] = {}

    def work() -> None:
        try:
            if in_process:
                found["summary"] = summarize_data(cfg)
            if count:
                found["counts"] = _parameter_counts(cfg)
        except BaseException as exc:  # noqa: BLE001 - raised again by summary() or parameter_count()
            found["error"] = exc

    thread = threading.Thread(target=work, name="rayfine-preflight", daemon=True)
    thread.start()

    def summary() -> DataSummary:
        if not in_process:
            return summarize_data(cfg)
        thread.join()
        if "summary" not in found:
            raise found["error"]
        return found["summary"]

    def parameter_count(num_labels: int | None) -> int:
        thread.join()
        if "error" in found:
            raise found["error"]
        return _count_for(found["counts"], num_labels)

    return Checks(summary, parameter_count)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_report(cfg: RunConfig, summary: DataSummary, num_params: int) -> str:
    from training.ds_config import estimate_memory_per_worker

    max_len = cfg.data.max_seq_length
    lines = [f"task: {cfg.task}    model: {cfg.model.name_or_path}", "", "records per split:"]
    for split, n in summary.counts.items():
        lines.append(f"  {split:<11} {n:>9,}")
    if summary.label_counts:
        lines += ["", "labels:"]
        names = summary.labels.names if summary.labels else sorted(summary.label_counts.get("train", {}))
        header = "  " + f"{'label':<20}" + "".join(f"{s:>12}" for s in summary.label_counts)
        lines.append(header)
        for name in names:
            lines.append("  " + f"{name[:20]:<20}" + "".join(
                f"{summary.label_counts[s].get(name, 0):>12,}" for s in summary.label_counts))
    lines += ["", f"token lengths (data.max_seq_length = {max_len}):",
              f"  {'split':<11}{'p50':>7}{'p90':>7}{'p95':>7}{'p99':>7}{'max':>7}{'truncated':>11}"]
    for split in summary.counts:
        st = summary.length_stats(split, max_len)
        if st:
            lines.append(f"  {split:<11}{st['p50']:>7.0f}{st['p90']:>7.0f}{st['p95']:>7.0f}{st['p99']:>7.0f}"
                         f"{st['max']:>7.0f}{st['truncated']:>11,}")
    train = summary.tokens("train", max_len)
    if train is not None:
        lines.append(f"  tokens per epoch (train, after truncation): {train:,}")
    lines += _format_rows_and_checks(summary)
    from training.ds_config import run_engine_shape
    from training.tasks import get_adapter

    lines += get_adapter(cfg).report_lines(summary)
    chosen = run_engine_shape(cfg, cfg.scaling.num_workers).stage
    lines += ["", f"parameters: {num_params:,}",
              f"memory per worker (model states, ZeRO-{chosen}, {workers_text(cfg.scaling.num_workers)}, "
              "16 bytes/param mixed-precision Adam):"]
    for stage in (0, 1, 2, 3):
        est = estimate_memory_per_worker(num_params, stage, cfg.scaling.num_workers,
                                         cfg.deepspeed.offload_optimizer and stage > 0,
                                         cfg.deepspeed.offload_params and stage == 3)
        mark = "  <- chosen" if stage == chosen else ""
        cpu = f" + {_fmt_bytes(est.cpu_bytes)} CPU (offload)" if est.cpu_bytes else ""
        lines.append(f"  ZeRO-{stage}: {_fmt_bytes(est.device_bytes)} on the device{cpu}{mark}")
    lines.append("  (activations come on top; they grow with batch_size x max_seq_length)")
    return "\n".join(lines)


def _format_rows_and_checks(summary: DataSummary) -> list[str]:
    """Rows after tokenization where they differ from records (QA windows), and the task's own checks."""
    lines = []
    if any(summary.rows(s) != n for s, n in summary.counts.items()):
        lines += ["", "rows after tokenization (a long QA context becomes several windows, a causal-LM record that "
                      "truncation left no target token is skipped; training counts rows):"]
        for split, n in summary.counts.items():
            rows = summary.rows(split)
            lines.append(f"  {split:<11} {rows:>9,}  ({rows / max(n, 1):.2f} per record)")
    checks = sorted({k for st in summary.stats.values() for k in st} - set(COUNTS))
    if checks:
        lines += ["", "checks (records):", "  " + f"{'':<24}" + "".join(f"{s:>12}" for s in summary.counts)]
        for key in checks:
            lines.append("  " + f"{key.replace('_', ' '):<24}" + "".join(
                f"{summary.stats.get(s, {}).get(key, 0):>12,}" for s in summary.counts))
        for split, found in summary.where.items():
            for key, places in found.items():
                lines.append(f"  {key.replace('_', ' ')} ({split}), first: {', '.join(places)}")
    return lines


def run_preflight(cfg: RunConfig, checks: Checks | None = None) -> DataSummary:
    """``rayfine validate``: check config and data, log the report. ``checks``: ``start_checks(cfg)``, called
    before Ray started (else here)."""
    checks = checks or start_checks(cfg)
    cfg, workers = resolve_workers(cfg)  # the report's memory per worker is for this count
    logger.info(f"Workers: {cfg.scaling.num_workers} ({workers.reason})")
    summary = checks.summary()
    num_labels = len(summary.labels.names) if summary.labels else None
    logger.info(format_report(cfg, summary, checks.parameter_count(num_labels)))
    logger.info("\nOK: config and data are valid.")
    return summary
