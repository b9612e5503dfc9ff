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

``series.parquet`` maps each series to its row in each level. ``core.window_store.WindowStore.gather`` composes
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
``last_month + 1`` -- or, with no ``test.csv``, the universe of pairs (``universe_pairs``, stable ``pair_id`` IDs).

Training sample policy (``windows.sample_policy``): ``grid`` (each training month's grid, zeros for
pairs without sales), ``active`` (pairs with a sale in the window or the target month), ``all``
(every series x month). ``grid`` is the default: with a small LSTM at about equal compute
(``benchmarks/prepare.py --compare-policies``), holdout RMSE / previous-period RMSE on the real
slice (origins 26, 27, 28) averaged 0.785 for grid, 0.839 for active (0.72-1.03: it never sees the
zero-history grid pairs the holdout is full of) and 0.868 for all; on demo data (origin 33) 0.773,
0.839 and 0.811.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.aggregate import merge_shop_ids, read_monthly_table
from core.config import NestcastConfig, WindowsConfig
from core.errors import DataValidationError
from core.features import NEVER
from core.files import atomic_path, file_sha256, read_json, recorded_file_problems
from core.lake import WINDOWS_META_FILE, LakePaths

STORE_FILES = "files"  # in meta.json: file name -> sha256 of every array and table of the store
#: 2: grid masks, validation month; 3: target-encoded means; 4: item name families; 5: universe; 6: validation months
WINDOWS_VERSION = "6"

# (name, level, scaled). Order is the channel order of every window.
CHANNEL_SPECS: tuple[tuple[str, str, bool], ...] = (
    ("target", "pair", False),  # monthly count clipped to [clip_min, clip_max]; what the model predicts
    ("pair_log_count", "pair", True),  # log1p of the unclipped count: magnitude beyond the clip
    ("pair_age", "pair", True),  # months since the pair's first sale (+1; 0 = never sold yet)
    ("item_total", "item", True),  # the item's units over all shops
    ("item_shops", "item", True),  # number of shops that sold the item
    ("item_price", "item", True),  # log1p price, carried forward from the last month with sales
    ("item_age", "item", True),  # months since the item's first sale anywhere (+1; 0 = not yet)
    # The "mean" channels are the target encodings gradient-boosted models win this competition with:
    # the clipped target summed over a group and divided by the group's cells in that month's grid.
    ("item_mean", "item", True),  # per grid shop
    ("category_mean", "item", True),  # the item's category, per grid cell of the category
    ("shop_total", "shop", True),  # the shop's units over all items
    ("shop_mean", "shop", True),  # per grid item
    ("shop_category_total", "shopcat", True),  # the shop's units in the item's category
    ("shop_category_mean", "shopcat", True),  # per grid item of the category
    ("next_month_sin", "calendar", False),  # month of year of month t+1
    ("next_month_cos", "calendar", False),
)
CHANNELS: tuple[str, ...] = tuple(name for name, _, _ in CHANNEL_SPECS)
LEVELS: tuple[str, ...] = ("pair", "item", "shop", "shopcat", "calendar")
STORED_LEVELS: tuple[str, ...] = ("pair_count", "pair_first", "item", "shop", "shopcat", "calendar")
#: Kaggle-grid membership by month: [n_months, n_shops] and [n_months, n_items] booleans.
GRID_ARRAYS: tuple[str, ...] = ("grid_shops", "grid_items")

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
    validation_months: list[int] = field(default_factory=list)
    sample_counts: dict[str, int] = field(default_factory=dict)
    bytes_on_disk: int = 0
    seconds: float = 0.0
    build_hash: str = ""  # identifies the content (inputs + windows settings), not the moment of the build

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- inputs --------------------------------------------------------------------------------------


def _reference(paths: LakePaths, name: str) -> pd.DataFrame | None:
    path = paths.reference_table(name)
    return pq.read_table(path).to_pandas() if path.exists() else None


def _monthly_files(paths: LakePaths) -> list[Path]:
    return [f for f in map(paths.monthly_file, paths.monthly_months()) if f.exists()]


def _input_hashes(paths: LakePaths) -> dict[str, str]:
    hashes = {f"monthly/{f.parent.name}": file_sha256(f) for f in _monthly_files(paths)}
    for name in ("items.parquet", "item_categories.parquet", "shops.parquet", "test.parquet"):
        path = paths.reference_table(name)
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


