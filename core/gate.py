"""The gate: one decision, in one place, of which forecast is exported, and why.

The candidates are the model (the Nested LSTM), the ensemble (the model blended with the gradient-boosted
reference, ``w * model + (1 - w) * reference``) and the previous-period forecast. Everything the gate uses
comes from the **validation month** (the month before the holdout): the blend weight is fitted there, and
the candidates are ranked there. The holdout month, which reports the score, never takes part, so the
reported score of the exported forecast stays honest.

Rule: the candidate with the lowest validation RMSE among the model and the ensemble is exported when it
beats the previous-period forecast on the validation month; otherwise ``fallback`` decides
(``baseline``: the previous-period forecast, ``model``: the model anyway).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

Exported = Literal["model", "ensemble", "baseline"]
Fallback = Literal["baseline", "model"]
CANDIDATES: tuple[str, ...] = ("model", "ensemble")


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
        cls, actual: np.ndarray, model: np.ndarray, reference: np.ndarray, launch: np.ndarray | None
    ) -> BlendWeights:
        """Each segment's :func:`blend_weight`; without launch rows (or ``launch=None``) one weight for both."""
        if launch is None or not np.any(launch) or np.all(launch):
            weight = blend_weight(actual, model, reference)
            return cls(weight, weight)
        launch = np.asarray(launch, dtype=bool)
        known = blend_weight(actual[~launch], model[~launch], reference[~launch])
        return cls(known, blend_weight(actual[launch], model[launch], reference[launch]))

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


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the gate exports and why, with the validation-month scores it decided on."""

    exported: Exported
    reason: str
    validation_month: int | None
    validation_rmse: dict[str, float]  # candidate or "baseline" -> RMSE on the validation month
    blend_weight: float | None  # the model's weight in the ensemble (None: no ensemble)
    launch_blend_weight: float | None = None  # its weight for items in their launch month (None: the same)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})


def decide(
    validation_rmse: Mapping[str, float],
    *,
    fallback: Fallback = "baseline",
    validation_month: int | None = None,
    blend_weight: float | None = None,
    launch_blend_weight: float | None = None,
) -> Decision:
    """Pick the export from validation-month RMSEs of ``model``, optionally ``ensemble``, and ``baseline``."""
    if fallback not in ("baseline", "model"):
        raise ValueError(f"fallback must be 'baseline' or 'model', got {fallback!r}")
    missing = [name for name in ("model", "baseline") if name not in validation_rmse]
    if missing:
        raise ValueError(f"the gate needs validation RMSEs of {missing}")
    scores = {name: float(value) for name, value in validation_rmse.items()}
    month = f"month {validation_month}" if validation_month is not None else "the validation month"
    best = min((name for name in CANDIDATES if name in scores), key=lambda name: (scores[name], name != "model"))
    baseline = scores["baseline"]
    detail = ", ".join(f"{name} {scores[name]:.4f}" for name in (*CANDIDATES, "baseline") if name in scores)
    exported: Exported
    if scores[best] < baseline:
        exported = best  # type: ignore[assignment]
        reason = f"the {best} has the lowest RMSE on validation {month} and beats the previous period ({detail})"
    elif fallback == "model":
        exported = "model"
        reason = f"nothing beats the previous period on validation {month} ({detail}); the model is exported anyway (fallback=model)"  # noqa: E501
    else:
        exported = "baseline"
        reason = f"nothing beats the previous period on validation {month} ({detail}); the previous-period forecast is exported (fallback=baseline)"  # noqa: E501
    ensemble = "ensemble" in scores
    return Decision(exported, reason, validation_month, scores, blend_weight if ensemble else None,
                    launch_blend_weight if ensemble else None)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ChampionDecision:
    """Whether the challenger (this run's gated forecast) replaces the champion, and why."""

    keep_champion: bool
    reason: str
    challenger_rmse: float
    champion_rmse: float | None
    month: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def challenge(
    challenger_rmse: float,
    champion_rmse: float | None,
    *,
    tolerance: float = 0.0,
    month: int | None = None,
    why_no_champion: str = "there is no champion yet",
) -> ChampionDecision:
    """The champion stays only when the challenger is worse than ``(1 + tolerance) x`` the champion on ``month``
    (the newest month with actuals: both were trained without it). No comparable champion: the challenger wins."""
    where = f"holdout month {month}" if month is not None else "the holdout month"
    if champion_rmse is None or not math.isfinite(champion_rmse):
        return ChampionDecision(False, f"the challenger becomes the champion: {why_no_champion}",
                                challenger_rmse, None, month)  # fmt: skip
    detail = f"challenger {challenger_rmse:.4f}, champion {champion_rmse:.4f} on {where}, tolerance {tolerance:g}"
    if challenger_rmse <= champion_rmse * (1.0 + tolerance):
        return ChampionDecision(False, f"the challenger is no worse than the champion ({detail})",
                                challenger_rmse, champion_rmse, month)  # fmt: skip
    return ChampionDecision(True, f"the challenger is worse than the champion ({detail}): the champion's model, "
                            "re-applied to this month's windows, is exported", challenger_rmse, champion_rmse, month)
