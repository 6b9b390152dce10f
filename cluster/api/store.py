"""SQLite state of the fine-tuning API: files, jobs, events and checkpoints.

One file (``DATA_DIR/api.sqlite3``) holds everything a restart must keep. Ids are generated here and are the
only handle clients get; every lookup is a parameterized query, so an id never becomes part of a path or of
SQL. Lists are ordered by an autoincrement ``seq`` (creation order): ``after=ID`` pages from that row on.

One connection, shared by the request threads and the runner thread under a lock (SQLite serializes writers
anyway; WAL lets a second process, e.g. a test, read while the server writes).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import sqlite3
import string
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from core.errors import UserError

ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
_ALPHABET = string.ascii_letters + string.digits

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes INTEGER NOT NULL, records INTEGER NOT NULL, created_at INTEGER NOT NULL,
    path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, model TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, hyperparameters TEXT NOT NULL, suffix TEXT,
    seed INTEGER NOT NULL, metadata TEXT, status TEXT NOT NULL, error TEXT, fine_tuned_model TEXT NOT NULL,
    created_at INTEGER NOT NULL, finished_at INTEGER, ray_job_id TEXT NOT NULL, submitted INTEGER NOT NULL DEFAULT 0,
    run_dir TEXT, metrics_offset INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, trained_tokens INTEGER,
    config TEXT NOT NULL, estimated_finish INTEGER, method TEXT, owner TEXT, stop_pending INTEGER NOT NULL DEFAULT 0,
    model_deleted INTEGER NOT NULL DEFAULT 0, integrations TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
    data TEXT, step INTEGER);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL, name TEXT NOT NULL,
    step INTEGER NOT NULL, created_at INTEGER NOT NULL, metrics TEXT NOT NULL, UNIQUE (job_id, name));
"""
# Columns added after the first release: (table, column, type), added to an older database when it is opened.
_ADDED_COLUMNS = (("jobs", "estimated_finish", "INTEGER"), ("jobs", "method", "TEXT"), ("jobs", "owner", "TEXT"),
                  ("jobs", "stop_pending", "INTEGER NOT NULL DEFAULT 0"),
                  ("jobs", "model_deleted", "INTEGER NOT NULL DEFAULT 0"), ("jobs", "integrations", "TEXT"))
_JSON_COLUMNS = {"hyperparameters", "metadata", "error", "data", "metrics", "config", "integrations"}


def new_id(prefix: str) -> str:
    """``prefix-`` and 24 random letters and digits (about 143 bits), like OpenAI's ids."""
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class StateLock:
    """An exclusive lock on the state, held while a server runs: a second server on the same SQLite file (a
    rolling update that starts the new pod before the old one stops) refuses to start instead of following the
    same jobs twice. A ``flock`` on ``FILE.lock`` beside the SQLite file, released by the kernel if the
    process dies."""

    def __init__(self, db_path: Path):
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.with_suffix('')}: another rayfine api server ({holder}) uses this state; "
                            "stop it first, or give this one its own --data-dir or --db-path") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class BadCursor(ValueError):
    """``after`` names no object of this list."""


