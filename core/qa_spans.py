"""Decoding an extractive-QA model's start/end logits into answer spans: one rule for evaluation and serving.

Training's evaluation (``training.tasks.question_answering``) and ``/v1/qa`` (``serving.encoders.Reader``) both
call ``best_spans`` on each window of a context, so the answer a deployment gives is the one evaluation scored.
"""

from __future__ import annotations

import numpy as np


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, offset_start: np.ndarray,
               offset_end: np.ndarray, n_best: int, max_answer_tokens: int, cls_index: int = 0
               ) -> tuple[float, list[tuple[float, int, int]]]:
    """The null (CLS) score and the ``n_best`` best spans ``(score, start_char, end_char)`` of one window.

    Candidates are the ``n_best`` highest start and end logits among context tokens (``offset_start >= 0``);
    a span is valid when it ends at or after its start and is at most ``max_answer_tokens`` long. The score
    of a span is its start logit plus its end logit, as in the reference SQuAD post-processing.
    """
    n = len(offset_start)
    start_logits, end_logits = np.asarray(start_logits[:n], float), np.asarray(end_logits[:n], float)
    valid = np.flatnonzero(np.asarray(offset_start) >= 0)
    starts = valid[np.argsort(-start_logits[valid], kind="stable")[:n_best]]
    ends = valid[np.argsort(-end_logits[valid], kind="stable")[:n_best]]
    spans = [(float(start_logits[s] + end_logits[e]), int(offset_start[s]), int(offset_end[e]))
             for s in starts for e in ends if s <= e < s + max_answer_tokens]
    spans.sort(key=lambda span: -span[0])
    return float(start_logits[cls_index] + end_logits[cls_index]), spans[:n_best]
