"""Pre-flight: one streaming pass over every record before anything heavy starts.

Each Ray Data batch is reduced to a small summary (counts, label counts, token lengths, the first problems);
the driver only merges summaries. ``rayfine validate`` prints the report; ``rayfine train`` runs the same
pass and stops on the first bad record, before it writes anything to the run folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from cluster.config import RunConfig
from cluster.errors import UserError
from training.data import Splits, build_records
from training.tasks.base import LabelSpace

logger = logging.getLogger(__name__)
MAX_PROBLEMS = 50


class SummarizeBatch:
    """Ray Data actor UDF: reduce a batch of records to one summary row."""

    def __init__(self, cfg: RunConfig):
        from transformers import AutoTokenizer

        from training.tasks import get_adapter

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.adapter = get_adapter(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        errors = [f"{f}:{n}: {e}" if n else f"{f}: {e}"
                  for f, n, e in zip(batch["_file"], batch["_line"], batch["_error"]) if e]
        ok = np.asarray(batch["_error"]) == ""
        summary = {"errors": errors[:MAX_PROBLEMS], "num_errors": len(errors),
                   "counts": {}, "labels": {}, "first_seen": {}, "lengths": {}}
        clean = {k: np.asarray(v)[ok] for k, v in batch.items()}
        if ok.any():
            lengths = self.adapter.tokenize(clean, self.tokenizer, None, truncate=False)["length"]
            for split in np.unique(clean["_split"]):
                mask = clean["_split"] == split
                summary["counts"][split] = int(mask.sum())
                summary["lengths"][split] = [int(x) for x in np.asarray(lengths)[mask]]
                if getattr(self.adapter, "has_labels", False):
                    labels = clean["label"][mask]
                    summary["labels"][split] = dict(Counter(str(x) for x in labels))
                    where = {}
                    for lab, f, n in zip(labels, clean["_file"][mask], clean["_line"][mask]):
                        where.setdefault(str(lab), f"{f}:{n}")
                    summary["first_seen"][split] = where
        return {"summary": [json.dumps(summary)]}


@dataclass
class DataSummary:
    counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    labels: LabelSpace | None = None

    def length_stats(self, split: str, max_len: int) -> dict[str, float]:
        x = self.lengths.get(split, np.zeros(0))
        if not len(x):
            return {}
        p = np.percentile(x, [50, 90, 95, 99])
        return {"p50": p[0], "p90": p[1], "p95": p[2], "p99": p[3], "max": float(x.max()),
                "truncated": int((x > max_len).sum()), "tokens": int(np.minimum(x, max_len).sum())}


def _summaries(ds, cfg: RunConfig):
    from ray.data import ActorPoolStrategy

    out = ds.map_batches(SummarizeBatch, batch_size=1024, fn_constructor_kwargs={"cfg": cfg},
                         compute=ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.5)
    for row in out.iter_rows():
        yield json.loads(row["summary"])


def summarize_data(cfg: RunConfig) -> DataSummary:
    """Read every record of every split once; raise UserError listing the problems found."""
    splits = Splits(cfg)
    sources = [("train", build_records(splits.train, cfg, splits.carve))]
    if splits.validation:
        sources.append(("validation", build_records(splits.validation, cfg)))
    if splits.test:
        sources.append(("test", build_records(splits.test, cfg)))
    problems, num_problems = [], 0
    result = DataSummary()
    lengths: dict[str, list[int]] = defaultdict(list)
    labels: dict[str, Counter] = defaultdict(Counter)
    first_seen: dict[str, dict[str, str]] = defaultdict(dict)
    for source, ds in sources:
        for s in _summaries(ds, cfg):
            problems += s["errors"][: MAX_PROBLEMS - len(problems)]
            num_problems += s["num_errors"]
            for split, n in s["counts"].items():
                name = split if source == "train" else source
                result.counts[name] = result.counts.get(name, 0) + n
                lengths[name] += s["lengths"][split]
                labels[name].update(s["labels"].get(split, {}))
                for lab, where in s["first_seen"].get(split, {}).items():
                    first_seen[name].setdefault(lab, where)
    if num_problems > len(problems):
        problems.append(f"... and {num_problems - len(problems)} more problem(s)")
    if problems:
        raise UserError(problems, header=f"{num_problems} problem(s) in the data:")
    result.lengths = {k: np.asarray(v) for k, v in lengths.items()}
    result.label_counts = {k: dict(v) for k, v in labels.items()}
    _check_splits(cfg, splits, result, first_seen)
    return result


def _check_splits(cfg: RunConfig, splits: Splits, result: DataSummary, first_seen) -> None:
    problems = []
    if not result.counts.get("train"):
        problems.append("data.train: no usable training records")
    if not result.counts.get("validation"):
        if splits.carve:
            problems.append(f"data.validation_split: {cfg.data.validation_split} of {result.counts.get('train', 0)} "
                            "records held out none; raise it or set data.validation")
    train_labels = result.label_counts.get("train")
    if train_labels is not None:
        numeric = all(_is_int(x) for x in train_labels)
        result.labels = LabelSpace.from_counts(train_labels, numeric)
        if len(train_labels) < 2:
            problems.append(f"data.label_column: training data has {len(train_labels)} distinct label(s); "
                            "a classifier needs at least 2")
        for split in ("validation", "test"):
            for lab in sorted(set(result.label_counts.get(split, {})) - set(train_labels)):
                problems.append(f"{first_seen[split][lab]}: label '{lab}' in {split} never appears in train; "
                                "add training examples for it or remove it")
    if problems:
        raise UserError(problems, header="Problems with the data splits:")


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


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
    train = summary.length_stats("train", max_len)
    if train:
        lines.append(f"  tokens per epoch (train, after truncation): {train['tokens']:,}")
    lines += ["", f"parameters: {num_params:,}",
              f"memory per worker (model states, ZeRO-{cfg.deepspeed.stage}, {cfg.scaling.num_workers} workers, "
              "16 bytes/param mixed-precision Adam):"]
    for stage in (0, 1, 2, 3):
        est = estimate_memory_per_worker(num_params, stage, cfg.scaling.num_workers,
                                         cfg.deepspeed.offload_optimizer and stage > 0,
                                         cfg.deepspeed.offload_params and stage == 3)
        mark = "  <- chosen" if stage == cfg.deepspeed.stage else ""
        cpu = f" + {_fmt_bytes(est.cpu_bytes)} CPU (offload)" if est.cpu_bytes else ""
        lines.append(f"  ZeRO-{stage}: {_fmt_bytes(est.device_bytes)} on the device{cpu}{mark}")
    lines.append("  (activations come on top; they grow with batch_size x max_seq_length)")
    return "\n".join(lines)


def run_preflight(cfg: RunConfig, address: str | None = None) -> DataSummary:
    """``rayfine validate``: check config and data, print the report."""
    from cluster.ray_connect import connect
    from training.progress import quiet_ray_data

    where = connect(address, num_workers=cfg.scaling.num_workers)
    quiet_ray_data()
    print(f"Validating {cfg.output.name} on {where} ...", flush=True)
    summary = summarize_data(cfg)
    num_labels = len(summary.labels.names) if summary.labels else None
    print(format_report(cfg, summary, count_parameters(cfg, num_labels)))
    print("\nOK: config and data are valid.")
    return summary
