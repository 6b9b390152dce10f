"""The Ray Data pipeline: find shards, read and validate every record, tokenize, split.

Reading is a Ray Data operation over the list of shards (one task reads one shard, streaming it in chunks), so
every record is checked where it is read and a problem can name its file and line. Tokenization runs in Ray
Data tasks with one tokenizer per worker process (``process_tokenizer``).
The driver only ever sees small summaries, never the records, except for small local data
(``IN_PROCESS_MAX_BYTES``): the driver reads and tokenizes it itself with the same functions, once, and puts the
tokenized rows in Ray's object store, where the workers read them without a Ray Data pipeline (``read_in_process``,
``held_split``, ``HeldSplit``).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from core.config import RunConfig
from core.errors import UserError
from training.formats import iter_conll, iter_squad, looks_like_json_document, parse_record
from training.tasks.base import LabelSpace, ParseError

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                  ".pq": "parquet", ".csv": "csv", ".conll": "conll", ".tsv": "csv"}
READ_CHUNK = 2048  # records per block yielded by a shard reader
MAX_PROBLEMS = 50  # problems listed in a data report (pre-flight, rayfine evaluate); the rest are counted


# ---- finding shards ----------------------------------------------------------------------------
def expand_inputs(spec: str | list[str] | None, fmt: str, key: str) -> list[tuple[str, str]]:
    """Expand paths, globs, folders and URIs into ``(path, format)`` pairs; raise naming ``key``."""
    if spec is None:
        return []
    entries = [spec] if isinstance(spec, str) else list(spec)
    found, problems = [], []
    for entry in entries:
        paths = _list_uri(entry) if _is_uri(entry) else _list_local(entry)
        if not paths:
            problems.append(f"{key}: no data file matches '{entry}'; check the path (relative paths are "
                            "resolved against the config file's folder)")
        for path in paths:
            file_fmt = fmt if fmt != "auto" else SUFFIX_FORMATS.get(Path(path).suffix.lower())
            if file_fmt is None:
                problems.append(f"{key}: cannot tell the format of '{path}' from its extension; set "
                                f"data.format to one of jsonl, parquet, csv, conll, squad")
            else:
                found.append((path, file_fmt))
    if problems:
        raise UserError(problems, header="Data files:")
    return found


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _list_local(entry: str) -> list[str]:
    entry = os.path.expanduser(entry.removeprefix("file://"))
    if os.path.isdir(entry):
        files = [str(p) for p in sorted(Path(entry).rglob("*")) if p.is_file()
                 and p.suffix.lower() in SUFFIX_FORMATS and not p.name.startswith((".", "_"))]
        return files
    if any(ch in entry for ch in "*?["):
        return sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
    return [entry] if os.path.isfile(entry) else []


def _list_uri(entry: str) -> list[str]:
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(entry)
        protocol = entry.split("://", 1)[0]
        out = []
        for path in paths:
            if fs.isdir(path):
                out += [f for f in sorted(fs.find(path)) if Path(f).suffix.lower() in SUFFIX_FORMATS]
            elif fs.exists(path):
                out.append(path)
        return [f"{protocol}://{p}" if "://" not in p else p for p in out]
    except Exception as exc:  # noqa: BLE001 - any backend error is a user-facing "cannot read"
        raise UserError(f"cannot list '{entry}': {exc}") from None


# ---- reading one shard -------------------------------------------------------------------------
def _open_text(path: str) -> io.TextIOBase:
    if _is_uri(path):
        import fsspec

        return fsspec.open(path, "rt", encoding="utf-8").open()
    return open(path.removeprefix("file://"), encoding="utf-8")


def iter_raw_records(path: str, fmt: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield ``(line, record, problem)``; ``line`` is 1-based (the data row for Parquet)."""
    if fmt == "json":  # JSON lines, or one document: nested SQuAD
        with _open_text(path) as f:
            fmt = "squad" if looks_like_json_document(f) else "jsonl"
    if fmt == "jsonl":
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, *parse_record(line)
    elif fmt == "csv":
        with _open_text(path) as f:
            delimiter = "\t" if path.endswith(".tsv") else ","
            reader = csv.DictReader(f, delimiter=delimiter)
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if k is not None}, None
    elif fmt == "conll":
        with _open_text(path) as f:
            yield from iter_conll(f)
    elif fmt == "squad":
        with _open_text(path) as f:
            yield from iter_squad(f.read())
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        source = path if not _is_uri(path) else _open_binary(path)
        row = 0
        for batch in pq.ParquetFile(source).iter_batches(batch_size=READ_CHUNK):
            for record in batch.to_pylist():
                row += 1
                yield row, record, None
    else:
        raise UserError(f"{path}: format '{fmt}' is not supported for task data yet")


