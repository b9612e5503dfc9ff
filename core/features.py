"""Every feature both model families read, declared once and looked up by name.

A feature is one column for samples ``(series, target month T)``: the LightGBM booster reads it as is, the Nested
LSTM's head reads it through its ``head`` transform (``log1p`` for counts, means and month spans, ``plain`` for
prices and flags; ``None`` keeps it out of the head: the ids and the month of year, which the network embeds).
Every value uses months ``< T`` only, except what the target month's grid itself reveals on forecast day (which
items are on sale: ``test.csv`` lists them), so a sample's features never see its own answer.

Features are computed from a windows store's arrays (:class:`StoreArrays`, which ``core.window_store.WindowStore``
hands out), through per-level monthly tables built once per store (:class:`FeatureTables`). Adding a signal is
one :func:`declare` call (its name, how it is computed, how the head reads it) plus its oracle test in
``tests/test_features.py``; the sets below (:data:`RECIPE`, :data:`LAUNCH`, :data:`BOOSTER`, :data:`HEAD`) name
who reads it.

A lag before month 0 is NaN (LightGBM's missing value), not 0: "no data yet" is not "sold nothing"; the head reads
NaN as 0, which no present value maps to except a true zero count (ages and spans are at least 1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np

HeadTransform = Literal["log1p", "plain"]
NEVER = 1 << 20  # first-sale month of an item or pair that never sold
NAME_DIMS = 8  # dimensions of an item's name vector (core.cube.item_name_vectors)


# --- what features are computed from -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreArrays:
    """A windows store's arrays that features read (``core.window_store.WindowStore.arrays()`` builds it).

    ``pair_count`` holds raw monthly counts of the pairs with sales, one row each, plus a last all-zero row shared
    by every pair without sales; ``rows`` maps each level (``pair``, ``item``, ``shop``, ``category``,
    ``shopcat``) to the row of every series in that level's arrays.
    """

    pair_count: np.ndarray  # [pairs + 1, months] raw monthly counts
    pair_first: np.ndarray  # [pairs + 1] month of the pair's first sale (NEVER on the zero row)
    item_price: np.ndarray  # [items, months] log price carried forward from the last month with sales (scaled)
    grid_shops: np.ndarray  # [months, shops] bool: the shop sold something that month
    grid_items: np.ndarray  # [months, items] bool: the item sold somewhere that month
    item_family: np.ndarray  # [items] the item's name family (same first two words: editions, sequels)
    item_names: np.ndarray  # [items, dims] the item's name as a vector (core.cube.item_name_vectors)
    rows: Mapping[str, np.ndarray]  # level -> [series] row in that level's arrays
    n_categories: int
    clip: tuple[float, float]
    first_calendar_month: str  # "YYYY-MM" of month 0


def _last_true(has: np.ndarray) -> np.ndarray:
    """For each row and month, the latest month ``<= t`` where ``has`` is true (-1: none yet)."""
    months = np.where(has, np.arange(has.shape[1], dtype=np.int16)[None, :], np.int16(-1))
    return np.maximum.accumulate(months, axis=1)


def _divide(total: np.ndarray, cells: np.ndarray) -> np.ndarray:
    return np.divide(total, cells, out=np.zeros_like(total, dtype=np.float64), where=cells > 0).astype(np.float32)


@dataclasses.dataclass
class FeatureTables:
    """Per-level monthly arrays the features are gathered from, built once per store."""

    pair_clipped: np.ndarray  # [pair rows, months]
    pair_last: np.ndarray  # [pair rows, months] latest month <= t with a sale
    pair_first: np.ndarray  # [pair rows]
    means: dict[str, np.ndarray]  # group -> [group rows, months]: clipped sales per grid cell of the group
    item_last: np.ndarray  # [items, months]
    item_first: np.ndarray  # [items] first month in a grid (NEVER: none)
    item_category: np.ndarray  # [items]
    price: np.ndarray  # [items, months]
    rows: dict[str, np.ndarray]  # level -> row of each series
    month_of_year_start: int
    launch: dict[str, np.ndarray]  # launch-month sums and cells by category / shop / family, per month
    family: np.ndarray  # [items]
    family_mean: np.ndarray  # [families, months] clipped sales per grid cell of the family's active items
    grid_items: np.ndarray  # [months, items] bool
    item_shops_sold: np.ndarray  # [items, months] shops that sold the item (clipped count > 0)
    item_names: np.ndarray  # [items, dims]

    @functools.cached_property
    def pair_cumulative(self) -> np.ndarray:
        """[pair rows, months] clipped sales summed from month 0 through each month."""
        return np.cumsum(self.pair_clipped, axis=1, dtype=np.float64).astype(np.float32)

    @functools.cached_property
    def item_cumulative(self) -> np.ndarray:
        """[items, months] the item's sales per grid cell summed from month 0 through each month."""
        return np.cumsum(self.means["item"], axis=1, dtype=np.float64).astype(np.float32)

    @classmethod
    def of(cls, arrays: StoreArrays) -> FeatureTables:
        low, high = arrays.clip
        clipped = np.clip(np.asarray(arrays.pair_count), low, high)
        n_pairs = clipped.shape[0] - 1
        n_months = clipped.shape[1]
        grid_items = np.asarray(arrays.grid_items, dtype=bool)
        grid_shops_by_month = np.asarray(arrays.grid_shops, dtype=bool)
        n_items, n_shops, n_cats = grid_items.shape[1], grid_shops_by_month.shape[1], arrays.n_categories
        rows = {level: np.asarray(index, dtype=np.int64) for level, index in arrays.rows.items()}
        sold = rows["pair"] < n_pairs
        pair_item, pair_shop, pair_cat = (np.zeros(n_pairs, dtype=np.int64) for _ in range(3))
        pair_item[rows["pair"][sold]] = rows["item"][sold]
        pair_shop[rows["pair"][sold]] = rows["shop"][sold]
        pair_cat[rows["pair"][sold]] = rows["category"][sold]
        item_cat = np.zeros(n_items, dtype=np.int64)
        item_cat[rows["item"]] = rows["category"]
        counts = clipped[:n_pairs]

        def group_sum_of(keys: np.ndarray, size: int, values: np.ndarray) -> np.ndarray:
            flat = (keys[:, None] * n_months + np.arange(n_months)[None, :]).ravel()
            return np.bincount(flat, weights=values.ravel(), minlength=size * n_months).reshape(size, n_months)

        def group_sum(keys: np.ndarray, size: int) -> np.ndarray:
            return group_sum_of(keys, size, counts)

        grid_shops = grid_shops_by_month.sum(axis=1).astype(np.float64)  # [months]
        cat_items = np.stack([np.bincount(item_cat, weights=g, minlength=n_cats) for g in grid_items])  # [months, cats]
        item_sums = group_sum(pair_item, n_items)
        means = {
            "item": _divide(item_sums, grid_shops[None, :]),
            "shop": _divide(group_sum(pair_shop, n_shops), grid_items.sum(axis=1).astype(np.float64)[None, :]),
            "category": _divide(group_sum(pair_cat, n_cats), (grid_shops[:, None] * cat_items).T),
            "shopcat": _divide(group_sum(pair_shop * n_cats + pair_cat, n_shops * n_cats),
                               np.tile(cat_items.T, (n_shops, 1))),
        }
        item_first = np.where(grid_items.any(axis=0), grid_items.argmax(axis=0), NEVER)
        family = np.asarray(arrays.item_family, dtype=np.int64)
        n_families = int(family.max()) + 1 if family.size else 1
        family_items = np.stack([np.bincount(family, weights=g, minlength=n_families) for g in grid_items])
        launch = _launch_tables(counts, pair_item, pair_shop, item_first, item_cat, family, grid_shops_by_month,
                                n_cats, n_families)
        return cls(
            pair_clipped=clipped.astype(np.float32),
            pair_last=_last_true(clipped > 0),
            pair_first=np.asarray(arrays.pair_first, dtype=np.int64),
            means=means,
            item_last=_last_true(item_sums > 0),
            item_first=item_first,
            item_category=item_cat,
            price=np.asarray(arrays.item_price, dtype=np.float32),
            rows=rows,
            month_of_year_start=int(arrays.first_calendar_month.split("-")[1]) - 1,
            launch=launch,
            family=family,
            family_mean=_divide(group_sum(family[pair_item], n_families), (grid_shops[:, None] * family_items).T),
            grid_items=grid_items,
            item_shops_sold=group_sum_of(pair_item, n_items, (counts > 0).astype(np.float64)).astype(np.float32),
            item_names=np.asarray(arrays.item_names, dtype=np.float32),
        )


