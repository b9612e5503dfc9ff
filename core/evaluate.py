"""Step 5: score every forecaster against the baselines on the holdout month, the way the competition scores.

The holdout frame is the Kaggle-style grid of the holdout month (every shop with sales that month x every
item with sales that month), one row per pair, with the clipped actual count and the baselines' inputs
(``prev``: the pair's clipped count the month before; ``mean3``: the mean of the three months before).
Every prediction is clipped to [0, 20] before scoring because the competition clips the same way, so a
model is not punished for excursions the submission would never contain.

The forecasters are ``core.forecasters``': the model, whatever else the run predicted (the LightGBM booster,
the ensemble), and the baselines (previous period, mean of 3, zeros), overall and by segment. Evaluation only
scores: what is exported, and the report that says so, are the gate's (``core.gate``, ``core.report``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, PrivateAttr

from core import forecasters
from core.config import DEFAULT_CLIP
from core.files import atomic_path, write_json_atomic
from core.lake import FORECAST_FILE, METRICS_FILE, forecast_month_label

#: Every forecaster an evaluation may score, in report order; the model and the baselines always are.
PREDICTORS: tuple[str, ...] = forecasters.NAMES
BASELINES: tuple[str, ...] = tuple(f.name for f in forecasters.FORECASTERS if f.role == "baseline")
#: The forecasters a run may add beside the model (``evaluate(others=...)``).
OPTIONAL_PREDICTORS: tuple[str, ...] = tuple(name for name in forecasters.PREDICTED if name != forecasters.NETWORK.name)

# The novelty segments partition the grid, so their rows add up to the whole.
NOVELTY_SEGMENTS: tuple[tuple[str, str], ...] = (
    ("new_item", "new item (never sold before)"),
    ("new_pair", "new pair (item sold before, not in this shop)"),
    ("existing_pair", "existing pair"),
)
HOLDOUT_COLUMNS: tuple[str, ...] = (
    "shop_id",
    "item_id",
    "item_category_id",
    "actual",
    "prev",
    "mean3",
    "new_item",
    "new_pair",
)
_KEY_SHIFT = np.int64(1 << 32)


# --- the holdout grid ------------------------------------------------------------------------------


def _pair_key(shop_id: Any, item_id: Any) -> np.ndarray:
    # One int64 per (shop, item) so pair lookups are array operations instead of multi-column merges.
    return np.asarray(shop_id, dtype=np.int64) * _KEY_SHIFT + np.asarray(item_id, dtype=np.int64)


def build_grid(monthly: pd.DataFrame, month: int) -> pd.DataFrame:
    """The Kaggle-style grid of ``month``: every shop with a monthly row that month x every such item.

    ``monthly`` has one row per (month, shop, item) with ``date_block_num, shop_id, item_id, item_cnt_month``
    (``item_category_id`` is carried over when present). Pairs without a row get ``item_cnt_month`` 0.
    The count is left unclipped. Rows are sorted by shop, then item.
    """
    missing = {"date_block_num", "shop_id", "item_id", "item_cnt_month"} - set(monthly.columns)
    if missing:
        raise ValueError(f"monthly frame lacks column(s) {sorted(missing)}")
    rows = monthly.loc[monthly["date_block_num"].to_numpy() == month]
    if rows.empty:
        raise ValueError(f"no monthly rows for date_block_num {month}; cannot build its grid")
    shops = np.unique(rows["shop_id"].to_numpy())
    items = np.unique(rows["item_id"].to_numpy())
    shop_col = np.repeat(shops, len(items))
    item_col = np.tile(items, len(shops))

    keys = _pair_key(rows["shop_id"], rows["item_id"])
    # Sum in case the caller passes daily-grained or duplicated rows; the grid has one row per pair.
    counts = pd.Series(rows["item_cnt_month"].to_numpy(dtype=np.float64)).groupby(keys).sum()
    position = counts.index.get_indexer(_pair_key(shop_col, item_col))
    cnt = np.where(position >= 0, counts.to_numpy()[position], 0.0)

    grid = pd.DataFrame(
        {
            "date_block_num": np.full(len(shop_col), month, dtype=np.int16),
            "shop_id": shop_col.astype(np.int16),
            "item_id": item_col.astype(np.int32),
        }
    )
    if "item_category_id" in rows.columns:
        category = rows.drop_duplicates("item_id").set_index("item_id")["item_category_id"]
        grid["item_category_id"] = category.reindex(item_col).to_numpy().astype(np.int16)
    grid["item_cnt_month"] = cnt.astype(np.float32)
    return grid


def backtest_frame(monthly: pd.DataFrame, month: int, clip: tuple[float, float] = DEFAULT_CLIP) -> pd.DataFrame:
    """A holdout frame for ``month`` built straight from monthly rows (for backtests and baselines).

    Same columns as the windows step's holdout frame, less ``series_idx``: the grid of ``month`` with
    ``actual`` (clipped count), ``prev`` (clipped count of ``month - 1``), ``mean3`` (mean clipped count of
    the three months before, months before the data counting as 0), ``new_item`` (no monthly row for the
    item before ``month``) and ``new_pair`` (no row for the pair before ``month``).
    """
    low, high = clip
    grid = build_grid(monthly, month)
    keys = _pair_key(grid["shop_id"], grid["item_id"])
    months = monthly["date_block_num"].to_numpy()
    before = monthly.loc[months < month]
    clipped = np.clip(before["item_cnt_month"].to_numpy(dtype=np.float64), low, high)
    before_keys = _pair_key(before["shop_id"], before["item_id"])
    before_months = before["date_block_num"].to_numpy()

    def pair_sum(mask: np.ndarray) -> np.ndarray:
        sums = pd.Series(clipped[mask]).groupby(before_keys[mask]).sum()
        position = sums.index.get_indexer(keys)
        return np.where(position >= 0, sums.to_numpy()[position], 0.0)

    out = grid.drop(columns=["date_block_num", "item_cnt_month"])
    out["actual"] = np.clip(grid["item_cnt_month"].to_numpy(dtype=np.float64), low, high).astype(np.float32)
    out["prev"] = pair_sum(before_months == month - 1).astype(np.float32)
    out["mean3"] = (pair_sum(before_months >= month - 3) / 3.0).astype(np.float32)
    out["new_item"] = ~np.isin(grid["item_id"].to_numpy(), before["item_id"].to_numpy())
    out["new_pair"] = ~np.isin(keys, before_keys)
    return out


def monthly_totals(monthly: pd.DataFrame, clip: tuple[float, float] = DEFAULT_CLIP) -> pd.DataFrame:
    """Per month, the total of clipped pair counts: ``date_block_num, actual``.

    This equals the sum of ``actual`` over that month's grid (absent pairs are 0), so it is comparable to
    the holdout totals in :class:`Evaluation` and is the ``history`` that :func:`write_report` plots.
    """
    clipped = np.clip(monthly["item_cnt_month"].to_numpy(dtype=np.float64), *clip)
    totals = pd.Series(clipped).groupby(monthly["date_block_num"].to_numpy()).sum()
    return pd.DataFrame({"date_block_num": totals.index.astype(np.int16), "actual": totals.to_numpy()})


# --- metrics --------------------------------------------------------------------------------------


class Metrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    rmse: float
    mae: float


class SegmentRow(BaseModel):
    """Metrics of every predictor on one segment of the grid."""

    model_config = ConfigDict(frozen=True)

    key: str
    label: str
    rows: int
    actual_mean: float
    metrics: dict[str, Metrics]
    improvement_rmse: float | None = None


class Evaluation(BaseModel):
    """Scores of the model and the baselines on the holdout month; ``to_dict()`` is JSON-ready.

    ``overall`` and each segment row map predictor name (:data:`PREDICTORS`) to RMSE and MAE.
    ``improvement_rmse``/``improvement_mae`` are the model's relative improvement over the previous-period
    baseline, ``(baseline - model) / baseline`` (None when the baseline scores 0). ``segments`` has
    ``novelty`` (new items, new pairs, existing pairs), ``category`` and ``shop`` rows, biggest first.
    """

    month: int | None = None
    month_label: str | None = None
    first_month: str = "2013-01"
    rows: int
    clip: tuple[float, float]
    overall: dict[str, Metrics]
    totals: dict[str, float]
    improvement_rmse: float | None
    improvement_mae: float | None
    beats_baseline: bool
    segments: dict[str, list[SegmentRow]]

    # Pair-level clipped arrays for the scatter plot; not serialised, so absent after from_dict().
    _pairs: dict[str, np.ndarray] | None = PrivateAttr(default=None)

    @property
    def predictors(self) -> list[str]:
        """The predictors this evaluation scored: :data:`PREDICTORS` order, then any other (a champion)."""
        return [p for p in PREDICTORS if p in self.overall] + [p for p in self.overall if p not in PREDICTORS]

    @property
    def model_rmse(self) -> float:
        return self.overall["model"].rmse

    @property
    def baseline_rmse(self) -> float:
        return self.overall["baseline"].rmse

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        return cls.model_validate(dict(data))

    def headline(self) -> str:
        verdict = "beats" if self.beats_baseline else "does not beat"
        change = "" if self.improvement_rmse is None else f", {self.improvement_rmse:+.1%}"
        return (
            f"model {verdict} the previous-period baseline: RMSE {self.model_rmse:.4f} vs "
            f"{self.baseline_rmse:.4f}{change}"
        )


def _relative(baseline: float, model: float) -> float | None:
    return None if baseline <= 0 else (baseline - model) / baseline


def _grouped(codes: np.ndarray, n_groups: int, actual: np.ndarray, preds: Mapping[str, np.ndarray]) -> dict:
    # bincount does the per-group sums in one pass per predictor, whatever the number of groups.
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    out: dict[str, Any] = {
        "rows": counts,
        "actual_mean": np.bincount(codes, weights=actual, minlength=n_groups) / safe,
    }
    for name, pred in preds.items():
        error = pred - actual
        out[name] = (
            np.sqrt(np.bincount(codes, weights=error * error, minlength=n_groups) / safe),
            np.bincount(codes, weights=np.abs(error), minlength=n_groups) / safe,
        )
    return out


def _segment_rows(
    codes: np.ndarray,
    keys: list[str],
    labels: list[str],
    actual: np.ndarray,
    preds: Mapping[str, np.ndarray],
    order_by_rows: bool,
) -> list[SegmentRow]:
    stats = _grouped(codes, len(keys), actual, preds)
    rows = stats["rows"]
    order = np.arange(len(keys))
    if order_by_rows:
        order = np.lexsort((order, -rows))
    result = []
    for g in order:
        if rows[g] == 0:
            continue
        metrics = {name: Metrics(rmse=float(stats[name][0][g]), mae=float(stats[name][1][g])) for name in preds}
        result.append(
            SegmentRow(
                key=keys[g],
                label=labels[g],
                rows=int(rows[g]),
                actual_mean=float(stats["actual_mean"][g]),
                metrics=metrics,
                improvement_rmse=_relative(metrics["baseline"].rmse, metrics["model"].rmse),
            )
        )
    return result


def _named(ids: np.ndarray, names: Mapping[Any, str] | None) -> tuple[list[str], list[str]]:
    keys = [str(int(i)) for i in ids]
    if not names:
        return keys, keys
    labels = []
    for i, key in zip(ids, keys, strict=True):
        name = names.get(int(i), names.get(key))
        labels.append(f"{key} · {name}" if name else key)
    return keys, labels


def _checked_clip(holdout: pd.DataFrame, clip: tuple[float, float]) -> tuple[float, float]:
    """The clip range, once the holdout frame has its columns and rows."""
    missing = [c for c in HOLDOUT_COLUMNS if c not in holdout.columns]
    if missing:
        raise ValueError(f"holdout frame lacks column(s) {missing}")
    if holdout.empty:
        raise ValueError("holdout frame is empty; nothing to evaluate")
    low, high = float(clip[0]), float(clip[1])
    if not high > low:
        raise ValueError(f"clip must be (low, high) with high > low, got {clip}")
    return low, high


def _checked_forecasts(
    holdout: pd.DataFrame, model_pred: np.ndarray, others: Mapping[str, np.ndarray] | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``model_pred`` and ``others`` as flat float arrays, one finite value per holdout row each."""
    pred = np.asarray(model_pred, dtype=np.float64).reshape(-1)
    if pred.size != len(holdout):
        raise ValueError(f"model_pred has {pred.size} values for {len(holdout)} holdout rows")
    extra = {}
    for name, values in (others or {}).items():
        if name in BASELINES or name == forecasters.NETWORK.name:
            raise ValueError(f"{name!r} is scored from the holdout frame or model_pred, not given in others")
        extra[name] = np.asarray(values, dtype=np.float64).reshape(-1)
    for name, values in {"model_pred": pred, **extra}.items():
        if values.size != len(holdout):
            raise ValueError(f"{name} has {values.size} values for {len(holdout)} holdout rows")
        if not np.isfinite(values).all():
            raise ValueError(f"{name} has {int((~np.isfinite(values)).sum())} NaN/inf value(s)")
    return pred, extra


