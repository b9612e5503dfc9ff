"""Step 3: the feature cube, the sample index, the time split, and the batches the model reads.

Storage. The logical cube is ``float32 [series, month, channel]``. Series are every (shop, item) pair
the model is asked about: pairs with sales, ``test.csv`` pairs, and every pair of the Kaggle-style
monthly grids (shops active in a month x items sold in it) used for training and the holdout. Most
grid pairs never sold; storing their rows densely would repeat item/shop-level values millions of
times (about 1.5 GB at full scale). So the cube is stored by level, each a small dense array:

- ``pair_count.npy`` [pairs with sales + 1, month]  raw monthly counts; the all-zero last row serves
  every pair without sales. With ``pair_first.npy`` (month of the pair's first sale) it yields the three
  pair channels at draw time (clip, log, age are cheap on a batch; storing them would triple the
  largest file)
- ``item.npy``     [items, month, 4]
- ``shop.npy``     [shops, month, 1]
- ``shopcat.npy``  [shops * categories, month, 1]
- ``calendar.npy`` [month, 2]

``series.parquet`` maps each series to its row in each level. ``WindowStore.gather`` composes
windows from the levels with fancy indexing; ``WindowStore.cube`` is a read-only view with the
contract's ``[series, month, channel]`` indexing on top of the same arrays.

Semantics. Channel values at month ``t`` use only data of months ``<= t``; a window for target month
``T`` covers months ``T - lookback .. T - 1``. Positions before month 0 are zero in every channel
(zero also means "no sales yet" in every count and age channel, because covariates are scaled by a
factor only, never shifted). The two calendar channels at position ``t`` describe month ``t + 1``, so
the window's last step carries the calendar of the month being predicted. Covariate scale factors
come from months before the holdout month only.

Samples are ``(series_idx, target_month)`` int32 pairs. Training targets run from
``windows.min_train_month`` to ``holdout - 1``; the holdout is the Kaggle-style grid of the holdout
month (default: the last month in the lake); the forecast is ``test.csv``'s pairs with target
``last_month + 1`` -- or, with no ``test.csv``, the grid of the last month (IDs 0..n-1).

Training sample policy (``windows.sample_policy``): ``grid`` (each training month's grid, zeros for
pairs without sales), ``active`` (pairs with a sale in the window or the target month), ``all``
(every series x month). ``grid`` is the default: with a small LSTM at about equal compute
(``benchmarks/prepare.py --compare-policies``), holdout RMSE / previous-period RMSE on the real
slice (origins 26, 27, 28) averaged 0.785 for grid, 0.839 for active (0.72-1.03: it never sees the
zero-history grid pairs the holdout is full of) and 0.868 for all; on demo data (origin 33) 0.773,
0.839 and 0.811.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.aggregate import PARTITION_FILE, merge_shop_ids, read_monthly_table
from core.config import NestcastConfig
from core.errors import DataValidationError
from core.lake import LakePaths, atomic_path, file_sha256, read_json

WINDOWS_VERSION = "1"

# (name, level, scaled). Order is the channel order of every window.
CHANNEL_SPECS: tuple[tuple[str, str, bool], ...] = (
    ("target", "pair", False),  # monthly count clipped to [clip_min, clip_max]; what the model predicts
    ("pair_log_count", "pair", True),  # log1p of the unclipped count: magnitude beyond the clip
    ("pair_age", "pair", True),  # months since the pair's first sale (+1; 0 = never sold yet)
    ("item_total", "item", True),  # the item's units over all shops
    ("item_shops", "item", True),  # number of shops that sold the item
    ("item_price", "item", True),  # log1p price, carried forward from the last month with sales
    ("item_age", "item", True),  # months since the item's first sale anywhere (+1; 0 = not yet)
    ("shop_total", "shop", True),  # the shop's units over all items
    ("shop_category_total", "shopcat", True),  # the shop's units in the item's category
    ("next_month_sin", "calendar", False),  # month of year of month t+1
    ("next_month_cos", "calendar", False),
)
CHANNELS: tuple[str, ...] = tuple(name for name, _, _ in CHANNEL_SPECS)
LEVELS: tuple[str, ...] = ("pair", "item", "shop", "shopcat", "calendar")
STORED_LEVELS: tuple[str, ...] = ("pair_count", "pair_first", "item", "shop", "shopcat", "calendar")
NEVER = 1 << 20  # first-sale month of the pairs without sales
LEVEL_SLICES: dict[str, tuple[int, int]] = {}
for _level in LEVELS:
    _positions = [i for i, (_, lvl, _) in enumerate(CHANNEL_SPECS) if lvl == _level]
    LEVEL_SLICES[_level] = (_positions[0], _positions[-1] + 1)
ROW_COLUMNS = {"pair": "pair_row", "item": "item_row", "shop": "shop_index", "shopcat": "shopcat_row"}


@dataclass
class WindowsSummary:
    """What ``build_windows`` produced; small and JSON-friendly."""

    windows_dir: str
    skipped: bool
    n_series: int
    n_pairs_with_sales: int
    n_channels: int
    lookback: int
    last_month: int
    holdout_month: int
    forecast_month: int
    sample_policy: str
    sample_counts: dict[str, int] = field(default_factory=dict)
    bytes_on_disk: int = 0
    seconds: float = 0.0
    build_hash: str = ""  # identifies the content (inputs + windows settings), not the moment of the build

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- inputs --------------------------------------------------------------------------------------


def _reference(paths: LakePaths, name: str) -> pd.DataFrame | None:
    path = paths.reference / name
    return pq.read_table(path).to_pandas() if path.exists() else None


def _monthly_files(paths: LakePaths) -> list[Path]:
    root = paths.monthly
    if not root.exists():
        return []
    files = [p / PARTITION_FILE for p in root.iterdir() if p.name.startswith("date_block_num=")]
    return sorted((f for f in files if f.exists()), key=lambda f: int(f.parent.name.split("=", 1)[1]))


def _input_hashes(paths: LakePaths) -> dict[str, str]:
    hashes = {f"monthly/{f.parent.name}": file_sha256(f) for f in _monthly_files(paths)}
    for name in ("items.parquet", "item_categories.parquet", "shops.parquet", "test.parquet"):
        path = paths.reference / name
        hashes[f"reference/{name}"] = file_sha256(path) if path.exists() else "absent"
    return hashes


def _build_hash(config: NestcastConfig, holdout: int | None, hashes: dict[str, str]) -> str:
    settings = {
        "version": WINDOWS_VERSION,
        "windows": config.windows.model_dump(mode="json"),
        "holdout_override": holdout,
        "shop_merge_map": {str(k): v for k, v in sorted(config.aggregate.shop_merge_map.items())},
        "first_month": config.ingest.first_month,
        "inputs": hashes,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _month_of_year_start(first_month: str) -> int:
    """0-based calendar month of date_block_num 0 (``"2013-01"`` -> 0)."""
    return int(first_month.split("-")[1]) - 1


def _log1p(values: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(values, np.float32(0.0), dtype=np.float32), dtype=np.float32)


def _rms(nonzero: np.ndarray) -> float:
    scale = float(np.sqrt(np.mean(np.square(nonzero, dtype=np.float64)))) if nonzero.size else 1.0
    return scale if scale > 0 else 1.0


def _log_scale(values: np.ndarray, train_months: int) -> tuple[np.ndarray, float]:
    """log1p, then divide by the root-mean-square of the non-zero training-month values.

    A pure factor keeps zero meaning "nothing" (no sales, not yet sold, before month 0). Using only
    non-zero entries makes the factor independent of how many all-zero rows (series that start
    later) the level array has, so data from later months cannot move it.
    """
    out = _log1p(values)
    train = out[:, :train_months]
    scale = _rms(train[train != 0])
    out /= np.float32(scale)
    return out, scale


def _age_scale(first: np.ndarray, train_months: int, n_months: int) -> float:
    """``_log_scale``'s factor for ages ``t - first + 1`` without building the [rows, months] array.

    A row first seen at ``f < train_months`` has non-zero ages 1 .. train_months - f.
    """
    per_age = np.square(_log1p(np.arange(n_months + 1, dtype=np.float32)), dtype=np.float64)
    cumulative = np.cumsum(per_age)  # cumulative[k] = sum over ages 1..k (age 0 contributes 0)
    spans = train_months - first[first < train_months].astype(np.int64)
    count = int(spans.sum())
    return float(np.sqrt(cumulative[spans].sum() / count)) if count else 1.0


def _pair_channels(
    counts: np.ndarray, first: np.ndarray, months: np.ndarray, clip: tuple[float, float], scales: tuple[float, float]
) -> np.ndarray:
    """The three pair channels from raw counts [n, k] at ``months`` [n, k] and first-sale months [n]."""
    out = np.empty(counts.shape + (3,), dtype=np.float32)
    np.clip(counts, clip[0], clip[1], out=out[..., 0])
    out[..., 1] = _log1p(counts) / np.float32(scales[0])
    age = (months - first[:, None] + 1).astype(np.float32)
    out[..., 2] = _log1p(age) / np.float32(scales[1])
    return out


def _age(first: np.ndarray, n_months: int) -> np.ndarray:
    """Months since ``first`` plus one at each month (0 before ``first``); causal by construction."""
    months = np.arange(n_months, dtype=np.int32)[None, :]
    age = months - first.astype(np.int32)[:, None] + 1
    return np.maximum(age, 0).astype(np.float32)


def _ffill(values: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Carry the last observed value forward along months; 0 before the first observation."""
    n_months = values.shape[1]
    last = np.where(has, np.arange(n_months)[None, :], -1)
    np.maximum.accumulate(last, axis=1, out=last)
    out = np.take_along_axis(values, np.maximum(last, 0), axis=1)
    out[last < 0] = 0.0
    return out