def _open_binary(path: str):
    import fsspec

    return fsspec.open(path, "rb").open()


def split_of(path: str, line: int, seed: int, fraction: float) -> str:
    """Deterministic train/validation assignment of one record (stable across runs and workers)."""
    if fraction <= 0:
        return "train"
    digest = hashlib.blake2b(f"{seed}:{Path(path).name}:{line}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") / 2**64 < fraction else "train"


def read_shard_rows(path: str, fmt: str, cfg: RunConfig, carve: float, keep: str | None
                    ) -> Iterator[dict[str, list]]:
    """Read one shard into column chunks of normalized records (errors included as rows)."""
    from training.tasks import get_adapter

    adapter = get_adapter(cfg)
    chunk: list[dict[str, Any]] = []
    seen = 0
    try:
        for line, record, problem in iter_raw_records(path, fmt):
            seen += 1
            split = split_of(path, line, cfg.data.shuffle_seed, carve)
            if keep is not None and split != keep:
                continue
            row = None
            if problem is None:
                try:
                    row = adapter.parse_record(record)
                except ParseError as exc:
                    problem = str(exc)
                    line = getattr(exc, "line", None) or line  # e.g. the word's own line in a CoNLL sentence
            row = row or adapter.empty_record()
            row.update(_file=path, _line=line, _split=split, _error=problem or "")
            chunk.append(row)
            if len(chunk) >= READ_CHUNK:
                yield _columns(chunk)
                chunk = []
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        row = adapter.empty_record()
        row.update(_file=path, _line=0, _split="train", _error=f"cannot read this file: {exc}")
        chunk.append(row)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for corrupt shards
        row = adapter.empty_record()
        row.update(_file=path, _line=0, _split="train", _error=f"cannot read this file: {exc}")
        chunk.append(row)
    else:
        if seen == 0 and keep in (None, "train"):  # said once, also when train is carved into two splits
            row = adapter.empty_record()
            row.update(_file=path, _line=0, _split=keep or "train",
                       _error="no records (an empty file or shard): remove it from the data, or fill it")
            chunk.append(row)
    if chunk:
        yield _columns(chunk)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [r[key] for r in rows] for key in rows[0]}


def _read_shards(batch: dict[str, np.ndarray], cfg: RunConfig, carve: float, keep: str | None):
    for path, fmt in zip(batch["path"], batch["format"]):
        yield from read_shard_rows(str(path), str(fmt), cfg, carve, keep)


def build_records(files: list[tuple[str, str]], cfg: RunConfig, carve: float = 0.0, keep: str | None = None):
    """A Ray Dataset of normalized records read from ``files`` (lazy, streaming)."""
    import ray.data

    items = [{"path": p, "format": f} for p, f in files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_read_shards, batch_size=1, fn_kwargs={"cfg": cfg, "carve": carve, "keep": keep},
                          num_cpus=0.5)


# ---- small local data: read in the driver ----------------------------------------------------------------
# Local files of at most this many bytes in all are read, checked and tokenized in the driver's own process:
# a Ray Data pass starts worker processes that each import transformers and load the tokenizer, seconds that
# small data does not repay. The functions are the ones Ray Data runs, on the same batches.
IN_PROCESS_MAX_BYTES = 8 * 2**20


def local_bytes(files: list[tuple[str, str]]) -> int | None:
    """The total size of ``files`` when every one is a readable local file; None otherwise (object storage)."""
    total = 0
    for path, _ in files:
        if "://" in path:
            return None
        try:
            total += os.path.getsize(path)
        except OSError:
            return None
    return total


def small_and_local(files: list[tuple[str, str]]) -> bool:
    """Whether ``files`` are read in the driver's process (``IN_PROCESS_MAX_BYTES``)."""
    size = local_bytes(files)
    return size is not None and size <= IN_PROCESS_MAX_BYTES