def _checked_actual(holdout: pd.DataFrame) -> np.ndarray:
    actual = holdout["actual"].to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(actual).any():
        raise ValueError(f"holdout actual has {int(np.isnan(actual).sum())} NaN value(s)")
    return actual


def _segments(
    holdout: pd.DataFrame,
    actual: np.ndarray,
    preds: Mapping[str, np.ndarray],
    category_names: Mapping[Any, str] | None,
    shop_names: Mapping[Any, str] | None,
) -> dict[str, list[SegmentRow]]:
    """Scores by novelty (new item, new pair, known pair), by category and by shop."""
    new_item = holdout["new_item"].to_numpy(dtype=bool)
    new_pair = holdout["new_pair"].to_numpy(dtype=bool)
    novelty = np.where(new_item, 0, np.where(new_pair, 1, 2))
    segments = {
        "novelty": _segment_rows(
            novelty,
            [key for key, _ in NOVELTY_SEGMENTS],
            [label for _, label in NOVELTY_SEGMENTS],
            actual,
            preds,
            order_by_rows=False,
        )
    }
    for segment, column, names in (("category", "item_category_id", category_names), ("shop", "shop_id", shop_names)):
        codes, uniques = pd.factorize(holdout[column].to_numpy(), sort=True)
        keys, labels = _named(np.asarray(uniques), names)
        segments[segment] = _segment_rows(codes, keys, labels, actual, preds, order_by_rows=True)
    return segments


