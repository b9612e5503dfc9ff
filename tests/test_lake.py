"""The lake's catalog: every dataset's location and partition naming, in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import NestcastConfig
from core.lake import PARTITION_KEY, LakePaths, forecast_month_label, partition_month, partition_months


def test_partitions_are_named_and_parsed_by_the_catalog(tmp_path):
    lake = LakePaths.of(NestcastConfig(data_dir=tmp_path))
    assert PARTITION_KEY == "date_block_num"
    assert lake.sales_partition(7) == tmp_path / "lake" / "sales" / "date_block_num=7"
    assert lake.monthly_file(3) == tmp_path / "lake" / "monthly" / "date_block_num=3" / "data.parquet"
    assert partition_month(lake.monthly_file(3)) == 3 and partition_month(lake.sales_partition(12)) == 12
    with pytest.raises(ValueError):
        partition_month(tmp_path / "month=3")
    for month in (10, 2, 0):
        lake.sales_partition(month).mkdir(parents=True)
    (lake.sales / "date_block_num=x").mkdir()
    (lake.sales / "_state.json").write_text("{}")
    assert lake.sales_months() == [0, 2, 10] == partition_months(lake.sales)
    assert lake.monthly_months() == []


def test_datasets_runs_and_submissions_have_one_name_each(tmp_path):
    lake = LakePaths(tmp_path)
    assert lake.reference_table("items") == lake.reference_table("items.csv") == lake.reference / "items.parquet"
    assert lake.windows_meta("evaluation") == tmp_path / "lake" / "windows" / "meta.json"
    assert lake.windows_dir("final") == tmp_path / "lake" / "windows-final"
    with pytest.raises(ValueError):
        lake.windows_dir("holdout")
    assert lake.backtest_windows(26, "abc") == tmp_path / "lake" / "backtest" / "windows-26-abc"
    assert lake.forecast_run("0123456789abcdef") == tmp_path / "runs" / "forecast-0123456789ab"
    assert LakePaths.stage_predictions(Path("r"), "final", "forecast") == Path("r/final/forecast.parquet")
    assert lake.submission(forecast_month_label(34)) == tmp_path / "submissions" / "2015-11.csv"
    assert {"lake", "runs", "submissions", "monthly"} <= set(lake.directories())