# --- build ---------------------------------------------------------------------------------------


def _resolve_holdout(config: NestcastConfig, holdout_month: int | None, last_month: int) -> int:
    holdout = holdout_month if holdout_month is not None else config.windows.holdout_month
    holdout = last_month if holdout is None else int(holdout)
    if not 1 <= holdout <= last_month + 1:
        raise ValueError(f"holdout month {holdout} outside 1..{last_month + 1} (last month in the lake: {last_month})")
    return holdout


def build_windows(
    config: NestcastConfig,
    holdout_month: int | None = None,
    force: bool = False,
    windows_dir: str | Path | None = None,
) -> WindowsSummary:
    """Build ``lake/windows`` from ``lake/monthly`` (skipped when inputs and settings are unchanged).

    ``holdout_month`` overrides ``config.windows.holdout_month`` (default: the last month in the lake).
    ``holdout_month = last_month + 1`` means "no holdout": every month with data trains, which is
    what a final model for the forecast wants; give it its own ``windows_dir`` (default
    ``lake/windows``) to keep the evaluation build beside it.
    """
    start = time.perf_counter()
    paths = LakePaths(config.data_dir)
    hashes = _input_hashes(paths)
    if not any(k.startswith("monthly/") for k in hashes):
        raise DataValidationError(f"{paths.monthly}: no monthly partitions; run aggregate first")
    build_hash = _build_hash(config, holdout_month, hashes)
    target = Path(windows_dir) if windows_dir is not None else paths.windows
    meta_path = target / "meta.json"
    meta = read_json(meta_path)
    if not force and meta is not None and meta.get("build_hash") == build_hash:
        return _summary(target, meta, skipped=True, seconds=time.perf_counter() - start)

    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        meta = _build_into(tmp, paths, config, holdout_month)
        meta["build_hash"] = build_hash
        meta["input_hashes"] = hashes
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return _summary(target, meta, skipped=False, seconds=time.perf_counter() - start)


