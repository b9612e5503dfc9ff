"""The gradient-boosted reference: LightGBM on the monthly lag features practitioners use for this competition.

It is the bar the Nested LSTM is judged against, so it is trained on exactly the NLSTM's samples: the same
windows store (``core.windows``), the same Kaggle-style grid of every training month, the same validation
month for early stopping, the same refit, the same clipped target. Features of a sample ``(pair, T)`` use
months ``< T`` only (:data:`FEATURES`):

- the pair's clipped count ``k`` months before ``T`` for ``k`` in 1, 2, 3, 6, 12;
- lags 1-3 of the item, shop, category and shop x category monthly means: the clipped counts summed over
  the group and divided by the group's cells in that month's grid (shops x items sold that month), i.e. the
  target encoding of the group computed from past months only;
- months since the item's / pair's first and last sale; the month of year of ``T``;
- the item's last known (log, carried-forward) price and its change over 1 and 3 months;
- shop and category as categorical features.

A lag before month 0 is NaN (LightGBM's missing value), not 0: "no data yet" is not "sold nothing".
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.lake import write_text_atomic

if TYPE_CHECKING:
    from core.config import ReferenceConfig
    from core.windows import WindowStore

PAIR_LAGS: tuple[int, ...] = (1, 2, 3, 6, 12)
MEAN_LAGS: tuple[int, ...] = (1, 2, 3)
GROUPS: tuple[str, ...] = ("item", "shop", "category", "shopcat")
CATEGORICAL: tuple[str, ...] = ("shop", "category")
FEATURES: tuple[str, ...] = (
    *(f"pair_lag_{k}" for k in PAIR_LAGS),
    *(f"{group}_mean_lag_{k}" for group in GROUPS for k in MEAN_LAGS),
    "item_months_since_first",
    "item_months_since_last",
    "pair_months_since_first",
    "pair_months_since_last",
    "month_of_year",
    "price_last",
    "price_change_1",
    "price_change_3",
    *CATEGORICAL,
)
MODEL_FILE = "reference.txt"
#: The features the Nested LSTM's head also gets (``core.model.build_model(n_static=...)``): all but the ids,
#: which it embeds (shop, category, and the month of year of the target).
#: Beyond the reference's features, the head also gets what launches sold: most of the squared error on the
#: real slice is items in their first month, which no lag can describe.
LAUNCH_FEATURES: tuple[str, ...] = (
    "item_is_new",
    "category_launch_mean_lag_1",
    "category_launch_mean_past",
    "shop_launch_mean_past",
    "family_mean_lag_1",  # the item's name family (same first two words: editions, formats, sequels)
    "family_mean_lag_2",
    "family_mean_lag_3",
)
STATIC_FEATURES: tuple[str, ...] = (
    *(f for f in FEATURES if f not in (*CATEGORICAL, "month_of_year")),
    *LAUNCH_FEATURES,
)
_COUNT_LIKE = tuple(f for f in STATIC_FEATURES if "lag" in f or "months_since" in f or "launch" in f)
_PRICE = 2  # position of the carried-forward log price in the windows' item level (core.windows.CHANNEL_SPECS)


def _last_true(has: np.ndarray) -> np.ndarray:
    """For each row and month, the latest month ``<= t`` where ``has`` is true (-1: none yet)."""
    months = np.where(has, np.arange(has.shape[1], dtype=np.int16)[None, :], np.int16(-1))
    return np.maximum.accumulate(months, axis=1)


def _divide(total: np.ndarray, cells: np.ndarray) -> np.ndarray:
    return np.divide(total, cells, out=np.zeros_like(total), where=cells > 0).astype(np.float32)


@dataclasses.dataclass
class FeatureTables:
    """Per-level monthly arrays the features are gathered from, built once per windows store."""

    pair_clipped: np.ndarray  # [pair rows, months]
    pair_last: np.ndarray  # [pair rows, months] latest month <= t with a sale
    pair_first: np.ndarray  # [pair rows]
    means: dict[str, np.ndarray]  # group -> [group rows, months]
    item_last: np.ndarray  # [items, months]
    item_first: np.ndarray  # [items]
    price: np.ndarray  # [items, months]
    rows: dict[str, np.ndarray]  # level -> row of each series
    month_of_year_start: int
    launch: dict[str, np.ndarray]  # "category" / "shop" -> [rows, months] launch sums and cells, cumulative
    family: np.ndarray  # [items] the item's name family (core.windows._item_families)
    family_mean: np.ndarray  # [families, months] clipped sales per grid cell of the family's active items

    @classmethod
    def of(cls, store: WindowStore) -> FeatureTables:
        low, high = (float(v) for v in store.meta["target_clip"])
        clipped = np.clip(np.asarray(store.levels["pair_count"]), low, high)
        series = store.series
        n_pairs = clipped.shape[0] - 1  # the last row is the shared all-zero row of pairs without sales
        n_items, n_shops, n_cats = (int(store.meta[k]) for k in ("n_items", "n_shops", "n_categories"))
        sold = series["pair_row"].to_numpy() < n_pairs
        pair_item = np.zeros(n_pairs, dtype=np.int64)
        pair_shop = np.zeros(n_pairs, dtype=np.int64)
        pair_cat = np.zeros(n_pairs, dtype=np.int64)
        pair_rows = series["pair_row"].to_numpy()[sold]
        pair_item[pair_rows] = series["item_row"].to_numpy()[sold]
        pair_shop[pair_rows] = series["shop_index"].to_numpy()[sold]
        pair_cat[pair_rows] = series["category_index"].to_numpy()[sold]
        counts = clipped[:n_pairs]

        grid_shops = store.grid["grid_shops"].sum(axis=1).astype(np.float32)  # [months]
        grid_items = store.grid["grid_items"]  # [months, items]
        item_cat = np.zeros(n_items, dtype=np.int64)
        item_cat[series["item_row"].to_numpy()] = series["category_index"].to_numpy()
        cat_items = np.stack([np.bincount(item_cat, weights=g, minlength=n_cats) for g in grid_items])  # [months, cats]

        n_months = counts.shape[1]

        def group_sum(keys: np.ndarray, size: int) -> np.ndarray:
            flat = (keys[:, None] * n_months + np.arange(n_months)[None, :]).ravel()
            return np.bincount(flat, weights=counts.ravel(), minlength=size * n_months).reshape(size, n_months)

        item_sums = group_sum(pair_item, n_items)
        means = {
            "item": _divide(item_sums, grid_shops[None, :]),
            "shop": _divide(group_sum(pair_shop, n_shops), grid_items.sum(axis=1).astype(np.float32)[None, :]),
            "category": _divide(group_sum(pair_cat, n_cats), (grid_shops[:, None] * cat_items).T),
            "shopcat": _divide(
                group_sum(pair_shop * n_cats + pair_cat, n_shops * n_cats), np.tile(cat_items.T, (n_shops, 1))
            ),
        }
        item_sold = item_sums > 0
        item_first = np.where(grid_items.any(axis=0), grid_items.argmax(axis=0), 1 << 20)
        launch = _launch_tables(counts, pair_item, pair_shop, pair_cat, item_first, item_cat, store, n_cats)
        family = store.item_family.astype(np.int64)
        n_families = int(family.max()) + 1 if family.size else 1
        family_items = np.stack([np.bincount(family, weights=g, minlength=n_families) for g in grid_items])
        family_mean = _divide(group_sum(family[pair_item], n_families), (grid_shops[:, None] * family_items).T)
        return cls(
            pair_clipped=clipped.astype(np.float32),
            pair_last=_last_true(clipped > 0),
            pair_first=np.asarray(store.levels["pair_first"], dtype=np.int64),
            means=means,
            item_last=_last_true(item_sold),
            item_first=item_first,
            price=np.asarray(store.levels["item"][..., _PRICE], dtype=np.float32),
            rows={
                "pair": store.rows_of["pair"],
                "item": store.rows_of["item"],
                "shop": store.shop_index.astype(np.int64),
                "category": store.category_index.astype(np.int64),
                "shopcat": store.rows_of["shopcat"],
            },
            month_of_year_start=int(str(store.meta["first_calendar_month"]).split("-")[1]) - 1,
            launch=launch,
            family=family,
            family_mean=family_mean,
        )


def _launch_tables(
    counts: np.ndarray,
    pair_item: np.ndarray,
    pair_shop: np.ndarray,
    pair_cat: np.ndarray,
    item_first: np.ndarray,
    item_cat: np.ndarray,
    store: WindowStore,
    n_cats: int,
) -> dict[str, np.ndarray]:
    """Cumulative sums over months of what items sold in their launch month, and of the grid cells they had.

    A launch cell is (shop, item) in the month of the item's first sale; per category the cells of a month are
    its active shops x its launched items, per shop the month's launched items (when the shop is active).
    ``sum[:, t] / cells[:, t]`` over the cumulative arrays is the mean launch-month sale up to month ``t``.
    """
    n_months = counts.shape[1]
    grid_shops = store.grid["grid_shops"]  # [months, shops]
    months = np.arange(n_months)
    at_launch = np.where(item_first[pair_item][:, None] == months[None, :], counts, 0.0)
    launched = item_first < n_months
    launch_items = np.zeros((n_months, n_cats))
    np.add.at(launch_items, (item_first[launched], item_cat[launched]), 1.0)

    def by(keys: np.ndarray, size: int) -> np.ndarray:
        flat = (keys[:, None] * n_months + months[None, :]).ravel()
        return np.bincount(flat, weights=at_launch.ravel(), minlength=size * n_months).reshape(size, n_months)

    category_cells = (grid_shops.sum(axis=1)[:, None] * launch_items).T  # [cats, months]
    shop_cells = (grid_shops * launch_items.sum(axis=1)[:, None]).T  # [shops, months]
    category_sums = by(pair_cat, n_cats)
    return {
        "category_sum": np.cumsum(category_sums, axis=1),
        "category_cells": np.cumsum(category_cells, axis=1),
        "category_month_sum": category_sums,
        "category_month_cells": category_cells,
        "shop_sum": np.cumsum(by(pair_shop, grid_shops.shape[1]), axis=1),
        "shop_cells": np.cumsum(shop_cells, axis=1),
    }


def _at(table: np.ndarray, rows: np.ndarray, months: np.ndarray) -> np.ndarray:
    """``table[rows, months]`` with NaN where the month is before month 0."""
    out = table[rows, np.maximum(months, 0)].astype(np.float32)
    out[months < 0] = np.nan
    return out


def _since(last_or_first: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Months from an event month to ``target``; NaN where there was no event before ``target``."""
    out = (target - last_or_first).astype(np.float32)
    out[(last_or_first < 0) | (last_or_first >= target)] = np.nan
    return out


