"""Metrics against cases worked out by hand."""
import math

import numpy as np
import pytest

from cmaclip import metrics


def test_accuracy_and_confusion():
    labels = np.array([0, 1, 2, 2, 1])
    predictions = np.array([0, 2, 2, 1, 1])
    assert metrics.accuracy(labels, predictions) == pytest.approx(3 / 5)
    confusion = metrics.confusion_matrix(labels, predictions, num_classes=4)
    assert confusion.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_confusion_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="label outside"):
        metrics.confusion_matrix(np.array([3]), np.array([0]), num_classes=3)


def test_macro_f1_skips_classes_never_seen_and_scores_missed_ones_zero():
    # class 0: tp 2 -> P 1, R 1, F1 1; class 1: true once, predicted as 2 -> F1 0;
    # class 2: predicted once, never true -> F1 0; classes 3, 4: absent everywhere -> left out.
    labels = np.array([0, 0, 1])
    predictions = np.array([0, 0, 2])
    assert metrics.macro_f1(labels, predictions, num_classes=5) == pytest.approx((1 + 0 + 0) / 3)


def test_macro_f1_partial_class():
    # class 0: tp 1, fp 1 (a 1 predicted as 0), fn 1 -> P 1/2, R 1/2, F1 1/2;
    # class 1: tp 1, fp 1, fn 1 -> F1 1/2.
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 1, 0, 1])
    assert metrics.macro_f1(labels, predictions, num_classes=2) == pytest.approx(0.5)


def test_recall_at_precision_picks_the_deepest_threshold_that_keeps_precision():
    # Ranked by confidence: correct, correct, wrong, correct, wrong.
    # Prefix precision: 1, 1, 2/3, 3/4, 3/5. At p = 0.75 the best prefix is 4 (3 correct) -> 3/5.
    labels = np.array([0, 0, 0, 0, 0])
    predictions = np.array([0, 0, 1, 0, 1])
    confidences = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert metrics.recall_at_precision(labels, predictions, confidences, 0.75) == pytest.approx(3 / 5)
    assert metrics.recall_at_precision(labels, predictions, confidences, 0.9) == pytest.approx(2 / 5)
    assert metrics.recall_at_precision(labels, predictions, confidences, 0.6) == pytest.approx(3 / 5)


def test_recall_at_precision_keeps_ties_together():
    # The top two share a confidence: one right, one wrong -> precision 1/2 at that threshold; no
    # threshold can keep only the right one, so at p = 0.9 nothing qualifies.
    labels = np.array([0, 0, 0])
    predictions = np.array([0, 1, 0])
    confidences = np.array([0.8, 0.8, 0.3])
    assert metrics.recall_at_precision(labels, predictions, confidences, 0.9) == 0.0
    # Order of the tied samples in the input must not matter.
    assert metrics.recall_at_precision(labels[[1, 0, 2]], predictions[[1, 0, 2]], confidences, 0.9) == 0.0
    assert metrics.recall_at_precision(labels, predictions, confidences, 0.5) == pytest.approx(2 / 3)


def test_recall_at_precision_all_correct_and_none_reaching():
    labels = np.array([1, 2, 0, 1])
    confidences = np.array([0.2, 0.9, 0.4, 0.4])
    assert metrics.recall_at_precision(labels, labels, confidences, 0.9) == 1.0
    assert metrics.recall_at_precision(labels, (labels + 1) % 3, confidences, 0.9) == 0.0


def test_recall_at_precision_exactly_at_the_precision():
    # 9 right then 1 wrong: precision of all 10 is exactly 0.9 -> all 9 correct count.
    labels = np.zeros(10, dtype=int)
    predictions = np.array([0] * 9 + [1])
    confidences = np.linspace(1.0, 0.1, 10)
    assert metrics.recall_at_precision(labels, predictions, confidences, 0.9) == pytest.approx(0.9)


def test_single_class_task():
    labels = np.zeros(4, dtype=int)
    result = metrics.task_metrics(labels, labels, np.ones(4), num_classes=1)
    assert result == {"n": 4, "accuracy": 1.0, "macro_f1": 1.0, "recall_at_p90": 1.0}


def test_task_metrics_drops_missing_labels_and_adds_precision_levels():
    labels = np.array([0, -1, 1, 1, -1])
    predictions = np.array([0, 1, 1, 0, 0])
    confidences = np.array([0.9, 0.99, 0.8, 0.7, 0.1])
    result = metrics.task_metrics(labels, predictions, confidences, num_classes=2, precisions=(0.9, 0.5))
    assert result["n"] == 3
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["recall_at_p90"] == pytest.approx(2 / 3)  # top two right, third wrong
    assert result["recall_at_p50"] == pytest.approx(2 / 3)


def test_task_without_labels_is_null_and_left_out_of_the_mean():
    empty = metrics.task_metrics(np.array([-1, -1]), np.array([0, 1]), np.array([0.5, 0.5]), num_classes=2)
    assert empty == {"n": 0, "accuracy": None, "macro_f1": None, "recall_at_p90": None}
    full = {"n": 2, "accuracy": 0.5, "macro_f1": 0.25, "recall_at_p90": 0.0}
    other = {"n": 5, "accuracy": 1.0, "macro_f1": 1.0, "recall_at_p90": 1.0}
    means = metrics.mean_over_tasks({"a": full, "b": other, "c": empty})
    assert means == {"accuracy": 0.75, "macro_f1": 0.625, "recall_at_p90": 0.5}
    assert metrics.mean_over_tasks({"c": empty}) == {"accuracy": None, "macro_f1": None, "recall_at_p90": None}


def test_recall_key_names():
    assert metrics.recall_key(0.9) == "recall_at_p90"
    assert metrics.recall_key(0.95) == "recall_at_p95"
    assert metrics.recall_key(0.925) == "recall_at_p92.5"


def test_class_table_lists_seen_classes_by_support():
    confusion = metrics.confusion_matrix(np.array([0, 0, 2]), np.array([0, 1, 2]), num_classes=4)
    rows = metrics.class_table(confusion, ["a", "b", "c", "d"])
    assert [row["class"] for row in rows] == ["a", "c", "b"]
    assert rows[0] == {"class": "a", "support": 2, "predicted": 1, "precision": 1.0, "recall": 0.5,
                       "f1": pytest.approx(2 / 3)}
    assert rows[2]["support"] == 0 and rows[2]["precision"] == 0.0


def test_empty_inputs_are_nan_not_errors():
    assert math.isnan(metrics.accuracy(np.array([]), np.array([])))
    assert math.isnan(metrics.recall_at_precision(np.array([]), np.array([]), np.array([])))