def read_in_process(files: list[tuple[str, str]], cfg: RunConfig, carve: float = 0.0
                    ) -> Iterator[dict[str, np.ndarray]]:
    """``build_records``'s batches in numpy format, read in this process (every split: ``_split`` names it)."""
    from ray.data.block import BlockAccessor

    for path, fmt in files:
        for chunk in read_shard_rows(path, fmt, cfg, carve, None):
            yield BlockAccessor.for_block(BlockAccessor.batch_to_block(chunk)).to_batch_format("numpy")


def held_split(batches: list[dict[str, np.ndarray]], cfg: RunConfig, labels: LabelSpace | None):
    """``batches`` tokenized here (the rows ``tokenized`` makes of them, in Ray Data's numpy batch format), put in
    Ray's object store whole: the workers read it as a ``HeldSplit``. A small split needs no Ray Data execution,
    split coordinator or dataset actors, which would cost more processes and CPU than the data itself."""
    import ray
    from ray.data.block import BlockAccessor

    from training.tasks import get_adapter

    outputs = [tokenize_batch(b, cfg, labels) for b in batches] or [get_adapter(cfg).empty_tokens()]
    parts = [BlockAccessor.for_block(BlockAccessor.batch_to_block(out)).to_batch_format("numpy") for out in outputs]
    return ray.put({key: _concat([part[key] for part in parts]) for key in parts[0]})


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """One column of several batches; rows of different shapes become an object array, as in Ray Data."""
    if len({(part.dtype, part.shape[1:]) for part in parts}) == 1:
        return np.concatenate(parts)
    rows = np.empty(sum(len(part) for part in parts), dtype=object)
    for i, row in enumerate(row for part in parts for row in part):
        rows[i] = row
    return rows


class HeldSplit:
    """A worker's share of a split that ``held_split`` put in the object store, read the way the loop reads a Ray
    Data shard (``iter_batches``). ``world`` > 1 deals the rows to ranks: rank r gets rows r, r + world, ...,
    floor(N / world) of them, as ``streaming_split(equal=True)`` would; evaluation splits are read whole."""

    def __init__(self, columns: dict[str, np.ndarray], rank: int = 0, world: int = 1):
        rows = len(next(iter(columns.values())))
        keep = np.arange(rank, rows - rows % world, world)
        self.columns = {key: column[keep] for key, column in columns.items()}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy", prefetch_batches: int = 1,
                     local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
        """Batches in the stored order, or, with a shuffle buffer, in an order drawn from ``local_shuffle_seed``
        (every row of the share is in the buffer: a small split fits)."""
        assert batch_format == "numpy", batch_format
        order = np.arange(len(self))
        if local_shuffle_buffer_size:
            order = np.random.default_rng(local_shuffle_seed).permutation(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start: start + batch_size]
            yield {key: column[idx] for key, column in self.columns.items()}

    def take_all(self) -> list[dict[str, Any]]:
        return [row for batch in self.iter_batches(batch_size=max(1, len(self))) for row in batch_rows(batch)]


# ---- tokenizing -------------------------------------------------------------------------------
# One tokenizer per process, kept for the process's life. Ray Data runs the tokenizing (and pre-flight) UDFs as
# tasks, and Ray reuses a worker process for many tasks, one at a time: so each process loads a tokenizer once
# and no two threads ever share it (a fast tokenizer shared between threads raises "Already borrowed"). An actor
# pool would load it again in new processes at each pass over the data (each epoch, each evaluation).
_TOKENIZERS: dict[tuple, Any] = {}


def process_tokenizer(cfg: RunConfig):
    """This process's tokenizer for ``cfg``'s model and task (the task may adjust it, e.g. a chat template)."""
    key = (cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.task)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        from training.tasks import get_adapter

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path,
                                                  trust_remote_code=cfg.model.trust_remote_code)
        get_adapter(cfg).prepare_tokenizer(tokenizer)
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def tokenize_batch(batch: dict[str, np.ndarray], cfg: RunConfig, labels: LabelSpace | None,
                   truncate: bool = True) -> dict[str, Any]:
    """Ray Data UDF: the model inputs of a batch of records (records with a problem are dropped)."""
    from training.tasks import get_adapter

    adapter = get_adapter(cfg)
    ok = np.asarray(batch["_error"]) == ""
    clean = {k: np.asarray(v)[ok] for k, v in batch.items()}
    if not ok.any():
        return adapter.empty_tokens()
    return adapter.tokenize(clean, process_tokenizer(cfg), labels, truncate=truncate)


