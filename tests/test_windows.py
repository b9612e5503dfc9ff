"""Step 3 (core.windows): the cube, the windows cut from it, the time split and the datasets.

The reference below is deliberately slow and plain: dictionaries and Python loops over rows and
months, written from the channel definitions, never from the vectorised code.
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
from core.cube import CHANNEL_SPECS, CHANNELS
from core.lake import LakePaths
from core.synthetic import generate
from core.window_store import WindowStore
from core.windows import build_windows

LOOKBACK = 6


# --- fixtures: a lake written directly in the contract's schema ---------------------------------


@pytest.fixture(scope="module")
def tiny() -> dict[str, pd.DataFrame]:
    data = generate("tiny", seed=3)
    sales = data.sales
    # What ingest would quarantine (planted outliers) is left out here.
    sales = sales[(sales["item_price"] > 0) & (sales["item_price"] < 100_000) & (sales["item_cnt_day"] < 1000)]
    return {
        "sales": sales.reset_index(drop=True),
        "items": data.items,
        "test": data.test,
        "shops": data.shops["shop_id"].tolist(),
    }


def tiny_lake(root: Path, tiny: dict[str, pd.DataFrame], **overrides: object) -> NestcastConfig:
    write_lake(root, tiny["sales"], tiny["items"], tiny["test"], tiny["shops"])
    config = NestcastConfig(data_dir=root).with_overrides(lookback=LOOKBACK, **overrides)
    aggregate(config)
    return config


# --- the slow reference ---------------------------------------------------------------------------


def reference_cube(config: NestcastConfig, store: WindowStore) -> tuple[np.ndarray, dict[str, float]]:
    """[series, month, channel] from the channel definitions, with loops; and the scale factors."""
    monthly = read_monthly(LakePaths(config.data_dir))
    n_months, holdout = store.n_months, store.holdout_month
    lo, hi = config.windows.target_clip_min, config.windows.target_clip_max
    count: dict[tuple[int, int, int], float] = {}
    item_total: dict[tuple[int, int], float] = defaultdict(float)
    item_shops: dict[tuple[int, int], float] = defaultdict(float)
    price_w: dict[tuple[int, int], float] = defaultdict(float)
    price_s: dict[tuple[int, int], float] = defaultdict(float)
    shop_total: dict[tuple[int, int], float] = defaultdict(float)
    shopcat_total: dict[tuple[int, int, int], float] = defaultdict(float)
    pair_first: dict[tuple[int, int], int] = {}
    item_first: dict[int, int] = {}
    item_cat: dict[int, int] = {}
    clipped_sum: dict[tuple, float] = defaultdict(float)  # ("item", i, m), ("shop", s, m), ("cat", c, m), ...
    grid_shops: dict[int, set[int]] = defaultdict(set)
    grid_items: dict[int, set[int]] = defaultdict(set)
    for row in monthly.itertuples():
        m, s, i, c, n = (
            int(row.date_block_num),
            int(row.shop_id),
            int(row.item_id),
            int(row.item_category_id),
            float(row.item_cnt_month),
        )
        count[(s, i, m)] = n
        item_total[(i, m)] += max(n, 0.0)
        item_shops[(i, m)] += 1.0 if n > 0 else 0.0
        price_w[(i, m)] += row.transactions
        price_s[(i, m)] += row.mean_price * row.transactions
        shop_total[(s, m)] += max(n, 0.0)
        shopcat_total[(s, c, m)] += max(n, 0.0)
        pair_first[(s, i)] = min(pair_first.get((s, i), m), m)
        item_first[i] = min(item_first.get(i, m), m)
        item_cat[i] = c
        grid_shops[m].add(s)
        grid_items[m].add(i)
        for key in (("item", i, m), ("shop", s, m), ("cat", c, m), ("shopcat", s, c, m)):
            clipped_sum[key] += min(max(n, lo), hi)

    def cat_items(c: int, m: int) -> int:
        return sum(1 for i in grid_items[m] if item_cat[i] == c)

    def per_cell(total: float, cells: int) -> float:
        return total / cells if cells else 0.0

    def price(i: int, m: int) -> float:
        for k in range(m, -1, -1):
            if price_w.get((i, k), 0.0) > 0:
                return price_s[(i, k)] / price_w[(i, k)]
        return 0.0

    def age(first: int | None, m: int) -> float:
        return 0.0 if first is None or m < first else float(m - first + 1)

    def raw(channel: str, s: int, i: int, c: int, m: int) -> float:
        n = count.get((s, i, m), 0.0)
        return {
            "target": min(max(n, lo), hi),
            "pair_log_count": math.log1p(max(n, 0.0)),
            "pair_age": math.log1p(age(pair_first.get((s, i)), m)),
            "item_total": math.log1p(item_total.get((i, m), 0.0)),
            "item_shops": math.log1p(item_shops.get((i, m), 0.0)),
            "item_price": math.log1p(max(price(i, m), 0.0)),
            "item_age": math.log1p(age(item_first.get(i), m)),
            "item_mean": math.log1p(per_cell(clipped_sum[("item", i, m)], len(grid_shops[m]))),
            "category_mean": math.log1p(per_cell(clipped_sum[("cat", c, m)], len(grid_shops[m]) * cat_items(c, m))),
            "shop_total": math.log1p(shop_total.get((s, m), 0.0)),
            "shop_mean": math.log1p(per_cell(clipped_sum[("shop", s, m)], len(grid_items[m]))),
            "shop_category_total": math.log1p(shopcat_total.get((s, c, m), 0.0)),
            "shop_category_mean": math.log1p(per_cell(clipped_sum[("shopcat", s, c, m)], cat_items(c, m))),
            "next_month_sin": math.sin(2 * math.pi * ((m + 1) % 12) / 12),
            "next_month_cos": math.cos(2 * math.pi * ((m + 1) % 12) / 12),
        }[channel]

    # Scale of a channel: root-mean-square of its non-zero values over the distinct entities
    # (pair / item / shop / shop x category) and the months before the holdout.
    # Items: the whole vocabulary (test.csv's items too), which share their category's mean.
    item_cat.update(zip(store.series["item_id"].astype(int), store.series["item_category_id"].astype(int), strict=True))
    entity_keys = {
        "pair": sorted(pair_first),
        "item": sorted({(0, i) for i in item_cat}),
        "shop": sorted({(s, 0) for s, _ in shop_total}),
        "shopcat": sorted({(s, c) for s, c, _ in shopcat_total}),
    }
    level_of = store.meta["channel_levels"]
    assert set(level_of) == set(CHANNELS)
    scales = {}
    for channel in [name for name, _, scaled in CHANNEL_SPECS if scaled]:
        values = []
        for a, b in entity_keys[level_of[channel]]:
            for m in range(holdout):
                if level_of[channel] == "shopcat":
                    v = raw(channel, a, -1, b, m)
                else:
                    v = raw(channel, a, b, item_cat.get(b, -1), m)
                if v != 0:
                    values.append(v * v)
        scales[channel] = math.sqrt(sum(values) / len(values)) if values else 1.0

    cube = np.zeros((store.n_series, n_months, len(CHANNELS)))
    for row in store.series.itertuples():
        s, i, c = int(row.shop_id), int(row.item_id), int(row.item_category_id)
        for m in range(n_months):
            for k, channel in enumerate(CHANNELS):
                value = raw(channel, s, i, c, m)
                cube[row.series_idx, m, k] = value / scales[channel] if channel in scales else value
    return cube, scales


def reference_window(cube: np.ndarray, series_idx: int, target: int, lookback: int) -> np.ndarray:
    window = np.zeros((lookback, cube.shape[2]))
    for k in range(lookback):
        month = target - lookback + k
        if month >= 0:
            window[k] = cube[series_idx, month]
    return window


def keyed_windows(store: WindowStore, target: int) -> dict[tuple[int, int], np.ndarray]:
    idx = np.arange(store.n_series)
    windows = store.gather(idx, np.full(idx.size, target))
    keys = zip(store.series["shop_id"].tolist(), store.series["item_id"].tolist(), strict=True)
    return {key: windows[n] for n, key in enumerate(keys)}


# --- tests ----------------------------------------------------------------------------------------


def test_every_window_equals_the_loop_reference(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    config = tiny_lake(tmp_path, tiny, holdout_month=12)
    summary = build_windows(config)
    store = WindowStore.open(summary.windows_dir)
    assert store.meta["channels"] == list(CHANNELS) and store.n_channels == len(CHANNELS)
    assert store.holdout_month == 12 and store.forecast_month == 16 and store.n_months == 16
    cube, scales = reference_cube(config, store)
    assert store.meta["scaling"]["scale"].keys() == scales.keys()
    for channel, scale in scales.items():
        assert store.meta["scaling"]["scale"][channel] == pytest.approx(scale, rel=1e-5), channel

    # The whole cube, through the [series, month, channel] view, and windows for every sample.
    np.testing.assert_allclose(store.cube[:], cube, rtol=2e-5, atol=2e-6)
    for index in (store.train_index, store.holdout_index, store.forecast_index):
        got = store.gather(index[:, 0], index[:, 1])
        want = np.stack([reference_window(cube, s, t, LOOKBACK) for s, t in index])
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)

    # Targets are the clipped counts of the target month.
    for s, t in store.train_index[:: max(1, len(store.train_index) // 500)]:
        assert store.targets(np.array([s]), np.array([t]))[0] == pytest.approx(cube[s, t, 0])


def test_series_are_sales_pairs_test_pairs_and_grids(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    config = tiny_lake(tmp_path, tiny, holdout_month=12)
    store = WindowStore.open(build_windows(config).windows_dir)
    monthly = read_monthly(LakePaths(config.data_dir))
    expected = set(zip(monthly["shop_id"], monthly["item_id"], strict=True))
    merge = config.aggregate.shop_merge_map
    expected |= {(merge.get(s, s), i) for s, i in zip(tiny["test"]["shop_id"], tiny["test"]["item_id"], strict=True)}
    for month in range(1, 13):
        rows = monthly[monthly["date_block_num"] == month]
        expected |= {(s, i) for s in set(rows["shop_id"]) for i in set(rows["item_id"])}
    got = list(zip(store.series["shop_id"], store.series["item_id"], strict=True))
    assert set(got) == expected and len(got) == len(expected)
    assert got == sorted(got)
    assert not (set(store.series["shop_id"]) & set(merge))  # duplicate ids are gone
    assert store.series["shop_index"].max() < store.meta["n_shops"]
    assert store.series["category_index"].max() < store.meta["n_categories"]


@pytest.mark.parametrize("policy", ["grid", "active", "all"])
def test_sample_policies(tmp_path: Path, tiny: dict[str, pd.DataFrame], policy: str) -> None:
    config = tiny_lake(tmp_path, tiny, holdout_month=12, sample_policy=policy, min_train_month=2)
    store = WindowStore.open(build_windows(config).windows_dir)
    monthly = read_monthly(LakePaths(config.data_dir))
    sold = {(int(r.shop_id), int(r.item_id), int(r.date_block_num)) for r in monthly.itertuples()}
    key_of = dict(enumerate(zip(store.series["shop_id"].tolist(), store.series["item_id"].tolist(), strict=True)))
    expected = set()
    for target in range(2, 12):
        if policy == "grid":
            rows = monthly[monthly["date_block_num"] == target]
            expected |= {(s, i, target) for s in set(rows["shop_id"]) for i in set(rows["item_id"])}
        elif policy == "active":
            for s, i in key_of.values():
                if any((s, i, m) in sold for m in range(target - LOOKBACK, target + 1)):
                    expected.add((s, i, target))
        else:
            expected |= {(s, i, target) for s, i in key_of.values()}
    got = [(*key_of[int(s)], int(t)) for s, t in store.train_index]
    assert len(got) == len(set(got))
    assert set(got) == expected
    assert store.meta["sample_counts"]["train"] == len(expected)
    assert store.meta["sample_policy"] == policy


def test_no_leakage_from_the_target_month_or_later(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    target = 10
    config = tiny_lake(tmp_path, tiny, holdout_month=target)
    clean = WindowStore.open(build_windows(config).windows_dir)
    clean_windows = {t: keyed_windows(clean, t) for t in range(1, target + 1)}
    clean_train = clean.gather(clean.train_index[:, 0], clean.train_index[:, 1])
    clean_keys = clean.series[["shop_id", "item_id"]].to_numpy()[clean.train_index[:, 0]]
    clean_scales = clean.meta["scaling"]["scale"]

    # Poison every input of months >= target: huge counts and prices, returns, new pairs and new items.
    sales = tiny["sales"].copy()
    late = sales["date_block_num"] >= target
    sales.loc[late, "item_cnt_day"] *= 997
    sales.loc[late, "item_price"] *= 1000
    unsold_items = sorted(set(tiny["items"]["item_id"]) - set(sales.loc[~late, "item_id"]))
    extra = pd.DataFrame(
        {
            "date_block_num": target,
            "shop_id": [25, 28, 31, 46],
            "item_id": [*unsold_items[:2], 5, 7],
            "item_price": 12345.0,
            "item_cnt_day": [500.0, 300.0, -50.0, 800.0],
        }
    )
    shutil.rmtree(tmp_path / "lake")
    poisoned = tiny_lake(
        tmp_path, {**tiny, "sales": pd.concat([sales, extra], ignore_index=True)}, holdout_month=target
    )
    dirty = WindowStore.open(build_windows(poisoned).windows_dir)
    assert dirty.meta["input_hashes"] != clean.meta["input_hashes"]

    assert dirty.meta["scaling"]["scale"] == clean_scales
    for t in range(1, target + 1):
        dirty_windows = keyed_windows(dirty, t)
        for key, window in clean_windows[t].items():
            np.testing.assert_array_equal(dirty_windows[key], window, err_msg=f"series {key}, target {t}")
    np.testing.assert_array_equal(dirty.train_index[:, 1], clean.train_index[:, 1])
    dirty_keys = dirty.series[["shop_id", "item_id"]].to_numpy()[dirty.train_index[:, 0]]
    np.testing.assert_array_equal(dirty_keys, clean_keys)
    np.testing.assert_array_equal(dirty.gather(dirty.train_index[:, 0], dirty.train_index[:, 1]), clean_train)
    # ...and the poison is visible where it should be: the holdout targets.
    assert dirty.holdout_frame()["actual"].sum() > clean.holdout_frame()["actual"].sum()


def test_test_pair_without_history(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": [1, 2, 3], "item_category_id": [0, 0, 1]})
    sales = pd.DataFrame(
        {
            "date_block_num": [2, 3, 4, 5, 5],
            "shop_id": [7, 7, 7, 7, 8],
            "item_id": [1, 1, 1, 1, 3],
            "item_price": 100.0,
            "item_cnt_day": [1.0, 2.0, 3.0, 4.0, 1.0],
        }
    )
    test = pd.DataFrame({"ID": [0, 1, 2], "shop_id": [8, 8, 7], "item_id": [1, 2, 1]})
    write_lake(tmp_path, sales, items, test)
    config = NestcastConfig(data_dir=tmp_path).with_overrides(lookback=4)
    aggregate(config)
    store = WindowStore.open(build_windows(config).windows_dir)
    forecast = store.forecast_frame()
    assert forecast["ID"].tolist() == [0, 1, 2] and store.forecast_month == 6
    windows = store.gather(forecast["series_idx"].to_numpy(), np.full(3, 6))  # months 2..5
    ch = {name: k for k, name in enumerate(CHANNELS)}
    scale = store.meta["scaling"]["scale"]

    new_pair, new_item, old_pair = windows
    for window in (new_pair, new_item):
        for name in ("target", "pair_log_count", "pair_age"):
            np.testing.assert_array_equal(window[:, ch[name]], 0.0)
    # Item 1 first sold in month 2: ages 1..4 over months 2..5, whatever the shop.
    ages = np.expm1(new_pair[:, ch["item_age"]] * scale["item_age"])
    np.testing.assert_allclose(ages, [1, 2, 3, 4], rtol=1e-5)
    np.testing.assert_allclose(new_pair[:, ch["item_age"]], old_pair[:, ch["item_age"]])
    for name in ("item_total", "item_shops", "item_price", "item_age"):
        np.testing.assert_array_equal(new_item[:, ch[name]], 0.0)  # item 2 never sold
    np.testing.assert_array_equal(old_pair[:, ch["target"]], [1, 2, 3, 4])
    np.testing.assert_allclose(np.expm1(old_pair[:, ch["pair_age"]] * scale["pair_age"]), [1, 2, 3, 4], rtol=1e-5)
    # Shop 8 sold once, in month 5.
    np.testing.assert_array_equal(new_pair[:3, ch["shop_total"]], 0.0)
    assert new_pair[3, ch["shop_total"]] > 0
    np.testing.assert_array_equal(forecast["prev"], [0, 0, 4])
    np.testing.assert_allclose(forecast["mean3"], [0, 0, 3])


def test_target_is_clipped_and_magnitude_kept(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": [1, 2], "item_category_id": [0, 0]})
    sales = pd.DataFrame(
        {
            "date_block_num": [0, 0, 1, 1, 2, 2],
            "shop_id": 5,
            "item_id": [1, 2, 1, 2, 1, 2],
            "item_price": 10.0,
            "item_cnt_day": [25.0, 3.0, -4.0, 3.0, 7.5, 3.0],
        }
    )
    write_lake(tmp_path, sales, items)
    config = NestcastConfig(data_dir=tmp_path).with_overrides(lookback=3, holdout_month=3, target_clip_max=7.0)
    aggregate(config)
    store = WindowStore.open(build_windows(config).windows_dir)
    s = store.series.set_index("item_id").loc[1, "series_idx"]
    window = store.gather(np.array([s]), np.array([3]))[0]
    np.testing.assert_array_equal(window[:, 0], [7.0, 0.0, 7.0])
    log_count = np.expm1(window[:, 1] * store.meta["scaling"]["scale"]["pair_log_count"])
    np.testing.assert_allclose(log_count, [25.0, 0.0, 7.5], rtol=1e-5)
    assert store.targets(np.array([s]), np.array([2]))[0] == 7.0


def test_scaling_uses_training_months_only(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    config = tiny_lake(tmp_path, tiny, holdout_month=8)
    store = WindowStore.open(build_windows(config).windows_dir)
    monthly = read_monthly(LakePaths(config.data_dir))
    positive = monthly.assign(pos=monthly["item_cnt_month"].clip(lower=0))
    totals = positive.groupby(["item_id", "date_block_num"])["pos"].sum().reset_index()
    totals = totals[totals["pos"] > 0]

    def rms(frame: pd.DataFrame) -> float:
        return float(np.sqrt(np.mean(np.log1p(frame["pos"]) ** 2)))

    train_rms = rms(totals[totals["date_block_num"] < 8])
    all_rms = rms(totals)
    assert store.meta["scaling"]["scale"]["item_total"] == pytest.approx(train_rms, rel=1e-5)
    assert abs(train_rms - all_rms) > 1e-3  # later months would have given a different factor
    assert store.meta["scaling"]["stats_months"] == [0, 7]


def test_split_boundaries(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    config = tiny_lake(tmp_path, tiny, min_train_month=3)
    store = WindowStore.open(build_windows(config).windows_dir)
    last = 15
    assert store.meta["last_month"] == last and store.holdout_month == last and store.forecast_month == last + 1
    assert sorted(set(store.train_index[:, 1].tolist())) == list(range(3, last))
    assert set(store.holdout_index[:, 1].tolist()) == {last}
    assert set(store.forecast_index[:, 1].tolist()) == {last + 1}
    # the validation months: the two before the holdout, each its whole grid, oldest first
    assert store.validation_months == [last - 2, last - 1] and store.validation_start == last - 2
    validation = store.validation_frame()
    np.testing.assert_array_equal(validation["date_block_num"], store.validation_index[:, 1])
    assert validation["date_block_num"].is_monotonic_increasing
    monthly = read_monthly(LakePaths(config.data_dir))
    for month in (last - 2, last - 1):
        rows = monthly[monthly["date_block_num"] == month]
        cells = {(s, i) for s in set(rows["shop_id"]) for i in set(rows["item_id"])}
        part = validation[validation["date_block_num"] == month]
        assert set(zip(part["shop_id"], part["item_id"], strict=True)) == cells and len(part) == len(cells)
    one = WindowStore.open(build_windows(tiny_lake(tmp_path / "one", tiny, min_train_month=3, validation_months=1))
                           .windows_dir)
    assert one.validation_months == [last - 1]

    holdout = store.holdout_frame()
    rows = monthly[monthly["date_block_num"] == last]
    grid = {(s, i) for s in set(rows["shop_id"]) for i in set(rows["item_id"])}
    assert set(zip(holdout["shop_id"], holdout["item_id"], strict=True)) == grid and len(holdout) == len(grid)
    np.testing.assert_array_equal(holdout["series_idx"], store.holdout_index[:, 0])

    count = {(r.shop_id, r.item_id, r.date_block_num): r.item_cnt_month for r in monthly.itertuples()}
    for r in holdout.itertuples():
        clipped = [min(max(count.get((r.shop_id, r.item_id, m), 0.0), 0.0), 20.0) for m in range(last + 1)]
        assert r.actual == pytest.approx(clipped[last])
        assert r.prev == pytest.approx(clipped[last - 1])
        assert r.mean3 == pytest.approx(sum(clipped[last - 3 : last]) / 3)
        assert r.new_pair == (not any((r.shop_id, r.item_id, m) in count for m in range(last)))
        assert r.new_item == (not (monthly[monthly["date_block_num"] < last]["item_id"] == r.item_id).any())
    assert holdout["new_item"].any() and holdout["new_pair"].any() and not holdout["new_pair"].all()

    forecast = store.forecast_frame()
    test = tiny["test"].sort_values("ID")
    merge = config.aggregate.shop_merge_map
    assert forecast["ID"].tolist() == test["ID"].tolist()
    assert forecast["shop_id"].tolist() == [merge.get(s, s) for s in test["shop_id"]]
    assert forecast["item_id"].tolist() == test["item_id"].tolist()

    # holdout = last + 1: no holdout, every month trains (the final model for the forecast),
    # built beside the evaluation windows.
    final_dir = tmp_path / "lake" / "windows_final"
    final = WindowStore.open(build_windows(config, holdout_month=last + 1, windows_dir=final_dir).windows_dir)
    assert final.holdout_frame().empty and max(final.train_index[:, 1]) == last
    assert final.meta["scaling"]["stats_months"] == [0, last]
    np.testing.assert_array_equal(final.forecast_frame()["series_idx"], forecast["series_idx"])
    assert build_windows(config).skipped  # the evaluation build is untouched
    with pytest.raises(ValueError, match="holdout"):
        build_windows(config, holdout_month=last + 2)


def test_rebuild_is_skipped_when_nothing_changed(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    config = tiny_lake(tmp_path, tiny)
    first = build_windows(config)
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(first.windows_dir).iterdir()}
    again = build_windows(config)
    assert again.skipped and not first.skipped
    assert {p.name: p.stat().st_mtime_ns for p in Path(first.windows_dir).iterdir()} == stamps
    changed = build_windows(config.with_overrides(lookback=3))
    assert not changed.skipped and WindowStore.open(changed.windows_dir).lookback == 3
    assert [p.name for p in (tmp_path / "lake").iterdir() if p.name.startswith(".")] == []


def test_cube_view_indexes_like_numpy(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    store = WindowStore.open(build_windows(tiny_lake(tmp_path, tiny)).windows_dir)
    dense = store.rows(np.arange(store.n_series))
    assert store.cube.shape == dense.shape
    s = np.array([5, 1, 5, 40])
    m = np.array([0, 3, 9, 15])
    np.testing.assert_array_equal(store.cube[s], dense[s])
    np.testing.assert_array_equal(store.cube[s, m], dense[s, m])
    np.testing.assert_array_equal(store.cube[7], dense[7])
    np.testing.assert_array_equal(store.cube[:, 4, 0], dense[:, 4, 0])
    np.testing.assert_array_equal(store.cube[2:9, :, 3:5], dense[2:9, :, 3:5])


def test_datasets_feed_keras(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> None:
    import keras

    store = WindowStore.open(build_windows(tiny_lake(tmp_path, tiny)).windows_dir)
    train = store.train_dataset(batch_size=64, seed=1, budget=300)
    assert len(train) == 5
    x, y, weights = train[0]  # a budget draw weighs each window by 1 / its draw rate
    assert set(x) == {"sequence", "shop", "category", "static", "month"}
    assert x["static"].shape == (64, store.n_static) and x["month"].dtype == np.int32
    assert x["sequence"].shape == (64, LOOKBACK, len(CHANNELS)) and x["sequence"].dtype == np.float32
    assert x["shop"].dtype == np.int32 and x["category"].dtype == np.int32 and y.shape == (64,)
    assert weights.shape == (64,) and (weights >= 1).all()
    same = store.train_dataset(batch_size=64, seed=1, budget=300)
    np.testing.assert_array_equal(same[0][0]["sequence"], x["sequence"])
    stream = store.train_dataset(batch_size=64, seed=1, budget=300, endless=True)  # what training reads
    np.testing.assert_array_equal(stream[0][0]["sequence"], x["sequence"])
    next_epoch = stream[len(stream)]  # the stream goes on into epoch 1: another order (and draw)
    assert not np.array_equal(next_epoch[1], y) or not np.array_equal(next_epoch[0]["shop"], x["shop"])
    seen = np.concatenate([train[k][1] for k in range(len(train))])
    assert seen.size == 300

    # Without the static features the batches are the window and the ids alone.
    shutil.rmtree(tmp_path / "lake" / "windows")
    store = WindowStore.open(build_windows(tiny_lake(tmp_path, tiny, static_features=False)).windows_dir)
    train = store.train_dataset(batch_size=64, seed=1, budget=300)
    assert set(train[0][0]) == {"sequence", "shop", "category"} and store.n_static == 0

    seq = keras.Input((LOOKBACK, len(CHANNELS)), name="sequence")
    shop = keras.Input((), dtype="int32", name="shop")
    category = keras.Input((), dtype="int32", name="category")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(store.meta["n_shops"], 2)(shop))
    cat_embedded = keras.layers.Flatten()(keras.layers.Embedding(store.meta["n_categories"], 2)(category))
    hidden = keras.layers.Concatenate()([keras.layers.LSTM(4)(seq), embedded, cat_embedded])
    model = keras.Model({"sequence": seq, "shop": shop, "category": category}, keras.layers.Dense(1)(hidden))
    model.compile("adam", "mse")
    history = model.fit(train, validation_data=store.holdout_dataset(128), epochs=1, verbose=0)
    assert np.isfinite(history.history["val_loss"][0])
    prediction = model.predict(store.forecast_dataset(128), verbose=0)
    assert prediction.shape == (len(store.forecast_frame()), 1)


# --- the sample budget (issue 17: a full-size run in a working day) ------------------------------------------
def test_a_budget_draw_keeps_the_nonzero_windows_that_fit_and_weights_each_group_by_its_inverse_rate() -> None:
    from core.sampling import budget_draw

    nonzero = np.zeros(100, dtype=bool)
    nonzero[::10] = True
    keep, weights = budget_draw(nonzero, budget=28, seed=3)
    assert keep.size == 28 and np.all(np.diff(keep) > 0)
    assert set(np.flatnonzero(nonzero)) <= set(keep.tolist())  # all 10 non-zero windows, weight 1
    np.testing.assert_array_equal(weights[nonzero[keep]], 1.0)
    np.testing.assert_array_equal(weights[~nonzero[keep]], 5.0)  # 18 of the 90 zeros stand for 5 each
    again, _ = budget_draw(nonzero, budget=28, seed=3)
    np.testing.assert_array_equal(again, keep)
    assert not np.array_equal(budget_draw(nonzero, budget=28, seed=4)[0], keep)

    # More non-zero windows than the budget's share: they are drawn too, each group weighted by its own rate.
    many = np.random.default_rng(0).random(1000) < 0.6
    keep, weights = budget_draw(many, budget=200, seed=0)
    assert many[keep].sum() == 150 and (~many[keep]).sum() == 50
    np.testing.assert_allclose(weights[many[keep]], many.sum() / 150)
    np.testing.assert_allclose(weights[~many[keep]], (~many).sum() / 50)
    keep, weights = budget_draw(many, budget=5000, seed=0)  # everything fits: nothing drawn, nothing weighted
    np.testing.assert_array_equal(keep, np.arange(1000)) and np.testing.assert_array_equal(weights, 1.0)


def store_and_pool(tmp_path: Path, tiny: dict[str, pd.DataFrame]) -> tuple[WindowStore, np.ndarray]:
    """The tiny lake's window store and every training sample in it."""
    store = WindowStore.open(build_windows(tiny_lake(tmp_path, tiny)).windows_dir)
    return store, store.training_samples()


