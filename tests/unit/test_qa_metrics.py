"""SQuAD exact match / F1 and the n-best span decoding, against hand computation."""

import numpy as np
import pytest

from core.qa_spans import best_spans
from training.span_metrics import exact_match, normalize_answer, squad_metrics, token_f1
from training.tasks.question_answering import predict_answers


def test_squad_normalization():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an Apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Eiffel Tower", "Eiffel tower.") == 1.0
    # pred "in paris france" vs gold "paris": common 1, precision 1/3, recall 1 -> f1 0.5
    assert token_f1("in Paris, France", "Paris") == pytest.approx(0.5)
    # pred "1889 year" vs gold "in 1889": common 1, p 1/2, r 1/2 -> f1 1/2
    assert token_f1("1889 year", "in 1889") == pytest.approx(0.5)
    assert token_f1("a", "the") == 1.0  # both normalize to nothing
    assert token_f1("", "Paris") == 0.0


def test_squad_metrics_take_the_best_gold_and_score_unanswerables():
    predictions = ["Paris", "in 1889", "", "Lyon"]
    golds = [["Paris", "paris France"], ["1889"], [], []]
    m = squad_metrics(predictions, golds)
    # EM: 1, 0, 1 (empty for unanswerable), 0 -> 0.5 ; F1: 1, 2/3 (p 1/2 r 1), 1, 0 -> (8/3)/4
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert m["num_examples"] == 4


def test_best_spans_decodes_hand_made_logits():
    # tokens: 0 CLS, 1-2 question, 3 SEP, 4-7 context words at chars 0-3, 4-9, 10-12, 13-18, 8 SEP
    offset_start = np.array([-1, -1, -1, -1, 0, 4, 10, 13, -1])
    offset_end = np.array([-1, -1, -1, -1, 3, 9, 12, 18, -1])
    start = np.array([1.0, 9, 0, 0, 0, 5, 0, 2, 0])  # question token 1 has the highest start: never chosen
    end = np.array([1.0, 0, 9, 0, 0, 0, 4, 3, 0])
    null, spans = best_spans(start, end, offset_start, offset_end, n_best=3, max_answer_tokens=3)
    assert null == 2.0
    # 5->6 = 9 ; 5->7 = 8 ; 7->7 = 5 ; (6->x with start 0 rank lower; end before start is invalid)
    assert spans == [(9.0, 4, 12), (8.0, 4, 18), (5.0, 13, 18)]
    _, short = best_spans(start, end, offset_start, offset_end, n_best=3, max_answer_tokens=1)
    assert short[0] == (5.0, 13, 18)  # 5->6 is two tokens long


def test_predictions_pick_the_best_window_and_null_only_with_unanswerables():
    windows = [{"example": "f:1", "answers": ["Paris"], "null": 1.0, "spans": [[3.0, "Lyon"]]},
               {"example": "f:1", "answers": ["Paris"], "null": 0.5, "spans": [[7.0, "Paris"], [2.0, "France"]]},
               {"example": "f:2", "answers": ["1889"], "null": 9.0, "spans": [[4.0, "1889"]]}]
    assert predict_answers(windows) == (["Paris", "1889"], [["Paris"], ["1889"]])  # SQuAD 1.1: always a span
    windows.append({"example": "f:3", "answers": [], "null": 5.0, "spans": [[1.0, "x"]]})
    predictions, _ = predict_answers(windows)
    assert predictions == ["Paris", "", ""]  # with unanswerables in the data, a null beating the best span wins