def tokenized(records, cfg: RunConfig, labels: LabelSpace | None, max_tasks: int = 2):
    from ray.data import TaskPoolStrategy

    return records.map_batches(tokenize_batch, batch_size=512, fn_kwargs={"cfg": cfg, "labels": labels},
                               compute=TaskPoolStrategy(size=max_tasks), num_cpus=0.5)


# ---- the splits used by a run ------------------------------------------------------------------
class Splits:
    """Where each split's records come from: explicit files, or carved out of train."""

    def __init__(self, cfg: RunConfig):
        d = cfg.data
        self.cfg = cfg
        self.train = expand_inputs(d.train, d.format, "data.train")
        self.validation = expand_inputs(d.validation, d.format, "data.validation")
        self.test = expand_inputs(d.test, d.format, "data.test")
        self.carve = d.validation_split if not self.validation else 0.0

    def read_in_driver(self) -> bool:
        """Whether this run's files are small and local enough to read in the driver (``small_and_local``)."""
        return small_and_local(self.train + (self.validation or []) + (self.test or []))

    def records(self, split: str):
        if split == "train":
            return build_records(self.train, self.cfg, self.carve, keep="train")
        if split == "validation" and not self.validation:
            return build_records(self.train, self.cfg, self.carve, keep="validation") if self.carve else None
        files = self.validation if split == "validation" else self.test
        return build_records(files, self.cfg) if files else None


# ---- what `rayfine evaluate` reads ---------------------------------------------------------------
class EvaluationData:
    """The records ``rayfine evaluate`` scores: ``--data``, else the config's test files, else its validation
    files (or the validation share carved out of train). Small local files are read in this process, like a
    run's (``small_and_local``): no Ray Data pass, no Ray at all; larger or remote data is a Ray Dataset."""

    def __init__(self, cfg: RunConfig, data: str | None = None):
        self.cfg = cfg
        self.carve, self.keep = 0.0, None
        if data is not None:
            self.files = expand_inputs(data, cfg.data.format, "--data")
        else:
            splits = Splits(cfg)
            self.files = splits.test or splits.validation or []
            if not self.files and splits.carve:
                self.files, self.carve, self.keep = splits.train, splits.carve, "validation"
        if not self.files:
            raise UserError("no evaluation data: pass --data FILE, or set data.test or data.validation")

    @property
    def in_process(self) -> bool:
        return small_and_local(self.files)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Numpy batches of the records, read in this process (``in_process`` data)."""
        for batch in read_in_process(self.files, self.cfg, self.carve):
            if self.keep is not None:
                batch = {k: v[batch["_split"] == self.keep] for k, v in batch.items()}
            if len(batch["_error"]):
                yield batch

    def dataset(self):
        """The records as a lazy Ray Dataset."""
        return build_records(self.files, self.cfg, self.carve, keep=self.keep)

    def rows(self) -> list[dict[str, Any]]:
        """Every record (``in_process`` data read here, else through Ray Data); raises on a problem in any, or
        when there is none."""
        rows = [row for batch in self.batches() for row in batch_rows(batch)] if self.in_process \
            else self.dataset().take_all()
        raise_problems(rows)
        if not rows:
            raise UserError("the evaluation data has no records")
        return rows


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The rows of a numpy batch, as Ray Data's ``take`` gives them."""
    return [{k: v[i] for k, v in batch.items()} for i in range(len(next(iter(batch.values()))))]


def raise_problems(rows: list[dict[str, Any]]) -> None:
    """Raise a UserError naming the file and line of every problem among ``rows`` (at most MAX_PROBLEMS)."""
    problems = [f"{r['_file']}:{r['_line']}: {r['_error']}" for r in rows if r["_error"]][:MAX_PROBLEMS]
    if problems:
        raise UserError(problems, header="Problems in the evaluation data:")