def test_the_weighted_draw_of_a_store_gives_the_full_grid_loss_of_any_forecast_that_depends_on_the_target_alone(
    tmp_path: Path, tiny: dict[str, pd.DataFrame]
) -> None:
    store, everything = store_and_pool(tmp_path, tiny)
    budget = everything.shape[0] // 3
    index, weights = store.weighted_training_samples(budget=budget, seed=2)
    assert index.shape[0] == budget and weights is not None
    y_all, y_kept = store.targets(everything[:, 0], everything[:, 1]), store.targets(index[:, 0], index[:, 1])
    # Every zero target stands for (n zeros / kept zeros) of them, so the squared error of a forecast that is a
    # function of "sold or not" (here 0.4 for zeros, the truth otherwise) sums exactly as over every window.
    assert np.sum(weights * (y_kept == 0) * 0.4**2) == pytest.approx(np.sum((y_all == 0) * 0.4**2), rel=1e-5)
    assert np.sum(weights) == pytest.approx(everything.shape[0], rel=1e-5)

    batches = store.train_dataset(batch_size=64, seed=2, budget=budget, pad_last=True)
    assert batches.n_samples == budget
    _, targets, batch_weights = batches[0]
    w_zero, w_sold = np.unique(weights[y_kept == 0]), np.unique(weights[y_kept > 0])
    assert w_zero.size == w_sold.size == 1 and w_zero[0] != w_sold[0]  # one rate per group
    np.testing.assert_array_equal(batch_weights, np.where(targets == 0, w_zero[0], w_sold[0]))
    last = batches[len(batches) - 1][2]
    assert (last == 0).sum() == len(batches) * 64 - budget  # the padding still weighs nothing


