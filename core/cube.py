"""The feature cube of step 3: what the windows are cut from, computed from ``lake/monthly`` and the reference
tables -- the vocabularies, each month's Kaggle-style grid, the series, and the channel levels stored by level
(``CHANNEL_SPECS``). ``core.windows`` builds and writes a store from it; ``core.window_store`` reads one.

Channel values at month ``t`` use only data of months ``<= t``. Covariates are ``log1p`` and divided by a factor
from months before the holdout month only (never shifted, so zero keeps meaning "nothing").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from core.aggregate import merge_shop_ids, read_monthly_table
from core.config import NestcastConfig
from core.errors import DataValidationError
from core.features import NAME_DIMS, NEVER
from core.lake import LakePaths

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


def _reference(paths: LakePaths, name: str) -> pd.DataFrame | None:
    path = paths.reference_table(name)
    return pq.read_table(path).to_pandas() if path.exists() else None


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


def _vocab(*arrays: np.ndarray) -> np.ndarray:
    # pd.unique hashes; sorting only the distinct ids is much cheaper than np.unique on every row.
    parts = [pd.unique(np.asarray(a, dtype=np.int64).ravel()) for a in arrays if a is not None]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _name_family(name: str, words: int = 2) -> str:
    """The first ``words`` words of an item name, lower-cased, letters and digits only ("FIFA 15 [PS4]": "fifa 15")."""
    tokens = "".join(c if c.isalnum() else " " for c in str(name).lower()).split()
    return " ".join(tokens[:words])


def item_families(items_ref: pd.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    """A family index per vocabulary item: items whose names start with the same two words (editions, formats,
    sequels) share one, so a launch can be read from its family's past sales."""
    if "item_name" not in items_ref.columns:
        return np.arange(item_ids.size, dtype=np.int32)
    names = pd.Series(items_ref["item_name"].to_numpy(), index=items_ref["item_id"].to_numpy()).reindex(item_ids)
    families = names.fillna("").map(_name_family).to_numpy()
    return pd.factorize(families)[0].astype(np.int32)


def item_name_vectors(items_ref: pd.DataFrame, item_ids: np.ndarray, dims: int = NAME_DIMS) -> np.ndarray:
    """``[items, dims]``: each vocabulary item's name as a short dense vector (TF-IDF of its character 2-4-grams,
    reduced by a truncated SVD fitted on the vocabulary's names), so trees can read what a never-sold item is
    from items whose names are alike (platform, format, edition). Zeros where no name is known."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    out = np.zeros((item_ids.size, dims), dtype=np.float32)
    if "item_name" not in items_ref.columns or item_ids.size < 3:
        return out
    names = pd.Series(items_ref["item_name"].to_numpy(), index=items_ref["item_id"].to_numpy()).reindex(item_ids)
    known = names.notna().to_numpy()
    text = names[known].astype(str).str.lower().to_numpy()
    try:
        tfidf = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True).fit_transform(text)
    except ValueError:  # no n-gram shared by two names: nothing to reduce
        return out
    width = min(dims, tfidf.shape[0] - 1, tfidf.shape[1] - 1)
    if width < 1:
        return out
    out[known, :width] = TruncatedSVD(n_components=width, random_state=0).fit_transform(tfidf)
    return out


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
                            np.tile(category_items.T, (n_shops, 1))),
    }


# --- build stages --------------------------------------------------------------------------------
# Each stage is a function of the lake and of earlier stages' frozen results and writes nothing: the
# whole build is computed (and can fail) before ``_write_build`` puts it, all at once, into the directory.


@dataclass(frozen=True)
class References:
    items: pd.DataFrame
    shops: pd.DataFrame | None
    categories: pd.DataFrame | None
    test: pd.DataFrame | None  # in ID order


def read_monthly_arrays(paths: LakePaths) -> dict[str, np.ndarray]:
    table = read_monthly_table(paths)
    monthly = {name: table[name].to_numpy() for name in table.column_names}
    if monthly["date_block_num"].size == 0:
        raise DataValidationError(f"{paths.monthly}: monthly partitions hold no rows")
    return monthly


def read_references(paths: LakePaths) -> References:
    items = _reference(paths, "items.parquet")
    if items is None:
        raise DataValidationError(f"{paths.reference_table('items')}: items reference is missing")
    test = _reference(paths, "test.parquet")
    if test is not None:
        test = test.sort_values("ID", kind="stable").reset_index(drop=True)
    return References(items, _reference(paths, "shops.parquet"), _reference(paths, "item_categories.parquet"), test)


@dataclass(frozen=True)
class Timeline:
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


def resolve_holdout(config: NestcastConfig, holdout_month: int | None, last_month: int) -> int:
    holdout = holdout_month if holdout_month is not None else config.windows.holdout_month
    holdout = last_month if holdout is None else int(holdout)
    if not 1 <= holdout <= last_month + 1:
        raise ValueError(f"holdout month {holdout} outside 1..{last_month + 1} (last month in the lake: {last_month})")
    return holdout


def timeline(config: NestcastConfig, holdout_month: int | None, month: np.ndarray) -> Timeline:
    last_month = int(month.max())
    holdout = resolve_holdout(config, holdout_month, last_month)
    first_train = config.windows.min_train_month
    train_months = tuple(range(max(first_train, 1), holdout))
    if not train_months:
        raise ValueError(f"no training months before holdout {holdout} (min_train_month={first_train})")
    return Timeline(last_month, holdout, train_months, config.windows.validation_months)


@dataclass(frozen=True)
class Vocabularies:
    """Sorted id vocabularies; everywhere else a shop, item or category is its position in these."""

    shop_ids: np.ndarray
    item_ids: np.ndarray
    category_ids: np.ndarray
    item_category: np.ndarray  # [items] category index
    item_family: np.ndarray  # [items] name-family index
    item_names: np.ndarray  # [items, NAME_DIMS] name vectors
    test_shop: np.ndarray  # [test rows] shop index, in ID order
    test_item: np.ndarray


def vocabularies(monthly: dict[str, np.ndarray], refs: References, config: NestcastConfig) -> Vocabularies:
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
    return Vocabularies(
        shop_ids=shop_ids,
        item_ids=item_ids,
        category_ids=category_ids,
        item_category=np.searchsorted(category_ids, item_category_ids),
        item_family=item_families(refs.items, item_ids),
        item_names=item_name_vectors(refs.items, item_ids),
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
class Sales:
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


def sales(monthly: dict[str, np.ndarray], vocab: Vocabularies) -> Sales:
    return Sales(
        month=monthly["date_block_num"].astype(np.int64),
        shop=np.searchsorted(vocab.shop_ids, monthly["shop_id"].astype(np.int64)),
        item=np.searchsorted(vocab.item_ids, monthly["item_id"].astype(np.int64)),
        count=monthly["item_cnt_month"].astype(np.float32),
        transactions=monthly["transactions"].astype(np.float64),
        mean_price=monthly["mean_price"].astype(np.float64),
    )


@dataclass(frozen=True)
class Grid:
    """The Kaggle-style grid of each month: shops with sales that month x items with sales that month."""

    shops: np.ndarray  # [months, shops] bool
    items: np.ndarray  # [months, items] bool
    item_first: np.ndarray  # [items] month of the item's first sale anywhere (n_months: never)

    def cells(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        return np.flatnonzero(self.shops[m]), np.flatnonzero(self.items[m])


def monthly_grid(sales: Sales, n_months: int, vocab: Vocabularies) -> Grid:
    shops = np.zeros((n_months, vocab.shop_ids.size), dtype=bool)
    shops[sales.month, sales.shop] = True
    items = np.zeros((n_months, vocab.item_ids.size), dtype=bool)
    items[sales.month, sales.item] = True
    item_first = np.where(items.any(axis=0), items.argmax(axis=0), n_months)
    return Grid(shops, items, item_first)


@dataclass(frozen=True)
class Series:
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

    def of_grid(self, grid: Grid, m: int) -> np.ndarray:
        """Series of month ``m``'s grid cells, ascending (the numbering is row-major, the cells are too)."""
        return self.table[np.ix_(*grid.cells(m))].ravel()

    def ids(self, series_idx: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "shop_id": self.shop_id[series_idx],
            "item_id": self.item_id[series_idx],
            "item_category_id": self.category_id[series_idx],
        }