def features(tables: FeatureTables, samples: np.ndarray) -> np.ndarray:
    """The ``[n, len(FEATURES)]`` float32 matrix of ``samples`` (``[n, 2]``: series index, target month)."""
    series = samples[:, 0].astype(np.int64)
    target = samples[:, 1].astype(np.int64)
    rows = {level: index[series] for level, index in tables.rows.items()}
    columns = [_at(tables.pair_clipped, rows["pair"], target - k) for k in PAIR_LAGS]
    for group in GROUPS:
        columns += [_at(tables.means[group], rows[group], target - k) for k in MEAN_LAGS]
    previous = np.maximum(target - 1, 0)
    item_last = np.where(target > 0, tables.item_last[rows["item"], previous], -1)
    pair_last = np.where(target > 0, tables.pair_last[rows["pair"], previous], -1)
    columns += [
        _since(tables.item_first[rows["item"]], target),
        _since(item_last, target),
        _since(tables.pair_first[rows["pair"]], target),
        _since(pair_last, target),
        ((tables.month_of_year_start + target) % 12).astype(np.float32),
    ]
    price = [_at(tables.price, rows["item"], target - k) for k in (1, 2, 4)]
    columns += [price[0], price[0] - price[1], price[0] - price[2]]
    columns += [rows["shop"].astype(np.float32), rows["category"].astype(np.float32)]
    return np.stack(columns, axis=1)