def pair_channels(
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
    paths = LakePaths.of(config)
    hashes = _input_hashes(paths)
    if not any(k.startswith("monthly/") for k in hashes):
        raise DataValidationError(f"{paths.monthly}: no monthly partitions; run aggregate first")
    build_hash = _build_hash(config, holdout_month, hashes)
    target = Path(windows_dir) if windows_dir is not None else paths.windows
    meta_path = target / WINDOWS_META_FILE
    meta = read_json(meta_path)
    if not force and meta is not None and meta.get("build_hash") == build_hash and not store_problems(target):
        return _summary(target, meta, skipped=True, seconds=time.perf_counter() - start)

    build = _build(paths, config, holdout_month, provenance={"build_hash": build_hash, "input_hashes": hashes})
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        _write_build(build, tmp)
    return _summary(target, build.meta, skipped=False, seconds=time.perf_counter() - start)


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
        validation_months=list(meta.get("validation_months") or []),
        forecast_month=meta["forecast_month"],
        sample_policy=meta["sample_policy"],
        sample_counts=meta["sample_counts"],
        bytes_on_disk=size,
        seconds=seconds,
        build_hash=str(meta.get("build_hash", "")),
    )


def _vocab(*arrays: np.ndarray) -> np.ndarray:
    # pd.unique hashes; sorting only the distinct ids is much cheaper than np.unique on every row.
    parts = [pd.unique(np.asarray(a, dtype=np.int64).ravel()) for a in arrays if a is not None]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _name_family(name: str, words: int = 2) -> str:
    """The first ``words`` words of an item name, lower-cased, letters and digits only ("FIFA 15 [PS4]": "fifa 15")."""
    tokens = "".join(c if c.isalnum() else " " for c in str(name).lower()).split()
    return " ".join(tokens[:words])