def _launch_tables(
    counts: np.ndarray,
    pair_item: np.ndarray,
    pair_shop: np.ndarray,
    item_first: np.ndarray,
    item_cat: np.ndarray,
    family: np.ndarray,
    grid_shops: np.ndarray,
    n_cats: int,
    n_families: int,
) -> dict[str, np.ndarray]:
    """What items sold in their launch month (the month of their first sale), and the grid cells they had.

    Per month: ``<group>_sum`` is the clipped launch-month sales of the group's launched items, ``<group>_cells``
    their grid cells (the month's active shops x the group's launched items; per shop, the month's launched items
    when the shop is active). ``sum / cells`` is the mean launch-month sale per grid cell.
    """
    n_months = counts.shape[1]
    months = np.arange(n_months)
    at_launch = np.where(item_first[pair_item][:, None] == months[None, :], counts, 0.0)
    launched = item_first < n_months
    shops_per_month = grid_shops.sum(axis=1).astype(np.float64)

    def launches_by(item_key: np.ndarray, size: int) -> np.ndarray:  # [months, size] launched items per group
        out = np.zeros((n_months, size))
        np.add.at(out, (item_first[launched], item_key[launched]), 1.0)
        return out

    def sales_by(pair_key: np.ndarray, size: int) -> np.ndarray:  # [size, months]
        flat = (pair_key[:, None] * n_months + months[None, :]).ravel()
        return np.bincount(flat, weights=at_launch.ravel(), minlength=size * n_months).reshape(size, n_months)

    launch_items = launches_by(item_cat, n_cats)
    return {
        "category_sum": sales_by(item_cat[pair_item], n_cats),
        "category_cells": (shops_per_month[:, None] * launch_items).T,
        "shop_sum": sales_by(pair_shop, grid_shops.shape[1]),
        "shop_cells": (grid_shops * launch_items.sum(axis=1)[:, None]).T,
        "family_sum": sales_by(family[pair_item], n_families),
        "family_cells": (shops_per_month[:, None] * launches_by(family, n_families)).T,
        "all_sum": sales_by(np.zeros_like(pair_item), 1),
        "all_cells": (shops_per_month * launch_items.sum(axis=1))[None, :],
    }