class Store:
    """Typed access to the four tables. Rows come back as dicts with JSON columns decoded."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        for table, column, kind in _ADDED_COLUMNS:
            if column not in {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- plumbing ----------------------------------------------------------------------------------------
    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(row) for row in self._db.execute(sql, tuple(params)).fetchall()]

    def _one(self, sql: str, params: Iterable[Any] = ()) -> Optional[dict[str, Any]]:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        cols = list(row)
        values = [_encode(c, row[c]) for c in cols]
        with self._lock:
            self._db.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                             values)

    def _page(self, table: str, where: str, params: list[Any], after: Optional[str], limit: int,
              descending: bool = True) -> tuple[list[dict[str, Any]], bool]:
        """One page of ``table`` filtered by ``where``; ``after`` must be an id within the same filter."""
        if after is not None:
            row = self._one(f"SELECT seq FROM {table} WHERE {where} AND id = ?", [*params, after])
            if row is None:
                raise BadCursor(after)
            where += f" AND seq {'<' if descending else '>'} ?"
            params = [*params, row["seq"]]
        order = "DESC" if descending else "ASC"
        rows = self._rows(f"SELECT * FROM {table} WHERE {where} ORDER BY seq {order} LIMIT ?", [*params, limit + 1])
        return rows[:limit], len(rows) > limit

    # ---- files -------------------------------------------------------------------------------------------
    def add_file(self, row: dict[str, Any]) -> None:
        self._insert("files", row)

    def get_file(self, file_id: str) -> Optional[dict[str, Any]]:
        return self._one("SELECT * FROM files WHERE id = ?", [file_id])

    def list_files(self, purpose: Optional[str], after: Optional[str], limit: int, descending: bool):
        where, params = ("purpose = ?", [purpose]) if purpose else ("1 = 1", [])
        return self._page("files", where, params, after, limit, descending)

    def delete_file(self, file_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", [file_id])

    def file_in_use(self, file_id: str) -> Optional[str]:
        """The id of an active job reading this file, if any."""
        row = self._one(f"SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ?) AND status IN "
                        f"({', '.join('?' * len(ACTIVE))})", [file_id, file_id, *ACTIVE])
        return row["id"] if row else None

    # ---- jobs --------------------------------------------------------------------------------------------
    def add_job(self, row: dict[str, Any]) -> None:
        self._insert("jobs", row)

    def get_job(self, job_id: str) -> Optional[dict[str, Any]]:
        return self._one("SELECT * FROM jobs WHERE id = ?", [job_id])

    def list_jobs(self, after: Optional[str], limit: int):
        return self._page("jobs", "1 = 1", [], after, limit)

    def active_jobs(self) -> list[dict[str, Any]]:
        return self._rows(f"SELECT * FROM jobs WHERE status IN ({', '.join('?' * len(ACTIVE))}) ORDER BY seq",
                          ACTIVE)

    def active_jobs_of(self, owner: str) -> int:
        """How many active jobs ``owner`` (an API key's hash) has."""
        row = self._one(f"SELECT COUNT(*) AS n FROM jobs WHERE owner = ? AND status IN "
                        f"({', '.join('?' * len(ACTIVE))})", [owner, *ACTIVE])
        return row["n"] if row else 0

    def jobs_to_stop(self) -> list[dict[str, Any]]:
        """Cancelled jobs whose Ray job may still run (``stop_pending``)."""
        return self._rows("SELECT * FROM jobs WHERE stop_pending = 1 ORDER BY seq")

    def update_job(self, job_id: str, only_if: Iterable[str] = (), **fields: Any) -> bool:
        """Set ``fields``; with ``only_if``, only while the job's status is one of them (compare-and-set, so a
        cancel and the runner never overwrite each other's final status). Returns whether a row changed."""
        only_if = tuple(only_if)
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql, params = f"UPDATE jobs SET {sets} WHERE id = ?", [*(_encode(k, v) for k, v in fields.items()), job_id]
        if only_if:
            sql += f" AND status IN ({', '.join('?' * len(only_if))})"
            params += list(only_if)
        with self._lock:
            return self._db.execute(sql, params).rowcount == 1

    def served_jobs(self) -> list[dict[str, Any]]:
        """Succeeded jobs whose fine-tuned model has not been deleted, oldest first."""
        return self._rows("SELECT * FROM jobs WHERE status = 'succeeded' AND model_deleted = 0 ORDER BY seq")

    def job_of_model(self, model_id: str) -> Optional[dict[str, Any]]:
        """The job whose fine-tuned model is ``model_id`` (any status)."""
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ?", [model_id])

    def job_counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._rows("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    # ---- events ------------------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: Optional[dict[str, Any]] = None, step: Optional[int] = None) -> str:
        event_id = new_id("ftevent")
        self._insert("events", {"id": event_id, "job_id": job_id, "created_at": int(time.time()), "level": level,
                                "message": message, "type": type, "data": data, "step": step})
        return event_id

    def list_events(self, job_id: str, after: Optional[str], limit: int):
        return self._page("events", "job_id = ?", [job_id], after, limit)

    def add_metrics(self, job_id: str, events: list[tuple[str, dict[str, Any]]], offset: int,
                    total_steps: Optional[int], trained_tokens: Optional[int] = None,
                    estimated_finish: Optional[int] = None) -> None:
        """Record metrics events ``(message, data)``, how far ``metrics.jsonl`` has been read and the progress
        it gives, in one transaction (a restart neither repeats nor skips a line)."""
        now = int(time.time())
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for message, data in events:
                    self._db.execute(
                        "INSERT INTO events (id, job_id, created_at, level, message, type, data, step) "
                        "VALUES (?, ?, ?, 'info', ?, 'metrics', ?, ?)",
                        [new_id("ftevent"), job_id, now, message, json.dumps(data), data.get("step")])
                self._db.execute("UPDATE jobs SET metrics_offset = ?, total_steps = ?, "
                                 "trained_tokens = COALESCE(?, trained_tokens), "
                                 "estimated_finish = COALESCE(?, estimated_finish) WHERE id = ?",
                                 [offset, total_steps, trained_tokens, estimated_finish, job_id])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def metrics_at(self, job_id: str, step: int) -> list[dict[str, Any]]:
        """The metrics events of ``job_id`` up to ``step``, oldest first (for a checkpoint's metrics)."""
        return self._rows("SELECT * FROM events WHERE job_id = ? AND type = 'metrics' AND step <= ? ORDER BY seq",
                          [job_id, step])

    # ---- checkpoints -------------------------------------------------------------------------------------
    def add_checkpoint(self, row: dict[str, Any]) -> bool:
        """Insert unless the job already has a checkpoint of that name; returns whether it was new."""
        try:
            self._insert("checkpoints", row)
            return True
        except sqlite3.IntegrityError:
            return False

    def checkpoint_names(self, job_id: str) -> set[str]:
        return {r["name"] for r in self._rows("SELECT name FROM checkpoints WHERE job_id = ?", [job_id])}

    def list_checkpoints(self, job_id: str, after: Optional[str], limit: int):
        return self._page("checkpoints", "job_id = ?", [job_id], after, limit)


def _encode(column: str, value: Any) -> Any:
    return json.dumps(value) if column in _JSON_COLUMNS and value is not None else value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in _JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out
