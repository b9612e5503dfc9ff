"""The feature room (core.features): every feature against a loop reference, no leakage, the head's inputs;
and the LightGBM boosters (core.reference) fitted on them.

The reference implementation is plain dictionaries and loops over monthly rows, written from the feature
definitions, never from the vectorised code.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lake_helpers import write_lake

from core.aggregate import aggregate, read_monthly
from core.config import NestcastConfig
from core.cube import item_name_vectors
from core.features import HISTORY, NAME, NAME_DIMS, RECIPE, FeatureTables, matrix
from core.lake import LakePaths
from core.reference import fit_reference
from core.synthetic import generate
from core.window_store import WindowStore
from core.windows import build_windows

CLIP = (0.0, 20.0)


@pytest.fixture(scope="module")
def tiny() -> dict[str, pd.DataFrame]:
    data = generate("tiny", seed=4)
    sales = data.sales
    sales = sales[(sales["item_price"] > 0) & (sales["item_price"] < 100_000) & (sales["item_cnt_day"] < 1000)]
    return {"sales": sales.reset_index(drop=True), "items": data.items, "test": data.test,
            "shops": data.shops["shop_id"].tolist()}


def lake(root: Path, tiny: dict[str, pd.DataFrame], holdout: int) -> tuple[NestcastConfig, WindowStore]:
    write_lake(root, tiny["sales"], tiny["items"], tiny["test"], tiny["shops"])
    config = NestcastConfig(data_dir=root).with_overrides(lookback=4)
    aggregate(config)
    return config, WindowStore.open(build_windows(config, holdout_month=holdout).windows_dir)


def loop_features(monthly: pd.DataFrame, store: WindowStore, shop: int, item: int, target: int) -> dict[str, float]:
    """The features of one (shop, item, target month) from monthly rows, by their definitions."""
    count: dict[tuple[int, int, int], float] = {}
    category_of: dict[int, int] = {}
    shops_in: dict[int, set[int]] = defaultdict(set)
    items_in: dict[int, set[int]] = defaultdict(set)
    for row in monthly.itertuples():
        s, i, m = int(row.shop_id), int(row.item_id), int(row.date_block_num)
        count[(s, i, m)] = float(row.item_cnt_month)
        category_of[i] = int(row.item_category_id)
        shops_in[m].add(s)
        items_in[m].add(i)
    category_of.update(zip(store.series["item_id"].astype(int), store.series["item_category_id"].astype(int),
                           strict=True))
    c = category_of[item]

    def clipped(s: int, i: int, m: int) -> float:
        return min(max(count.get((s, i, m), 0.0), CLIP[0]), CLIP[1])

    def group_mean(m: int, keep) -> float:  # noqa: ANN001 - a predicate on (shop, item)
        cells = [(s, i) for s in shops_in[m] for i in items_in[m] if keep(s, i)]
        return sum(clipped(s, i, m) for s, i in cells) / len(cells) if cells else 0.0

    out: dict[str, float] = {}
    for k in (1, 2, 3, 6, 12):
        out[f"pair_lag_{k}"] = clipped(shop, item, target - k) if target - k >= 0 else math.nan
    for k in (1, 2, 3):
        m = target - k
        means = {
            "item": lambda s, i: i == item,
            "shop": lambda s, i: s == shop,
            "category": lambda s, i: category_of[i] == c,
            "shopcat": lambda s, i: s == shop and category_of[i] == c,
        }
        for group, keep in means.items():
            out[f"{group}_mean_lag_{k}"] = group_mean(m, keep) if m >= 0 else math.nan
    item_months = [m for m in range(target) if item in items_in[m]]
    item_sold = [m for m in range(target) if sum(clipped(s, item, m) for s in shops_in[m]) > 0]
    pair_months = [m for m in range(target) if (shop, item, m) in count]
    pair_sold = [m for m in range(target) if clipped(shop, item, m) > 0]
    out["item_months_since_first"] = target - item_months[0] if item_months else math.nan
    out["item_months_since_last"] = target - item_sold[-1] if item_sold else math.nan
    out["pair_months_since_first"] = target - pair_months[0] if pair_months else math.nan
    out["pair_months_since_last"] = target - pair_sold[-1] if pair_sold else math.nan
    out["month_of_year"] = float(target % 12)  # the lake starts in January
    for k in (1, 2):
        m = target - k
        sold_in = sum(clipped(s, item, m) > 0 for s in shops_in[m])
        out[f"item_shops_sold_lag_{k}"] = float(sold_in) if m >= 0 else math.nan
    since_pair = range(pair_months[0], target) if pair_months else range(0)
    out["pair_mean_since_first"] = (sum(clipped(shop, item, m) for m in since_pair) / len(since_pair)
                                    if since_pair else math.nan)
    since_item = range(item_months[0], target) if item_months else range(0)
    out["item_mean_since_first"] = (sum(group_mean(m, lambda s, i: i == item) for m in since_item) / len(since_item)
                                    if since_item else math.nan)
    return out


def test_every_feature_equals_the_loop_reference(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    config, store = lake(tmp_path, tiny, holdout=13)
    monthly = read_monthly(LakePaths(config.data_dir))
    tables = FeatureTables.of(store.arrays())
    rng = np.random.default_rng(0)
    rows = store.train_index[rng.choice(store.train_index.shape[0], 60, replace=False)]
    rows = np.concatenate([rows, store.holdout_index[:20], store.forecast_index[:20]])
    names = (*RECIPE, *HISTORY)
    got = matrix(tables, rows, names)
    assert got.shape == (rows.shape[0], len(names)) and got.dtype == np.float32
    column = {name: k for k, name in enumerate(names)}
    for n, (series, target) in enumerate(rows):
        shop, item = int(store.series["shop_id"][series]), int(store.series["item_id"][series])
        expected = loop_features(monthly, store, shop, item, int(target))
        for name, value in expected.items():
            np.testing.assert_allclose(got[n, column[name]], value, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} of shop {shop}, item {item}, month {target}")
        assert got[n, column["shop"]] == store.shop_index[series]
        assert got[n, column["category"]] == store.category_index[series]


def test_no_feature_sees_the_target_month_or_later(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    target = 10
    _, clean = lake(tmp_path / "clean", tiny, holdout=target)
    sales = tiny["sales"].copy()
    late = sales["date_block_num"] >= target
    sales.loc[late, "item_cnt_day"] *= 997
    sales.loc[late, "item_price"] *= 1000
    _, dirty = lake(tmp_path / "dirty", {**tiny, "sales": sales}, holdout=target)

    def keyed(store: WindowStore) -> dict[tuple[int, int, int], np.ndarray]:
        rows = np.concatenate([store.train_index, store.holdout_index])
        values = matrix(FeatureTables.of(store.arrays()), rows, (*RECIPE, *HISTORY))
        keys = zip(store.series["shop_id"].to_numpy()[rows[:, 0]], store.series["item_id"].to_numpy()[rows[:, 0]],
                   rows[:, 1], strict=True)
        return {tuple(int(v) for v in key): values[n] for n, key in enumerate(keys)}

    clean_rows, dirty_rows = keyed(clean), keyed(dirty)
    assert clean_rows.keys() == dirty_rows.keys()
    assert any(key[2] == target for key in clean_rows)  # the holdout month's own samples are compared too
    for key, value in clean_rows.items():
        np.testing.assert_array_equal(dirty_rows[key], value, err_msg=str(key))
    shutil.rmtree(tmp_path / "dirty")


def test_the_reference_early_stops_on_the_validation_month_then_refits(tmp_path, tiny) -> None:
    config, store = lake(tmp_path, tiny, holdout=14)
    cfg = config.reference.model_copy(update={"max_rounds": 300, "early_stopping_rounds": 20, "boost_threads": 1})
    tables = FeatureTables.of(store.arrays())
    selected = fit_reference(store, tables, cfg, seed=1, before_month=store.validation_start, validate=True)
    assert 1 <= selected.rounds <= 300 and selected.best_validation_rmse is not None
    assert selected.train_samples == int((store.train_index[:, 1] < store.validation_start).sum())
    refit = fit_reference(store, tables, cfg, seed=1, rounds=selected.rounds)
    assert refit.train_samples == store.train_index.shape[0] and refit.rounds == selected.rounds
    holdout = store.holdout_frame()
    pred = refit.predict(matrix(tables, store.holdout_index, RECIPE), CLIP)
    assert pred.min() >= 0 and pred.max() <= 20
    rmse = float(np.sqrt(np.mean((pred - holdout["actual"]) ** 2)))
    previous = float(np.sqrt(np.mean((np.clip(holdout["prev"], *CLIP) - holdout["actual"]) ** 2)))
    assert rmse < previous, "the trees must learn more than last month's value on the synthetic data"
    again = fit_reference(store, tables, cfg, seed=1, rounds=selected.rounds)
    np.testing.assert_array_equal(again.predict(matrix(tables, store.holdout_index, RECIPE), CLIP), pred)  # seeded
    refit.save(tmp_path / "reference.txt")
    assert "Tree=" in (tmp_path / "reference.txt").read_text()
    with pytest.raises(ValueError, match="rounds"):
        fit_reference(store, tables, cfg, seed=1)


def test_the_models_static_inputs_are_the_reference_features_of_the_target_month(tmp_path, tiny) -> None:
    from core.features import HEAD, head_inputs

    _, store = lake(tmp_path, tiny, holdout=12)
    assert store.n_static == len(HEAD)
    rows = store.train_index[::97]
    batch = store.inputs(rows[:, 0], rows[:, 1])
    assert batch["static"].shape == (rows.shape[0], len(HEAD)) and np.isfinite(batch["static"]).all()
    full = matrix(FeatureTables.of(store.arrays()), rows, RECIPE)
    column = {name: k for k, name in enumerate(RECIPE)}
    np.testing.assert_array_equal(batch["month"], full[:, column["month_of_year"]].astype(np.int32))
    lag1 = HEAD.index("pair_lag_1")
    np.testing.assert_allclose(batch["static"][:, lag1], np.log1p(np.nan_to_num(full[:, column["pair_lag_1"]])),
                               rtol=1e-6)
    price = HEAD.index("price_last")
    np.testing.assert_allclose(batch["static"][:, price], np.nan_to_num(full[:, column["price_last"]]), rtol=1e-6)
    assert head_inputs(store.feature_tables(), rows)["static"].tobytes() == batch["static"].tobytes()


def test_launch_rows_are_the_samples_whose_item_never_sold_before_the_target_month(tmp_path, tiny) -> None:
    from core.protocol import launch_rows

    config, store = lake(tmp_path, tiny, holdout=14)
    monthly = read_monthly(LakePaths.of(config))
    first_sale = monthly.groupby("item_id")["date_block_num"].min().to_dict()
    for name in ("validation", "holdout", "forecast"):
        index = getattr(store, f"{name}_index")
        items = store.series["item_id"].to_numpy()[index[:, 0]]
        expected = [first_sale.get(int(i), 1 << 30) >= int(t) for i, t in zip(items, index[:, 1], strict=True)]
        np.testing.assert_array_equal(launch_rows(store, index), expected, err_msg=name)
    assert launch_rows(store, store.holdout_index).any(), "the tiny data must launch items in month 14"
    np.testing.assert_array_equal(launch_rows(store, store.holdout_index), store.holdout_frame()["new_item"])


def test_items_with_alike_names_get_close_name_vectors_and_an_unknown_name_gets_zeros() -> None:
    items = pd.DataFrame({
        "item_id": range(8),
        "item_name": ["FIFA 14 [PS3, русская версия]", "FIFA 15 [PS3, русская версия]", "FIFA 15 [PC, Jewel]",
                      "Звездные войны (Blu-Ray)", "Звездные войны 2 (Blu-Ray)", "Гарри Поттер (DVD)",
                      "Гарри Поттер 2 (DVD)", "Наушники Sony MDR"],
    })
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, 99])  # 99 is in no items table
    vectors = item_name_vectors(items, ids)
    assert vectors.shape == (9, NAME_DIMS) and vectors.dtype == np.float32
    assert not vectors[99 == ids].any() and np.abs(vectors[:8]).sum(axis=1).min() > 0
    unit = vectors[:8] / np.linalg.norm(vectors[:8], axis=1, keepdims=True)
    similarity = unit @ unit.T
    assert similarity[0, 1] > similarity[0, 3] and similarity[0, 1] > similarity[0, 5]
    assert similarity[3, 4] > similarity[3, 0] and similarity[5, 6] > similarity[5, 7]
    np.testing.assert_array_equal(item_name_vectors(items, ids), vectors)  # the same names, the same vectors


def test_the_name_features_are_the_stores_name_vectors_of_each_samples_item(tmp_path: Path, tiny) -> None:
    _, store = lake(tmp_path, tiny, holdout=12)
    rows = np.concatenate([store.train_index[:50], store.holdout_index[:20]])
    got = matrix(store.feature_tables(), rows, NAME)
    tables = store.feature_tables()
    vocabulary = np.zeros(tables.item_names.shape[0], dtype=np.int64)  # item row -> item id, from the series
    vocabulary[tables.rows["item"]] = store.series["item_id"].to_numpy()
    assert np.array_equal(np.unique(vocabulary), vocabulary)  # every item has a series: this is the vocabulary
    names = pd.read_parquet(LakePaths(tmp_path).reference / "items.parquet")  # the names the lake holds
    expected = item_name_vectors(names, vocabulary)[tables.rows["item"][rows[:, 0]]]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
