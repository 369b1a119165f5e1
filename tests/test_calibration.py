"""Calibration math on generated classifiers whose true calibration is known: the temperature it
fits, and thresholds chosen on one split that hold their precision on another."""
import json
import math

import numpy as np
import pytest

from cmaclip import calibration as C

CLASSES = ["a", "b", "c", "d"]
SCALE = 3.0


def generated(rng, n: int, margins) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's logits and the labels: x ~ N(0, 1) per class, + margin[y] on the true class y,
    logits = SCALE * x. With equal margins m and equal priors the true posterior is softmax(m * x),
    i.e. temperature SCALE / m."""
    margins = np.asarray(margins, dtype=np.float64)
    labels = rng.integers(0, len(CLASSES), n)
    x = rng.normal(size=(n, len(CLASSES)))
    x[np.arange(n), labels] += margins[labels]
    return SCALE * x, labels


def test_temperature_recovers_the_true_one_and_lowers_the_ece():
    logits, labels = generated(np.random.default_rng(0), 20000, [2.0] * 4)
    task = C.calibrate_task(logits, labels, CLASSES, precision=0.9, min_class_samples=100)
    # NLL minimiser of 20000 samples: the estimate's spread is well under 2% here
    assert task.temperature == pytest.approx(SCALE / 2.0, rel=0.04)
    assert task.ece_before > 0.05 > 0.015 > task.ece_after


def test_expected_calibration_error_of_known_bins():
    confidences = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0])
    # bin 0.9-0.97: accuracy 0.75 vs 0.95 (4 samples); bin 0.53-0.6: 0.5 vs 0.55 (2 samples)
    assert C.expected_calibration_error(confidences, correct) == pytest.approx((4 * 0.2 + 2 * 0.05) / 6)


def test_threshold_is_the_lowest_that_reaches_the_precision():
    labels = np.array([0] * 10 + [1] * 2)
    predicted = np.zeros(12, int)
    confidence = np.linspace(1.0, 0.45, 12)  # 9 right, then 1 wrong, ... : 9 of 10 at 0.9 exactly
    confidence_order = np.argsort(-confidence)
    labels[confidence_order[9]] = 1  # the 10th most confident is wrong
    labels[confidence_order[10]] = 0  # the 11th right: 10 of 11 = 0.909
    assert C.precision_threshold(labels, predicted, confidence, 0.9) == pytest.approx(confidence[confidence_order[10]])
    assert C.precision_threshold(labels, predicted, confidence, 0.95) == pytest.approx(confidence[confidence_order[8]])
    assert C.precision_threshold(np.ones(5, int), np.zeros(5, int), np.ones(5), 0.5) is None  # all wrong


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_chosen_on_validation_hold_on_a_held_out_split(seed):
    """Four classes of different difficulty, each with its own threshold (enough samples). On the
    held-out split the accepted predictions' precision, overall and per class, must be within
    TOLERANCE standard deviations of the target. The sd is the binomial one of the difference of
    two precision estimates, validation's (n_val accepted) and the held-out's (n_test):
    sqrt(p (1 - p) (1/n_val + 1/n_test)), about 0.006 overall and 0.012 per class here. 4 sd, not
    3: the threshold is the lowest of many at which validation reaches p, which favours
    thresholds where validation was lucky (in 200 simulated seeds the shortfall reached 3.5 sd).
    A threshold 0.05 too permissive, or one far too strict (precision near 1), fails by > 8 sd."""
    target, tolerance = 0.9, 4.0
    margins = [3.0, 2.0, 1.5, 1.0]
    rng = np.random.default_rng(seed)
    val_logits, val_labels = generated(rng, 8000, margins)
    test_logits, test_labels = generated(rng, 8000, margins)
    calibration = C.calibrate({"kind": val_logits}, val_labels[:, None], {"kind": CLASSES}, precision=target,
                              min_class_samples=500)
    task = calibration.tasks["kind"]
    assert set(task.class_thresholds) == set(CLASSES) and len(set(task.class_thresholds.values())) == 4
    _, val_predicted, val_accepted = calibration.decide("kind", CLASSES, val_logits)
    _, predicted, accepted = calibration.decide("kind", CLASSES, test_logits)
    groups = [("all", np.ones(len(predicted), bool), np.ones(len(val_predicted), bool))]
    groups += [(name, predicted == c, val_predicted == c) for c, name in enumerate(CLASSES)]
    for name, chosen, val_chosen in groups:
        n_test, n_val = int((accepted & chosen).sum()), int((val_accepted & val_chosen).sum())
        assert n_test > 300 and n_val > 300, name
        val_precision = (val_predicted == val_labels)[val_accepted & val_chosen].mean()
        assert val_precision >= target, name  # by construction
        precision = (predicted == test_labels)[accepted & chosen].mean()
        sd = math.sqrt(target * (1 - target) * (1 / n_val + 1 / n_test))
        assert abs(precision - target) <= tolerance * sd, (name, precision, sd)
    assert task.coverage == pytest.approx(accepted.mean(), abs=0.03)  # coverage holds too


def test_small_classes_share_one_threshold_fitted_on_their_pooled_samples():
    logits, labels = generated(np.random.default_rng(1), 4000, [2.0] * 4)
    task = C.calibrate_task(logits, labels, CLASSES, precision=0.8, min_class_samples=10**6)
    assert task.class_thresholds == {} and task.threshold is not None
    assert np.all(task.threshold_per_class(CLASSES) == task.threshold)
    unreachable = C.calibrate_task(logits, (labels + 1) % 4, CLASSES, precision=0.9, min_class_samples=1)
    assert all(value is None for value in unreachable.class_thresholds.values())  # every prediction wrong
    assert np.all(np.isinf(unreachable.threshold_per_class(CLASSES))) and unreachable.coverage == 0


def test_saved_next_to_the_model_and_loaded_back(tmp_path):
    logits, labels = generated(np.random.default_rng(2), 2000, [2.0] * 4)
    tasks = {"kind": CLASSES, "other": CLASSES}
    calibration = C.calibrate({"kind": logits, "other": logits}, np.stack([labels, labels], 1), tasks,
                              precision=0.9, min_class_samples=400)
    path = calibration.save(tmp_path)
    assert path == tmp_path / C.CALIBRATION_FILE and json.loads(path.read_text())["target_precision"] == 0.9
    loaded = C.Calibration.load(tmp_path)
    assert loaded == calibration
    for got, expected in zip(loaded.decide("kind", CLASSES, logits), calibration.decide("kind", CLASSES, logits)):
        np.testing.assert_array_equal(got, expected)
    assert C.Calibration.load(tmp_path / "elsewhere") is None
    with pytest.raises(ValueError, match="differ from the model's"):
        loaded.check_fits_model({"kind": CLASSES}, path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a calibration file"):
        C.Calibration.load(tmp_path)