def _summary(windows_dir: Path, meta: dict[str, Any], skipped: bool, seconds: float) -> WindowsSummary:
    size = sum(p.stat().st_size for p in windows_dir.iterdir() if p.is_file())
    return WindowsSummary(
        windows_dir=str(windows_dir),
        skipped=skipped,
        n_series=meta["n_series"],
        n_pairs_with_sales=meta["n_pairs_with_sales"],
        n_channels=meta["n_channels"],
        lookback=meta["lookback"],
        last_month=meta["last_month"],
        holdout_month=meta["holdout_month"],
        forecast_month=meta["forecast_month"],
        sample_policy=meta["sample_policy"],
        sample_counts=meta["sample_counts"],
        bytes_on_disk=size,
        seconds=seconds,
        build_hash=str(meta.get("build_hash", "")),
    )


def _write_table(table: pa.Table, path: Path) -> None:
    # lz4: these files are re-read at every training run; speed matters more than size here.
    pq.write_table(table, path, compression="lz4")


def _vocab(*arrays: np.ndarray) -> np.ndarray:
    # pd.unique hashes; sorting only the distinct ids is much cheaper than np.unique on every row.
    parts = [pd.unique(np.asarray(a, dtype=np.int64).ravel()) for a in arrays if a is not None]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _build_into(out_dir: Path, paths: LakePaths, config: NestcastConfig, holdout_month: int | None) -> dict[str, Any]:
    wcfg = config.windows
    table = read_monthly_table(paths)
    monthly = {name: table[name].to_numpy() for name in table.column_names}
    del table
    if monthly["date_block_num"].size == 0:
        raise DataValidationError(f"{paths.monthly}: monthly partitions hold no rows")
    month = monthly["date_block_num"].astype(np.int64)
    last_month = int(month.max())
    n_months = last_month + 1
    holdout = _resolve_holdout(config, holdout_month, last_month)
    forecast_month = last_month + 1
    train_start = max(wcfg.min_train_month, 1)
    train_months = list(range(train_start, holdout))
    if not train_months:
        raise ValueError(f"no training months before holdout {holdout} (min_train_month={wcfg.min_train_month})")

    # Vocabularies. Shops and categories come from the reference tables too, so the embedding sizes
    # do not depend on which months happen to be in the lake.
    items_ref = _reference(paths, "items.parquet")
    shops_ref = _reference(paths, "shops.parquet")
    cats_ref = _reference(paths, "item_categories.parquet")
    test = _reference(paths, "test.parquet")
    if items_ref is None:
        raise DataValidationError(f"{paths.reference / 'items.parquet'}: items reference is missing")
    if test is not None:
        test = test.sort_values("ID", kind="stable").reset_index(drop=True)
        test_shop = merge_shop_ids(test["shop_id"].to_numpy(np.int64), config)
        test_item = test["item_id"].to_numpy(np.int64)
    else:
        test_shop = test_item = np.zeros(0, dtype=np.int64)

    ref_shops = merge_shop_ids(shops_ref["shop_id"].to_numpy(np.int64), config) if shops_ref is not None else None
    shop_ids = _vocab(monthly["shop_id"], test_shop, ref_shops)
    item_ids = _vocab(monthly["item_id"], test_item)
    category_of_item = pd.Series(
        items_ref["item_category_id"].to_numpy(np.int64), index=items_ref["item_id"].to_numpy()
    )
    item_cats = category_of_item.reindex(item_ids).to_numpy()
    if np.isnan(item_cats.astype(np.float64)).any():
        missing = item_ids[np.isnan(item_cats.astype(np.float64))][:10].tolist()
        raise DataValidationError(f"item ids missing from lake/reference/items.parquet: {missing}")
    item_cats = item_cats.astype(np.int64)
    ref_cats = cats_ref["item_category_id"].to_numpy() if cats_ref is not None else None
    category_ids = _vocab(items_ref["item_category_id"].to_numpy(), ref_cats)
    n_shops, n_items, n_cats = shop_ids.size, item_ids.size, category_ids.size
    item_cat_index = np.searchsorted(category_ids, item_cats)

    si = np.searchsorted(shop_ids, monthly["shop_id"].astype(np.int64))
    ii = np.searchsorted(item_ids, monthly["item_id"].astype(np.int64))
    cnt = monthly["item_cnt_month"].astype(np.float32)
    cnt_pos = np.maximum(cnt, 0.0)
    tshop = np.searchsorted(shop_ids, test_shop)
    titem = np.searchsorted(item_ids, test_item)

    # Kaggle-style grid of a month: shops with sales that month x items with sales that month.
    shop_active = np.zeros((n_months, n_shops), dtype=bool)
    shop_active[month, si] = True
    has_item_t = np.zeros((n_months, n_items), dtype=bool)
    has_item_t[month, ii] = True
    month_shops = {m: np.flatnonzero(shop_active[m]) for m in range(n_months)}
    month_items = {m: np.flatnonzero(has_item_t[m]) for m in range(n_months)}

    grid_months = sorted(set(train_months) | ({holdout} if holdout <= last_month else set()))
    if test is None:
        grid_months = sorted(set(grid_months) | {last_month})
    mask = np.zeros((n_shops, n_items), dtype=bool)
    mask[si, ii] = True
    mask[tshop, titem] = True
    for m in grid_months:
        mask[np.ix_(month_shops[m], month_items[m])] = True
    series_shop, series_item = np.nonzero(mask)  # row-major: sorted by (shop_id, item_id)
    n_series = series_shop.size
    pair_table = np.full((n_shops, n_items), -1, dtype=np.int32)
    pair_table[series_shop, series_item] = np.arange(n_series, dtype=np.int32)
    del mask

    # Pair level: only pairs with sales get a row; the extra last row is all zeros.
    row_series = pair_table[si, ii]
    sold_series, prow = np.unique(row_series, return_inverse=True)
    n_pairs = sold_series.size
    pair_row = np.full(n_series, n_pairs, dtype=np.int32)
    pair_row[sold_series] = np.arange(n_pairs, dtype=np.int32)
    counts = np.zeros((n_pairs, n_months), dtype=np.float32)
    counts[prow, month] = cnt
    has_pair = np.zeros((n_pairs, n_months), dtype=bool)
    has_pair[prow, month] = True
    pair_first = has_pair.argmax(axis=1)

    scales: dict[str, float] = {}
    levels: dict[str, np.ndarray] = {}
    # Zero row last; its "first sale" lies beyond any month so its age stays 0.
    levels["pair_count"] = np.concatenate([counts, np.zeros((1, n_months), dtype=np.float32)])
    levels["pair_first"] = np.append(pair_first, NEVER).astype(np.int32)
    positive = (cnt > 0) & (month < holdout)
    scales["pair_log_count"] = _rms(_log1p(cnt[positive]))
    scales["pair_age"] = _age_scale(pair_first, holdout, n_months)
    clip = (wcfg.target_clip_min, wcfg.target_clip_max)

    flat_item = ii * n_months + month
    size = n_items * n_months
    item_total = np.bincount(flat_item, weights=cnt_pos, minlength=size).reshape(n_items, n_months)
    item_shops = np.bincount(flat_item, weights=(cnt > 0), minlength=size).reshape(n_items, n_months)
    transactions = monthly["transactions"].astype(np.float64)
    price_weight = np.bincount(flat_item, weights=transactions, minlength=size).reshape(n_items, n_months)
    price_sum = np.bincount(
        flat_item, weights=monthly["mean_price"].astype(np.float64) * transactions, minlength=size
    ).reshape(n_items, n_months)
    has_price = price_weight > 0
    price = _ffill(np.divide(price_sum, price_weight, out=np.zeros_like(price_sum), where=has_price), has_price)
    has_item = has_item_t.T
    item_first = np.where(has_item.any(axis=1), has_item.argmax(axis=1), n_months)
    item = np.empty((n_items, n_months, 4), dtype=np.float32)
    item[..., 0], scales["item_total"] = _log_scale(item_total.astype(np.float32), holdout)
    item[..., 1], scales["item_shops"] = _log_scale(item_shops.astype(np.float32), holdout)
    item[..., 2], scales["item_price"] = _log_scale(price.astype(np.float32), holdout)
    item[..., 3], scales["item_age"] = _log_scale(_age(item_first, n_months), holdout)
    levels["item"] = item
    del item_total, item_shops, price_weight, price_sum, price

    shop_total = np.bincount(si * n_months + month, weights=cnt_pos, minlength=n_shops * n_months)
    levels["shop"] = np.empty((n_shops, n_months, 1), dtype=np.float32)
    levels["shop"][..., 0], scales["shop_total"] = _log_scale(
        shop_total.reshape(n_shops, n_months).astype(np.float32), holdout
    )
    shopcat_flat = (si * n_cats + item_cat_index[ii]) * n_months + month
    shopcat = np.bincount(shopcat_flat, weights=cnt_pos, minlength=n_shops * n_cats * n_months)
    levels["shopcat"] = np.empty((n_shops * n_cats, n_months, 1), dtype=np.float32)
    levels["shopcat"][..., 0], scales["shop_category_total"] = _log_scale(
        shopcat.reshape(n_shops * n_cats, n_months).astype(np.float32), holdout
    )

    moy_next = (_month_of_year_start(config.ingest.first_month) + np.arange(1, n_months + 1)) % 12
    angle = 2.0 * np.pi * moy_next / 12.0
    levels["calendar"] = np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)

    for name, array in levels.items():
        np.save(out_dir / f"{name}.npy", np.ascontiguousarray(array))

    series_cat_index = item_cat_index[series_item]
    series_shop_id = shop_ids[series_shop].astype(np.int16)
    series_item_id = item_ids[series_item].astype(np.int32)
    series_cat_id = category_ids[series_cat_index].astype(np.int16)
    series = pa.table(
        {
            "series_idx": np.arange(n_series, dtype=np.int32),
            "shop_id": series_shop_id,
            "item_id": series_item_id,
            "item_category_id": series_cat_id,
            "shop_index": series_shop.astype(np.int32),
            "category_index": series_cat_index.astype(np.int32),
            "pair_row": pair_row,
            "item_row": series_item.astype(np.int32),
            "shopcat_row": (series_shop * n_cats + series_cat_index).astype(np.int32),
        }
    )
    _write_table(series, out_dir / "series.parquet")

    # Training samples.
    policy = wcfg.sample_policy
    if policy == "grid":
        parts = [(pair_table[np.ix_(month_shops[m], month_items[m])].ravel(), m) for m in train_months]
    elif policy == "active":
        # Any sale in months T-lookback .. T, from a running count of months with sales.
        running = np.zeros((n_pairs, n_months + 1), dtype=np.int32)
        np.cumsum(has_pair, axis=1, out=running[:, 1:])
        parts = []
        for m in train_months:
            active = running[:, m + 1] - running[:, max(m - wcfg.lookback, 0)] > 0
            parts.append((sold_series[active].astype(np.int32), m))
    else:
        parts = [(np.arange(n_series, dtype=np.int32), m) for m in train_months]
    train_index = np.concatenate(
        [np.stack([s.astype(np.int32), np.full(s.size, m, dtype=np.int32)], axis=1) for s, m in parts]
    )
    np.save(out_dir / "train_index.npy", train_index)

    def clipped(series_idx: np.ndarray, m: int) -> np.ndarray:
        if not 0 <= m < n_months:
            return np.zeros(series_idx.size, np.float32)
        return np.clip(levels["pair_count"][pair_row[series_idx], m], *clip).astype(np.float32)

    def mean3(series_idx: np.ndarray, m: int) -> np.ndarray:
        months = [k for k in (m - 3, m - 2, m - 1) if k >= 0]
        return np.mean([clipped(series_idx, k) for k in months], axis=0).astype(np.float32)

    # Holdout: the Kaggle-style grid of the holdout month.
    if holdout <= last_month:
        hs = pair_table[np.ix_(month_shops[holdout], month_items[holdout])].ravel()
        hs.sort()
    else:
        hs = np.zeros(0, dtype=np.int32)
    holdout_frame = pa.table(
        {
            "series_idx": hs.astype(np.int32),
            "shop_id": series_shop_id[hs],
            "item_id": series_item_id[hs],
            "item_category_id": series_cat_id[hs],
            "actual": clipped(hs, holdout),
            "prev": clipped(hs, holdout - 1),
            "mean3": mean3(hs, holdout) if hs.size else np.zeros(0, np.float32),
            "new_item": item_first[series_item[hs]] >= holdout,
            "new_pair": np.where(pair_row[hs] < n_pairs, pair_first[np.minimum(pair_row[hs], n_pairs - 1)], n_months)
            >= holdout,
        }
    )
    _write_table(holdout_frame, out_dir / "holdout.parquet")
    np.save(out_dir / "holdout_index.npy", np.stack([hs.astype(np.int32), np.full(hs.size, holdout, np.int32)], 1))

    # Forecast: test.csv pairs (or, with no test.csv, the grid of the last month), target = last + 1.
    if test is not None:
        fs = pair_table[tshop, titem]
        ids = test["ID"].to_numpy(np.int32)
    else:
        fs = np.sort(pair_table[np.ix_(month_shops[last_month], month_items[last_month])].ravel())
        ids = np.arange(fs.size, dtype=np.int32)
    forecast_frame = pa.table(
        {
            "ID": ids,
            "series_idx": fs.astype(np.int32),
            "shop_id": series_shop_id[fs],
            "item_id": series_item_id[fs],
            "item_category_id": series_cat_id[fs],
            "prev": clipped(fs, last_month),
            "mean3": mean3(fs, forecast_month),
        }
    )
    _write_table(forecast_frame, out_dir / "forecast.parquet")
    np.save(
        out_dir / "forecast_index.npy",
        np.stack([fs.astype(np.int32), np.full(fs.size, forecast_month, np.int32)], 1),
    )

    return {
        "version": WINDOWS_VERSION,
        "channels": list(CHANNELS),
        "channel_levels": {name: level for name, level, _ in CHANNEL_SPECS},
        "n_channels": len(CHANNELS),
        "lookback": wcfg.lookback,
        "first_month": 0,
        "first_calendar_month": config.ingest.first_month,
        "last_month": last_month,
        "n_months": n_months,
        "holdout_month": holdout,
        "has_holdout": holdout <= last_month,
        "forecast_month": forecast_month,
        "train_months": train_months,
        "target_clip": [wcfg.target_clip_min, wcfg.target_clip_max],
        "scaling": {
            "method": "log1p(x) / rms of non-zero log1p values over months < holdout_month",
            "stats_months": [0, holdout - 1],
            "scale": scales,
        },
        "n_series": int(n_series),
        "n_pairs_with_sales": int(n_pairs),
        "n_items": int(n_items),
        "n_shops": int(n_shops),
        "n_categories": int(n_cats),
        "shop_ids": shop_ids.tolist(),
        "category_ids": category_ids.tolist(),
        "sample_policy": policy,
        "sample_counts": {
            "train": int(train_index.shape[0]),
            "holdout": int(hs.size),
            "forecast": int(fs.size),
        },
        "forecast_source": "test.parquet" if test is not None else f"grid of month {last_month}",
    }


