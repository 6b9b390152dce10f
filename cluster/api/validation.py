"""Record checks of fine-tuning files, naming the line of every problem.

Two moments:

- upload (``check_upload``): the file must be JSON lines, one object per line, and its records must pass the
  per-record checks ``rayfine validate`` applies (the task adapters' ``parse_record``) for at least one base
  model (with one task served, that task's checks), a causal-LM base model's with either method: supervised
  (chat, prompt/completion) or DPO (preference pairs), since the method is chosen later, at job creation;
- job creation (``check_job_files``, status ``validating_files``): the training and validation files against
  the chosen base model's task and columns, plus the checks across records that training would stop on: no
  usable records, fewer than two labels, a validation label the training file never has, a held-out split
  that holds out nothing.

The adapters are imported from ``training.tasks``; they need neither torch nor Ray.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from core.config import RunConfig
from training.formats import parse_record
from training.preflight import check_splits

MAX_PROBLEMS = 20
MAX_LINE_BYTES = 4 * 2**20  # one training example; a longer line is refused without being held in memory


def iter_jsonl(path: Path) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    """``(line, record, problem)`` for each non-blank line; exact line numbers even for bad UTF-8. Lines are read
    one at a time, each at most MAX_LINE_BYTES (the rest of a longer one is skipped unread into memory)."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES)
                yield lineno, None, f"the line is longer than {MAX_LINE_BYTES // 2**20} MiB"
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not UTF-8 text (byte {exc.start + 1} of the line)"
                continue
            if line.strip():
                yield lineno, *parse_record(line)


@dataclass
class Problems:
    """The first problems (``line N: ...``) and how many there were."""

    lines: list[str] = field(default_factory=list)
    total: int = 0

    def add(self, text: str) -> None:
        self.total += 1
        if len(self.lines) < MAX_PROBLEMS:
            self.lines.append(text)

    def summary(self) -> str:
        more = f"; and {self.total - len(self.lines)} more problem(s)" if self.total > len(self.lines) else ""
        return "; ".join(self.lines) + more


def _adapter(cfg: RunConfig):
    from training.tasks import get_adapter

    return get_adapter(cfg)


def _check_key(cfg: RunConfig) -> str:
    """Base configs with the same task, method and column settings check records the same way."""
    data = cfg.data.model_dump(exclude={"train", "validation", "test", "format"})
    return json.dumps([cfg.task, cfg.training.method, data], sort_keys=True, default=str)


def _with_methods(configs: dict[str, RunConfig]) -> dict[str, RunConfig]:
    """Each base config, and for a causal LM also as the other method would train it (sft or dpo)."""
    out = dict(configs)
    for name, cfg in configs.items():
        if cfg.task == "causal_lm":
            other = "sft" if cfg.training.method == "dpo" else "dpo"
            out[f"{name} ({other})"] = cfg.model_copy(update={
                "training": cfg.training.model_copy(update={"method": other}),
                "data": cfg.data.model_copy(update={"packing": False})})
    return out


def check_upload(path: Path, configs: dict[str, RunConfig]) -> tuple[int, Optional[str]]:
    """Check an uploaded file; returns ``(records, None)`` or ``(records, message)`` naming the lines."""
    checkers: dict[str, tuple[list[str], Any, Problems]] = {}
    for name, cfg in _with_methods(configs).items():
        key = _check_key(cfg)
        if key in checkers:
            checkers[key][0].append(name)
        else:
            checkers[key] = ([name], _adapter(cfg), Problems())
    records = 0
    for line, record, problem in iter_jsonl(path):
        records += 1
        for _, adapter, problems in checkers.values():
            if problem:
                problems.add(f"line {line}: {problem}")
            else:
                _parse(adapter, record, line, problems)
    if records == 0:
        return 0, "the file has no records; upload JSON lines, one example per line"
    if any(p.total == 0 for _, _, p in checkers.values()):
        return records, None
    if len(checkers) == 1:
        (_, adapter, problems), = checkers.values()
        return records, f"{problems.total} problem(s) for {_kind(adapter)} data: {problems.summary()}"
    parts = [f"for {', '.join(names)} ({_kind(adapter)}): {p.summary()}" for names, adapter, p in checkers.values()]
    return records, "the records fit none of the base models: " + " | ".join(parts)


