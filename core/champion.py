"""Champion and challenger: ``runs/index.json`` names the champion run and the forecaster it exported; every new
run's gated forecast challenges it.

Both are whole forecasters -- what each exported, with its blend weights and launch scales -- scored on the same
month, the run's holdout month M-1, which neither saw: the challenger by its holdout refit (trained through M-2),
the champion by its newest stage that never saw M-1 (``scoring_stage``: its final stage, or its holdout refit when
it forecast M itself, as on a rerun with other settings), re-applied to this run's holdout windows with
``core.protocol.apply_stage``, the function that made its own forecasts. The rule is ``core.gate.challenge``.
When the champion stays, the same forecaster of its final stage, re-applied to this month's forecast windows,
becomes the ``champion`` column of the run's ``forecast.parquet``, which export writes.

Runs are named by their path inside the data directory (``runs/forecast-…``), so another working copy of an
object-store lake (``core.store``), or the same lake moved, finds the champion through the catalog.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.files import read_json, write_json_atomic
from core.lake import INDEX_FILE, SELECTION_FILE, LakePaths, forecast_month_label


def index_path(paths: LakePaths) -> Path:
    return paths.runs / INDEX_FILE


def read_index(paths: LakePaths) -> dict[str, Any]:
    """``{"champion": {...} | None, "history": [...]}`` (empty before the first run)."""
    return read_json(index_path(paths), default={"champion": None, "history": []})


def crown(paths: LakePaths, run_dir: str | Path, forecast_month: int, exported: str, rmse: float,
          reason: str) -> dict[str, Any]:
    """Make ``run_dir``'s ``exported`` forecaster the champion; returns the new record."""
    index = read_index(paths)
    champion = {"run_dir": paths.run_name(run_dir), "forecast_month": int(forecast_month), "exported": exported,
                "holdout_rmse": float(rmse), "since": datetime.now(UTC).isoformat(timespec="seconds")}
    index["champion"] = champion
    index["history"] = [*index.get("history", []), {**champion, "reason": reason}]
    write_json_atomic(index_path(paths), index)
    return champion


def scoring_stage(champion_forecast_month: int, holdout_month: int) -> str | None:
    """The champion's stage that never saw ``holdout_month``: its final one when its forecast month is at most that
    month, its holdout refit (trained through the month before) when the champion forecast the month after (a
    rerun on the same lake), none otherwise."""
    if champion_forecast_month <= holdout_month:
        return "final"
    return "holdout" if champion_forecast_month == holdout_month + 1 else None


def _column(columns: dict[str, np.ndarray], exported: str, previous: np.ndarray,
            clip: tuple[float, float]) -> np.ndarray:
    """The exported forecaster's column (the previous month's sales when it exported the baseline)."""
    if exported == "baseline":
        return np.clip(previous, *clip).astype(np.float32)
    if exported not in columns:
        raise ValueError(f"its stage does not make the {exported!r} forecast it exported")
    return columns[exported]


def reapply(config: Any, champion_dir: Path, champion: dict[str, Any], stage: str, windows_dir: str | Path,
            final_windows_dir: str | Path) -> dict[str, np.ndarray]:
    """The champion's exported forecaster, as a whole: its ``stage`` on this run's holdout windows and its final
    stage on this run's forecast windows, each with its own selection's weights and scales."""
    from core.protocol import Selection, apply_stage
    from core.window_store import WindowStore

    record = read_json(champion_dir / "select" / SELECTION_FILE)
    if record is None:
        raise FileNotFoundError(f"{champion_dir / 'select' / SELECTION_FILE} is missing")
    selection = Selection.from_dict(record)
    exported = str(champion.get("exported") or "model")
    clip = config.windows.clip
    out = {}
    for name, stage_name, directory in (("holdout", stage, windows_dir), ("forecast", "final", final_windows_dir)):
        store = WindowStore.open(directory)
        columns = apply_stage(config, champion_dir / stage_name, selection, store, (name,))[name]
        frame = store.holdout_frame() if name == "holdout" else store.forecast_frame()
        out[name] = _column(columns, exported, frame["prev"].to_numpy(np.float64), clip)
    return out


@dataclasses.dataclass
class ChampionScore:
    """The champion's forecasts re-applied to this run and its holdout RMSE -- or why it cannot compete."""

    record: dict[str, Any] | None
    columns: dict[str, np.ndarray] | None
    rmse: float | None
    why_not: str = ""


def score_champion(config: Any, holdout_month: int, windows_dir: str | Path,
                   final_windows_dir: str | Path) -> ChampionScore:
    """The current champion re-applied to this run's windows and scored on its holdout month."""
    from core.blend import rmse
    from core.window_store import WindowStore

    paths = LakePaths.of(config)
    champion = read_index(paths).get("champion")
    if champion is None:
        return ChampionScore(None, None, None, "there is no champion yet")
    stage = scoring_stage(int(champion["forecast_month"]), holdout_month)
    if stage is None:
        return ChampionScore(champion, None, None,
                             f"every model of the champion {champion['run_dir']} saw the holdout month "
                             f"{forecast_month_label(holdout_month, config.ingest.first_month)}")
    try:
        columns = reapply(config, paths.run_path(champion["run_dir"]), champion, stage, windows_dir,
                          final_windows_dir)
    # A champion whose files are gone, or whose models no longer fit this month's windows (another lookback,
    # other features, new shops), cannot compete: the challenger wins, and the reason says why.
    except Exception as error:  # noqa: BLE001
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        return ChampionScore(champion, None, None, f"the champion {champion['run_dir']} cannot be re-applied "
                                                   f"({type(error).__name__}: {first_line})")
    actual = WindowStore.open(windows_dir).holdout_frame()["actual"].to_numpy()
    return ChampionScore(champion, columns, rmse(columns["holdout"], actual))