def _item_families(items_ref: pd.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    """A family index per vocabulary item: items whose names start with the same two words (editions, formats,
    sequels) share one, so a launch can be read from its family's past sales."""
    if "item_name" not in items_ref.columns:
        return np.arange(item_ids.size, dtype=np.int32)
    names = pd.Series(items_ref["item_name"].to_numpy(), index=items_ref["item_id"].to_numpy()).reindex(item_ids)
    families = names.fillna("").map(_name_family).to_numpy()
    return pd.factorize(families)[0].astype(np.int32)


def _grid_means(
    clipped: np.ndarray,
    shop: np.ndarray,
    item: np.ndarray,
    item_category: np.ndarray,
    month: np.ndarray,
    shop_active: np.ndarray,
    item_active: np.ndarray,
    n_categories: int,
) -> dict[str, np.ndarray]:
    """Monthly target encodings ``[group rows, months]``: clipped counts per grid cell of each group.

    A month's grid is its active shops x its active items; a group's cells are the grid cells it covers
    (an item: every active shop; a category: active shops x its active items; a shop: every active item;
    a shop x category: the category's active items). Month ``t`` uses month ``t``'s rows only.
    """
    n_months, n_shops = shop_active.shape
    n_items = item_active.shape[1]
    shops_per_month = shop_active.sum(axis=1).astype(np.float64)  # [months]
    items_per_month = item_active.sum(axis=1).astype(np.float64)
    category_items = np.stack([np.bincount(item_category, weights=row, minlength=n_categories) for row in item_active])
    weights = clipped.astype(np.float64)
    category = item_category[item]

    def total(keys: np.ndarray, size: int) -> np.ndarray:
        return np.bincount(keys * n_months + month, weights=weights, minlength=size * n_months).reshape(size, n_months)

    def per_cell(sums: np.ndarray, cells: np.ndarray) -> np.ndarray:
        return np.divide(sums, cells, out=np.zeros_like(sums), where=cells > 0).astype(np.float32)

    return {
        "item": per_cell(total(item, n_items), shops_per_month[None, :]),
        "category": per_cell(total(category, n_categories), (category_items * shops_per_month[:, None]).T),
        "shop": per_cell(total(shop, n_shops), items_per_month[None, :]),
        "shopcat": per_cell(total(shop * n_categories + category, n_shops * n_categories),
                            np.tile(category_items.T, (n_shops, 1))),  # fmt: skip
    }


# --- build stages --------------------------------------------------------------------------------
# Each stage is a function of the lake and of earlier stages' frozen results and writes nothing: the
# whole build is computed (and can fail) before ``_write_build`` puts it, all at once, into the directory.


@dataclass(frozen=True)
class _References:
    items: pd.DataFrame
    shops: pd.DataFrame | None
    categories: pd.DataFrame | None
    test: pd.DataFrame | None  # in ID order


def _read_monthly(paths: LakePaths) -> dict[str, np.ndarray]:
    table = read_monthly_table(paths)
    monthly = {name: table[name].to_numpy() for name in table.column_names}
    if monthly["date_block_num"].size == 0:
        raise DataValidationError(f"{paths.monthly}: monthly partitions hold no rows")
    return monthly


def _read_references(paths: LakePaths) -> _References:
    items = _reference(paths, "items.parquet")
    if items is None:
        raise DataValidationError(f"{paths.reference_table('items')}: items reference is missing")
    test = _reference(paths, "test.parquet")
    if test is not None:
        test = test.sort_values("ID", kind="stable").reset_index(drop=True)
    return _References(items, _reference(paths, "shops.parquet"), _reference(paths, "item_categories.parquet"), test)


@dataclass(frozen=True)
class _Timeline:
    last_month: int
    holdout: int
    train_months: tuple[int, ...]  # target months of the training samples; never empty
    n_validation: int = 2  # months before the holdout that choose (windows.validation_months)

    @property
    def n_months(self) -> int:
        return self.last_month + 1

    @property
    def forecast_month(self) -> int:
        return self.last_month + 1

    @property
    def validation(self) -> tuple[int, ...]:
        # The months before the holdout pick epochs, boosting rounds, blend weights and the gate, and are
        # trained on only by the refit (core.protocol): several, so that one odd month cannot swing a choice.
        months = range(self.holdout - self.n_validation, self.holdout)
        return tuple(m for m in months if m >= self.train_months[0])

    @property
    def has_holdout(self) -> bool:
        return self.holdout <= self.last_month


def _timeline(config: NestcastConfig, holdout_month: int | None, month: np.ndarray) -> _Timeline:
    last_month = int(month.max())
    holdout = _resolve_holdout(config, holdout_month, last_month)
    first_train = config.windows.min_train_month
    train_months = tuple(range(max(first_train, 1), holdout))
    if not train_months:
        raise ValueError(f"no training months before holdout {holdout} (min_train_month={first_train})")
    return _Timeline(last_month, holdout, train_months, config.windows.validation_months)


@dataclass(frozen=True)
class _Vocabularies:
    """Sorted id vocabularies; everywhere else a shop, item or category is its position in these."""

    shop_ids: np.ndarray
    item_ids: np.ndarray
    category_ids: np.ndarray
    item_category: np.ndarray  # [items] category index
    item_family: np.ndarray  # [items] name-family index
    test_shop: np.ndarray  # [test rows] shop index, in ID order
    test_item: np.ndarray


def _vocabularies(monthly: dict[str, np.ndarray], refs: _References, config: NestcastConfig) -> _Vocabularies:
    # Shops and categories come from the reference tables too, so the embedding sizes do not depend on
    # which months happen to be in the lake.
    no_test = np.zeros(0, dtype=np.int64)
    test_shop = merge_shop_ids(refs.test["shop_id"].to_numpy(np.int64), config) if refs.test is not None else no_test
    test_item = refs.test["item_id"].to_numpy(np.int64) if refs.test is not None else no_test
    ref_shops = merge_shop_ids(refs.shops["shop_id"].to_numpy(np.int64), config) if refs.shops is not None else None
    shop_ids = _vocab(monthly["shop_id"], test_shop, ref_shops)
    item_ids = _vocab(monthly["item_id"], test_item)
    item_category_ids = _item_category_ids(refs.items, item_ids)
    ref_categories = refs.categories["item_category_id"].to_numpy() if refs.categories is not None else None
    category_ids = _vocab(refs.items["item_category_id"].to_numpy(), ref_categories)
    return _Vocabularies(
        shop_ids=shop_ids,
        item_ids=item_ids,
        category_ids=category_ids,
        item_category=np.searchsorted(category_ids, item_category_ids),
        item_family=_item_families(refs.items, item_ids),
        test_shop=np.searchsorted(shop_ids, test_shop),
        test_item=np.searchsorted(item_ids, test_item),
    )


def _item_category_ids(items_ref: pd.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    category_of = pd.Series(items_ref["item_category_id"].to_numpy(np.int64), index=items_ref["item_id"].to_numpy())
    categories = category_of.reindex(item_ids).to_numpy()
    missing = np.isnan(categories.astype(np.float64))
    if missing.any():
        unknown = item_ids[missing][:10].tolist()
        raise DataValidationError(f"item ids missing from lake/reference/items.parquet: {unknown}")
    return categories.astype(np.int64)


@dataclass(frozen=True)
class _Sales:
    """The monthly rows with shops and items as vocabulary indexes."""

    month: np.ndarray
    shop: np.ndarray
    item: np.ndarray
    count: np.ndarray  # float32; negative where returns exceed sales
    transactions: np.ndarray
    mean_price: np.ndarray

    @property
    def sold(self) -> np.ndarray:
        # Totals count units sold: a shop's returns must not cancel another shop's sales.
        return np.maximum(self.count, 0.0)


def _sales(monthly: dict[str, np.ndarray], vocab: _Vocabularies) -> _Sales:
    return _Sales(
        month=monthly["date_block_num"].astype(np.int64),
        shop=np.searchsorted(vocab.shop_ids, monthly["shop_id"].astype(np.int64)),
        item=np.searchsorted(vocab.item_ids, monthly["item_id"].astype(np.int64)),
        count=monthly["item_cnt_month"].astype(np.float32),
        transactions=monthly["transactions"].astype(np.float64),
        mean_price=monthly["mean_price"].astype(np.float64),
    )


@dataclass(frozen=True)
class _Grid:
    """The Kaggle-style grid of each month: shops with sales that month x items with sales that month."""

    shops: np.ndarray  # [months, shops] bool
    items: np.ndarray  # [months, items] bool
    item_first: np.ndarray  # [items] month of the item's first sale anywhere (n_months: never)

    def cells(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        return np.flatnonzero(self.shops[m]), np.flatnonzero(self.items[m])


def _monthly_grid(sales: _Sales, n_months: int, vocab: _Vocabularies) -> _Grid:
    shops = np.zeros((n_months, vocab.shop_ids.size), dtype=bool)
    shops[sales.month, sales.shop] = True
    items = np.zeros((n_months, vocab.item_ids.size), dtype=bool)
    items[sales.month, sales.item] = True
    item_first = np.where(items.any(axis=0), items.argmax(axis=0), n_months)
    return _Grid(shops, items, item_first)


@dataclass(frozen=True)
class _Series:
    """Every (shop, item) pair the model is asked about, numbered row-major by (shop index, item index)."""

    shop: np.ndarray  # [series] shop index
    item: np.ndarray
    category: np.ndarray
    table: np.ndarray  # [shops, items] series index, -1 where the pair is no series
    shop_id: np.ndarray  # [series] the lake's ids, in the dtypes the frames store
    item_id: np.ndarray
    category_id: np.ndarray

    @property
    def n(self) -> int:
        return self.shop.size

    def of_grid(self, grid: _Grid, m: int) -> np.ndarray:
        """Series of month ``m``'s grid cells, ascending (the numbering is row-major, the cells are too)."""
        return self.table[np.ix_(*grid.cells(m))].ravel()

    def ids(self, series_idx: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "shop_id": self.shop_id[series_idx],
            "item_id": self.item_id[series_idx],
            "item_category_id": self.category_id[series_idx],
        }


def _series(sales: _Sales, vocab: _Vocabularies, grid: _Grid, timeline: _Timeline, has_test: bool) -> _Series:
    """Pairs with sales, test.csv pairs, and the grids of the training months, the holdout and -- with no
    test.csv, where the forecast covers the universe -- the last month (recent sellers are pairs with sales)."""
    grid_months = set(timeline.train_months) | ({timeline.holdout} if timeline.has_holdout else set())
    if not has_test:
        grid_months.add(timeline.last_month)
    mask = np.zeros((vocab.shop_ids.size, vocab.item_ids.size), dtype=bool)
    mask[sales.shop, sales.item] = True
    mask[vocab.test_shop, vocab.test_item] = True
    for m in sorted(grid_months):
        mask[np.ix_(*grid.cells(m))] = True
    shop, item = np.nonzero(mask)
    table = np.full(mask.shape, -1, dtype=np.int32)
    table[shop, item] = np.arange(shop.size, dtype=np.int32)
    category = vocab.item_category[item]
    return _Series(
        shop=shop,
        item=item,
        category=category,
        table=table,
        shop_id=vocab.shop_ids[shop].astype(np.int16),
        item_id=vocab.item_ids[item].astype(np.int32),
        category_id=vocab.category_ids[category].astype(np.int16),
    )


@dataclass(frozen=True)
class _PairLevel:
    """Raw counts of the pairs with sales; every series without sales reads the all-zero last row."""

    count: np.ndarray  # [pairs + 1, months] float32
    first: np.ndarray  # [pairs + 1] int32 month of the first sale; NEVER on the zero row, so its age stays 0
    row: np.ndarray  # [series] int32
    sold_series: np.ndarray  # [pairs] the series of each row
    observed: np.ndarray  # [pairs, months] bool: the pair has a monthly row
    clip: tuple[float, float]
    scales: dict[str, float]

    def clipped(self, series_idx: np.ndarray, m: int) -> np.ndarray:
        if not 0 <= m < self.count.shape[1]:
            return np.zeros(series_idx.size, np.float32)
        return np.clip(self.count[self.row[series_idx], m], *self.clip).astype(np.float32)

    def mean3(self, series_idx: np.ndarray, m: int) -> np.ndarray:
        """Mean clipped count over the (up to) three months before ``m``: the baseline a model must beat."""
        if not series_idx.size:
            return np.zeros(0, np.float32)
        months = [k for k in (m - 3, m - 2, m - 1) if k >= 0]
        return np.mean([self.clipped(series_idx, k) for k in months], axis=0).astype(np.float32)


def _pair_level(sales: _Sales, series: _Series, timeline: _Timeline, clip: tuple[float, float]) -> _PairLevel:
    sold_series, row_of_sale = np.unique(series.table[sales.shop, sales.item], return_inverse=True)
    n_pairs, n_months = sold_series.size, timeline.n_months
    row = np.full(series.n, n_pairs, dtype=np.int32)
    row[sold_series] = np.arange(n_pairs, dtype=np.int32)
    count = np.zeros((n_pairs + 1, n_months), dtype=np.float32)
    count[row_of_sale, sales.month] = sales.count
    observed = np.zeros((n_pairs, n_months), dtype=bool)
    observed[row_of_sale, sales.month] = True
    first = observed.argmax(axis=1)
    positive = (sales.count > 0) & (sales.month < timeline.holdout)
    scales = {
        "pair_log_count": _rms(_log1p(sales.count[positive])),
        "pair_age": _age_scale(first, timeline.holdout, n_months),
    }
    return _PairLevel(count, np.append(first, NEVER).astype(np.int32), row, sold_series, observed, clip, scales)


@dataclass(frozen=True)
class _Level:
    values: np.ndarray  # [rows, months, channels] float32, in CHANNEL_SPECS order
    scales: dict[str, float]  # the factor each channel was divided by


def _scaled_level(level: str, channels: dict[str, np.ndarray], train_months: int) -> _Level:
    lo, hi = LEVEL_SLICES[level]
    assert tuple(channels) == CHANNELS[lo:hi], f"{level}: channels out of CHANNEL_SPECS order"
    values = np.empty(next(iter(channels.values())).shape + (hi - lo,), dtype=np.float32)
    scales: dict[str, float] = {}
    for k, (name, raw) in enumerate(channels.items()):
        values[..., k], scales[name] = _log_scale(raw.astype(np.float32), train_months)
    return _Level(values, scales)


def _item_level(
    sales: _Sales, grid: _Grid, vocab: _Vocabularies, means: dict[str, np.ndarray], timeline: _Timeline
) -> _Level:
    n_items, n_months = vocab.item_ids.size, timeline.n_months
    cell = sales.item * n_months + sales.month

    def per_item_month(weights: np.ndarray) -> np.ndarray:
        return np.bincount(cell, weights=weights, minlength=n_items * n_months).reshape(n_items, n_months)

    price_weight = per_item_month(sales.transactions)
    price_sum = per_item_month(sales.mean_price * sales.transactions)
    has_price = price_weight > 0
    price = np.divide(price_sum, price_weight, out=np.zeros_like(price_sum), where=has_price)
    channels = {
        "item_total": per_item_month(sales.sold),
        "item_shops": per_item_month(sales.count > 0),
        "item_price": _ffill(price, has_price),
        "item_age": _age(grid.item_first, n_months),
        "item_mean": means["item"],
        "category_mean": means["category"][vocab.item_category],
    }
    return _scaled_level("item", channels, timeline.holdout)


def _shop_level(sales: _Sales, n_shops: int, means: dict[str, np.ndarray], timeline: _Timeline) -> _Level:
    n_months = timeline.n_months
    total = np.bincount(sales.shop * n_months + sales.month, weights=sales.sold, minlength=n_shops * n_months)
    channels = {"shop_total": total.reshape(n_shops, n_months), "shop_mean": means["shop"]}
    return _scaled_level("shop", channels, timeline.holdout)


def _shopcat_level(sales: _Sales, vocab: _Vocabularies, means: dict[str, np.ndarray], timeline: _Timeline) -> _Level:
    n_rows, n_months = vocab.shop_ids.size * vocab.category_ids.size, timeline.n_months
    row = sales.shop * vocab.category_ids.size + vocab.item_category[sales.item]
    total = np.bincount(row * n_months + sales.month, weights=sales.sold, minlength=n_rows * n_months)
    channels = {"shop_category_total": total.reshape(n_rows, n_months), "shop_category_mean": means["shopcat"]}
    return _scaled_level("shopcat", channels, timeline.holdout)


def _calendar(first_month: str, n_months: int) -> np.ndarray:
    moy_next = (_month_of_year_start(first_month) + np.arange(1, n_months + 1)) % 12
    angle = 2.0 * np.pi * moy_next / 12.0
    return np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


@dataclass(frozen=True)
class _Levels:
    pair: _PairLevel
    item: _Level
    shop: _Level
    shopcat: _Level
    calendar: np.ndarray  # [months, 2]

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored level arrays, by STORED_LEVELS name."""
        return {
            "pair_count": self.pair.count,
            "pair_first": self.pair.first,
            "item": self.item.values,
            "shop": self.shop.values,
            "shopcat": self.shopcat.values,
            "calendar": self.calendar,
        }

    def scales(self) -> dict[str, float]:
        return self.pair.scales | self.item.scales | self.shop.scales | self.shopcat.scales


def _levels(
    sales: _Sales, vocab: _Vocabularies, grid: _Grid, series: _Series, timeline: _Timeline, config: NestcastConfig
) -> _Levels:
    clip = config.windows.clip
    means = _grid_means(
        np.clip(sales.count, *clip), sales.shop, sales.item, vocab.item_category, sales.month,
        grid.shops, grid.items, vocab.category_ids.size,
    )  # fmt: skip
    return _Levels(
        pair=_pair_level(sales, series, timeline, clip),
        item=_item_level(sales, grid, vocab, means, timeline),
        shop=_shop_level(sales, vocab.shop_ids.size, means, timeline),
        shopcat=_shopcat_level(sales, vocab, means, timeline),
        calendar=_calendar(config.ingest.first_month, timeline.n_months),
    )


def _samples(series_idx: np.ndarray, target_month: int) -> np.ndarray:
    """``[n, 2]`` int32 ``(series_idx, target_month)`` rows."""
    return np.stack([series_idx.astype(np.int32), np.full(series_idx.size, target_month, dtype=np.int32)], axis=1)


def _train_index(
    policy: str, lookback: int, timeline: _Timeline, grid: _Grid, series: _Series, pairs: _PairLevel
) -> np.ndarray:
    months = timeline.train_months
    if policy == "grid":
        parts = [series.of_grid(grid, m) for m in months]
    elif policy == "active":
        parts = _active_series(pairs, months, lookback)
    else:
        parts = [np.arange(series.n, dtype=np.int32)] * len(months)
    return np.concatenate([_samples(part, m) for part, m in zip(parts, months, strict=True)])


def _active_series(pairs: _PairLevel, months: tuple[int, ...], lookback: int) -> list[np.ndarray]:
    """Per target month ``T``, the series with a sale in months ``T - lookback .. T``."""
    n_pairs, n_months = pairs.observed.shape
    # A running count of months with sales makes each month's test one subtraction.
    running = np.zeros((n_pairs, n_months + 1), dtype=np.int32)
    np.cumsum(pairs.observed, axis=1, out=running[:, 1:])
    return [
        pairs.sold_series[running[:, m + 1] - running[:, max(m - lookback, 0)] > 0].astype(np.int32) for m in months
    ]


@dataclass(frozen=True)
class _Split:
    """The samples of one evaluation target month and their frame, row for row."""

    frame: pa.Table
    index: np.ndarray  # [n, 2] (series_idx, target_month)


def _grid_split(m: int, timeline: _Timeline, grid: _Grid, series: _Series, pairs: _PairLevel) -> _Split:
    """Month ``m``'s grid with actuals, baselines and new-item / new-pair segments (empty for a month without
    training data, such as the holdout of a build without one)."""
    has_data = timeline.train_months[0] <= m <= timeline.last_month
    samples = series.of_grid(grid, m) if has_data else np.zeros(0, dtype=np.int32)
    frame = pa.table(
        {
            "date_block_num": np.full(samples.size, m, dtype=np.int16),
            "series_idx": samples.astype(np.int32),
            **series.ids(samples),
            "actual": pairs.clipped(samples, m),
            "prev": pairs.clipped(samples, m - 1),
            "mean3": pairs.mean3(samples, m),
            "new_item": grid.item_first[series.item[samples]] >= m,
            "new_pair": pairs.first[pairs.row[samples]] >= m,
        }
    )
    return _Split(frame, _samples(samples, m))


def _grid_splits(months: tuple[int, ...], timeline: _Timeline, grid: _Grid, series: _Series,
                 pairs: _PairLevel) -> _Split:  # fmt: skip
    """The grids of several months, one after the other (the validation months)."""
    splits = [_grid_split(m, timeline, grid, series, pairs) for m in months]
    if not splits:
        return _grid_split(-1, timeline, grid, series, pairs)
    return _Split(pa.concat_tables([s.frame for s in splits]), np.concatenate([s.index for s in splits]))


#: Without test.csv a forecast row's ID is its pair's: ``shop_id * UNIVERSE_ID_STRIDE + item_id``. Derived from the
#: pair alone, it is the same in every run and every month, with no registry to keep (and it fits int32).
UNIVERSE_ID_STRIDE = 1_000_000


def pair_id(shop_id: np.ndarray, item_id: np.ndarray) -> np.ndarray:
    """The stable ID of each (shop, item) pair in a forecast without test.csv."""
    shop, item = np.asarray(shop_id, np.int64), np.asarray(item_id, np.int64)
    max_shop = np.iinfo(np.int32).max // UNIVERSE_ID_STRIDE  # the IDs stay int32, as test.csv's
    if item.size and (item.max() >= UNIVERSE_ID_STRIDE or shop.max() > max_shop):
        raise DataValidationError(f"item ids must be below {UNIVERSE_ID_STRIDE:,} and shop ids at most {max_shop} "
                                  "for the stable pair IDs of a forecast without test.csv")  # fmt: skip
    return (shop * UNIVERSE_ID_STRIDE + item).astype(np.int32)


def universe_pairs(
    wcfg: WindowsConfig, timeline: _Timeline, grid: _Grid, series: _Series, pairs: _PairLevel
) -> np.ndarray:
    """Series of the forecast universe without test.csv, sorted by their stable ID: every pair that sold in the
    last ``universe_months`` months, plus (``universe_grid``) every cell of the last month's grid."""
    first = max(0, timeline.last_month - wcfg.universe_months + 1)
    sold = pairs.count[: pairs.sold_series.size, first : timeline.last_month + 1] > 0
    chosen = [pairs.sold_series[sold.any(axis=1)]] if wcfg.universe_months else []
    if wcfg.universe_grid:
        chosen.append(series.of_grid(grid, timeline.last_month))
    samples = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    ids = pair_id(series.shop_id[samples], series.item_id[samples])
    return samples[np.argsort(ids, kind="stable")]


def _forecast_split(
    test: pd.DataFrame | None,
    vocab: _Vocabularies,
    timeline: _Timeline,
    grid: _Grid,
    series: _Series,
    pairs: _PairLevel,
    wcfg: WindowsConfig,
) -> _Split:
    """test.csv's rows in ID order -- or, with no test.csv, the universe of pairs by their stable IDs."""
    if test is not None:
        samples = series.table[vocab.test_shop, vocab.test_item]
        ids = test["ID"].to_numpy(np.int32)
    else:
        samples = universe_pairs(wcfg, timeline, grid, series, pairs)
        ids = pair_id(series.shop_id[samples], series.item_id[samples])
        if not samples.size:
            raise DataValidationError("no test.csv and an empty universe of pairs: nothing to forecast "
                                      "(raise windows.universe_months or set windows.universe_grid)")  # fmt: skip
    frame = pa.table(
        {
            "ID": ids,
            "series_idx": samples.astype(np.int32),
            **series.ids(samples),
            "prev": pairs.clipped(samples, timeline.last_month),
            "mean3": pairs.mean3(samples, timeline.forecast_month),
        }
    )
    return _Split(frame, _samples(samples, timeline.forecast_month))


def _series_table(series: _Series, pairs: _PairLevel, n_categories: int) -> pa.Table:
    return pa.table(
        {
            "series_idx": np.arange(series.n, dtype=np.int32),
            "shop_id": series.shop_id,
            "item_id": series.item_id,
            "item_category_id": series.category_id,
            "shop_index": series.shop.astype(np.int32),
            "category_index": series.category.astype(np.int32),
            "pair_row": pairs.row,
            "item_row": series.item.astype(np.int32),
            "shopcat_row": (series.shop * n_categories + series.category).astype(np.int32),
        }
    )


def _meta(
    config: NestcastConfig,
    timeline: _Timeline,
    vocab: _Vocabularies,
    n_series: int,
    levels: _Levels,
    sample_counts: dict[str, int],
    has_test: bool,
) -> dict[str, Any]:
    wcfg = config.windows
    return {
        "version": WINDOWS_VERSION,
        "channels": list(CHANNELS),
        "channel_levels": {name: level for name, level, _ in CHANNEL_SPECS},
        "n_channels": len(CHANNELS),
        "lookback": wcfg.lookback,
        "first_month": 0,
        "first_calendar_month": config.ingest.first_month,
        "last_month": timeline.last_month,
        "n_months": timeline.n_months,
        "holdout_month": timeline.holdout,
        "has_holdout": timeline.has_holdout,
        "forecast_month": timeline.forecast_month,
        "train_months": list(timeline.train_months),
        "target_clip": list(wcfg.clip),
        "scaling": _scaling_meta(timeline, levels),
        "n_series": int(n_series),
        "n_pairs_with_sales": int(levels.pair.sold_series.size),
        "n_items": int(vocab.item_ids.size),
        "n_shops": int(vocab.shop_ids.size),
        "n_categories": int(vocab.category_ids.size),
        "shop_ids": vocab.shop_ids.tolist(),
        "category_ids": vocab.category_ids.tolist(),
        "sample_policy": wcfg.sample_policy,
        "validation_months": [m for m in timeline.validation if m <= timeline.last_month] if sample_counts[
            "validation"] else [],
        "sample_counts": sample_counts,
        "forecast_source": "test.parquet" if has_test else _universe_label(wcfg, timeline),
        "static_features": wcfg.static_features,
    }


def _universe_label(wcfg: WindowsConfig, timeline: _Timeline) -> str:
    parts = [f"pairs sold in the last {wcfg.universe_months} month(s)"] if wcfg.universe_months else []
    parts += [f"grid of month {timeline.last_month}"] if wcfg.universe_grid else []
    return "universe: " + " + ".join(parts)


def _scaling_meta(timeline: _Timeline, levels: _Levels) -> dict[str, Any]:
    return {
        "method": "log1p(x) / rms of non-zero log1p values over months < holdout_month",
        "stats_months": [0, timeline.holdout - 1],
        "scale": levels.scales(),
    }


# --- the build object and its writer -------------------------------------------------------------


@dataclass(frozen=True)
class _WindowsBuild:
    """Everything a windows directory holds, computed and not yet written."""

    levels: _Levels
    item_family: np.ndarray
    grid: _Grid
    series: pa.Table
    train_index: np.ndarray
    splits: dict[str, _Split]  # holdout, validation, forecast
    meta: dict[str, Any]

    def arrays(self) -> dict[str, np.ndarray]:
        """``<name>.npy`` contents by name."""
        return (
            self.levels.arrays()
            | {"item_family": self.item_family, "train_index": self.train_index}
            | {f"{name}_index": split.index for name, split in self.splits.items()}
            | {"grid_shops": self.grid.shops, "grid_items": self.grid.items}
        )

    def tables(self) -> dict[str, pa.Table]:
        """``<name>.parquet`` contents by name."""
        return {"series": self.series} | {name: split.frame for name, split in self.splits.items()}


def _build(
    paths: LakePaths, config: NestcastConfig, holdout_month: int | None, provenance: dict[str, Any]
) -> _WindowsBuild:
    """All stages, in dependency order; ``provenance`` (build hash, input hashes) goes into the meta as is."""
    monthly = _read_monthly(paths)
    timeline = _timeline(config, holdout_month, monthly["date_block_num"])
    refs = _read_references(paths)
    has_test = refs.test is not None
    vocab = _vocabularies(monthly, refs, config)
    sales = _sales(monthly, vocab)
    del monthly  # the sales hold the same rows in the types the stages use
    grid = _monthly_grid(sales, timeline.n_months, vocab)
    series = _series(sales, vocab, grid, timeline, has_test)
    levels = _levels(sales, vocab, grid, series, timeline, config)
    wcfg = config.windows
    train_index = _train_index(wcfg.sample_policy, wcfg.lookback, timeline, grid, series, levels.pair)
    splits = {
        "holdout": _grid_split(timeline.holdout, timeline, grid, series, levels.pair),
        "validation": _grid_splits(timeline.validation, timeline, grid, series, levels.pair),
        "forecast": _forecast_split(refs.test, vocab, timeline, grid, series, levels.pair, config.windows),
    }
    sample_counts = {"train": int(train_index.shape[0])} | {name: int(s.index.shape[0]) for name, s in splits.items()}
    meta = _meta(config, timeline, vocab, series.n, levels, sample_counts, has_test) | provenance
    return _WindowsBuild(
        levels=levels,
        item_family=vocab.item_family,
        grid=grid,
        series=_series_table(series, levels.pair, vocab.category_ids.size),
        train_index=train_index,
        splits=splits,
        meta=meta,
    )


def _write_build(build: _WindowsBuild, out_dir: Path) -> None:
    for name, array in build.arrays().items():
        np.save(out_dir / f"{name}.npy", np.ascontiguousarray(array))
    for name, table in build.tables().items():
        # lz4: these files are re-read at every training run; speed matters more than size here.
        pq.write_table(table, out_dir / f"{name}.parquet", compression="lz4")
    # The store's files and their sha256, so a file deleted or damaged since is rebuilt, not served.
    build.meta[STORE_FILES] = {path.name: file_sha256(path) for path in sorted(out_dir.iterdir())
                               if path.name != WINDOWS_META_FILE}  # fmt: skip
    (out_dir / WINDOWS_META_FILE).write_text(json.dumps(build.meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def store_files(windows_dir: str | Path) -> list[Path]:
    """``meta.json`` and every file it records: what a cached windows step must find as it left them."""
    windows_dir = Path(windows_dir)
    recorded = (read_json(windows_dir / WINDOWS_META_FILE) or {}).get(STORE_FILES) or {}
    return [windows_dir / WINDOWS_META_FILE, *(windows_dir / name for name in sorted(recorded))]


def store_problems(windows_dir: str | Path) -> list[str]:
    """Each file ``meta.json`` records that is missing or whose sha256 differs (empty: the store is intact)."""
    recorded = (read_json(Path(windows_dir) / WINDOWS_META_FILE) or {}).get(STORE_FILES) or {}
    return recorded_file_problems(windows_dir, recorded, WINDOWS_META_FILE)
