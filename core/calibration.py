"""Launch calibration: one scale per forecaster for items in their launch month, chosen on the validation month.

An item in its first month has no lags, so every forecaster predicts it from what earlier launches sold. When
launches change in size, that lags behind: on the shared real slice a launch sold 1.3-3.8 units per shop in
months 0-10, 3.5-5.5 in months 21-26 and 12.8-16.2 in months 27-28, and the models' launch forecasts were about
half of what sold. Launch rows are 1-3 % of a month's grid but a quarter to a half of its squared error.

The scale is the grid point of :data:`SCALES` that minimises a validation month's RMSE over its launch rows (the
holdout month never takes part); with several validation months it is the geometric mean of each month's scale
(every month counts alike, so one month of extreme launches moves it by its share only). It multiplies the
forecaster's launch-row predictions of every later set. Validation months without launches leave it at 1.
"""

from __future__ import annotations

import numpy as np

#: Candidate scales: from halving to tripling the launch forecasts, in steps of 0.1.
SCALES: np.ndarray = np.round(np.arange(0.5, 3.0 + 1e-9, 0.1), 2)


def launch_scale(
    actual: np.ndarray,
    prediction: np.ndarray,
    launch: np.ndarray,
    clip: tuple[float, float],
    months: np.ndarray | None = None,
) -> float:
    """The scale of :data:`SCALES` with the lowest RMSE of ``clip(scale * prediction)`` on the launch rows.

    Ties go to the scale nearest 1 (no change is the default when the month cannot tell). ``months`` (one per
    row): each month's scale is chosen alone, and the result is their geometric mean, rounded to 0.01.
    """
    actual = np.asarray(actual, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    launch = np.asarray(launch, dtype=bool)
    if not actual.shape == prediction.shape == launch.shape:
        raise ValueError(f"shapes differ: actual {actual.shape}, prediction {prediction.shape}, launch {launch.shape}")
    if months is not None:
        months = np.asarray(months)
        scales = [_month_scale(actual[rows], prediction[rows], launch[rows], clip)
                  for rows in (months == m for m in np.unique(months)) if launch[rows].any()]
        return round(float(np.exp(np.mean(np.log(scales)))), 2) if scales else 1.0
    return _month_scale(actual, prediction, launch, clip)


def _month_scale(actual: np.ndarray, prediction: np.ndarray, launch: np.ndarray, clip: tuple[float, float]) -> float:
    if not launch.any():
        return 1.0
    scaled = np.clip(SCALES[:, None] * prediction[launch][None, :], *clip)  # [scales, launch rows]
    errors = np.mean((scaled - actual[launch][None, :]) ** 2, axis=1)
    best = np.flatnonzero(np.isclose(errors, errors.min(), rtol=1e-12, atol=0.0))
    return float(SCALES[best[np.argmin(np.abs(SCALES[best] - 1.0))]])


def apply_launch_scale(
    prediction: np.ndarray, launch: np.ndarray | None, scale: float, clip: tuple[float, float]
) -> np.ndarray:
    """``prediction`` with its launch rows multiplied by ``scale`` and clipped (float32); ``launch=None``: as is."""
    prediction = np.asarray(prediction, dtype=np.float32)
    if launch is None or scale == 1.0:
        return prediction
    scaled = np.clip(prediction.astype(np.float64) * scale, *clip).astype(np.float32)
    return np.where(np.asarray(launch, dtype=bool), scaled, prediction)
