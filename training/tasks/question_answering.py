"""Extractive question answering (SQuAD): predict the answer's start and end token in the context.

A record is a question, a context and its gold answers (character offsets; none = unanswerable). A context
longer than ``data.max_seq_length`` is split into overlapping windows (``data.doc_stride`` tokens shared by
neighbours), so one record becomes several rows. Training points each window at its answer's tokens, or at
the CLS token when the answer is not inside that window. Evaluation decodes the ``data.n_best`` best start
and end logits of every window into text spans, keeps each question's best span over its windows and scores
it with SQuAD's exact match and F1.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np

from core.errors import UserError
from core.qa_spans import best_spans
from training.span_metrics import squad_metrics
from training.tasks.base import LabelSpace, ParseError, TaskAdapter, padded_inputs, text_field

SPECIAL_TOKENS = 3  # [CLS] question [SEP] context [SEP]


def _answer_lists(value: Any, column: str) -> tuple[list, list]:
    """``{text: [...], answer_start: [...]}`` or SQuAD's ``[{text, answer_start}, ...]`` -> two lists."""
    if isinstance(value, (list, tuple)) and all(isinstance(a, dict) for a in value):
        value = {"text": [a.get("text") for a in value], "answer_start": [a.get("answer_start") for a in value]}
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise ParseError(f"'{column}' must be {{\"text\": [...], \"answer_start\": [...]}}, got {value!r:.80}")
    texts, starts = value["text"], value["answer_start"]
    texts = texts.tolist() if isinstance(texts, np.ndarray) else texts
    starts = starts.tolist() if isinstance(starts, np.ndarray) else starts
    if not isinstance(texts, (list, tuple)) or not isinstance(starts, (list, tuple)):
        raise ParseError(f"'{column}.text' and '{column}.answer_start' must be lists")
    if len(texts) != len(starts):
        raise ParseError(f"'{column}' has {len(texts)} texts but {len(starts)} answer_start values; give one "
                         "start per text")
    return list(texts), list(starts)


def check_answers(context: str, texts: list, starts: list, column: str) -> tuple[list[str], list[int]]:
    """Every answer must be a non-empty string found at its ``answer_start`` in the context."""
    for i, (text, start) in enumerate(zip(texts, starts)):
        if not isinstance(text, str) or not text.strip():
            raise ParseError(f"{column}.text[{i}] must be a non-empty string, got {text!r}")
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ParseError(f"{column}.answer_start[{i}] must be a character offset (int >= 0), got {start!r}")
        found = context[start: start + len(text)]
        if found != text:
            where = context.find(text)
            hint = (f"the text occurs at {where}" if where >= 0 else
                    "the text does not occur in the context at all; fix the answer or the context")
            raise ParseError(f"{column}.text[{i}] {text!r} is not at answer_start {start} in the context "
                             f"(found {found!r}); {hint}")
    return [str(t) for t in texts], [int(s) for s in starts]


def answer_token_span(offsets: list[tuple[int, int]], sequence_ids: list[int | None], start_char: int,
                      end_char: int, cls_index: int = 0) -> tuple[int, int]:
    """Start and end token of the answer ``[start_char, end_char)`` in one window; CLS when it is not inside."""
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return cls_index, cls_index
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


