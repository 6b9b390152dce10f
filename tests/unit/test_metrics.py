import numpy as np
import pytest

from training.metrics import classification_metrics


def test_metrics_match_hand_computation():
    # gold: a a a b b c ; pred: a a b b c c
    names = ["a", "b", "c"]
    gold = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(pred, gold, names)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: tp2 fp0 fn1 -> p1 r2/3 f0.8 ; b: tp1 fp1 fn1 -> p.5 r.5 f.5 ; c: tp1 fp1 fn0 -> p.5 r1 f2/3
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
                                   "support": 3}
    assert m["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["num_examples"] == 6


def test_class_absent_from_gold_and_pred_does_not_count_in_macro():
    m = classification_metrics(np.array([0, 1]), np.array([0, 1]), ["x", "y", "never"])
    assert m["f1"] == 1.0 and m["per_class"]["never"]["support"] == 0