def launch_features(tables: FeatureTables, samples: np.ndarray) -> np.ndarray:
    """:data:`LAUNCH_FEATURES` of ``samples``, ``[n, 7]``; month ``T``'s values use months ``< T``."""
    series = samples[:, 0].astype(np.int64)
    target = samples[:, 1].astype(np.int64)
    item = tables.rows["item"][series]
    category = tables.rows["category"][series]
    shop = tables.rows["shop"][series]
    previous = np.maximum(target - 1, 0)
    launch = tables.launch

    def ratio(total: str, cells: str, rows: np.ndarray) -> np.ndarray:
        out = _divide(launch[total][rows, previous], launch[cells][rows, previous])
        out[target < 1] = np.nan
        return out

    return np.stack(
        [
            (tables.item_first[item] >= target).astype(np.float32),
            ratio("category_month_sum", "category_month_cells", category),
            ratio("category_sum", "category_cells", category),
            ratio("shop_sum", "shop_cells", shop),
            *(_at(tables.family_mean, tables.family[item], target - k) for k in (1, 2, 3)),
        ],
        axis=1,
    )


def design(tables: FeatureTables, samples: np.ndarray, extended: bool = False) -> np.ndarray:
    """The booster's input: :data:`FEATURES`, and with ``extended`` also :data:`LAUNCH_FEATURES` (the
    ensemble's trees get what the Nested LSTM's head gets; the reported reference keeps the standard recipe)."""
    x = features(tables, samples)
    return np.concatenate([x, launch_features(tables, samples)], axis=1) if extended else x


def feature_names(extended: bool = False) -> list[str]:
    return [*FEATURES, *LAUNCH_FEATURES] if extended else list(FEATURES)


