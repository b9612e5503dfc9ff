"""Step 2 (core.aggregate): daily lake/sales partitions -> lake/monthly partitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from lake_helpers import sales_table, write_lake

from core.aggregate import (
    MONTHLY_SCHEMA,
    aggregate,
    aggregate_month,
    monthly_path,
    months_to_aggregate,
    read_monthly,
    write_state,
)
from core.config import NestcastConfig
from core.errors import DataValidationError
from core.files import write_parquet_atomic
from core.lake import LakePaths


def random_sales(seed: int = 0, months: int = 4, rows: int = 600) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": np.arange(100, 130), "item_category_id": np.arange(30) % 5})
    sales = pd.DataFrame(
        {
            "date_block_num": rng.integers(0, months, rows),
            "shop_id": rng.choice([0, 1, 5, 57, 58], rows),  # 0 -> 57 and 1 -> 58 are merged by default
            "item_id": rng.choice(items["item_id"], rows),
            "item_price": rng.choice([99.0, 149.5, 399.0], rows),
            "item_cnt_day": rng.choice([1.0, 1.0, 2.0, 3.0, -1.0, 40.0], rows),
        }
    )
    return sales, items


@pytest.fixture
def lake(tmp_path: Path) -> tuple[NestcastConfig, pd.DataFrame]:
    sales, items = random_sales()
    write_lake(tmp_path, sales, items)
    return NestcastConfig(data_dir=tmp_path), sales


def _merged(sales: pd.DataFrame, config: NestcastConfig) -> pd.DataFrame:
    out = sales.copy()
    out["shop_id"] = out["shop_id"].replace(config.aggregate.shop_merge_map)
    return out


def test_monthly_totals_equal_the_daily_rows(lake: tuple[NestcastConfig, pd.DataFrame]) -> None:
    config, sales = lake
    summary = aggregate(config)
    monthly = read_monthly(LakePaths(config.data_dir))

    assert summary.rows_in == len(sales)
    assert summary.rows_out == len(monthly)
    assert summary.units_in == pytest.approx(sales["item_cnt_day"].sum())
    assert summary.units_out == pytest.approx(sales["item_cnt_day"].sum())
    assert monthly["date_block_num"].dtype == np.int16
    assert pa.Schema.from_pandas(monthly.drop(columns="date_block_num"), preserve_index=False).equals(MONTHLY_SCHEMA)

    daily = _merged(sales, config)
    daily["revenue"] = daily["item_price"] * daily["item_cnt_day"]
    expected = (
        daily.groupby(["date_block_num", "shop_id", "item_id"])
        .agg(
            cnt=("item_cnt_day", "sum"),
            revenue=("revenue", "sum"),
            price=("item_price", "mean"),
            transactions=("item_cnt_day", "size"),
        )
        .reset_index()
    )
    got = monthly.merge(expected, on=["date_block_num", "shop_id", "item_id"], how="outer", indicator=True)
    assert (got["_merge"] == "both").all()
    np.testing.assert_allclose(got["item_cnt_month"], got["cnt"], rtol=1e-6)
    np.testing.assert_allclose(got["revenue_x"], got["revenue_y"], rtol=1e-6)
    np.testing.assert_allclose(got["mean_price"], got["price"], rtol=1e-6)
    np.testing.assert_array_equal(got["transactions_x"], got["transactions_y"])
    assert got["transactions_x"].sum() == len(sales)  # every daily row lands in exactly one monthly row
    np.testing.assert_array_equal(got["item_category_id"], (got["item_id"] - 100) % 5)


def test_duplicate_shops_are_merged_before_grouping(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": [7], "item_category_id": [3]})
    sales = pd.DataFrame(
        {
            "date_block_num": [0, 0, 0, 0],
            "shop_id": [0, 57, 57, 5],
            "item_id": [7, 7, 7, 7],
            "item_price": [10.0, 20.0, 30.0, 10.0],
            "item_cnt_day": [1.0, 2.0, 4.0, 8.0],
        }
    )
    write_lake(tmp_path, sales, items)
    aggregate(NestcastConfig(data_dir=tmp_path))
    monthly = read_monthly(LakePaths(tmp_path)).set_index("shop_id")
    assert sorted(monthly.index) == [5, 57]
    assert monthly.loc[57, "item_cnt_month"] == 7.0
    assert monthly.loc[57, "transactions"] == 3
    assert monthly.loc[57, "revenue"] == pytest.approx(10 + 40 + 120)

    unmerged = NestcastConfig(data_dir=tmp_path).with_overrides(shop_merge_map={})
    aggregate(unmerged)
    assert sorted(read_monthly(LakePaths(tmp_path))["shop_id"]) == [0, 5, 57]


def test_outlier_policy_comes_from_config(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": [7], "item_category_id": [3]})
    sales = pd.DataFrame(
        {
            "date_block_num": [0, 0, 0],
            "shop_id": [5, 5, 5],
            "item_id": [7, 7, 7],
            "item_price": [10.0, 10.0, 10.0],
            "item_cnt_day": [500.0, -2.0, 3.0],
        }
    )
    write_lake(tmp_path, sales, items)
    base = NestcastConfig(data_dir=tmp_path)
    aggregate(base)
    assert read_monthly(LakePaths(tmp_path))["item_cnt_month"].item() == 501.0

    summary = aggregate(base.with_overrides(drop_returns=True, daily_count_cap=100.0))
    row = read_monthly(LakePaths(tmp_path)).iloc[0]
    assert row["item_cnt_month"] == 103.0
    assert row["transactions"] == 2
    assert summary.month_stats[0]["rows_dropped_returns"] == 1
    assert summary.month_stats[0]["rows_in"] == 3


def test_only_changed_months_are_recomputed(lake: tuple[NestcastConfig, pd.DataFrame]) -> None:
    config, sales = lake
    paths = LakePaths(config.data_dir)
    first = aggregate(config)
    assert first.recomputed == [0, 1, 2, 3]
    stamps = {m: monthly_path(paths, m).stat().st_mtime_ns for m in range(4)}
    state_bytes = (paths.monthly / "_state.json").read_bytes()
    state = json.loads(state_bytes)
    assert sorted(state["months"]) == ["0", "1", "2", "3"]
    assert state["months"]["2"]["stats"]["rows_in"] == int((sales["date_block_num"] == 2).sum())

    again = aggregate(config)
    assert again.recomputed == [] and again.skipped == [0, 1, 2, 3]
    assert {m: monthly_path(paths, m).stat().st_mtime_ns for m in range(4)} == stamps
    assert (paths.monthly / "_state.json").read_bytes() == state_bytes

    # Change one sales partition: only that month is redone.
    before_change = read_monthly(paths, months=[1])["item_cnt_month"].sum()
    changed = sales[sales["date_block_num"] == 1].copy()
    changed["item_cnt_day"] *= 2
    write_parquet_atomic(paths.sales / "date_block_num=1" / "data.parquet", sales_table(1, changed))
    assert months_to_aggregate(config) == [1]
    partial = aggregate(config)
    assert partial.recomputed == [1]
    assert {m: monthly_path(paths, m).stat().st_mtime_ns for m in (0, 2, 3)} == {m: stamps[m] for m in (0, 2, 3)}
    month1 = read_monthly(paths, months=[1])
    assert month1["item_cnt_month"].sum() == pytest.approx(changed["item_cnt_day"].sum())
    assert month1["item_cnt_month"].sum() == pytest.approx(2 * before_change)

    # A config change that affects aggregation redoes every month; a removed sales month disappears.
    assert months_to_aggregate(config.with_overrides(drop_returns=True)) == [0, 1, 2, 3]
    for file in (paths.sales / "date_block_num=3").iterdir():
        file.unlink()
    (paths.sales / "date_block_num=3").rmdir()
    removed = aggregate(config)
    assert removed.removed == [3] and removed.recomputed == []
    assert sorted(read_monthly(paths)["date_block_num"].unique()) == [0, 1, 2]


def test_months_can_be_aggregated_one_by_one(lake: tuple[NestcastConfig, pd.DataFrame]) -> None:
    config, _ = lake
    paths = LakePaths(config.data_dir)
    todo = months_to_aggregate(config)
    assert todo == [0, 1, 2, 3]
    for month in todo:
        assert aggregate_month(paths, month, config) == monthly_path(paths, month)
    assert months_to_aggregate(config) == []
    state = json.loads(write_state(config).read_text())
    assert sorted(state["months"]) == ["0", "1", "2", "3"]
    assert aggregate(config).recomputed == []


def test_unknown_item_is_a_data_error(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": [7], "item_category_id": [3]})
    sales = pd.DataFrame(
        {"date_block_num": [0], "shop_id": [5], "item_id": [8], "item_price": [1.0], "item_cnt_day": [1.0]}
    )
    write_lake(tmp_path, sales, items)
    with pytest.raises(DataValidationError, match="8"):
        aggregate(NestcastConfig(data_dir=tmp_path))