def evaluate(
    holdout: pd.DataFrame,
    model_pred: np.ndarray,
    clip: tuple[float, float] = DEFAULT_CLIP,
    category_names: Mapping[Any, str] | None = None,
    *,
    shop_names: Mapping[Any, str] | None = None,
    month: int | None = None,
    first_month: str = "2013-01",
    others: Mapping[str, np.ndarray] | None = None,
) -> Evaluation:
    """Score ``model_pred`` (one value per holdout row) and the baselines on the holdout grid.

    ``others`` adds more forecasters by name (:data:`OPTIONAL_PREDICTORS`, or another such as a re-applied
    ``champion``; never a baseline's name), one value per holdout row each, scored like the model.

    ``holdout`` needs ``shop_id, item_id, item_category_id, actual, prev, mean3, new_item, new_pair``.
    Missing ``prev``/``mean3`` values count as 0 (no sales). ``month`` defaults to the frame's
    ``date_block_num`` when it has one. Names label the category and shop segments when given.
    """
    low, high = _checked_clip(holdout, clip)
    pred, extra = _checked_forecasts(holdout, model_pred, others)
    actual = np.clip(_checked_actual(holdout), low, high)
    preds = {
        "model": np.clip(pred, low, high),
        **{name: np.clip(values, low, high) for name, values in extra.items()},
        "baseline": np.clip(np.nan_to_num(holdout["prev"].to_numpy(dtype=np.float64, na_value=0.0)), low, high),
        "mean3": np.clip(np.nan_to_num(holdout["mean3"].to_numpy(dtype=np.float64, na_value=0.0)), low, high),
        "zeros": np.clip(np.zeros_like(actual), low, high),
    }
    overall = {}
    for name, values in preds.items():
        error = values - actual
        overall[name] = Metrics(rmse=float(np.sqrt(np.mean(error * error))), mae=float(np.mean(np.abs(error))))
    segments = _segments(holdout, actual, preds, category_names, shop_names)
    if month is None and "date_block_num" in holdout.columns:
        months = pd.unique(holdout["date_block_num"])
        month = int(months[0]) if len(months) == 1 else None
    totals = {"actual": float(actual.sum())} | {name: float(values.sum()) for name, values in preds.items()}
    evaluation = Evaluation(
        month=month,
        month_label=None if month is None else forecast_month_label(month, first_month),
        first_month=first_month,
        rows=len(holdout),
        clip=(low, high),
        overall=overall,
        totals=totals,
        improvement_rmse=_relative(overall["baseline"].rmse, overall["model"].rmse),
        improvement_mae=_relative(overall["baseline"].mae, overall["model"].mae),
        beats_baseline=overall["model"].rmse < overall["baseline"].rmse,
        segments=segments,
    )
    evaluation._pairs = {"actual": actual.astype(np.float32)} | {name: values.astype(np.float32)
                                                                for name, values in preds.items()}
    return evaluation


