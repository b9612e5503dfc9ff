"""core.synthetic writes the five competition files in Kaggle's exact formats, with the structure the lake needs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.files import file_sha256
from core.synthetic import (
    FILE_NAMES,
    OUTLIER_COUNT,
    OUTLIER_NEGATIVE_PRICE,
    OUTLIER_PRICE,
    SCALES,
    custom_spec,
    generate,
    write_competition_files,
)

TINY = SCALES["tiny"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "raw"
    write_competition_files(out, "tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def sales(tiny_dir: Path) -> pd.DataFrame:
    return pd.read_csv(tiny_dir / "sales_train.csv")


def _header(path: Path) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.readline().rstrip("\n")


def test_writes_the_five_files_with_exact_headers(tiny_dir: Path) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(FILE_NAMES)
    assert _header(tiny_dir / "sales_train.csv") == "date,date_block_num,shop_id,item_id,item_price,item_cnt_day"
    assert _header(tiny_dir / "test.csv") == "ID,shop_id,item_id"
    assert _header(tiny_dir / "items.csv") == "item_name,item_id,item_category_id"
    assert _header(tiny_dir / "item_categories.csv") == "item_category_name,item_category_id"
    assert _header(tiny_dir / "shops.csv") == "shop_name,shop_id"


def test_no_temporary_files_are_left(tiny_dir: Path) -> None:
    assert not [p for p in tiny_dir.iterdir() if p.name.startswith(".")]


def test_sales_values_have_the_competition_text_format(tiny_dir: Path) -> None:
    text = pd.read_csv(tiny_dir / "sales_train.csv", dtype=str)
    assert text["date"].str.fullmatch(r"\d{2}\.\d{2}\.\d{4}").all()
    for column in ("date_block_num", "shop_id", "item_id"):
        assert text[column].str.fullmatch(r"\d+").all(), column
    # Floats as the real file writes them: 999.0, 1.0, -1.0, 398.95.
    assert text["item_price"].str.fullmatch(r"-?\d+\.\d+").all()
    assert text["item_cnt_day"].str.fullmatch(r"-?\d+\.0").all()
    assert (text["item_price"].str.endswith(".0")).mean() > 0.9


def test_sales_dtypes_parse(sales: pd.DataFrame) -> None:
    assert list(sales.columns) == ["date", "date_block_num", "shop_id", "item_id", "item_price", "item_cnt_day"]
    for column in ("date_block_num", "shop_id", "item_id"):
        assert pd.api.types.is_integer_dtype(sales[column]), column
    assert pd.api.types.is_float_dtype(sales["item_price"])
    assert pd.api.types.is_float_dtype(sales["item_cnt_day"])
    assert sales.notna().all().all()


def test_dates_agree_with_date_block_num(sales: pd.DataFrame) -> None:
    dates = pd.to_datetime(sales["date"], format="%d.%m.%Y")
    assert ((dates.dt.year - 2013) * 12 + dates.dt.month - 1 == sales["date_block_num"]).all()
    assert sorted(sales["date_block_num"].unique()) == list(range(TINY.n_months))


def test_one_row_per_day_shop_and_item(sales: pd.DataFrame) -> None:
    assert not sales.duplicated(["date", "shop_id", "item_id"]).any()


def test_ids_exist_in_the_reference_files(tiny_dir: Path, sales: pd.DataFrame) -> None:
    items = pd.read_csv(tiny_dir / "items.csv")
    categories = pd.read_csv(tiny_dir / "item_categories.csv")
    shops = pd.read_csv(tiny_dir / "shops.csv")
    assert len(items) == TINY.n_items and items["item_id"].is_unique
    assert len(categories) == TINY.n_categories and categories["item_category_id"].is_unique
    assert sorted(shops["shop_id"]) == sorted(TINY.shop_ids)
    assert set(sales["shop_id"]) <= set(shops["shop_id"])
    assert set(sales["item_id"]) <= set(items["item_id"])
    assert set(items["item_category_id"]) <= set(categories["item_category_id"])
    # Names with commas and quotes survive the CSV round trip.
    assert items["item_name"].str.len().gt(0).all() and shops["shop_name"].str.contains('"').any()


def test_test_csv_is_open_shops_times_items_sold_in_the_forecast_month(tiny_dir: Path, sales: pd.DataFrame) -> None:
    test = pd.read_csv(tiny_dir / "test.csv")
    assert test["ID"].tolist() == list(range(len(test)))
    assert not test.duplicated(["shop_id", "item_id"]).any()
    shops, items = set(test["shop_id"]), set(test["item_id"])
    assert len(test) == len(shops) * len(items)  # a full cross product, as the competition built it

    truth = generate("tiny", seed=0)
    assert items == set(truth.forecast_truth["item_id"])
    assert set(truth.forecast_truth["shop_id"]) <= shops
    f = TINY.forecast_month
    open_shops = {s for s, o in truth.info["shop_open_month"].items() if o <= f < truth.info["shop_close_month"][s]}
    assert shops == open_shops
    # From the files alone: the shops selling in the last month, under their canonical ids.
    duplicates = {dup for dup, _ in TINY.duplicate_pairs}
    last = sales[sales["date_block_num"] == TINY.n_months - 1]
    assert shops == set(last["shop_id"]) - duplicates
    assert set(pd.read_csv(tiny_dir / "items.csv")["item_id"]) >= items


def test_summary_describes_the_files(tmp_path: Path) -> None:
    summary = write_competition_files(tmp_path, "tiny", seed=3)
    assert summary.scale == "tiny" and summary.seed == 3
    assert summary.rows == len(pd.read_csv(tmp_path / "sales_train.csv"))
    assert summary.test_rows == len(pd.read_csv(tmp_path / "test.csv"))
    assert (summary.n_shops, summary.n_items, summary.n_categories) == (TINY.n_shops, TINY.n_items, TINY.n_categories)
    assert summary.months == TINY.n_months and summary.forecast_month == TINY.n_months
    assert sorted(Path(p).name for p in summary.files) == sorted(FILE_NAMES)
    assert 1000 < summary.rows < 20000


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, tiny_dir: Path) -> None:
    write_competition_files(tmp_path / "again", "tiny", seed=0)
    write_competition_files(tmp_path / "other", "tiny", seed=1)
    for name in FILE_NAMES:
        assert file_sha256(tmp_path / "again" / name) == file_sha256(tiny_dir / name), name
    assert file_sha256(tmp_path / "other" / "sales_train.csv") != file_sha256(tiny_dir / "sales_train.csv")
    # Rewriting in place changes nothing, not even the modification time.
    target = tmp_path / "again" / "sales_train.csv"
    before = (file_sha256(target), target.stat().st_mtime_ns)
    write_competition_files(tmp_path / "again", "tiny", seed=0)
    assert (file_sha256(target), target.stat().st_mtime_ns) == before
    # A different seed into the same folder replaces every file that differs.
    write_competition_files(tmp_path / "again", "tiny", seed=1)
    assert file_sha256(target) == file_sha256(tmp_path / "other" / "sales_train.csv")


def test_returns_and_planted_outliers_are_present_and_rare(sales: pd.DataFrame) -> None:
    returns = sales["item_cnt_day"] < 0
    assert returns.any() and returns.mean() < 0.01
    assert (sales["item_price"] == OUTLIER_PRICE).sum() == 1
    assert (sales["item_price"] == OUTLIER_NEGATIVE_PRICE).sum() == 1
    assert (sales["item_cnt_day"] == OUTLIER_COUNT).sum() == 1
    natural = sales[(sales["item_price"] != OUTLIER_PRICE) & (sales["item_price"] > 0)]
    assert natural["item_price"].max() < 100_000
    assert (sales["item_cnt_day"] > 1000).sum() == 1


def test_duplicate_shop_sells_first_then_its_canonical_id(sales: pd.DataFrame) -> None:
    for dup, canon in TINY.duplicate_pairs:
        dup_months = set(sales.loc[sales["shop_id"] == dup, "date_block_num"])
        canon_months = set(sales.loc[sales["shop_id"] == canon, "date_block_num"])
        assert dup_months and canon_months
        assert max(dup_months) < min(canon_months) <= 4
        assert min(dup_months) == 0 and max(canon_months) == TINY.n_months - 1


def test_shops_open_late_and_close_items_launch_and_leave(sales: pd.DataFrame) -> None:
    shop_span = sales.groupby("shop_id")["date_block_num"].agg(["min", "max"])
    duplicates = {dup for dup, _ in TINY.duplicate_pairs} | {canon for _, canon in TINY.duplicate_pairs}
    plain = shop_span.drop(index=list(duplicates & set(shop_span.index)))
    assert (plain["min"] > 0).sum() == TINY.n_late_shops
    assert (plain["max"] < TINY.n_months - 1).sum() == TINY.n_closing_shops
    item_span = sales.groupby("item_id")["date_block_num"].agg(["min", "max"])
    assert (item_span["min"] > 0).any()  # launches
    assert (item_span["max"] < TINY.n_months - 3).any()  # items out of sale


def test_launch_month_spikes_then_decays() -> None:
    data = generate(custom_spec("tiny", n_items=300, n_months=24), seed=0)
    sales = data.sales[(data.sales["item_cnt_day"] > 0) & (data.sales["item_cnt_day"] < 1000)]
    monthly = sales.groupby(["item_id", "date_block_num"])["item_cnt_day"].sum().reset_index()
    launch = np.asarray(data.info["item_launch_month"])[monthly["item_id"]]
    monthly["age"] = monthly["date_block_num"] - launch
    by_age = monthly[launch > 0].groupby("age")["item_cnt_day"].mean()
    assert by_age.loc[0:1].mean() > 1.3 * by_age.loc[6:].mean()


def test_december_peaks() -> None:
    spec = custom_spec("tiny", n_items=200, n_months=36)
    ratios = []
    for seed in (0, 1):
        sales = generate(spec, seed=seed).sales
        sales = sales[(sales["item_cnt_day"] <= 1000) & (sales["item_price"] > 0)]
        total = sales.groupby("date_block_num")["item_cnt_day"].sum()
        ratios += [total[m] / total[m - 1] for m in (11, 23, 35) if m in total.index]
    assert np.mean(ratios) > 1.15


def test_weekends_sell_more(sales: pd.DataFrame) -> None:
    weekday = pd.to_datetime(sales["date"], format="%d.%m.%Y").dt.dayofweek
    positive = sales["item_cnt_day"].clip(lower=0, upper=1000)
    per_day = positive.groupby(weekday).sum()
    assert per_day.loc[[5, 6]].mean() > per_day.loc[[0, 1, 2]].mean()


def test_exact_forecast_item_count_is_honoured(tmp_path: Path) -> None:
    spec = custom_spec("tiny", forecast_items=20)
    summary = write_competition_files(tmp_path, spec, seed=0)
    test = pd.read_csv(tmp_path / "test.csv")
    assert test["item_id"].nunique() == 20
    assert summary.test_rows == 20 * test["shop_id"].nunique()


def test_scales_grow_and_unknown_scale_is_refused(tmp_path: Path) -> None:
    assert SCALES["tiny"].n_items < SCALES["demo"].n_items < SCALES["full"].n_items
    full = SCALES["full"]
    assert (full.n_shops, full.n_items, full.n_categories, full.n_months) == (60, 22170, 84, 34)
    assert full.forecast_items == 5100
    assert full.n_shops - len(full.duplicate_pairs) - full.n_closing_shops == 42
    with pytest.raises(ValueError, match="unknown scale"):
        write_competition_files(tmp_path, "huge", seed=0)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_dates_are_calendar_days(sales: pd.DataFrame) -> None:
    assert all(re.fullmatch(r"(0[1-9]|[12]\d|3[01])\.(0[1-9]|1[0-2])\.201[3-5]", d) for d in sales["date"].unique())