def test_a_budgeted_dataset_draws_afresh_each_epoch_and_a_resumed_run_redraws_the_same_epoch(
    tmp_path: Path, tiny: dict[str, pd.DataFrame]
) -> None:
    store, everything = store_and_pool(tmp_path, tiny)
    budget = everything.shape[0] // 4

    def epoch_rows(dataset: object, epoch: int) -> set[tuple[int, int]]:
        start = epoch * len(dataset)  # the stream's batches of that epoch
        rows = np.concatenate([dataset.epoch_samples(epoch)[dataset.batch_positions(start + i)]
                               for i in range(len(dataset))])
        return set(map(tuple, rows[: dataset.n_samples].tolist()))

    batches = store.train_dataset(batch_size=64, seed=5, budget=budget, pad_last=True, endless=True)
    first = epoch_rows(batches, 0)
    assert len(first) == budget  # each draw is without replacement
    # The boosters train on the fixed draw, which is the network's first epoch.
    boosters, _ = store.weighted_training_samples(budget=budget, seed=5)
    assert first == set(map(tuple, boosters.tolist()))
    second = epoch_rows(batches, 1)
    assert len(second) == budget and second != first and len(first | second) > budget  # new windows this epoch

    resumed = store.train_dataset(batch_size=64, seed=5, budget=budget, pad_last=True, endless=True)
    resumed.set_epoch(1)  # a run resumed at epoch 1 starts its stream there
    for i in (0, len(resumed) - 1):
        x, y, w = resumed[i]
        x_run, y_run, w_run = batches[len(batches) + i]
        np.testing.assert_array_equal(x["sequence"], x_run["sequence"])
        np.testing.assert_array_equal(y, y_run) and np.testing.assert_array_equal(w, w_run)

    # Each epoch's draw is weighted on its own: its weights still add up to every window.
    kept, weights = batches.epoch_samples(1), batches.epoch_weights(1)
    y_kept = store.targets(kept[:, 0], kept[:, 1])
    assert np.sum(weights) == pytest.approx(everything.shape[0], rel=1e-5)
    assert np.sum(weights * (y_kept == 0)) == pytest.approx(
        np.sum(store.targets(everything[:, 0], everything[:, 1]) == 0), rel=1e-5
    )
