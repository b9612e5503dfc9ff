"""Step 8: forecast ranges -- calibrated quantiles of every exported pair, and how well they cover.

Method: split-conformal offsets per segment. The exported forecaster's residuals (truth - forecast) on the
validation months the protocol already scores (``select/validation.parquet``: trained on the months before them,
the same predictions the blend weights and the gate are chosen on) give, per segment, the empirical quantile of
the residual at each level of ``export.quantile_levels``; a pair's quantile is its point forecast plus its
segment's offset, clipped to the submission's range and sorted across levels. The holdout month never enters the
offsets: it only scores them (coverage, width, pinball loss), exactly as it scores the point forecast. The
forecast of the next month reuses the same offsets, as the final refit reuses the selection's weights.

Why conformal on residuals rather than quantile heads: it calibrates whatever the gate exports (the network, the
LightGBM, their blend, the previous month) without training anything, its coverage on exchangeable rows is
guaranteed by construction (``P(residual <= offset) >= level``), and the segments absorb the largest differences
in spread (a launch sells 0 or 15; an established pair that sold nothing last month almost surely sells 0 again).

Segments (:data:`SEGMENTS`): new item (never sold before), new pair (item sold before, not in this shop), and
established pairs by last month's clipped sales (0, 1-2, 3-7, 8+). A segment with fewer than
:data:`MIN_SEGMENT_ROWS` validation rows takes its parent's offsets (a sales level: the established pairs; those:
every pair), so a thin segment never gets offsets from a handful of rows.

The naive range, the bar to beat: the previous month's sales plus the pooled empirical quantiles of the previous
month's residuals on the same validation months.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import check_levels
from core.errors import ExportCheckError

#: A segment with fewer validation rows than this is calibrated with its parent's residuals.
MIN_SEGMENT_ROWS = 200
#: Last month's clipped sales that start each sales level of the established pairs (0, 1-2, 3-7, 8+).
SALES_LEVELS: tuple[float, ...] = (0.0, 1.0, 3.0, 8.0)
#: Resamples of the monthly total in the fan chart.
FAN_DRAWS = 200
FAN_SHOPS = 4


@dataclasses.dataclass(frozen=True)
class Segment:
    key: str
    label: str
    parent: str | None


SEGMENTS: tuple[Segment, ...] = (
    Segment("all", "every pair", None),
    Segment("new_item", "new item (never sold before)", "all"),
    Segment("new_pair", "new pair (item sold before, not in this shop)", "all"),
    Segment("established", "established pair", "all"),
    Segment("sold_0", "established, sold 0 last month", "established"),
    Segment("sold_1_2", "established, sold 1-2 last month", "established"),
    Segment("sold_3_7", "established, sold 3-7 last month", "established"),
    Segment("sold_8_plus", "established, sold 8+ last month", "established"),
)
BY_KEY: dict[str, Segment] = {s.key: s for s in SEGMENTS}
#: The segments a row belongs to at the bottom; :func:`leaf_codes` numbers rows by this tuple.
LEAVES: tuple[str, ...] = ("new_item", "new_pair", "sold_0", "sold_1_2", "sold_3_7", "sold_8_plus")


def ancestors(key: str) -> list[str]:
    """``key`` and its parents up to ``all``."""
    chain = [key]
    while BY_KEY[chain[-1]].parent is not None:
        chain.append(str(BY_KEY[chain[-1]].parent))
    return chain


def leaf_codes(new_item: np.ndarray, new_pair: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Each row's leaf segment, as an index into :data:`LEAVES`."""
    level = np.searchsorted(np.asarray(SALES_LEVELS[1:]), np.asarray(prev, np.float64), side="right")
    codes = 2 + level
    codes = np.where(np.asarray(new_pair, bool), 1, codes)
    return np.where(np.asarray(new_item, bool), 0, codes).astype(np.int64)


def members(codes: np.ndarray, key: str) -> np.ndarray:
    """Rows of segment ``key`` (a leaf or a parent)."""
    leaves = [i for i, leaf in enumerate(LEAVES) if key in ancestors(leaf)]
    return np.isin(codes, leaves)


