"""Classification metrics for one task: accuracy, macro-F1, recall at a precision, confusion matrix.

Plain numpy on three arrays per task: the true class `labels`, the predicted class `predictions`
and the predicted class's `confidences` (its softmax probability). Samples whose label is missing
(-1) must be dropped by the caller; `task_metrics` does it. A task with no labelled sample gets
`None` metrics (JSON null) and is left out of the means, so a missing task never reads as 0.

Definitions (docs/INTERFACE.md):
- accuracy: fraction of samples whose predicted class is the true class.
- macro-F1: unweighted mean of the per-class F1 over the classes that occur in the labels or in the
  predictions. A class that is predicted but never true, or true but never predicted, scores 0; a
  class that is neither true nor predicted is left out (it says nothing about the model, and the
  label sets here have classes with a single sample, often absent from a split).
- recall at precision p (the paper's "recall at 90% precision"): rank the samples by confidence,
  predict the top ones and abstain on the rest; the largest fraction of all samples that is
  predicted correctly while the predicted ones keep precision >= p. Samples with equal confidence
  are kept or dropped together (no threshold separates them), and predicting nothing scores 0.
"""
from __future__ import annotations

import numpy as np

DEFAULT_PRECISIONS = (0.9,)


def recall_key(precision: float) -> str:
    """`recall_at_p90` for 0.9, `recall_at_p95` for 0.95, `recall_at_p92.5` for 0.925."""
    return f"recall_at_p{round(precision * 100, 6):g}"


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return float((labels == predictions).mean()) if labels.size else float("nan")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes]: row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside [0, {num_classes}): {values.min()}..{values.max()}")
    flat = labels * num_classes + predictions
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    true_positives = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(true_positives), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    confusion = confusion_matrix(labels, predictions, num_classes)
    table = per_class(confusion)
    seen = (table["support"] > 0) | (table["predicted"] > 0)
    return float(table["f1"][seen].mean()) if seen.any() else float("nan")


def precision_curve(labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray):
    """Predict the samples whose confidence is >= t and abstain on the rest: for each candidate t
    (each distinct confidence, highest first) -> (t, samples predicted, predicted correctly).
    Samples with equal confidence are kept or dropped together (no threshold separates them)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    confidences = np.asarray(confidences, dtype=np.float64)
    order = np.argsort(-confidences, kind="stable")
    correct = (labels[order] == predictions[order]).astype(np.int64)
    sorted_confidences = confidences[order]
    run_ends = np.flatnonzero(np.append(sorted_confidences[1:] != sorted_confidences[:-1], True))
    return sorted_confidences[run_ends], run_ends + 1, np.cumsum(correct)[run_ends]


def reaches_precision(correct: np.ndarray, predicted: np.ndarray, precision: float) -> np.ndarray:
    # Integer comparison (correct >= p * predicted) would still need p as a float; a small
    # tolerance keeps exactly-p cases (e.g. 9 of 10 at p = 0.9) on the right side of rounding.
    return correct >= precision * predicted - 1e-9


def recall_at_precision(labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray,
                        precision: float = 0.9) -> float:
    labels = np.asarray(labels)
    if not labels.size:
        return float("nan")
    _, predicted_so_far, correct_so_far = precision_curve(labels, predictions, confidences)
    reaches = reaches_precision(correct_so_far, predicted_so_far, precision)
    if not reaches.any():
        return 0.0
    return float(correct_so_far[reaches].max() / labels.size)


def task_metrics(labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray, num_classes: int,
                 precisions=DEFAULT_PRECISIONS) -> dict:
    """metrics.json's entry for one task; samples with label -1 (missing) are left out."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = labels >= 0
    labels, predictions = labels[keep], np.asarray(predictions, dtype=np.int64)[keep]
    confidences = np.asarray(confidences, dtype=np.float64)[keep]
    result = {"n": int(labels.size)}
    if not labels.size:
        result.update({"accuracy": None, "macro_f1": None})
        result.update({recall_key(p): None for p in precisions})
        return result
    result["accuracy"] = accuracy(labels, predictions)
    result["macro_f1"] = macro_f1(labels, predictions, num_classes)
    for p in precisions:
        result[recall_key(p)] = recall_at_precision(labels, predictions, confidences, p)
    return result


def mean_over_tasks(tasks: dict[str, dict]) -> dict:
    """Unweighted mean of each metric over the tasks that have it (tasks without labels skipped)."""
    names = [key for key in next(iter(tasks.values()), {}) if key != "n"]
    means = {}
    for name in names:
        values = [metrics[name] for metrics in tasks.values() if metrics.get(name) is not None]
        means[name] = float(np.mean(values)) if values else None
    return means


def class_table(confusion: np.ndarray, class_names: list[str]) -> list[dict]:
    """One row per class that occurs in the labels or the predictions, most frequent first."""
    table = per_class(confusion)
    rows = [
        {"class": class_names[c], "support": int(table["support"][c]), "predicted": int(table["predicted"][c]),
         "precision": float(table["precision"][c]), "recall": float(table["recall"][c]),
         "f1": float(table["f1"][c])}
        for c in range(len(class_names)) if table["support"][c] or table["predicted"][c]
    ]
    return sorted(rows, key=lambda row: (-row["support"], row["class"]))
