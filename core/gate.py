"""The gate: one decision, in one place, of which forecast is exported, and why; and the blend it may export.

The candidates are ``core.forecasters.CANDIDATES`` (the model, the LightGBM booster and their ensemble,
``w * model + (1 - w) * booster``) and the previous-period forecast. Everything the gate uses comes from the
**validation months** (the months before the holdout): the blend weights are fitted there, and the candidates are
ranked there. The holdout month, which reports the score, never takes part, so the reported score of the
exported forecast stays honest.

Every month counts alike: a blend weight is the mean of each validation month's best weight, and a candidate's
score is the mean of its RMSE over the months, so one odd month (a wave of launches) moves a choice by at most
its share, never alone to the edge of its range.

Rule: the candidate with the lowest mean validation RMSE is exported when it beats the previous-period forecast
there; otherwise ``fallback`` decides (``baseline``: the previous-period forecast, ``model``: the model anyway).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from core.forecasters import CANDIDATES

Fallback = Literal["baseline", "model"]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the gate exports and why, with the validation months' scores it decided on."""

    exported: str  # a candidate of core.forecasters, or "baseline"
    reason: str
    validation_months: list[int]
    validation_rmse: dict[str, float]  # candidate or "baseline" -> mean RMSE over the validation months
    blend_weight: float | None  # the model's weight in the ensemble (None: no ensemble)
    launch_blend_weight: float | None = None  # its weight for items in their launch month (None: the same)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})


def months_text(months: list[int] | tuple[int, ...], first_month: str = "2013-01") -> str:
    """``month 2015-04`` or ``months 2015-03 and 2015-04`` (``the validation months`` when there are none)."""
    from core.lake import forecast_month_label

    labels = [forecast_month_label(int(m), first_month) for m in months]
    if not labels:
        return "the validation months"
    if len(labels) == 1:
        return f"month {labels[0]}"
    return "months " + ", ".join(labels[:-1]) + f" and {labels[-1]}"


def decide(
    validation_rmse: Mapping[str, float],
    *,
    fallback: Fallback = "baseline",
    validation_months: list[int] | tuple[int, ...] = (),
    blend_weight: float | None = None,
    launch_blend_weight: float | None = None,
    first_month: str = "2013-01",
) -> Decision:
    """Pick the export from mean validation RMSEs of the candidates present (``model`` at least) and ``baseline``."""
    if fallback not in ("baseline", "model"):
        raise ValueError(f"fallback must be 'baseline' or 'model', got {fallback!r}")
    missing = [name for name in ("model", "baseline") if name not in validation_rmse]
    if missing:
        raise ValueError(f"the gate needs validation RMSEs of {missing}")
    scores = {name: float(value) for name, value in validation_rmse.items()}
    where = f"validation {months_text(list(validation_months), first_month)}"
    present = [name for name in CANDIDATES if name in scores]
    best = min(present, key=lambda name: (scores[name], present.index(name)))
    baseline = scores["baseline"]
    detail = ", ".join(f"{name} {scores[name]:.4f}" for name in (*present, "baseline"))
    if scores[best] < baseline:
        exported, reason = best, f"the {best} has the lowest RMSE on {where} and beats the previous period ({detail})"
    elif fallback == "model":
        exported = "model"
        reason = f"nothing beats the previous period on {where} ({detail}); the model is exported anyway (fallback=model)"  # noqa: E501
    else:
        exported = "baseline"
        reason = f"nothing beats the previous period on {where} ({detail}); the previous-period forecast is exported (fallback=baseline)"  # noqa: E501
    ensemble = "ensemble" in scores
    return Decision(exported, reason, list(validation_months), scores, blend_weight if ensemble else None,
                    launch_blend_weight if ensemble else None)


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
    first_month: str = "2013-01",
) -> ChampionDecision:
    """The champion stays only when the challenger is worse than ``(1 + tolerance) x`` the champion on ``month``
    (the newest month with actuals: both were trained without it). No comparable champion: the challenger wins."""
    where = months_text([month], first_month).replace("month", "the holdout month") if month is not None \
        else "the holdout month"
    if champion_rmse is None or not math.isfinite(champion_rmse):
        return ChampionDecision(False, f"the challenger becomes the champion: {why_no_champion}",
                                challenger_rmse, None, month)
    detail = f"challenger {challenger_rmse:.4f}, champion {champion_rmse:.4f} on {where}, tolerance {tolerance:g}"
    if challenger_rmse <= champion_rmse * (1.0 + tolerance):
        return ChampionDecision(False, f"the challenger is no worse than the champion ({detail})",
                                challenger_rmse, champion_rmse, month)
    return ChampionDecision(True, f"the challenger is worse than the champion ({detail}): the champion's forecaster, "
                            "re-applied to this month's windows, is exported", challenger_rmse, champion_rmse, month)


# --- the gate step, as the orchestration calls it --------------------------------------------------


@dataclasses.dataclass
class ExportDecision:
    """What the gate step exports, why, and how it scored: the one record export reads."""

    exported: str  # the forecast.parquet column export writes: a candidate, "baseline" or "champion"
    reason: str
    exported_rmse: float  # its RMSE on the holdout month
    holdout_month: int
    forecast_month: int
    decision: Decision  # the validation months' ranking
    champion: ChampionDecision | None  # None: the champion gate is off
    champion_run: str | None  # the champion before this run (its path inside the data directory)
    beaten_by: dict[str, float]  # forecasters that scored better than the export on the holdout month
    report: str
    plots: dict[str, str]
    ranges: dict[str, Any] = dataclasses.field(default_factory=dict)  # core.quantiles.range_run's result

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _champion_text(champion: ChampionDecision, before: str | None, exported: str) -> str:
    return "\n".join([f"- exported: **{exported}**", f"- {champion.reason}",
                      f"- champion before this run: `{before or 'none'}`"])


