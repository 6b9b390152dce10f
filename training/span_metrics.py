"""Span metrics computed by hand: entity-level scores for tagging (seqeval semantics) and SQuAD EM/F1.

Both follow the reference implementations exactly, so numbers are comparable with published ones:

- entities are read from BIO tags the way ``seqeval`` does in its default (non-strict) mode: an ``I-X``
  that does not continue an ``X`` entity starts a new one, and an entity ends at ``O``, at ``B-``, or where
  the type changes. Scores are micro-averaged over entities; per-type scores are in ``per_type``.
- answers are compared after the official SQuAD normalization (lower-case, drop punctuation and the
  articles a/an/the, collapse whitespace); each prediction takes its best score over the gold answers, and an
  unanswerable question (no gold answer) scores 1 only for an empty prediction.
"""

from __future__ import annotations

import re
import string
from collections import Counter


# ---- entities ----------------------------------------------------------------------------------
def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def bio_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities ``(type, first, last)`` (inclusive word indices) in one sentence's tags."""
    entities, start, prev_prefix, prev_kind = [], 0, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = split_tag(tag)
        ends = prev_prefix != "O" and (prefix in ("B", "O") or kind != prev_kind)
        if ends:
            entities.append((prev_kind, start, i - 1))
        if prefix == "B" or (prefix == "I" and (prev_prefix == "O" or kind != prev_kind)):
            start = i
        prev_prefix, prev_kind = prefix, kind
    return entities


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level precision/recall/F1 (overall and per type) and word accuracy over sentences.

    ``gold`` and ``pred`` hold one tag list per sentence, of equal lengths.
    """
    gold_set, pred_set = set(), set()
    correct = total = 0
    for n, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {n}: {len(g)} gold tags but {len(p)} predicted")
        gold_set |= {(n, *e) for e in bio_entities(g)}
        pred_set |= {(n, *e) for e in bio_entities(p)}
        correct += sum(a == b for a, b in zip(g, p))
        total += len(g)
    hits = gold_set & pred_set
    per_type = {}
    for kind in sorted({e[1] for e in gold_set | pred_set}):
        n_gold = sum(e[1] == kind for e in gold_set)
        per_type[kind] = _prf(sum(e[1] == kind for e in hits), sum(e[1] == kind for e in pred_set), n_gold)
        per_type[kind]["support"] = n_gold
    return {**_prf(len(hits), len(pred_set), len(gold_set)),
            "accuracy": correct / total if total else 0.0,
            "num_examples": len(gold), "per_type": per_type}


# ---- answers -----------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalization."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_toks or not gold_toks:  # unanswerable: right only if both are empty
        return float(pred_toks == gold_toks)
    common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred_toks), common / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], golds: list[list[str]]) -> dict:
    """Mean exact match and F1 (fractions in [0, 1]) of predictions against their gold answer lists."""
    em = f1 = 0.0
    for prediction, answers in zip(predictions, golds):
        answers = [a for a in answers if normalize_answer(a)] or [""]
        em += max(exact_match(prediction, a) for a in answers)
        f1 += max(token_f1(prediction, a) for a in answers)
    n = len(predictions)
    return {"exact_match": em / n if n else 0.0, "f1": f1 / n if n else 0.0, "num_examples": n}