# --- the whole step, as the orchestration calls it ----------------------------------------------


def _names(reference_dir: Path, table: str, id_column: str, name_column: str) -> dict[int, str] | None:
    path = reference_dir / f"{table}.parquet"
    if not path.exists():
        return None
    frame = pd.read_parquet(path, columns=[id_column, name_column])
    return dict(zip(frame[id_column].astype(int), frame[name_column].astype(str), strict=True))


def _forecast_frame(store: Any, predictions: pd.DataFrame, clip: tuple[float, float]) -> pd.DataFrame:
    """Every candidate forecast of the store's forecast pairs side by side, by ``ID``."""
    forecast = store.forecast_frame()
    frame = {"ID": forecast["ID"].to_numpy()}
    frame |= {name: predictions[name].to_numpy(np.float32) for name in forecasters.PREDICTED if name in predictions}
    frame["baseline"] = np.clip(forecast["prev"].to_numpy(dtype=np.float32), *clip)
    return pd.DataFrame(frame)


def score_holdout(config: Any, windows_dir: str | Path, run_dir: str | Path,
                  extra: Mapping[str, np.ndarray] | None = None) -> Evaluation:
    """Every forecaster of the run's holdout refit (``run_dir/holdout``) and the baselines, scored on the holdout
    month's grid (pair-level values kept for the plots); ``extra`` adds more (a re-applied champion)."""
    from core import protocol
    from core.lake import LakePaths
    from core.window_store import WindowStore

    paths = LakePaths.of(config)
    store = WindowStore.open(windows_dir)
    predictions = protocol.read_predictions(Path(run_dir) / "holdout", "holdout")
    return evaluate(
        store.holdout_frame(),
        predictions[forecasters.NETWORK.name].to_numpy(),
        config.windows.clip,
        _names(paths.reference, "item_categories", "item_category_id", "item_category_name"),
        shop_names=_names(paths.reference, "shops", "shop_id", "shop_name"),
        month=int(store.meta["holdout_month"]),
        first_month=config.ingest.first_month,
        others={name: predictions[name].to_numpy() for name in OPTIONAL_PREDICTORS if name in predictions}
        | dict(extra or {}),
    )