def series(sales: Sales, vocab: Vocabularies, grid: Grid, timeline: Timeline, has_test: bool) -> Series:
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
    return Series(
        shop=shop,
        item=item,
        category=category,
        table=table,
        shop_id=vocab.shop_ids[shop].astype(np.int16),
        item_id=vocab.item_ids[item].astype(np.int32),
        category_id=vocab.category_ids[category].astype(np.int16),
    )


@dataclass(frozen=True)
class PairLevel:
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


def _pair_level(sales: Sales, series: Series, timeline: Timeline, clip: tuple[float, float]) -> PairLevel:
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
    return PairLevel(count, np.append(first, NEVER).astype(np.int32), row, sold_series, observed, clip, scales)


@dataclass(frozen=True)
class Level:
    values: np.ndarray  # [rows, months, channels] float32, in CHANNEL_SPECS order
    scales: dict[str, float]  # the factor each channel was divided by


def _scaled_level(level: str, channels: dict[str, np.ndarray], train_months: int) -> Level:
    lo, hi = LEVEL_SLICES[level]
    assert tuple(channels) == CHANNELS[lo:hi], f"{level}: channels out of CHANNEL_SPECS order"
    values = np.empty(next(iter(channels.values())).shape + (hi - lo,), dtype=np.float32)
    scales: dict[str, float] = {}
    for k, (name, raw) in enumerate(channels.items()):
        values[..., k], scales[name] = _log_scale(raw.astype(np.float32), train_months)
    return Level(values, scales)


def _item_level(
    sales: Sales, grid: Grid, vocab: Vocabularies, means: dict[str, np.ndarray], timeline: Timeline
) -> Level:
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


def _shop_level(sales: Sales, n_shops: int, means: dict[str, np.ndarray], timeline: Timeline) -> Level:
    n_months = timeline.n_months
    total = np.bincount(sales.shop * n_months + sales.month, weights=sales.sold, minlength=n_shops * n_months)
    channels = {"shop_total": total.reshape(n_shops, n_months), "shop_mean": means["shop"]}
    return _scaled_level("shop", channels, timeline.holdout)


def _shopcat_level(sales: Sales, vocab: Vocabularies, means: dict[str, np.ndarray], timeline: Timeline) -> Level:
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
class Levels:
    pair: PairLevel
    item: Level
    shop: Level
    shopcat: Level
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


def levels(
    sales: Sales, vocab: Vocabularies, grid: Grid, series: Series, timeline: Timeline, config: NestcastConfig
) -> Levels:
    clip = config.windows.clip
    means = _grid_means(
        np.clip(sales.count, *clip), sales.shop, sales.item, vocab.item_category, sales.month,
        grid.shops, grid.items, vocab.category_ids.size,
    )
    return Levels(
        pair=_pair_level(sales, series, timeline, clip),
        item=_item_level(sales, grid, vocab, means, timeline),
        shop=_shop_level(sales, vocab.shop_ids.size, means, timeline),
        shopcat=_shopcat_level(sales, vocab, means, timeline),
        calendar=_calendar(config.ingest.first_month, timeline.n_months),
    )
