"""Calibration for auto-fill: per-task temperature, and confidence thresholds that reach a target
precision. Plain numpy on logits and labels; `cmaclip calibrate` fits it, `cmaclip predict` and
`cmaclip eval` apply it.

Why each part:
- **Temperature** (Guo et al. 2017): one scalar T per task, softmax(logits / T), fitted by
  minimising the negative log-likelihood on the validation split. It leaves every argmax alone and
  makes the confidences honest (reported as ECE before and after), so a threshold reads as a
  probability. The NLL is convex in 1/T, so a golden-section search over log(1/T) finds it.
- **Thresholds**: a prediction is accepted (filled in without review) when its calibrated
  confidence is >= its threshold. On the validation split, the threshold is the lowest one at
  which the accepted predictions still have precision >= the target: the largest automatic
  coverage at that precision (the operating point of the paper's recall at 90% precision, and the
  same sweep as `metrics.recall_at_precision`). A predicted class with at least
  `min_class_samples` validation predictions gets its own threshold; the other classes share one
  threshold fitted on their pooled samples. Every group then reaches the target on validation, so
  their union does too. A group that cannot reach it anywhere gets no threshold (null): never
  accepted.

calibration.json (next to the model, `<model dir>/calibration.json`):
  {"target_precision": 0.9, "min_class_samples": 100, "split": "val", "shards": str, "samples": int,
   "tasks": {task: {"temperature": f, "threshold": f|null, "class_thresholds": {class: f|null},
                    "ece_before": f, "ece_after": f, "n": int, "coverage": f, "precision": f|null}}}
`threshold` applies to the predicted classes absent from `class_thresholds`; `coverage` and
`precision` are those of the accepted predictions on the validation split.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cmaclip import metrics
from cmaclip.errors import DataError
from cmaclip.files import write_json_atomic

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15
# 1/T is searched over [e^-6, e^6]: far beyond any temperature a trained classifier needs
LOG_INVERSE_TEMPERATURE_RANGE = (-6.0, 6.0)
SEARCH_STEPS = 80  # golden-section steps: the interval shrinks by 0.618 per step, 12 -> 1e-15


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) in float64 [N, C]."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of the labels (all >= 0) under softmax(logits / T)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1)
    log_normaliser = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return float(np.mean(log_normaliser - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the NLL of `labels` (all >= 0); 1.0 without samples."""
    if not len(labels):
        return 1.0
    low, high = LOG_INVERSE_TEMPERATURE_RANGE
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_inverse):
        return negative_log_likelihood(logits, labels, math.exp(-log_inverse))

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(SEARCH_STEPS):
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp(-(low + high) / 2)


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Weighted mean over equal-width confidence bins of |accuracy - mean confidence|."""
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if not confidences.size:
        return float("nan")
    bin_of = np.minimum((confidences * bins).astype(np.int64), bins - 1)
    counts = np.bincount(bin_of, minlength=bins)
    gap = np.bincount(bin_of, weights=correct - confidences, minlength=bins)
    return float(np.abs(gap).sum() / counts.sum())


def precision_threshold(labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray,
                        precision: float) -> float | None:
    """The lowest confidence threshold at which the accepted samples reach `precision`; None when
    no threshold does (or there are no samples)."""
    if not len(labels):
        return None
    thresholds, predicted, correct = metrics.precision_curve(labels, predictions, confidences)
    reaches = np.flatnonzero(metrics.reaches_precision(correct, predicted, precision))
    return float(thresholds[reaches[-1]]) if len(reaches) else None


@dataclass
class TaskCalibration:
    temperature: float = 1.0
    threshold: float | None = None
    """For the predicted classes without their own threshold; None = never accept them."""
    class_thresholds: dict[str, float | None] = field(default_factory=dict)
    ece_before: float | None = None
    ece_after: float | None = None
    n: int = 0
    coverage: float | None = None
    precision: float | None = None

    def threshold_per_class(self, classes: list[str]) -> np.ndarray:
        """float64 [C]: the threshold of each class, inf where a class is never accepted."""
        chosen = [self.class_thresholds.get(name, self.threshold) for name in classes]
        return np.array([math.inf if value is None else value for value in chosen], dtype=np.float64)


def calibrate_task(logits: np.ndarray, labels: np.ndarray, classes: list[str], precision: float,
                   min_class_samples: int) -> TaskCalibration:
    """Temperature and thresholds of one task from its validation logits [N, C] and labels (-1 =
    missing, left out)."""
    labelled = np.asarray(labels) >= 0
    logits, labels = np.asarray(logits)[labelled], np.asarray(labels)[labelled]
    predicted = logits.argmax(axis=1)
    correct = predicted == labels
    temperature = fit_temperature(logits, labels)
    confidence = probabilities(logits, temperature).max(axis=1)
    result = TaskCalibration(
        temperature=temperature, n=int(len(labels)),
        ece_before=_none_if_nan(expected_calibration_error(probabilities(logits).max(axis=1), correct)),
        ece_after=_none_if_nan(expected_calibration_error(confidence, correct)))
    counts = np.bincount(predicted, minlength=len(classes))
    own = [c for c in range(len(classes)) if counts[c] >= min_class_samples]
    for c in own:
        chosen = predicted == c
        result.class_thresholds[classes[c]] = precision_threshold(labels[chosen], predicted[chosen],
                                                                  confidence[chosen], precision)
    pooled = ~np.isin(predicted, own)
    result.threshold = precision_threshold(labels[pooled], predicted[pooled], confidence[pooled], precision)
    accepted = confidence >= result.threshold_per_class(classes)[predicted]
    result.coverage = float(accepted.mean()) if len(labels) else None
    result.precision = float(correct[accepted].mean()) if accepted.any() else None
    return result


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass
class Calibration:
    """Per-task temperatures and thresholds for one model (calibration.json, module docstring)."""

    target_precision: float
    min_class_samples: int = 0
    split: str = ""
    shards: str = ""
    samples: int = 0
    tasks: dict[str, TaskCalibration] = field(default_factory=dict)

    def decide(self, task: str, classes: list[str], logits: np.ndarray):
        """-> (calibrated probabilities [N, C], predicted class [N], accepted bool [N])."""
        calibration = self.tasks[task]
        probs = probabilities(logits, calibration.temperature)
        predicted = probs.argmax(axis=1)
        accepted = probs[np.arange(len(predicted)), predicted] >= calibration.threshold_per_class(classes)[predicted]
        return probs, predicted, accepted

    def check_fits_model(self, model_tasks: dict[str, list[str]], path) -> None:
        if list(self.tasks) != list(model_tasks):
            raise DataError(f"{path}: calibrated tasks {list(self.tasks)} differ from the model's "
                             f"{list(model_tasks)}; run `cmaclip calibrate` for this model again")
        for task, calibration in self.tasks.items():
            unknown = sorted(set(calibration.class_thresholds) - set(model_tasks[task]))
            if unknown:
                raise DataError(f"{path}: task {task}: classes {unknown[:5]} are not the model's; "
                                 "run `cmaclip calibrate` for this model again")

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / CALIBRATION_FILE
        write_json_atomic(path, asdict(self))
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> "Calibration | None":
        """The calibration saved next to the model, or None when there is none."""
        path = Path(model_dir) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            tasks = {task: TaskCalibration(**values) for task, values in raw.pop("tasks").items()}
            return cls(tasks=tasks, **raw)
        except (ValueError, TypeError, KeyError) as error:
            raise DataError(f"{path}: not a calibration file ({error}); run `cmaclip calibrate` again") from None


def calibrate(logits: dict[str, np.ndarray], labels: np.ndarray, tasks: dict[str, list[str]], *,
              precision: float, min_class_samples: int) -> Calibration:
    """Fit every task: `logits` {task: [N, C]}, `labels` [N, K] in `tasks` order."""
    return Calibration(
        target_precision=precision, min_class_samples=min_class_samples, samples=int(len(labels)),
        tasks={task: calibrate_task(logits[task], labels[:, k], classes, precision, min_class_samples)
               for k, (task, classes) in enumerate(tasks.items())})


def auto_fill_report(labels: np.ndarray, predicted: np.ndarray, accepted: np.ndarray,
                     task_names: list[str]) -> dict:
    """Per task, over the labelled samples: the accepted predictions' precision and coverage (the
    fraction of samples filled in automatically). labels, predicted, accepted: [N, K]."""
    report = {}
    for k, task in enumerate(task_names):
        labelled = labels[:, k] >= 0
        chosen = accepted[:, k] & labelled
        n, count = int(labelled.sum()), int(chosen.sum())
        report[task] = {"n": n, "accepted": count, "coverage": count / n if n else None,
                        "precision": metrics.accuracy(labels[chosen, k], predicted[chosen, k]) if count else None}
    return report


def format_report(calibration: Calibration, report: dict | None = None) -> str:
    """Markdown table: temperature, ECE, validation coverage/precision, and (given eval's `report`)
    the accepted predictions' precision and coverage on the evaluated split."""
    def number(value):
        return "-" if value is None else f"{value:.3f}"

    header = ["task", "T", "ECE before", "ECE after", "val coverage", "val precision"]
    if report:
        header += ["coverage", "precision"]
    lines = [f"auto-fill at precision {calibration.target_precision:g}:", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for task, c in calibration.tasks.items():
        cells = [task, f"{c.temperature:.3f}", number(c.ece_before), number(c.ece_after), number(c.coverage),
                 number(c.precision)]
        if report:
            cells += [number(report[task]["coverage"]), number(report[task]["precision"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