def static_features(tables: FeatureTables, samples: np.ndarray) -> dict[str, np.ndarray]:
    """The Nested LSTM's ``static`` ([n, len(STATIC_FEATURES)]) and ``month`` ([n], 0-11) inputs of ``samples``.

    Counts, means and month spans go through ``log1p``; a missing value (before month 0, never sold) is 0,
    which no present value maps to except a true zero count -- the ages and spans are at least 1.
    """
    full = features(tables, samples)
    column = {name: k for k, name in enumerate(FEATURES)}
    static = np.concatenate(
        [full[:, [column[name] for name in STATIC_FEATURES if name in column]], launch_features(tables, samples)],
        axis=1,
    )
    count_like = [STATIC_FEATURES.index(name) for name in _COUNT_LIKE]
    static[:, count_like] = np.log1p(np.maximum(static[:, count_like], 0.0))
    return {
        "static": np.nan_to_num(static, nan=0.0).astype(np.float32),
        "month": full[:, column["month_of_year"]].astype(np.int32),
    }


# --- the model -----------------------------------------------------------------------------------


@dataclasses.dataclass
class ReferenceFit:
    """One trained booster: what it trained on and how long it took."""

    booster: Any
    rounds: int
    best_validation_rmse: float | None
    train_samples: int
    seconds: float
    extended: bool = False

    def predict(self, x: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
        return np.clip(self.booster.predict(x, num_iteration=self.rounds), *clip).astype(np.float32)

    def predict_samples(self, tables: FeatureTables, samples: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
        """Predictions for ``samples`` ([n, 2]: series index, target month), clipped."""
        return self.predict(design(tables, samples, self.extended), clip)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_text_atomic(Path(path), self.booster.model_to_string(num_iteration=self.rounds))


def _params(cfg: ReferenceConfig, seed: int) -> dict[str, Any]:
    return {
        "objective": "regression",
        "learning_rate": cfg.boost_learning_rate,
        "num_leaves": cfg.num_leaves,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "feature_fraction": cfg.feature_fraction,
        "bagging_fraction": cfg.bagging_fraction,
        "bagging_freq": 1,
        "lambda_l2": cfg.lambda_l2,
        "seed": seed,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": cfg.boost_threads or os.cpu_count() or 1,
        "verbosity": -1,
    }


def fit_reference(
    store: WindowStore,
    tables: FeatureTables,
    cfg: ReferenceConfig,
    *,
    seed: int,
    before_month: int | None = None,
    rounds: int | None = None,
    validate: bool = False,
    max_samples: int | None = None,
    budget: int | None = None,
    extended: bool = False,
) -> ReferenceFit:
    """Train on the store's training samples before ``before_month`` (None: all of them).

    ``validate``: early-stop on the validation month's grid (at most ``cfg.max_rounds``) -- the selection
    stage; otherwise train exactly ``rounds`` rounds (the refit with the selected count).
    """
    import lightgbm as lgb

    started = time.perf_counter()
    clip = tuple(float(v) for v in store.meta["target_clip"])
    samples, weights = store.weighted_training_samples(before_month, max_samples, seed, budget)
    if samples.shape[0] == 0:
        raise ValueError(f"no training samples before month {before_month}")
    y = store.targets(samples[:, 0], samples[:, 1])
    train = lgb.Dataset(design(tables, samples, extended), y, weight=weights, feature_name=feature_names(extended),
                        categorical_feature=list(CATEGORICAL), free_raw_data=True)  # fmt: skip
    params = _params(cfg, seed)
    if validate:
        valid_samples = store.validation_index
        if valid_samples.shape[0] == 0:
            raise ValueError("the windows store has no validation month to early-stop on")
        valid = lgb.Dataset(
            design(tables, valid_samples, extended), np.clip(store.validation_frame()["actual"].to_numpy(), *clip),
            reference=train,
        )
        booster = lgb.train(
            params | {"metric": "rmse"}, train, num_boost_round=cfg.max_rounds, valid_sets=[valid],
            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)],
        )  # fmt: skip
        best = int(booster.best_iteration) or cfg.max_rounds
        score = float(booster.best_score["valid_0"]["rmse"])
        return ReferenceFit(booster, best, score, int(samples.shape[0]), time.perf_counter() - started, extended)
    if rounds is None or rounds < 1:
        raise ValueError(f"a refit needs the selected number of rounds (>= 1), got {rounds!r}")
    booster = lgb.train(params, train, num_boost_round=rounds)
    return ReferenceFit(booster, rounds, None, int(samples.shape[0]), time.perf_counter() - started, extended)