# --- samples -------------------------------------------------------------------------------------


class Samples:
    """Samples ``[n, 2]`` (series index, target month) with each level's row, gathered once per matrix."""

    def __init__(self, tables: FeatureTables, samples: np.ndarray) -> None:
        samples = np.asarray(samples).reshape(-1, 2)
        self.series = samples[:, 0].astype(np.int64)
        self.target = samples[:, 1].astype(np.int64)
        self._tables = tables

    @functools.cached_property
    def rows(self) -> dict[str, np.ndarray]:
        return {level: index[self.series] for level, index in self._tables.rows.items()}

    @property
    def previous(self) -> np.ndarray:
        """``T - 1``, floored at month 0 (callers mask ``T < 1``)."""
        return np.maximum(self.target - 1, 0)

    def __len__(self) -> int:
        return self.series.size


def _at(table: np.ndarray, rows: np.ndarray, months: np.ndarray) -> np.ndarray:
    """``table[rows, months]`` with NaN where the month is before month 0."""
    out = table[rows, np.maximum(months, 0)].astype(np.float32)
    out[months < 0] = np.nan
    return out


def _since(event: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Months from an event month to ``target``; NaN where there was no event before ``target``."""
    out = (target - event).astype(np.float32)
    out[(event < 0) | (event >= target)] = np.nan
    return out


def _ratio(sums: np.ndarray, cells: np.ndarray, rows: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Per sample, ``sum(sums[row, first..last]) / sum(cells[row, first..last])`` (months clipped to 0; NaN where
    ``last < 0`` or no cell)."""
    cumulative_sums = np.cumsum(sums, axis=1)
    cumulative_cells = np.cumsum(cells, axis=1)
    hi = np.maximum(last, 0)
    lo = np.maximum(first, 0) - 1

    def window(cumulative: np.ndarray) -> np.ndarray:
        total = cumulative[rows, hi]
        return total - np.where(lo >= 0, cumulative[rows, np.maximum(lo, 0)], 0.0)

    cells = window(cumulative_cells)
    out = np.divide(window(cumulative_sums), cells, out=np.full(rows.shape, np.nan), where=cells > 0)
    out[last < 0] = np.nan
    return out.astype(np.float32)


# --- the registry --------------------------------------------------------------------------------

Compute = Callable[[FeatureTables, Samples], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Feature:
    """One column: its name, how it is computed, and how the network's head reads it."""

    name: str
    compute: Compute
    head: HeadTransform | None
    categorical: bool = False


REGISTRY: dict[str, Feature] = {}


def declare(name: str, compute: Compute, *, head: HeadTransform | None = "log1p", categorical: bool = False) -> str:
    """Register a feature under ``name`` (unique); returns the name, so sets can be built from the calls."""
    if name in REGISTRY:
        raise ValueError(f"feature {name!r} is declared twice")
    if head not in ("log1p", "plain", None):
        raise ValueError(f"head must be 'log1p', 'plain' or None, got {head!r}")
    REGISTRY[name] = Feature(name, compute, head, categorical)
    return name


# Pair lags: the pair's clipped count k months before T.
PAIR_LAGS: tuple[int, ...] = (1, 2, 3, 6, 12)
_PAIR_LAG_NAMES = tuple(
    declare(f"pair_lag_{k}", lambda t, s, k=k: _at(t.pair_clipped, s.rows["pair"], s.target - k)) for k in PAIR_LAGS
)

# Target encodings: the group's clipped sales per grid cell k months before T.
MEAN_LAGS: tuple[int, ...] = (1, 2, 3)
GROUPS: tuple[str, ...] = ("item", "shop", "category", "shopcat")
_MEAN_LAG_NAMES = tuple(
    declare(f"{g}_mean_lag_{k}", lambda t, s, g=g, k=k: _at(t.means[g], s.rows[g], s.target - k))
    for g in GROUPS
    for k in MEAN_LAGS
)


def _item_last_before(t: FeatureTables, s: Samples) -> np.ndarray:
    return np.where(s.target > 0, t.item_last[s.rows["item"], s.previous], -1)


def _pair_last_before(t: FeatureTables, s: Samples) -> np.ndarray:
    return np.where(s.target > 0, t.pair_last[s.rows["pair"], s.previous], -1)


_TIMING_NAMES = (
    declare("item_months_since_first", lambda t, s: _since(t.item_first[s.rows["item"]], s.target)),
    declare("item_months_since_last", lambda t, s: _since(_item_last_before(t, s), s.target)),
    declare("pair_months_since_first", lambda t, s: _since(t.pair_first[s.rows["pair"]], s.target)),
    declare("pair_months_since_last", lambda t, s: _since(_pair_last_before(t, s), s.target)),
)
MONTH_OF_YEAR = declare(
    "month_of_year", lambda t, s: ((t.month_of_year_start + s.target) % 12).astype(np.float32), head=None
)


def _price_change(t: FeatureTables, s: Samples, k: int) -> np.ndarray:
    return _at(t.price, s.rows["item"], s.target - 1) - _at(t.price, s.rows["item"], s.target - 1 - k)


_PRICE_NAMES = (
    declare("price_last", lambda t, s: _at(t.price, s.rows["item"], s.target - 1), head="plain"),
    declare("price_change_1", lambda t, s: _price_change(t, s, 1), head="plain"),
    declare("price_change_3", lambda t, s: _price_change(t, s, 3), head="plain"),
)
CATEGORICAL: tuple[str, ...] = (
    declare("shop", lambda t, s: s.rows["shop"].astype(np.float32), head=None, categorical=True),
    declare("category", lambda t, s: s.rows["category"].astype(np.float32), head=None, categorical=True),
)


# Launches: what is known about an item on the day it is first on sale.
def _launch_mean(t: FeatureTables, s: Samples, group: str, rows: np.ndarray, months: int | None) -> np.ndarray:
    """The group's mean launch-month sale per grid cell over the ``months`` months before T (None: all of them)."""
    last = s.target - 1
    first = np.zeros_like(last) if months is None else s.target - months
    return _ratio(t.launch[f"{group}_sum"], t.launch[f"{group}_cells"], rows, first, last)


#: 1.0 where the sample's item never sold before the target month (its launch month or later), else 0.0.
ITEM_IS_NEW = declare(
    "item_is_new", lambda t, s: (t.item_first[s.rows["item"]] >= s.target).astype(np.float32), head="plain"
)
_LAUNCH_NAMES = (
    ITEM_IS_NEW,
    # The month the item first sold (T itself for a launch): the trees read the launch cohort it belongs to, and a
    # launch is forecast like the newest cohorts. Absolute time: kept out of the network, which would extrapolate.
    declare("item_first_sale_month",
            lambda t, s: np.minimum(t.item_first[s.rows["item"]], s.target).astype(np.float32), head=None),
    # What launches sold chain-wide per grid cell, last month and over the last three: the launch level as a
    # trend, which a network can scale from.
    declare("all_launch_mean_lag_1", lambda t, s: _launch_mean(t, s, "all", np.zeros_like(s.series), 1)),
    declare("all_launch_mean_3", lambda t, s: _launch_mean(t, s, "all", np.zeros_like(s.series), 3)),
    declare("category_launch_mean_lag_1", lambda t, s: _launch_mean(t, s, "category", s.rows["category"], 1)),
    declare("category_launch_mean_past", lambda t, s: _launch_mean(t, s, "category", s.rows["category"], None)),
    declare("shop_launch_mean_past", lambda t, s: _launch_mean(t, s, "shop", s.rows["shop"], None)),
    *(
        declare(f"family_mean_lag_{k}", lambda t, s, k=k: _at(t.family_mean, t.family[s.rows["item"]], s.target - k))
        for k in (1, 2, 3)
    ),
)

# An item's and a pair's history beyond the last months: how widely the item sold lately, and the average month
# since the first sale (a long-run level the short lags and the last three months' means miss for slow sellers).
def _mean_since_first(cumulative: np.ndarray, rows: np.ndarray, first: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per sample, the mean of a monthly series over its months ``first .. T-1`` (its sums before ``first`` are
    zero); NaN where ``first >= T``."""
    total = _at(cumulative, rows, target - 1)
    months = (target - np.maximum(first, 0)).astype(np.float32)
    out = np.divide(total, months, out=np.full(total.shape, np.nan, dtype=np.float32), where=months > 0)
    out[first >= target] = np.nan
    return out


_HISTORY_NAMES = (
    *(
        declare(f"item_shops_sold_lag_{k}", lambda t, s, k=k: _at(t.item_shops_sold, s.rows["item"], s.target - k),
                head=None)
        for k in (1, 2)
    ),
    declare("pair_mean_since_first", lambda t, s: _mean_since_first(
        t.pair_cumulative, s.rows["pair"], t.pair_first[s.rows["pair"]], s.target), head=None),
    declare("item_mean_since_first", lambda t, s: _mean_since_first(
        t.item_cumulative, s.rows["item"], t.item_first[s.rows["item"]], s.target), head=None),
)

# What the item's name says (core.cube.item_name_vectors), known for a launch on its first day.
_NAME_NAMES = tuple(
    declare(f"item_name_{k}", lambda t, s, k=k: t.item_names[s.rows["item"], k], head=None) for k in range(NAME_DIMS)
)

#: The standard recipe of this competition (lags, target encodings, timing, price, ids): what the reported
#: LightGBM reference reads.
RECIPE: tuple[str, ...] = (
    *_PAIR_LAG_NAMES, *_MEAN_LAG_NAMES, *_TIMING_NAMES, MONTH_OF_YEAR, *_PRICE_NAMES, *CATEGORICAL,
)
#: What is known about a launch on its first day beyond the recipe.
LAUNCH: tuple[str, ...] = _LAUNCH_NAMES
#: An item's and a pair's longer history (the trees only: the network reads its own sequence).
HISTORY: tuple[str, ...] = _HISTORY_NAMES
#: The item's name vector (trees only).
NAME: tuple[str, ...] = _NAME_NAMES
#: The ensemble's booster: the recipe, the launch features, the longer history and the item's name.
BOOSTER: tuple[str, ...] = (*RECIPE, *LAUNCH, *HISTORY, *NAME)
#: The network head's ``static`` input, in order: every feature of the booster that the head reads.
HEAD: tuple[str, ...] = tuple(name for name in BOOSTER if REGISTRY[name].head is not None)


# --- matrices --------------------------------------------------------------------------------------


def matrix(tables: FeatureTables, samples: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The ``[n, len(names)]`` float32 matrix of ``samples`` (``[n, 2]``: series index, target month)."""
    unknown = [name for name in names if name not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown feature(s) {unknown}; declared: {', '.join(REGISTRY)}")
    rows = Samples(tables, samples)
    if not names:
        return np.zeros((len(rows), 0), dtype=np.float32)
    return np.stack([REGISTRY[name].compute(tables, rows).astype(np.float32) for name in names], axis=1)


def categorical(names: Sequence[str]) -> list[str]:
    """The categorical features among ``names`` (LightGBM's ``categorical_feature``)."""
    return [name for name in names if REGISTRY[name].categorical]


def head_inputs(tables: FeatureTables, samples: np.ndarray, names: Sequence[str] = HEAD) -> dict[str, np.ndarray]:
    """The network's ``static`` (``[n, len(names)]``, each through its head transform, NaN as 0) and ``month``
    (``[n]``, the target's month of year, 0-11) inputs of ``samples``."""
    static = matrix(tables, samples, [*names, MONTH_OF_YEAR])
    month = static[:, -1].astype(np.int32)
    static = static[:, :-1]
    logs = [k for k, name in enumerate(names) if REGISTRY[name].head == "log1p"]
    static[:, logs] = np.log1p(np.maximum(static[:, logs], 0.0))
    return {"static": np.nan_to_num(static, nan=0.0).astype(np.float32), "month": month}
