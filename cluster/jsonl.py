"""One JSON-lines record: parsed, or the problem with it (shared by the data pipeline and the jobs API)."""

from __future__ import annotations

import json
from typing import Optional


def parse_record(line: str) -> tuple[Optional[dict], Optional[str]]:
    """``(record, None)`` for a JSON object, else ``(None, problem)`` worded for a ``file:line:`` message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None