# --- the math --------------------------------------------------------------------------------------
def conformal_quantiles(residuals: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """The split-conformal quantile of ``residuals`` at each level: the ``ceil((n + 1) * level)``-th smallest
    (the largest when that passes ``n``), so a new exchangeable residual is at or below it with probability at
    least ``level``."""
    ordered = np.sort(np.asarray(residuals, np.float64))
    if not ordered.size:
        raise ValueError("no residuals to calibrate on")
    rank = np.ceil((ordered.size + 1) * np.asarray(levels, np.float64)).astype(np.int64)
    return ordered[np.clip(rank, 1, ordered.size) - 1]


def pinball(actual: np.ndarray, quantile: np.ndarray, level: float) -> float:
    """Mean pinball (quantile) loss of ``quantile`` at ``level``."""
    diff = np.asarray(actual, np.float64) - np.asarray(quantile, np.float64)
    return float(np.mean(np.maximum(level * diff, (level - 1.0) * diff)))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Offsets per leaf segment (added to the point forecast) and the naive range's pooled offsets."""

    levels: tuple[float, ...]
    offsets: dict[str, list[float]]  # leaf -> offset per level
    source: dict[str, str]  # leaf -> the segment whose residuals gave its offsets (itself or a parent)
    rows: dict[str, int]  # segment -> validation rows
    naive: list[float]  # offsets of the previous month's forecast, pooled
    months: list[int]  # the validation months calibrated on
    forecaster: str  # the column whose residuals were used
    min_rows: int = MIN_SEGMENT_ROWS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        values = dict(data)
        values["levels"] = tuple(values["levels"])
        return cls(**values)

    def matrix(self) -> np.ndarray:
        """``[leaf, level]`` offsets in :data:`LEAVES` order."""
        return np.asarray([self.offsets[leaf] for leaf in LEAVES], np.float64).reshape(len(LEAVES), -1)


def calibration_source(rows: Mapping[str, int], leaf: str, min_rows: int) -> str:
    """The first of ``leaf`` and its parents with at least ``min_rows`` rows (``all`` in the end)."""
    return next((key for key in ancestors(leaf) if rows.get(key, 0) >= min_rows), "all")


def calibrate(actual: np.ndarray, point: np.ndarray, prev: np.ndarray, codes: np.ndarray, levels: Sequence[float],
              *, months: Sequence[int] = (), forecaster: str = "", min_rows: int = MIN_SEGMENT_ROWS,
              clip: tuple[float, float] = (0.0, 20.0)) -> Calibration:
    """Offsets from validation rows: ``actual`` (clipped truth), ``point`` (the exported forecast), ``prev``
    (last month's clipped sales) and ``codes`` (:func:`leaf_codes`)."""
    levels = check_levels(levels)
    residual = np.asarray(actual, np.float64) - np.asarray(point, np.float64)
    rows = {s.key: int(members(codes, s.key).sum()) for s in SEGMENTS}
    source = {leaf: calibration_source(rows, leaf, min_rows) for leaf in LEAVES}
    by_segment = {key: conformal_quantiles(residual[members(codes, key)], levels).tolist()
                  for key in set(source.values())}
    naive = conformal_quantiles(np.asarray(actual, np.float64) - np.clip(prev, *clip), levels)
    return Calibration(levels, {leaf: by_segment[source[leaf]] for leaf in LEAVES}, source, rows, naive.tolist(),
                       [int(m) for m in months], forecaster, min_rows)


def _clip_sorted(values: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
    # Offsets rise with the level, so the sort only guards against float ties; clipping keeps the order.
    return np.sort(np.clip(values, clip[0], clip[1]), axis=1)


def apply(point: np.ndarray, codes: np.ndarray, calibration: Calibration, clip: tuple[float, float]) -> np.ndarray:
    """``[row, level]`` quantiles: the point forecast plus its segment's offsets, clipped, monotone."""
    values = np.asarray(point, np.float64)[:, None] + calibration.matrix()[np.asarray(codes, np.int64)]
    return _clip_sorted(values, clip)


def apply_naive(prev: np.ndarray, calibration: Calibration, clip: tuple[float, float]) -> np.ndarray:
    """The naive range: last month's clipped sales plus the pooled offsets."""
    base = np.clip(np.asarray(prev, np.float64), *clip)
    return _clip_sorted(base[:, None] + np.asarray(calibration.naive)[None, :], clip)


def score(actual: np.ndarray, quantiles: np.ndarray, levels: Sequence[float]) -> dict[str, Any]:
    """Coverage per level (share of rows at or below it), the outer interval's coverage and mean width, and the
    mean pinball loss over the levels."""
    actual = np.asarray(actual, np.float64)
    low, high = quantiles[:, 0], quantiles[:, -1]
    return {
        "rows": int(actual.size),
        "coverage": {f"{level:g}": float(np.mean(actual <= quantiles[:, j])) for j, level in enumerate(levels)},
        "interval": float(levels[-1] - levels[0]),
        "interval_coverage": float(np.mean((actual >= low) & (actual <= high))),
        "interval_width": float(np.mean(high - low)),
        "pinball": float(np.mean([pinball(actual, quantiles[:, j], lv) for j, lv in enumerate(levels)])),
    }


def segment_scores(actual: np.ndarray, quantiles: np.ndarray, naive: np.ndarray, codes: np.ndarray,
                   levels: Sequence[float]) -> list[dict[str, Any]]:
    """:func:`score` of the calibrated and the naive range on each segment with rows."""
    out = []
    for segment in SEGMENTS:
        rows = members(codes, segment.key)
        if rows.any():
            out.append({"segment": segment.key, "label": segment.label,
                        "range": score(actual[rows], quantiles[rows], levels),
                        "naive": score(actual[rows], naive[rows], levels)})
    return out


# --- the monthly total's range, by resampling residuals -------------------------------------------
def residual_pools(residual: np.ndarray, codes: np.ndarray, calibration: Calibration) -> list[np.ndarray]:
    """Per leaf, the validation residuals its offsets came from (its own segment's or its parent's)."""
    return [residual[members(codes, calibration.source[leaf])] for leaf in LEAVES]


def resampled_totals(point: np.ndarray, codes: np.ndarray, pools: Sequence[np.ndarray], groups: np.ndarray,
                     n_groups: int, clip: tuple[float, float], draws: int = FAN_DRAWS, seed: int = 0,
                     chunk: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """``[group, draw]`` totals of ``clip(point + r)``, each row's ``r`` drawn from its leaf's pool, and ``[draw]``
    totals of every row (the same draws). Groups are ``0..n_groups-1``; a row of group -1 counts in the total only.
    Vectorised over rows; the draws go in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    point, codes = np.asarray(point, np.float64), np.asarray(codes, np.int64)
    sizes = np.asarray([max(len(p), 1) for p in pools])
    flat = np.concatenate([p if len(p) else np.zeros(1) for p in pools])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    keep = (groups >= 0) & (groups < n_groups)
    totals, everything = np.zeros((n_groups, draws)), np.zeros(draws)
    for first in range(0, draws, chunk):
        count = min(chunk, draws - first)
        picks = starts[codes] + (rng.random((count, codes.size)) * sizes[codes]).astype(np.int64)
        values = np.clip(point[None, :] + flat[picks], *clip)
        totals[:, first:first + count] = _group_sums(values[:, keep], groups[keep], n_groups).T
        everything[first:first + count] = values.sum(axis=1)
    return totals, everything


def _group_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """``[draw, group]`` sums of ``values`` (``[draw, row]``) by each row's group."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    bounds = np.searchsorted(sorted_groups, np.arange(n_groups + 1))
    cumulative = np.concatenate([np.zeros((values.shape[0], 1)), np.cumsum(values[:, order], axis=1)], axis=1)
    return cumulative[:, bounds[1:]] - cumulative[:, bounds[:-1]]


# --- the quantiles file ------------------------------------------------------------------------------
def level_column(level: float) -> str:
    """``q0.1``: the quantiles file's column of a level."""
    return f"q{level:g}"


def quantile_frame(ids: np.ndarray, shop_id: np.ndarray, item_id: np.ndarray, quantiles: np.ndarray,
                   levels: Sequence[float]) -> pd.DataFrame:
    """``ID, shop_id, item_id, q<level>...``, sorted by ID."""
    frame = pd.DataFrame({"ID": np.asarray(ids, np.int64), "shop_id": np.asarray(shop_id, np.int64),
                          "item_id": np.asarray(item_id, np.int64)})
    for j, level in enumerate(levels):
        frame[level_column(level)] = np.asarray(quantiles[:, j], np.float32)
    return frame.sort_values("ID", kind="stable").reset_index(drop=True)


def check_quantile_frame(frame: pd.DataFrame, ids: np.ndarray, levels: Sequence[float],
                         clip: tuple[float, float], name: str) -> None:
    """Raise :class:`ExportCheckError` naming ``name``, the first bad row and the rule: one row per exported ID,
    every value finite and within ``clip``, monotone in the level."""
    columns = [level_column(level) for level in levels]
    expected = ["ID", "shop_id", "item_id", *columns]
    if list(frame.columns) != expected:
        raise ExportCheckError(f"{name}: columns must be {expected}, got {list(frame.columns)}")
    got, wanted = frame["ID"].to_numpy(np.int64), np.sort(np.asarray(ids, np.int64))
    if got.size != wanted.size or not np.array_equal(got, wanted):
        raise ExportCheckError(f"{name}: {got.size:,} rows for {wanted.size:,} exported IDs; the file needs one row "
                               "per exported ID, in ID order")
    values = frame[columns].to_numpy(np.float64)
    rules = (("is not a finite number", ~np.isfinite(values)),
             (f"is outside [{clip[0]:g}, {clip[1]:g}]", (values < clip[0]) | (values > clip[1])))
    for rule, bad in rules:
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ExportCheckError(f"{name} row {row} (ID {got[row]}): {columns[col]} {values[row, col]:g} {rule}")
    falling = np.diff(values, axis=1) < 0
    if falling.any():
        row, col = np.argwhere(falling)[0]
        raise ExportCheckError(f"{name} row {row} (ID {got[row]}): {columns[col + 1]} {values[row, col + 1]:g} is "
                               f"below {columns[col]} {values[row, col]:g}; quantiles must rise with the level")


def write_quantiles(path: str | Path, frame: pd.DataFrame, ids: np.ndarray, levels: Sequence[float],
                    clip: tuple[float, float]) -> Path:
    """Check ``frame`` and write it atomically to ``path`` (nothing is written when a check fails)."""
    import pyarrow as pa

    from core.files import write_parquet_atomic

    check_quantile_frame(frame, ids, levels, clip, Path(path).name)
    return write_parquet_atomic(path, pa.Table.from_pandas(frame, preserve_index=False))


def interval_text(calibration: Calibration) -> str:
    return f"P{calibration.levels[0] * 100:g}-P{calibration.levels[-1] * 100:g}"


# --- the step, as the gate calls it ----------------------------------------------------------------
RANGES_FILE = "ranges.json"  # runs/<id>/: the calibration, the holdout month's scores and the fan's totals
FAN_PLOT = "fan.png"
SECTION_KEY = "ranges"


def frame_codes(frame: pd.DataFrame) -> np.ndarray:
    """:func:`leaf_codes` of a holdout or validation frame (``new_item``, ``new_pair``, ``prev``)."""
    return leaf_codes(frame["new_item"].to_numpy(bool), frame["new_pair"].to_numpy(bool),
                      frame["prev"].to_numpy(np.float64))


def forecast_codes(store: Any) -> np.ndarray:
    """:func:`leaf_codes` of a store's forecast rows: new item and new pair as the windows step tells them (an item
    in no grid before the month; a pair with no sale before it), read from the store's arrays (no feature tables)."""
    series, month = store.forecast_index[:, 0].astype(np.int64), store.forecast_index[:, 1]
    grid_items = np.asarray(store.grid["grid_items"], dtype=bool)
    seen = grid_items.any(axis=0)
    item_first = np.where(seen, grid_items.argmax(axis=0), np.iinfo(np.int64).max)
    new_item = item_first[np.asarray(store.rows_of["item"])[series]] >= month
    new_pair = np.asarray(store.levels["pair_first"])[np.asarray(store.rows_of["pair"])[series]] >= month
    return leaf_codes(new_item, new_pair, store.forecast_frame()["prev"].to_numpy(np.float64))


def column_of(predictions: pd.DataFrame, frame: pd.DataFrame, name: str, clip: tuple[float, float]) -> np.ndarray:
    """Forecaster ``name``'s values of a prediction set (the previous month's, clipped, for ``baseline``)."""
    if name == "baseline":
        return np.clip(frame["prev"].to_numpy(np.float64), *clip)
    return np.clip(predictions[name].to_numpy(np.float64), *clip)


def calibrated_column(exported: str, chosen: str, columns: Sequence[str]) -> str:
    """The column whose validation residuals calibrate the export: itself, or -- for a champion, whose run's
    validation months are not this run's -- the candidate the validation months chose."""
    return exported if exported in (*columns, "baseline") else chosen


@dataclasses.dataclass(frozen=True)
class Month:
    """One month's rows for the ranges: point forecast, segments, the previous month, truth (None: not known)."""

    point: np.ndarray
    codes: np.ndarray
    prev: np.ndarray
    actual: np.ndarray | None
    shop: np.ndarray


def _month(frame: pd.DataFrame, point: np.ndarray, codes: np.ndarray | None = None) -> Month:
    actual = frame["actual"].to_numpy(np.float64) if "actual" in frame else None
    return Month(point, frame_codes(frame) if codes is None else codes, frame["prev"].to_numpy(np.float64), actual,
                 frame["shop_id"].to_numpy(np.int64))


def calibrate_stage(select_dir: str | Path, store: Any, name: str, levels: Sequence[float],
                    clip: tuple[float, float]) -> tuple[Calibration, list[np.ndarray]]:
    """The calibration from a selection stage's validation predictions, and the residuals behind it."""
    from core.protocol import read_predictions

    frame = store.validation_frame()
    valid = _month(frame, column_of(read_predictions(select_dir, "validation"), frame, name, clip))
    months = sorted(int(m) for m in np.unique(frame["date_block_num"].to_numpy()))
    calibration = calibrate(valid.actual, valid.point, valid.prev, valid.codes, levels, months=months,
                            forecaster=name, clip=clip)
    residual = valid.actual - valid.point
    return calibration, residual_pools(residual, valid.codes, calibration)


def holdout_scores(calibration: Calibration, month: Month, clip: tuple[float, float]) -> dict[str, Any]:
    """The range and the naive range scored on a month with truth, overall and per segment."""
    assert month.actual is not None
    ranges = apply(month.point, month.codes, calibration, clip)
    naive = apply_naive(month.prev, calibration, clip)
    levels = calibration.levels
    return {"range": score(month.actual, ranges, levels), "naive": score(month.actual, naive, levels),
            "segments": segment_scores(month.actual, ranges, naive, month.codes, levels)}


def fan_totals(calibration: Calibration, pools: Sequence[np.ndarray], month: Month, shops: Sequence[int],
               clip: tuple[float, float], seed: int = 0) -> list[dict[str, Any]]:
    """The chain's and each of ``shops``' total: the sum of the P50s, the 10-90 % range of the resampled total
    and (when known) the actual total."""
    groups = np.full(month.point.size, -1, np.int64)
    for index, shop in enumerate(shops):
        groups[month.shop == shop] = index
    by_shop, chain = resampled_totals(month.point, month.codes, pools, groups, len(shops), clip, seed=seed)
    middle = apply(month.point, month.codes, calibration, clip)[:, len(calibration.levels) // 2]
    out = []
    for index, (name, totals) in enumerate([("chain", chain), *((f"shop {s}", t) for s, t in zip(shops, by_shop,
                                                                                                strict=True))]):
        rows = np.ones(month.point.size, bool) if index == 0 else groups == index - 1
        out.append({"group": name, "p50_sum": float(middle[rows].sum()), "low": float(np.quantile(totals, 0.1)),
                    "high": float(np.quantile(totals, 0.9)),
                    "actual": None if month.actual is None else float(month.actual[rows].sum())})
    return out


def biggest_shops(month: Month, count: int = FAN_SHOPS) -> list[int]:
    """The ``count`` shops with the most sales in a month with truth (by forecast when there is none)."""
    values = month.actual if month.actual is not None else month.point
    shops, position = np.unique(month.shop, return_inverse=True)
    totals = np.bincount(position, weights=values)
    return [int(s) for s in shops[np.argsort(-totals, kind="stable")[:count]]]


def range_run(config: Any, windows_dir: str | Path, final_windows_dir: str | Path, run_dir: str | Path,
              exported: str, chosen: str) -> dict[str, Any]:
    """Calibrate the exported forecaster on the validation months, score its range on the holdout month, total
    the holdout's and the forecast month's ranges (the fan chart) and put it all in ``ranges.json``, ``fan.png``
    and a section of ``report.md``. ``chosen`` is the validation months' pick (calibrates a champion export)."""
    from core.lake import FORECAST_FILE, LakePaths
    from core.protocol import read_predictions
    from core.window_store import WindowStore

    clip, run_dir = config.windows.clip, Path(run_dir)
    store, final = WindowStore.open(windows_dir), WindowStore.open(final_windows_dir)
    held = read_predictions(run_dir / "holdout", "holdout")
    name = calibrated_column(exported, chosen, list(held.columns))
    calibration, pools = calibrate_stage(run_dir / "select", store, name, config.export.quantile_levels, clip)
    frame = store.holdout_frame()
    holdout = _month(frame, column_of(held, frame, name, clip))
    forecast = pd.read_parquet(run_dir / FORECAST_FILE)
    later = final.forecast_frame()
    ahead = Month(np.clip(forecast[exported].to_numpy(np.float64), *clip), forecast_codes(final),
                  later["prev"].to_numpy(np.float64), None, later["shop_id"].to_numpy(np.int64))
    shops = biggest_shops(holdout)
    holdout_month, forecast_month = int(store.meta["holdout_month"]), int(final.meta["forecast_month"])
    result = {
        "calibration": calibration.to_dict(), "exported": exported, "holdout_month": holdout_month,
        "forecast_month": forecast_month, "holdout": holdout_scores(calibration, holdout, clip),
        "fan": {"holdout": fan_totals(calibration, pools, holdout, shops, clip),
                "forecast": fan_totals(calibration, pools, ahead, shops, clip)},
    }
    history = shop_history(LakePaths.of(config), shops, holdout_month, clip)
    return result | write_ranges(config, run_dir, result, history)


def shop_history(paths: Any, shops: Sequence[int], before: int, clip: tuple[float, float],
                 months: int = 12) -> pd.DataFrame:
    """``date_block_num, group, actual``: the last ``months`` months' clipped totals of the chain and each shop."""
    from core.aggregate import read_monthly

    monthly = read_monthly(paths)
    monthly = monthly[(monthly["date_block_num"] < before) & (monthly["date_block_num"] >= before - months)]
    value = np.clip(monthly["item_cnt_month"].to_numpy(np.float64), *clip)
    month = monthly["date_block_num"].to_numpy(np.int64)
    chain = pd.DataFrame({"date_block_num": month, "group": "chain", "actual": value})
    shop_id = monthly["shop_id"].to_numpy(np.int64)
    keep = np.isin(shop_id, list(shops))
    by_shop = pd.DataFrame({"date_block_num": month[keep], "group": [f"shop {s}" for s in shop_id[keep]],
                            "actual": value[keep]})
    both = pd.concat([chain, by_shop], ignore_index=True)
    return both.groupby(["date_block_num", "group"], as_index=False)["actual"].sum()


def write_ranges(config: Any, run_dir: Path, result: Mapping[str, Any], history: pd.DataFrame) -> dict[str, Any]:
    """``ranges.json``, ``fan.png`` and the report's section."""
    from core.files import write_bytes_atomic, write_json_atomic
    from core.lake import REPORT_FILE
    from core.report import replace_report_section

    write_json_atomic(run_dir / RANGES_FILE, dict(result))
    plot = write_bytes_atomic(run_dir / FAN_PLOT, plot_fan(result, history, config.ingest.first_month))
    section = ranges_markdown(result, config.ingest.first_month, FAN_PLOT)
    replace_report_section(run_dir / REPORT_FILE, SECTION_KEY, section)
    return {"file": str(run_dir / RANGES_FILE), "plot": str(plot), "markdown": section}


# --- the report's section and the fan chart ------------------------------------------------------------
def _pct(value: float) -> str:
    return f"{value:.1%}"


def score_row(name: str, scores: Mapping[str, Any]) -> list[str]:
    coverage = " / ".join(_pct(v) for v in scores["coverage"].values())
    return [name, f"{scores['rows']:,}", coverage, _pct(scores["interval_coverage"]),
            f"{scores['interval_width']:.3f}", f"{scores['pinball']:.4f}"]


def segment_table_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The holdout month's range per segment, as rows for a table artifact."""
    rows = []
    for row in result["holdout"]["segments"]:
        own, naive = row["range"], row["naive"]
        rows.append({"segment": row["label"], "rows": own["rows"],
                     "interval coverage": round(own["interval_coverage"], 4),
                     "interval width": round(own["interval_width"], 3), "pinball": round(own["pinball"], 4),
                     "naive coverage": round(naive["interval_coverage"], 4),
                     "naive width": round(naive["interval_width"], 3), "naive pinball": round(naive["pinball"], 4)})
    return rows


def ranges_markdown(result: Mapping[str, Any], first_month: str, plot_name: str | None) -> str:
    """The report's section: the method in a line, the holdout month's scores by segment, the fan's totals."""
    from core.lake import forecast_month_label
    from core.report import table

    calibration = Calibration.from_dict(result["calibration"])
    levels = " / ".join(f"P{lv * 100:g}" for lv in calibration.levels)
    interval = interval_text(calibration)
    held = forecast_month_label(result["holdout_month"], first_month)
    ahead = forecast_month_label(result["forecast_month"], first_month)
    calibrated_on = ", ".join(forecast_month_label(m, first_month) for m in calibration.months)
    header = ["range", "rows", f"coverage of {levels}", f"{interval} coverage", f"{interval} width", "pinball"]
    rows = [score_row(f"{row['label']}{suffix}", row[key]) for row in result["holdout"]["segments"]
            for key, suffix in (("range", ""), ("naive", ", naive"))]
    fan = [[f["group"], f"{f['actual']:,.0f}" if f["actual"] is not None else "", f"{f['p50_sum']:,.0f}",
            f"{f['low']:,.0f} – {f['high']:,.0f}", f"{g['p50_sum']:,.0f}", f"{g['low']:,.0f} – {g['high']:,.0f}"]
           for f, g in zip(result["fan"]["holdout"], result["fan"]["forecast"], strict=True)]
    lines = [
        "## Forecast ranges", "",
        f"Quantiles {levels} of the **{result['exported']}** forecast: split-conformal offsets per segment from the "
        f"residuals of the {calibration.forecaster} forecast on the validation month(s) {calibrated_on}; the "
        f"holdout month {held} only scores them{scored_note(result['exported'], calibration.forecaster)}. Naive: "
        "the previous month plus its pooled residual quantiles.",
        "", f"### Holdout month {held}, by segment", "", table(header, rows), "",
        f"### Monthly total: sum of P50, and the 10-90 % range of the total ({FAN_DRAWS} resamples of residuals)",
        "", table(["group", f"actual {held}", f"P50 sum {held}", f"range {held}", f"P50 sum {ahead}",
                   f"range {ahead}"], fan),
    ]
    if plot_name:
        lines += ["", f"![forecast ranges]({plot_name})"]
    return "\n".join(lines) + "\n"


def scored_note(exported: str, forecaster: str) -> str:
    """Said when the scores below are not the export's own (a champion: its run's holdout predictions are not kept)."""
    return "" if exported == forecaster else f" (the {forecaster} forecast's range, calibrated the same way)"


def plot_fan(result: Mapping[str, Any], history: pd.DataFrame, first_month: str) -> bytes:
    """The chain's and the biggest shops' monthly totals: the history, and at the holdout and the forecast month
    the sum of P50 with the 10-90 % range of the total (the holdout's actual beside it)."""
    from core.report import EXPORTED_COLOUR, figure, month_ticks, png

    groups = [f["group"] for f in result["fan"]["holdout"]]
    fig = figure(figsize=(11, 2.6 * len(groups)))
    held, ahead = result["holdout_month"], result["forecast_month"]
    for index, name in enumerate(groups):
        ax = fig.add_subplot(len(groups), 1, index + 1)
        past = history[history["group"] == name].sort_values("date_block_num")
        ax.plot(past["date_block_num"], past["actual"], marker=".", color="#333333", label="actual")
        for month, fan in ((held, result["fan"]["holdout"][index]), (ahead, result["fan"]["forecast"][index])):
            first = month == held
            ax.vlines([month], fan["low"], fan["high"], color=EXPORTED_COLOUR, alpha=0.35, linewidth=10,
                      label="10-90 % of the total" if first else None)
            ax.scatter([month], [fan["p50_sum"]], marker="D", color=EXPORTED_COLOUR, zorder=4,
                       label="sum of P50" if first else None)
            if fan["actual"] is not None:
                ax.scatter([month], [fan["actual"]], color="#333333", zorder=5)
        months = np.unique(np.concatenate([past["date_block_num"].to_numpy(np.int64), [held, ahead]]))
        month_ticks(ax, months, first_month)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        if index == 0:
            ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return png(fig)


# --- the backtest's ranges ----------------------------------------------------------------------------
def holdout_summary(calibration: Calibration, month: Month, clip: tuple[float, float]) -> dict[str, Any]:
    """The flat numbers a backtest row shows: the range's and the naive range's interval coverage, width and
    pinball on the holdout month, and the range's coverage on new-item rows."""
    scored = holdout_scores(calibration, month, clip)
    new_item = next((row["range"] for row in scored["segments"] if row["segment"] == "new_item"), None)
    return {"range_coverage": scored["range"]["interval_coverage"], "range_width": scored["range"]["interval_width"],
            "range_pinball": scored["range"]["pinball"], "naive_coverage": scored["naive"]["interval_coverage"],
            "naive_width": scored["naive"]["interval_width"], "naive_pinball": scored["naive"]["pinball"],
            "new_item_coverage": None if new_item is None else new_item["interval_coverage"],
            "new_item_rows": 0 if new_item is None else new_item["rows"]}


def origin_ranges(config: Any, store: Any, run_dir: str | Path, name: str) -> dict[str, Any]:
    """A backtest origin's ranges: forecaster ``name`` (the gate's pick) calibrated on ``run_dir/select``'s
    validation months and scored on the origin (``run_dir/refit``'s holdout predictions)."""
    from core.protocol import read_predictions

    clip, run_dir = config.windows.clip, Path(run_dir)
    calibration, _ = calibrate_stage(run_dir / "select", store, name, config.export.quantile_levels, clip)
    frame = store.holdout_frame()
    month = _month(frame, column_of(read_predictions(run_dir / "refit", "holdout"), frame, name, clip))
    return {"exported": name} | holdout_summary(calibration, month, clip)
