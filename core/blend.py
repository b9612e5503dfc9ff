"""The ensemble's blend: ``clip(w * model + (1 - w) * booster)``, with the model's weight chosen on the validation
months, per segment (items in their launch month apart from the rest), each month counting alike.

A blend weight is the mean of each validation month's best weight, so one odd month (a wave of launches) moves it
by at most its share, never alone to the edge of [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def rmse(prediction: np.ndarray, actual: np.ndarray) -> float:
    """Root-mean-square error of two equally long arrays."""
    error = np.asarray(prediction, dtype=np.float64) - np.asarray(actual, dtype=np.float64)
    return float(np.sqrt(np.mean(error * error))) if error.size else math.nan


def blend_weight(actual: np.ndarray, model: np.ndarray, reference: np.ndarray, *, step: float = 0.05) -> float:
    """The model's weight ``w`` in [0, 1] that minimises the RMSE of ``clip(w * model + (1 - w) * reference)``.

    Searched on a grid of ``step`` (the clip makes the loss non-quadratic, and a coarse grid is a mild
    regulariser on a single month); ties go to the larger model weight.
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    actual = np.asarray(actual, dtype=np.float64)
    model = np.asarray(model, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if not actual.shape == model.shape == reference.shape:
        raise ValueError(f"shapes differ: actual {actual.shape}, model {model.shape}, reference {reference.shape}")
    weights = np.round(np.arange(1.0, -step / 2, -step), 10)
    low, high = 0.0, max(float(actual.max(initial=0.0)), 20.0)
    scores = [rmse(np.clip(w * model + (1 - w) * reference, low, high), actual) for w in weights]
    return float(weights[int(np.argmin(scores))]) + 0.0  # + 0.0: no "-0.0" in reports


def blend(
    model: np.ndarray, reference: np.ndarray, weight: float | np.ndarray, clip: tuple[float, float]
) -> np.ndarray:
    """``clip(weight * model + (1 - weight) * reference)`` as float32; ``weight`` is one number or one per row."""
    weight = np.asarray(weight, dtype=np.float64)
    mixed = weight * np.asarray(model, dtype=np.float64) + (1.0 - weight) * np.asarray(reference, dtype=np.float64)
    return np.clip(mixed, *clip).astype(np.float32)


def _mean_weight(weights: list[float]) -> float:
    return round(float(np.mean(weights)), 4) + 0.0 if weights else 1.0


@dataclasses.dataclass(frozen=True)
class BlendWeights:
    """The model's weight in the ensemble for pairs of known items and for items in their launch month.

    Launch rows (an item with no sale before the target month) are about 1.5 % of a month's grid but a quarter
    to a half of its squared error, and there the trees are the better forecaster; one weight for all rows is
    set by the other 98.5 %, so each segment gets its own, both chosen on the validation month.
    """

    known: float
    launch: float

    @classmethod
    def fit(
        cls,
        actual: np.ndarray,
        model: np.ndarray,
        reference: np.ndarray,
        launch: np.ndarray | None,
        months: np.ndarray | None = None,
    ) -> BlendWeights:
        """Each segment's :func:`blend_weight`; without launch rows (or ``launch=None``) one weight for both.

        ``months`` (one per row): each month's weights are fitted alone and averaged, every month counting alike
        (a month without launch rows says nothing about the launch weight).
        """
        actual, model, reference = (np.asarray(a, dtype=np.float64) for a in (actual, model, reference))
        months = np.zeros(actual.size, dtype=np.int64) if months is None else np.asarray(months)
        launch = None if launch is None else np.asarray(launch, dtype=bool)
        known, launched = [], []
        for month in np.unique(months):
            rows = months == month
            if launch is None or not launch[rows].any() or launch[rows].all():
                known.append(blend_weight(actual[rows], model[rows], reference[rows]))
                continue
            old, new = rows & ~launch, rows & launch
            known.append(blend_weight(actual[old], model[old], reference[old]))
            launched.append(blend_weight(actual[new], model[new], reference[new]))
        mean_known = _mean_weight(known)
        return cls(mean_known, _mean_weight(launched) if launched else mean_known)

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> BlendWeights:
        """From a selection or decision record's ``blend_weight`` and ``launch_blend_weight`` (a record from
        before the launch weight existed has one weight for both)."""
        known = float(record["blend_weight"])
        launch = record.get("launch_blend_weight")
        return cls(known, known if launch is None else float(launch))

    def per_row(self, launch: np.ndarray | None, n_rows: int) -> np.ndarray:
        """The weight of each row: ``launch`` for launch rows, ``known`` for the rest."""
        if launch is None:
            return np.full(n_rows, self.known)
        return np.where(np.asarray(launch, dtype=bool), self.launch, self.known)

    def describe(self) -> str:
        """``0.6 × model + 0.4 × trees`` (and the launch rows' weights when they differ)."""
        text = f"{self.known:g} × model + {1 - self.known:g} × LightGBM"
        if self.launch != self.known:
            text += f" ({self.launch:g} × model + {1 - self.launch:g} × LightGBM for items in their launch month)"
        return text
