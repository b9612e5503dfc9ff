"""Without test.csv the forecast covers the universe of pairs: every pair sold in the last N months plus the last
month's grid, with IDs that stay the same from one month's run to the next. Built on a lake written directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lake_helpers import write_lake

from core.aggregate import aggregate, read_monthly
from core.config import NestcastConfig
from core.lake import LakePaths
from core.synthetic import generate
from core.window_store import WindowStore
from core.windows import UNIVERSE_ID_STRIDE, build_windows


@pytest.fixture(scope="module")
def history() -> dict[str, pd.DataFrame]:
    data = generate("tiny", seed=3)
    sales = data.sales
    sales = sales[(sales["item_price"] > 0) & (sales["item_price"] < 100_000) & (sales["item_cnt_day"] < 1000)]
    return {"sales": sales.reset_index(drop=True), "items": data.items, "shops": data.shops["shop_id"].tolist()}


def forecast_of(root: Path, history: dict[str, pd.DataFrame], last_month: int, **overrides: object) -> pd.DataFrame:
    """The final store's forecast rows of a lake holding months 0..last_month and no test.csv."""
    sales = history["sales"][history["sales"]["date_block_num"] <= last_month]
    write_lake(root, sales, history["items"], None, history["shops"])
    config = NestcastConfig(data_dir=root).with_overrides(lookback=3, **overrides)
    aggregate(config)
    summary = build_windows(config, holdout_month=last_month + 1, windows_dir=root / "final")
    return WindowStore.open(summary.windows_dir).forecast_frame()


def expected_universe(root: Path, months: int, grid: bool) -> set[tuple[int, int]]:
    """From lake/monthly alone: pairs with a positive month in the last ``months``, and the last grid."""
    monthly = read_monthly(LakePaths(root))
    last = int(monthly["date_block_num"].max())
    recent = monthly[(monthly["date_block_num"] > last - months) & (monthly["item_cnt_month"] > 0)]
    pairs = set(zip(recent["shop_id"].tolist(), recent["item_id"].tolist(), strict=True)) if months else set()
    if grid:
        final = monthly[monthly["date_block_num"] == last]
        pairs |= {(s, i) for s in final["shop_id"].unique().tolist() for i in final["item_id"].unique().tolist()}
    return pairs


def test_the_default_universe_is_the_last_three_months_sellers_plus_the_last_months_grid(tmp_path, history):
    forecast = forecast_of(tmp_path, history, last_month=14)
    pairs = set(zip(forecast["shop_id"].tolist(), forecast["item_id"].tolist(), strict=True))
    assert pairs == expected_universe(tmp_path, 3, grid=True)
    assert len(forecast) == len(pairs) and forecast["ID"].is_unique and forecast["ID"].is_monotonic_increasing
    assert (forecast["ID"] == forecast["shop_id"].astype(np.int64) * UNIVERSE_ID_STRIDE + forecast["item_id"]).all()


def test_a_pair_keeps_its_id_from_one_months_run_to_the_next(tmp_path, history):
    earlier = forecast_of(tmp_path / "a", history, last_month=13).set_index(["shop_id", "item_id"])["ID"]
    later = forecast_of(tmp_path / "b", history, last_month=14).set_index(["shop_id", "item_id"])["ID"]
    common = earlier.index.intersection(later.index)
    assert len(common) > 0 and (earlier[common] == later[common]).all()


def test_the_universe_is_configurable(tmp_path, history):
    forecast = forecast_of(tmp_path, history, last_month=14, universe_months=6, universe_grid=False)
    pairs = set(zip(forecast["shop_id"].tolist(), forecast["item_id"].tolist(), strict=True))
    assert pairs == expected_universe(tmp_path, 6, grid=False)