# --- reading -------------------------------------------------------------------------------------


class CubeView:
    """The logical ``[series, month, channel]`` cube over the level arrays.

    Indexing follows numpy on the dense cube (``cube[s]``, ``cube[s, m]``, ``cube[s_array, m_array]``,
    ``cube[:, 5, 0]``...); only the series that are asked for are composed, so a row costs
    ``months * channels`` floats however large the cube is.
    """

    def __init__(self, store: WindowStore) -> None:
        self._store = store
        self.shape = (store.n_series, store.n_months, store.n_channels)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        rows = np.arange(self.shape[0])[key[0]]
        unique, inverse = np.unique(rows, return_inverse=True)
        dense = self._store.rows(unique)
        return dense[(inverse.reshape(np.shape(rows)),) + tuple(key[1:])]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = self._store.rows(np.arange(self.shape[0]))
        return dense if dtype is None else dense.astype(dtype)


class WindowStore:
    """Read access to ``lake/windows``: metadata, series, windows by index, datasets, frames."""

    def __init__(self, windows_dir: Path) -> None:
        self.dir = Path(windows_dir)
        self.meta: dict[str, Any] = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))
        self.series: pd.DataFrame = pq.read_table(self.dir / "series.parquet").to_pandas()
        self.lookback: int = int(self.meta["lookback"])
        self.n_months: int = int(self.meta["n_months"])
        self.n_channels: int = int(self.meta["n_channels"])
        self.n_series: int = int(self.meta["n_series"])
        self.channels: list[str] = list(self.meta["channels"])
        self.holdout_month: int = int(self.meta["holdout_month"])
        self.forecast_month: int = int(self.meta["forecast_month"])
        # The pair counts are the only large array: memory-map them; the rest is small enough to load.
        self.levels: dict[str, np.ndarray] = {
            name: np.load(self.dir / f"{name}.npy", mmap_mode="r" if name == "pair_count" else None)
            for name in STORED_LEVELS
        }
        scale = self.meta["scaling"]["scale"]
        self._pair_scales = (float(scale["pair_log_count"]), float(scale["pair_age"]))
        self._clip = (float(self.meta["target_clip"][0]), float(self.meta["target_clip"][1]))
        self.rows_of: dict[str, np.ndarray] = {
            level: self.series[column].to_numpy(np.int64) for level, column in ROW_COLUMNS.items()
        }
        self.shop_index: np.ndarray = self.series["shop_index"].to_numpy(np.int32)
        self.category_index: np.ndarray = self.series["category_index"].to_numpy(np.int32)
        self.train_index: np.ndarray = np.load(self.dir / "train_index.npy")
        self.holdout_index: np.ndarray = np.load(self.dir / "holdout_index.npy")
        self.forecast_index: np.ndarray = np.load(self.dir / "forecast_index.npy")
        # Read now, not on demand: a rebuild swaps the directory, and a store must stay one snapshot.
        self._holdout_frame = pq.read_table(self.dir / "holdout.parquet").to_pandas()
        self._forecast_frame = pq.read_table(self.dir / "forecast.parquet").to_pandas()
        self.cube = CubeView(self)

    @classmethod
    def open(cls, windows_dir: str | Path) -> WindowStore:
        return cls(Path(windows_dir))

    # Windows -------------------------------------------------------------------------------------
    def _compose(self, series_idx: np.ndarray, months: np.ndarray) -> np.ndarray:
        """Values at ``months`` ([n, k], each in 0..n_months-1) for ``series_idx`` ([n]) -> [n, k, C]."""
        out = np.empty(months.shape + (self.n_channels,), dtype=np.float32)
        for level in LEVELS:
            lo, hi = LEVEL_SLICES[level]
            if level == "calendar":
                out[..., lo:hi] = self.levels["calendar"][months]
            elif level == "pair":
                rows = self.rows_of["pair"][series_idx]
                counts = self.levels["pair_count"][rows[:, None], months]
                first = self.levels["pair_first"][rows]
                out[..., lo:hi] = _pair_channels(counts, first, months, self._clip, self._pair_scales)
            else:
                out[..., lo:hi] = self.levels[level][self.rows_of[level][series_idx][:, None], months]
        return out

    def rows(self, series_idx: np.ndarray) -> np.ndarray:
        """Whole cube rows ``[n, n_months, C]`` for the given series."""
        series_idx = np.asarray(series_idx, dtype=np.int64).ravel()
        months = np.broadcast_to(np.arange(self.n_months), (series_idx.size, self.n_months))
        return self._compose(series_idx, months)

    def gather(self, series_idx: np.ndarray, target_month: np.ndarray) -> np.ndarray:
        """Windows ``[n, lookback, C]`` over months ``T - lookback .. T - 1`` for each (series, T).

        Positions before month 0 are zeros. ``T`` may be at most ``n_months`` (the forecast month).
        """
        series_idx = np.asarray(series_idx, dtype=np.int64).ravel()
        target = np.asarray(target_month, dtype=np.int64).ravel()
        if target.size and (target.max() > self.n_months or target.min() < 0):
            raise ValueError(f"target months must lie in 0..{self.n_months}")
        months = target[:, None] + np.arange(-self.lookback, 0)[None, :]
        before = months < 0
        out = self._compose(series_idx, np.maximum(months, 0))
        if before.any():
            out[before] = 0.0
        return out

    def targets(self, series_idx: np.ndarray, target_month: np.ndarray) -> np.ndarray:
        """Clipped counts ``[n]`` of each series in its target month (must hold data)."""
        series_idx = np.asarray(series_idx, dtype=np.int64).ravel()
        target = np.asarray(target_month, dtype=np.int64).ravel()
        if target.size and target.max() >= self.n_months:
            raise ValueError("targets exist only for months with data")
        counts = self.levels["pair_count"][self.rows_of["pair"][series_idx], target]
        return np.clip(counts, *self._clip).astype(np.float32)

    def inputs(self, series_idx: np.ndarray, target_month: np.ndarray) -> dict[str, np.ndarray]:
        """The model's input dict for a batch of samples."""
        series_idx = np.asarray(series_idx, dtype=np.int64).ravel()
        return {
            "sequence": self.gather(series_idx, target_month),
            "shop": self.shop_index[series_idx],
            "category": self.category_index[series_idx],
        }

    # Datasets ------------------------------------------------------------------------------------
    def train_dataset(
        self, batch_size: int, seed: int = 0, shuffle: bool = True, max_samples: int | None = None, **kwargs: Any
    ) -> Any:
        """Training batches (``keras.utils.PyDataset``), reshuffled every epoch from ``seed``.

        ``max_samples`` keeps a seeded random subset. ``kwargs`` go to ``PyDataset`` (workers...).
        """
        index = self.train_index
        if max_samples is not None and max_samples < index.shape[0]:
            keep = np.sort(np.random.default_rng(seed).choice(index.shape[0], size=max_samples, replace=False))
            index = index[keep]
        return _dataset_class()(self, index, batch_size, with_y=True, shuffle=shuffle, seed=seed, **kwargs)

    def holdout_dataset(self, batch_size: int, **kwargs: Any) -> Any:
        """Holdout batches with targets, in ``holdout_frame()`` order."""
        return _dataset_class()(self, self.holdout_index, batch_size, with_y=True, shuffle=False, **kwargs)

    def forecast_dataset(self, batch_size: int, **kwargs: Any) -> Any:
        """Forecast batches (inputs only), in ``forecast_frame()`` order."""
        return _dataset_class()(self, self.forecast_index, batch_size, with_y=False, shuffle=False, **kwargs)

    # Frames --------------------------------------------------------------------------------------
    def holdout_frame(self) -> pd.DataFrame:
        """One row per holdout-grid pair: ids, ``actual``, baselines ``prev`` and ``mean3``, segments."""
        return self._holdout_frame.copy()

    def forecast_frame(self) -> pd.DataFrame:
        """One row per test.csv row (ID order): ids, ``series_idx``, baselines ``prev`` and ``mean3``."""
        return self._forecast_frame.copy()


