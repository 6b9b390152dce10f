"""Readers of the record formats: one JSON-lines record, CoNLL (token classification) and nested SQuAD JSON (QA).

``parse_record`` is the one JSON-lines record parser, shared by the data pipeline and the jobs API's upload
checks.

Both yield ``(line, record, problem)`` like every reader in ``training.data``, with 1-based line numbers
of the file itself, so a problem names the line a user has to fix:

- CoNLL: one word per line with its tag in the last column, a blank line between sentences, ``-DOCSTART-``
  lines skipped. A sentence is reported at the line of its first word and becomes
  ``{"tokens": [...], "tags": [...], "_lines": [...]}`` (``_lines``: each word's line, for tag problems).
- SQuAD: ``{"data": [{"paragraphs": [{"context": ..., "qas": [{"id", "question", "answers": [{"text",
  "answer_start"}]}]}]}]}``. Each question is reported at the line where its object opens and becomes
  ``{"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}``.
"""

from __future__ import annotations

import bisect
import json
import re
from typing import Callable, Iterator, Optional, TextIO

Row = tuple[int, "dict | None", "str | None"]


def parse_record(line: str) -> tuple[Optional[dict], Optional[str]]:
    """``(record, None)`` for a JSON object, else ``(None, problem)`` worded for a ``file:line:`` message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON ({exc.msg} at column {exc.colno})"
    except ValueError:  # Python refuses to convert an integer of more than 4,300 digits
        return None, "a number with too many digits (over 4,300)"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def iter_conll(f: TextIO) -> Iterator[Row]:
    """Sentences of a CoNLL file."""
    tokens, tags, lines, problem = [], [], [], None
    for lineno, line in enumerate(f, start=1):
        cols = line.split()
        if cols and cols[0] == "-DOCSTART-":
            cols = []
        if cols:
            if len(cols) < 2 and problem is None:
                problem = (lineno, f"expected a word and its tag separated by whitespace, got {line.strip()!r}")
            tokens.append(cols[0])
            tags.append(cols[-1])
            lines.append(lineno)
            continue
        if lines:
            yield (problem[0], None, problem[1]) if problem else (lines[0], _sentence(tokens, tags, lines), None)
        tokens, tags, lines, problem = [], [], [], None
    if lines:
        yield (problem[0], None, problem[1]) if problem else (lines[0], _sentence(tokens, tags, lines), None)


def _sentence(tokens: list[str], tags: list[str], lines: list[int]) -> dict:
    return {"tokens": tokens, "tags": tags, "_lines": lines}


def looks_like_json_document(f: TextIO) -> bool:
    """True when a .json file is one JSON document (nested SQuAD), False for JSON lines.

    A document either spreads its first object over several lines (the first line is cut short), or is
    SQuAD on a single line (an object with ``data -> paragraphs``).
    """
    for line in f:
        if not line.strip():
            continue
        try:
            first = json.loads(line)
        except json.JSONDecodeError as exc:
            return exc.pos >= len(line.rstrip())
        data = first.get("data") if isinstance(first, dict) else None
        return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "paragraphs" in data[0]
    return False


# ---- nested SQuAD JSON -------------------------------------------------------------------------
_WS = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


class SquadFormatError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


class _Walker:
    """Walks a JSON text object by object, with C-speed decoding of the leaves it does not descend into."""

    def __init__(self, text: str):
        self.text = text
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1

    def skip(self, pos: int) -> int:
        return _WS.match(self.text, pos).end()

    def expect(self, pos: int, char: str) -> int:
        pos = self.skip(pos)
        if self.text[pos: pos + 1] != char:
            raise SquadFormatError(self.line(pos), f"expected '{char}' (data -> paragraphs -> qas)")
        return self.skip(pos + 1)

    def value(self, pos: int):
        try:
            return _DECODER.raw_decode(self.text, self.skip(pos))
        except json.JSONDecodeError as exc:
            raise SquadFormatError(exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None

    def object(self, pos: int, on_member: Callable[[str, int], int]) -> int:
        """Call ``on_member(key, value_pos) -> end_pos`` for each member; returns the end position."""
        pos = self.expect(pos, "{")
        while self.text[pos: pos + 1] != "}":
            key, pos = self.value(pos)
            pos = on_member(key, self.expect(pos, ":"))
            pos = self.skip(pos)
            if self.text[pos: pos + 1] == ",":
                pos = self.skip(pos + 1)
            elif self.text[pos: pos + 1] != "}":
                raise SquadFormatError(self.line(pos), "expected ',' or '}' in an object")
        return pos + 1

    def array(self, pos: int, on_item: Callable[[int], int]) -> int:
        pos = self.expect(pos, "[")
        while self.text[pos: pos + 1] != "]":
            pos = self.skip(on_item(pos))
            if self.text[pos: pos + 1] == ",":
                pos = self.skip(pos + 1)
            elif self.text[pos: pos + 1] != "]":
                raise SquadFormatError(self.line(pos), "expected ',' or ']' in a list")
        return pos + 1

    def skip_value(self, pos: int) -> int:
        return self.value(pos)[1]


def iter_squad(text: str) -> Iterator[Row]:
    """Questions of a nested SQuAD JSON document."""
    walker, rows = _Walker(text), []
    found = {"data": False}

    def on_top(key: str, pos: int) -> int:
        if key != "data":
            return walker.skip_value(pos)
        found["data"] = True
        return walker.array(pos, lambda p: walker.object(p, on_article))

    def on_article(key: str, pos: int) -> int:
        if key != "paragraphs":
            return walker.skip_value(pos)
        return walker.array(pos, on_paragraph)

    def on_paragraph(pos: int) -> int:
        paragraph = {"context": None, "qas": []}

        def on_member(key: str, p: int) -> int:
            if key == "qas":
                return walker.array(p, lambda q: _take(q, paragraph["qas"]))
            value, end = walker.value(p)
            paragraph[key] = value
            return end

        end = walker.object(pos, on_member)
        for line, qa in paragraph["qas"]:
            rows.append(_question(line, qa, paragraph["context"]))
        return end

    def _take(pos: int, into: list) -> int:
        qa, end = walker.value(pos)
        into.append((walker.line(walker.skip(pos)), qa))
        return end

    try:
        walker.object(0, on_top)
    except SquadFormatError as exc:
        yield exc.line, None, f"not a SQuAD JSON file: {exc}"
        return
    if not found["data"]:
        yield 1, None, "not a SQuAD JSON file: no top-level 'data' (data -> paragraphs -> qas)"
    yield from rows


def _question(line: int, qa, context) -> Row:
    if not isinstance(qa, dict):
        return line, None, f"expected a question object in 'qas', got {type(qa).__name__}"
    record = {k: v for k, v in qa.items() if k not in ("answers", "plausible_answers", "is_impossible")}
    if context is not None:
        record["context"] = context
    answers = qa.get("answers")
    if isinstance(answers, list) and all(isinstance(a, dict) for a in answers):
        answers = {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]}
    if answers is not None:
        record["answers"] = answers
    elif qa.get("is_impossible"):
        record["answers"] = {"text": [], "answer_start": []}
    return line, record, None
