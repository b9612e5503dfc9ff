"""Champion and challenger: ``runs/index.json`` names the champion run; every new run's gated forecast challenges it.

Both are scored on the newest month with actuals, the run's holdout month M-1: the challenger by its holdout refit
(trained through M-2), the champion by its newest model that never saw M-1 (``scoring_stage``: its final model,
or its holdout refit when it forecast M itself), re-applied to this run's holdout windows. The rule is
``core.gate.challenge``. When the champion stays, its final model re-applied to this month's final windows
becomes the ``champion`` column of the run's ``forecast.parquet``, which export writes; when the challenger
wins, it becomes the champion.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import gate
from core.config import NestcastConfig
from core.files import atomic_path, read_json, write_json_atomic
from core.lake import FORECAST_FILE, REPORT_FILE, LakePaths

INDEX_FILE = "index.json"  # runs/index.json
SECTION_KEY = "champion"  # report.md's champion/challenger section


def index_path(paths: LakePaths) -> Path:
    return paths.runs / INDEX_FILE


def read_index(paths: LakePaths) -> dict[str, Any]:
    """``{"champion": {...} | None, "history": [...]}`` (empty before the first run)."""
    return read_json(index_path(paths), default={"champion": None, "history": []})


def _crown(paths: LakePaths, run_dir: Path, forecast_month: int, rmse: float, reason: str) -> None:
    index = read_index(paths)
    champion = {"run_dir": str(run_dir), "forecast_month": forecast_month, "holdout_rmse": rmse,
                "since": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    index["champion"] = champion
    index["history"] = [*index.get("history", []), {**champion, "reason": reason}]
    write_json_atomic(index_path(paths), index)


def reapply(champion_dir: Path, scoring_stage: str, windows_dir: str | Path, final_windows_dir: str | Path,
            batch: int) -> dict[str, np.ndarray]:  # fmt: skip
    """The champion's ``scoring_stage`` model on this run's holdout windows, its final model on the forecast's."""
    from core.model import predict
    from core.protocol import load_verified_model
    from core.window_store import WindowStore

    evaluation, final = WindowStore.open(windows_dir), WindowStore.open(final_windows_dir)
    low, high = tuple(evaluation.meta["target_clip"])
    scorer = load_verified_model(champion_dir / scoring_stage / "model.keras")
    forecaster = scorer if scoring_stage == "final" else load_verified_model(champion_dir / "final" / "model.keras")
    return {"holdout": predict(scorer, evaluation.holdout_dataset(batch), clip_min=low, clip_max=high),
            "forecast": predict(forecaster, final.forecast_dataset(batch), clip_min=low, clip_max=high)}  # fmt: skip


def scoring_stage(champion_forecast_month: int, holdout_month: int) -> str | None:
    """The champion's model that never saw ``holdout_month``: its final one when its forecast month is at most
    that month, its holdout refit (trained through the month before) when the champion forecast the month after
    (a rerun on the same lake), none otherwise."""
    if champion_forecast_month <= holdout_month:
        return "final"
    return "holdout" if champion_forecast_month == holdout_month + 1 else None


Score = tuple[dict[str, np.ndarray] | None, float | None, str]


def _champion_score(champion: dict[str, Any] | None, holdout_month: int, windows_dir: str | Path,
                    final_windows_dir: str | Path, batch: int) -> Score:  # fmt: skip
    """The champion's re-applied forecasts and holdout RMSE -- or None and why it cannot compete this month."""
    from core.window_store import WindowStore

    if champion is None:
        return None, None, "there is no champion yet"
    stage = scoring_stage(int(champion["forecast_month"]), holdout_month)
    if stage is None:
        return None, None, f"every model of the champion {champion['run_dir']} saw holdout month {holdout_month}"
    try:
        applied = reapply(Path(champion["run_dir"]), stage, windows_dir, final_windows_dir, batch)
    # A champion whose files are gone, or whose model no longer fits this month's windows (another lookback,
    # new shops), cannot compete: the challenger wins, and the reason says why.
    except Exception as error:  # noqa: BLE001
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        return None, None, f"the champion {champion['run_dir']} cannot be re-applied ({type(error).__name__}: " \
                           f"{first_line})"
    actual = WindowStore.open(windows_dir).holdout_frame()["actual"].to_numpy()
    return applied, gate.rmse(applied["holdout"], actual), ""


def _section(decision: gate.ChampionDecision, champion: dict[str, Any] | None, exported: str) -> str:
    champion_dir = champion["run_dir"] if champion else "none"
    return "\n".join(["## Champion and challenger", "", f"- exported: **{exported}**", f"- {decision.reason}",
                      f"- champion before this run: `{champion_dir}`"])  # fmt: skip


def challenge_run(config: NestcastConfig, windows_dir: str | Path, final_windows_dir: str | Path,
                  run_dir: str | Path, evaluation: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The evaluation, with ``exported``/``reason``/``exported_rmse`` changed when the champion stays, and a
    ``champion`` entry saying what was decided; ``runs/index.json`` crowns a winning challenger."""
    from core.evaluate import replace_report_section

    paths, run_dir = LakePaths.of(config), Path(run_dir)
    champion = read_index(paths).get("champion")
    holdout_month = int(evaluation["holdout_month"])
    if not config.export.champion_gate:
        return {**evaluation, "champion": None}
    if champion is not None and champion["run_dir"] == str(run_dir):  # a rerun of the champion itself
        decision = gate.ChampionDecision(False, "this run is the champion", evaluation["exported_rmse"],
                                         champion.get("holdout_rmse"), holdout_month)  # fmt: skip
        applied = None
    else:
        applied, champion_rmse, why = _champion_score(
            champion, holdout_month, windows_dir, final_windows_dir, max(config.train.batch_size, 4096))
        decision = gate.challenge(float(evaluation["exported_rmse"]), champion_rmse, month=holdout_month,
                                  tolerance=config.export.champion_tolerance, why_no_champion=why)  # fmt: skip
    result = {**evaluation, "champion": {**decision.to_dict(), "champion_run": champion and champion["run_dir"]}}
    if decision.keep_champion and applied is not None:
        forecast = pd.read_parquet(run_dir / FORECAST_FILE).assign(champion=applied["forecast"])
        with atomic_path(run_dir / FORECAST_FILE) as tmp:
            forecast.to_parquet(tmp, index=False)
        result |= {"exported": "champion", "reason": decision.reason, "exported_rmse": decision.champion_rmse}
    elif champion is None or champion["run_dir"] != str(run_dir):
        _crown(paths, run_dir, holdout_month + 1, float(evaluation["exported_rmse"]), decision.reason)
    replace_report_section(run_dir / REPORT_FILE, SECTION_KEY, _section(decision, champion, result["exported"]))
    return result