@dataclasses.dataclass
class RunScores:
    """What the evaluate step scored and wrote: each forecaster's holdout RMSE and MAE, the candidate forecasts."""

    run_dir: str
    holdout_month: int
    forecast_month: int
    rmse: dict[str, float]  # forecaster -> RMSE on the holdout month
    mae: dict[str, float]
    metrics: str  # run_dir/metrics.json
    forecast: str  # run_dir/forecast.parquet: every candidate's forecast of the forecast pairs, by ID


def evaluate_run(config: Any, windows_dir: str | Path, final_windows_dir: str | Path, run_dir: str | Path) -> RunScores:
    """Score the holdout refit's forecasters on the holdout month (``metrics.json``) and put every candidate
    forecast of the forecast month side by side (``forecast.parquet``, from the final refit) for the gate.

    The holdout month's predictions come from ``run_dir/holdout`` (trained through the month before it), the
    forecast's from ``run_dir/final`` (trained through the last month); ``core.protocol`` wrote both.
    """
    from core import protocol
    from core.window_store import WindowStore

    run_dir = Path(run_dir)
    evaluation = score_holdout(config, windows_dir, run_dir)
    final = WindowStore.open(final_windows_dir)
    forecast = _forecast_frame(final, protocol.read_predictions(run_dir / "final", "forecast"), config.windows.clip)
    with atomic_path(run_dir / FORECAST_FILE) as tmp:
        forecast.to_parquet(tmp, index=False)
    metrics = write_json_atomic(run_dir / METRICS_FILE, evaluation.to_dict())
    return RunScores(
        run_dir=str(run_dir),
        holdout_month=int(evaluation.month if evaluation.month is not None else final.meta["last_month"]),
        forecast_month=int(final.meta["forecast_month"]),
        rmse={name: m.rmse for name, m in evaluation.overall.items()},
        mae={name: m.mae for name, m in evaluation.overall.items()},
        metrics=str(metrics),
        forecast=str(run_dir / FORECAST_FILE),
    )
