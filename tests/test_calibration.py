"""Launch calibration (core.calibration): the validation month's best scale, applied to launch rows only."""

from __future__ import annotations

import numpy as np
import pytest

from core.calibration import SCALES, apply_launch_scale, launch_scale

CLIP = (0.0, 20.0)


def brute_force_scale(actual: np.ndarray, prediction: np.ndarray, launch: np.ndarray) -> float:
    """An independent search: every candidate's RMSE over the whole month, one at a time."""
    best, best_error = 1.0, np.inf
    for scale in sorted(SCALES, key=lambda s: abs(s - 1.0)):
        scaled = np.where(launch, np.clip(prediction * scale, *CLIP), prediction)
        error = float(np.sqrt(np.mean((scaled - actual) ** 2)))
        if error < best_error - 1e-12:
            best, best_error = float(scale), error
    return best


def test_launch_forecasts_that_sold_half_of_what_they_said_get_a_scale_near_two() -> None:
    rng = np.random.default_rng(0)
    actual = rng.poisson(3.0, 3000).astype(float)
    launch = rng.random(actual.size) < 0.05
    prediction = np.where(launch, actual / 2, actual) + rng.normal(0, 0.3, actual.size)
    scale = launch_scale(actual, prediction, launch, CLIP)
    assert scale == brute_force_scale(actual, prediction, launch)
    assert 1.8 <= scale <= 2.2
    calibrated = apply_launch_scale(prediction, launch, scale, CLIP)
    np.testing.assert_array_equal(calibrated[~launch], prediction[~launch].astype(np.float32))
    assert np.sqrt(np.mean((calibrated - actual) ** 2)) < np.sqrt(np.mean((prediction - actual) ** 2))
    assert calibrated.max() <= 20


def test_a_month_without_launches_or_with_exact_launch_forecasts_keeps_the_scale_at_one() -> None:
    actual = np.array([0.0, 1.0, 4.0, 2.0])
    assert launch_scale(actual, actual + 1, np.zeros(4, dtype=bool), CLIP) == 1.0
    assert launch_scale(actual, actual, np.array([False, True, True, False]), CLIP) == 1.0
    # all-zero launch forecasts cannot tell one scale from another: no change
    assert launch_scale(actual, np.zeros(4), np.array([True, True, False, False]), CLIP) == 1.0
    np.testing.assert_array_equal(apply_launch_scale(actual, None, 2.0, CLIP), actual.astype(np.float32))
    with pytest.raises(ValueError, match="shapes differ"):
        launch_scale(actual, actual[:2], np.zeros(4, dtype=bool), CLIP)