def gate_run(config: Any, windows_dir: str | Path, final_windows_dir: str | Path, run_dir: str | Path,
             selection: Any, scores: Any) -> ExportDecision:
    """The one decision of what is exported: the validation months' best candidate (:func:`decide`), then the
    champion gate (:func:`challenge`, the champion re-applied as the whole forecaster it exported). Writes the
    ``champion`` column into ``forecast.parquet`` when the champion stays, crowns a winning challenger in
    ``runs/index.json``, and writes the run's report (``core.report``) saying what was exported and what beat it."""
    import pandas as pd

    from core import champion as champions
    from core import quantiles, report
    from core.evaluate import score_holdout
    from core.files import atomic_path
    from core.lake import LakePaths

    paths, run_dir = LakePaths.of(config), Path(run_dir)
    decision = _validation_decision(config, selection)
    exported, reason, exported_rmse = decision.exported, decision.reason, float(scores.rmse[decision.exported])
    evaluation = score_holdout(config, windows_dir, run_dir)
    forecast = pd.read_parquet(scores.forecast)
    verdict, before = None, None
    if config.export.champion_gate:
        verdict, before, score = _champion_verdict(config, paths, run_dir, windows_dir, final_windows_dir, scores,
                                                   exported_rmse)
        if score is None:  # this run is the champion: nothing to re-apply, nobody to crown
            pass
        elif verdict.keep_champion and score.columns is not None:
            forecast["champion"] = score.columns["forecast"]
            with atomic_path(scores.forecast) as tmp:
                forecast.to_parquet(tmp, index=False)
            evaluation = score_holdout(config, windows_dir, run_dir, extra={"champion": score.columns["holdout"]})
            exported, reason, exported_rmse = "champion", verdict.reason, float(score.rmse or 0.0)
        else:
            champions.crown(paths, run_dir, scores.forecast_month, decision.exported, exported_rmse,
                            verdict.reason)
    holdout_scores = {p: evaluation.overall[p].rmse for p in evaluation.predictors}
    written = _write_run_report(config, paths, run_dir, evaluation, exported, reason, scores, forecast, selection,
                                None if verdict is None else _champion_text(verdict, before, exported))
    # The exported forecaster's ranges, calibrated on the validation months and scored on the holdout month.
    ranges = quantiles.range_run(config, windows_dir, final_windows_dir, run_dir, exported, decision.exported)
    return ExportDecision(
        exported=exported, reason=reason, exported_rmse=exported_rmse, holdout_month=scores.holdout_month,
        forecast_month=scores.forecast_month, decision=decision, champion=verdict, champion_run=before,
        beaten_by=dict(report.better_than(holdout_scores, exported)), report=str(written.pop("report")),
        plots={name: str(path) for name, path in written.items()} | {"ranges": ranges["plot"]}, ranges=ranges,
    )


def _validation_decision(config: Any, selection: Any) -> Decision:
    """:func:`decide` on the validation months' RMSE of the candidates and the baseline."""
    candidates = {name: selection.validation_rmse[name] for name in (*CANDIDATES, "baseline")
                  if name in selection.validation_rmse}
    blend = selection.blend
    return decide(candidates, fallback=config.export.fallback, validation_months=selection.validation_months,
                  blend_weight=None if blend is None else blend.known,
                  launch_blend_weight=None if blend is None else blend.launch,
                  first_month=config.ingest.first_month)


def _champion_verdict(config: Any, paths: Any, run_dir: Path, windows_dir: str | Path, final_windows_dir: str | Path,
                      scores: Any, exported_rmse: float) -> tuple[ChampionDecision, str | None, Any]:
    """The champion gate's verdict, the champion's run (None: no champion yet) and the champion re-applied and
    scored (None when this run is itself the champion)."""
    from core import champion as champions

    record = champions.read_index(paths).get("champion")
    before = record["run_dir"] if record else None
    if record is not None and paths.run_path(record["run_dir"]).resolve() == run_dir.resolve():
        return ChampionDecision(False, "this run is the champion", exported_rmse, record.get("holdout_rmse"),
                                scores.holdout_month), before, None
    score = champions.score_champion(config, scores.holdout_month, windows_dir, final_windows_dir)
    verdict = challenge(exported_rmse, score.rmse, month=scores.holdout_month,
                        tolerance=config.export.champion_tolerance, why_no_champion=score.why_not,
                        first_month=config.ingest.first_month)
    return verdict, before, score


def _write_run_report(config: Any, paths: Any, run_dir: Path, evaluation: Any, exported: str, reason: str,
                      scores: Any, forecast: Any, selection: Any, champion: str | None) -> dict[str, Path]:
    """The run's report (``core.report.write_report``): what was exported and why, beside the holdout's history."""
    from core import report
    from core.aggregate import read_monthly
    from core.evaluate import monthly_totals

    monthly = read_monthly(paths)
    return report.write_report(
        evaluation, run_dir, exported=exported, reason=reason, forecast_month=scores.forecast_month,
        history=monthly_totals(monthly[monthly["date_block_num"] < scores.holdout_month], config.windows.clip),
        forecast_totals={c: float(forecast[c].sum()) for c in forecast.columns if c != "ID"},
        selection=selection.to_dict(),
        champion=champion,
        extra=_run_settings(config, selection),
    )


def _run_settings(config: Any, selection: Any) -> dict[str, Any]:
    return {"model": config.model.kind, "units": config.model.units, "depth": config.model.depth,
            "lookback": config.windows.lookback, "validation months": ", ".join(map(str, selection.validation_months)),
            "epochs (selected on the validation months)": selection.epochs,
            "boosting rounds": ", ".join(f"{k} {v}" for k, v in selection.rounds.items()) or None}