class QuestionAnswering(TaskAdapter):
    name = "question_answering"
    has_labels = False
    auto_model = "AutoModelForQuestionAnswering"

    # ---- records -------------------------------------------------------------------------------
    def parse_record(self, record: dict[str, Any]) -> dict[str, Any]:
        d = self.data
        question = text_field(record, d.question_column, "data.question_column")
        context = text_field(record, d.context_column, "data.context_column")
        if d.answers_column not in record:
            cols = ", ".join(sorted(k for k in record if not k.startswith("_"))) or "none"
            raise ParseError(f"missing column '{d.answers_column}' (data.answers_column); columns are {cols}")
        texts, starts = _answer_lists(record[d.answers_column], d.answers_column)
        texts, starts = check_answers(context, texts, starts, d.answers_column)
        return {"question": question, "context": context, "answer_texts": texts, "answer_starts": starts}

    @staticmethod
    def empty_record() -> dict[str, Any]:
        return {"question": "", "context": "", "answer_texts": [], "answer_starts": []}

    # ---- tokens --------------------------------------------------------------------------------
    def _questions(self, questions: list[str], tokenizer) -> tuple[list[str], np.ndarray]:
        """Cut questions too long to leave a context window wider than the stride (the tokenizer panics);
        returns the questions and which were cut."""
        room = self.data.max_seq_length - SPECIAL_TOKENS - self.data.doc_stride - 1
        enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
        cut = np.array([len(offsets) > room for offsets in enc["offset_mapping"]], dtype=bool)
        out = [q[: offsets[room - 1][1]] if too_long else q
               for q, offsets, too_long in zip(questions, enc["offset_mapping"], cut)]
        return out, cut

    def windows(self, batch: dict[str, np.ndarray], tokenizer):
        """The tokenizer's windows of every record (``overflow_to_sample_mapping`` maps them back)."""
        if not tokenizer.is_fast:
            raise UserError("task question_answering needs a fast tokenizer (offset mapping); this model's "
                            "tokenizer is a slow one")
        questions, _ = self._questions([str(q) for q in batch["question"]], tokenizer)
        return tokenizer(questions, [str(c) for c in batch["context"]], truncation="only_second",
                         max_length=self.data.max_seq_length, stride=self.data.doc_stride,
                         return_overflowing_tokens=True, return_offsets_mapping=True)

    def tokenize(self, batch: dict[str, np.ndarray], tokenizer, labels: LabelSpace | None,
                 truncate: bool = True) -> dict[str, Any]:
        if not truncate:  # one row per record at its full length (pre-flight length statistics)
            enc = tokenizer([str(q) for q in batch["question"]], [str(c) for c in batch["context"]])
            ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
            return {"input_ids": ids, "length": np.array([len(x) for x in ids], dtype=np.int32)}
        enc = self.windows(batch, tokenizer)
        keys = [f"{f}:{n}" for f, n in zip(batch["_file"], batch["_line"])]
        out: dict[str, list] = defaultdict(list)
        for w, record in enumerate(enc["overflow_to_sample_mapping"]):
            ids, offsets, seq = enc["input_ids"][w], enc["offset_mapping"][w], enc.sequence_ids(w)
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            texts, starts = list(batch["answer_texts"][record]), list(batch["answer_starts"][record])
            start, end = cls, cls
            if texts:  # training targets the first gold answer, as SQuAD training does
                start, end = answer_token_span(offsets, seq, int(starts[0]), int(starts[0]) + len(texts[0]), cls)
            out["input_ids"].append(np.asarray(ids, dtype=np.int32))
            if "token_type_ids" in enc:
                out["token_type_ids"].append(np.asarray(enc["token_type_ids"][w], dtype=np.int8))
            out["start_positions"].append(start)
            out["end_positions"].append(end)
            out["offset_start"].append(np.array([o[0] if s == 1 else -1 for o, s in zip(offsets, seq)], np.int32))
            out["offset_end"].append(np.array([o[1] if s == 1 else -1 for o, s in zip(offsets, seq)], np.int32))
            out["example"].append(keys[record])
            out["context"].append(str(batch["context"][record]))
            out["answers"].append(json.dumps([str(t) for t in texts]))
            out["cls_index"].append(cls)
        result = dict(out)
        result["length"] = np.array([len(x) for x in out["input_ids"]], dtype=np.int32)
        for key in ("start_positions", "end_positions", "cls_index"):
            result[key] = np.asarray(out[key], dtype=np.int64)
        return result

    def record_stats(self, batch: dict[str, np.ndarray], tokenizer) -> dict[str, np.ndarray]:
        """Per record: windows (rows), unanswerable, answer outside every window, question cut short."""
        enc = self.windows(batch, tokenizer)
        n = len(batch["question"])
        rows, found = np.zeros(n, np.int64), np.zeros(n, bool)
        for w, record in enumerate(enc["overflow_to_sample_mapping"]):
            rows[record] += 1
            texts, starts = list(batch["answer_texts"][record]), list(batch["answer_starts"][record])
            if texts:
                start_char = int(starts[0])
                span = answer_token_span(enc["offset_mapping"][w], enc.sequence_ids(w), start_char,
                                         start_char + len(texts[0]), cls_index=-1)
                found[record] |= span[0] >= 0
        answerable = np.array([len(t) > 0 for t in batch["answer_texts"]])
        _, cut = self._questions([str(q) for q in batch["question"]], tokenizer)
        return {"rows": rows, "unanswerable": (~answerable).astype(np.int64),
                "answer_outside_windows": (answerable & ~found).astype(np.int64),
                "question_truncated": cut.astype(np.int64)}

    def collate(self, batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
        out = padded_inputs(batch, pad_id)
        out["start_positions"] = np.asarray(batch["start_positions"], dtype=np.int64)
        out["end_positions"] = np.asarray(batch["end_positions"], dtype=np.int64)
        return out

    # ---- model and metrics ---------------------------------------------------------------------
    def model_kwargs(self, labels: LabelSpace | None) -> dict[str, Any]:
        return {}

    def eval_outputs(self, batch: dict[str, np.ndarray], inputs: dict, outputs) -> list[dict]:
        starts = outputs.start_logits.float().cpu().numpy()
        ends = outputs.end_logits.float().cpu().numpy()
        results = []
        for i in range(len(starts)):
            context = str(batch["context"][i])
            null, spans = best_spans(starts[i], ends[i], np.asarray(batch["offset_start"][i], np.int64),
                                     np.asarray(batch["offset_end"][i], np.int64), self.data.n_best,
                                     self.data.max_answer_length, int(batch["cls_index"][i]))
            results.append({"example": str(batch["example"][i]), "answers": json.loads(str(batch["answers"][i])),
                            "null": null, "spans": [[score, context[a:b]] for score, a, b in spans]})
        return results

    @staticmethod
    def compute_metrics(results: list[dict], label_space: LabelSpace | None = None) -> dict:
        return squad_metrics(*predict_answers(results))


def predict_answers(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Each question's answer from its windows' candidates, with its gold answers.

    The best span over all windows wins. When the evaluation data has unanswerable questions (SQuAD 2.0
    style), the empty answer is predicted where the lowest null (CLS) score of a question's windows beats
    its best span; otherwise a span is always predicted, as ``pipeline("question-answering")`` does.
    """
    by_example: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_example[r["example"]].append(r)
    allow_empty = any(not windows[0]["answers"] for windows in by_example.values())
    predictions, golds = [], []
    for windows in by_example.values():
        spans = [span for w in windows for span in w["spans"]]
        best = max(spans, key=lambda span: span[0]) if spans else (float("-inf"), "")
        null = min(w["null"] for w in windows)
        predictions.append("" if allow_empty and null > best[0] else best[1])
        golds.append(windows[0]["answers"])
    return predictions, golds
