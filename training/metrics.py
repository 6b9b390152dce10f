"""Metrics computed by hand (numpy only), so the numbers are easy to check and have no hidden defaults."""

from __future__ import annotations

import numpy as np


def classification_metrics(preds: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1 and a per-class report.

    Macro averages are over the classes of ``names`` that occur in ``labels`` or ``preds`` (a class absent
    from both would otherwise add an arbitrary 0 or 1). A class never predicted has precision 0.
    """
    preds = np.asarray(preds, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    per_class = {}
    present = []
    for idx, name in enumerate(names):
        tp = int(np.sum((preds == idx) & (labels == idx)))
        fp = int(np.sum((preds == idx) & (labels != idx)))
        fn = int(np.sum((preds != idx) & (labels == idx)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        support = int(np.sum(labels == idx))
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or tp + fp:
            present.append(name)
    macro = {k: float(np.mean([per_class[c][k] for c in present])) if present else 0.0
             for k in ("precision", "recall", "f1")}
    return {
        "accuracy": float(np.mean(preds == labels)) if n else 0.0,
        "f1": macro["f1"],
        "precision": macro["precision"],
        "recall": macro["recall"],
        "num_examples": n,
        "per_class": per_class,
    }
