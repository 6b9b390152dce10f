"""Entity-level NER metrics (seqeval semantics) against hand computation."""

import pytest

from training.span_metrics import bio_entities, entity_metrics
from training.tasks.base import LabelSpace
from training.tasks.token_classification import TokenClassification

GOLD = [["B-PER", "I-PER", "O", "B-LOC"],
        ["B-ORG", "O", "B-PER"],
        ["O", "I-LOC", "I-LOC", "O"]]  # a stray I- starts an entity (seqeval's default, lenient mode)
PRED = [["B-PER", "I-PER", "O", "B-ORG"],
        ["B-ORG", "O", "O"],
        ["O", "B-LOC", "I-LOC", "O"]]


def test_entities_follow_seqeval_chunking():
    assert bio_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert bio_entities(["I-PER", "I-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 2, 2)]
    assert bio_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]  # a type change splits
    assert bio_entities(["O", "O"]) == [] and bio_entities([]) == []


def test_entity_scores_match_hand_computation():
    m = entity_metrics(GOLD, PRED)
    # gold entities: PER s1, LOC s1, ORG s2, PER s2, LOC s3 (5); predicted: PER s1, ORG s1, ORG s2, LOC s3 (4);
    # correct: PER s1, ORG s2, LOC s3 (3)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(8 / 11)  # word tags: 3/4 + 2/3 + 3/4 right
    assert m["num_examples"] == 3 and sum(t["support"] for t in m["per_type"].values()) == 5
    # PER: gold 2, pred 1, hit 1; LOC: gold 2, pred 1, hit 1; ORG: gold 1, pred 2, hit 1
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_type"]["LOC"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_type"]["ORG"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


def test_entity_scores_equal_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    m = entity_metrics(GOLD, PRED)
    assert m["precision"] == pytest.approx(seqeval.precision_score(GOLD, PRED))
    assert m["recall"] == pytest.approx(seqeval.recall_score(GOLD, PRED))
    assert m["f1"] == pytest.approx(seqeval.f1_score(GOLD, PRED))
    assert m["accuracy"] == pytest.approx(seqeval.accuracy_score(GOLD, PRED))
    report = seqeval.classification_report(GOLD, PRED, output_dict=True)
    for kind, scores in m["per_type"].items():
        assert scores["f1"] == pytest.approx(report[kind]["f1-score"])
        assert scores["support"] == report[kind]["support"]


def test_no_entities_scores_zero_without_dividing_by_zero():
    m = entity_metrics([["O", "O"]], [["O", "O"]])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0)


def test_adapter_metrics_count_truncated_words_as_missed():
    space = LabelSpace(["O", "B-LOC", "I-LOC", "B-PER", "I-PER"])
    results = [{"pred": [3, 4, 0], "gold": [3, 4, 0, 1]},  # the 4th word was cut off: its LOC is missed
               {"pred": [1, -1], "gold": [1, 0]}]  # -1: a word that became no token counts as O
    m = TokenClassification.compute_metrics(results, space)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)