def _kind(adapter) -> str:
    """What data an adapter reads, for messages: the task, and the method of a causal LM."""
    return f"{adapter.name} {adapter.cfg.training.method}" if adapter.name == "causal_lm" else adapter.name


def _parse(adapter, record: dict, line: int, problems: Problems) -> Optional[dict]:
    from training.tasks.base import ParseError

    try:
        return adapter.parse_record(record)
    except ParseError as exc:
        problems.add(f"line {getattr(exc, 'line', None) or line}: {exc}")
        return None


@dataclass
class FileProblem:
    """Why a job's files cannot train: an OpenAI ``error`` object."""

    code: str
    param: str
    message: str


@dataclass
class _Scan:
    records: int = 0
    held_out: int = 0
    labels: Counter = field(default_factory=Counter)
    first_seen: dict[str, int] = field(default_factory=dict)
    problems: Problems = field(default_factory=Problems)


def _scan(path: Path, cfg: RunConfig, adapter, carve: float) -> _Scan:
    from training.data import split_of

    scan = _Scan()
    for line, record, problem in iter_jsonl(path):
        if problem:
            scan.problems.add(f"line {line}: {problem}")
            continue
        row = _parse(adapter, record, line, scan.problems)
        if row is None:
            continue
        if carve and split_of(str(path), line, cfg.data.shuffle_seed, carve) == "validation":
            scan.held_out += 1
            continue
        scan.records += 1
        for label in _record_labels(adapter, row):
            scan.labels[label] += 1
            scan.first_seen.setdefault(label, line)
    return scan


def _record_labels(adapter, row: dict) -> list[str]:
    """The label strings of one record, as pre-flight counts them (NER: its tags)."""
    return adapter.record_labels({k: [v] for k, v in row.items()})[0] if adapter.has_labels else []


def check_job_files(cfg: RunConfig, train: dict, validation: Optional[dict]) -> Optional[FileProblem]:
    """Check a job's stored files (``files`` rows) against its run config; None when they can train."""
    adapter = _adapter(cfg)
    carve = 0.0 if validation else cfg.data.validation_split
    tr = _scan(Path(train["path"]), cfg, adapter, carve)
    where = f"The training file {train['id']} ({train['filename']})"
    if tr.problems.total:
        return FileProblem("invalid_training_file", "training_file", f"{where} is invalid: {tr.problems.summary()}")
    if tr.records == 0:
        return FileProblem("invalid_training_file", "training_file", f"{where} has no usable training records.")
    va = _scan(Path(validation["path"]), cfg, adapter, 0.0) if validation else None
    counts = {"train": tr.records, "validation": va.records if va else tr.held_out}
    label_counts = {"train": dict(tr.labels)} if adapter.has_labels else {}
    if va and adapter.has_labels:
        label_counts["validation"] = dict(va.labels)
    check = check_splits(adapter, counts, label_counts, carved=bool(carve))
    if check.held_out_none:
        return FileProblem("invalid_training_file", "training_file",
                           f"{where}: holding out {carve:g} of its {tr.records} records for validation "
                           "(data.validation_split) held out none; upload a validation_file or more records.")
    if check.too_few_labels:
        return FileProblem("invalid_training_file", "training_file",
                           f"{where} has {len(tr.labels)} distinct label(s) ({', '.join(sorted(tr.labels))}); "
                           "a classifier needs at least 2.")
    if va is None:
        return None
    where = f"The validation file {validation['id']} ({validation['filename']})"
    problems = va.problems
    for label in sorted(check.unseen.get("validation", []), key=lambda lab: va.first_seen[lab]):
        problems.add(f"line {va.first_seen[label]}: label '{label}' never appears in the training file")
    if problems.total:
        return FileProblem("invalid_validation_file", "validation_file", f"{where} is invalid: {problems.summary()}")
    if va.records == 0:
        return FileProblem("invalid_validation_file", "validation_file", f"{where} has no usable records.")
    return None