@functools.cache
def _dataset_class() -> type:
    """Defined on first use so that building the cube does not import TensorFlow."""
    import keras

    class WindowDataset(keras.utils.PyDataset):
        """Batches of windows cut from a ``WindowStore`` at draw time (nothing is pre-materialised)."""

        def __init__(
            self,
            store: WindowStore,
            index: np.ndarray,
            batch_size: int,
            with_y: bool,
            shuffle: bool,
            seed: int = 0,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            if batch_size < 1:
                raise ValueError("batch_size must be >= 1")
            self.store = store
            self.index = np.asarray(index, dtype=np.int32).reshape(-1, 2)
            self.batch_size = int(batch_size)
            self.with_y = with_y
            self.shuffle = shuffle
            self.seed = seed
            self.epoch = 0
            self._order = self._permutation()

        def _permutation(self) -> np.ndarray:
            n = self.index.shape[0]
            if not self.shuffle:
                return np.arange(n)
            return np.random.default_rng([self.seed, self.epoch]).permutation(n)

        def __len__(self) -> int:
            return math.ceil(self.index.shape[0] / self.batch_size)

        def __getitem__(self, i: int) -> Any:
            if not 0 <= i < len(self):
                raise IndexError(i)
            rows = self.index[self._order[i * self.batch_size : (i + 1) * self.batch_size]]
            inputs = self.store.inputs(rows[:, 0], rows[:, 1])
            if not self.with_y:
                return (inputs,)
            return inputs, self.store.targets(rows[:, 0], rows[:, 1])

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._order = self._permutation()

    return WindowDataset
