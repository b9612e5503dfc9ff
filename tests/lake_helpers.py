"""Test helpers: a lake written directly in the contract's schema (lake/sales partitions, lake/reference)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from core.files import write_parquet_atomic
from core.lake import LakePaths


def sales_table(month: int, part: pd.DataFrame) -> pa.Table:
    """One lake/sales partition in the contract's schema (no date_block_num column inside)."""
    first_day = dt.date(2013 + month // 12, month % 12 + 1, 1)
    return pa.table(
        {
            "date": pa.array([first_day + dt.timedelta(days=k % 28) for k in range(len(part))], pa.date32()),
            "shop_id": pa.array(part["shop_id"].to_numpy(np.int16)),
            "item_id": pa.array(part["item_id"].to_numpy(np.int32)),
            "item_price": pa.array(part["item_price"].to_numpy(np.float32)),
            "item_cnt_day": pa.array(part["item_cnt_day"].to_numpy(np.float32)),
        }
    )


def write_lake(
    root: Path,
    sales: pd.DataFrame,
    items: pd.DataFrame,
    test: pd.DataFrame | None = None,
    shops: list[int] | None = None,
) -> LakePaths:
    """lake/sales partitions + lake/reference/*.parquet, as ingest writes them."""
    paths = LakePaths(root)
    for month, part in sales.groupby("date_block_num"):
        target = paths.sales / f"date_block_num={int(month)}" / "data.parquet"
        write_parquet_atomic(target, sales_table(int(month), part))
    write_parquet_atomic(
        paths.reference / "items.parquet",
        pa.table(
            {
                "item_id": pa.array(items["item_id"].to_numpy(np.int32)),
                "item_name": pa.array([f"item {i}" for i in items["item_id"]]),
                "item_category_id": pa.array(items["item_category_id"].to_numpy(np.int16)),
            }
        ),
    )
    categories = np.unique(items["item_category_id"].to_numpy())
    write_parquet_atomic(
        paths.reference / "item_categories.parquet",
        pa.table(
            {
                "item_category_id": pa.array(categories.astype(np.int16)),
                "item_category_name": pa.array([f"cat {c}" for c in categories]),
            }
        ),
    )
    if shops is not None:
        write_parquet_atomic(
            paths.reference / "shops.parquet",
            pa.table(
                {"shop_id": pa.array(np.asarray(shops, np.int16)), "shop_name": pa.array([f"shop {s}" for s in shops])}
            ),
        )
    if test is not None:
        write_parquet_atomic(
            paths.reference / "test.parquet",
            pa.table(
                {
                    "ID": pa.array(test["ID"].to_numpy(np.int32)),
                    "shop_id": pa.array(test["shop_id"].to_numpy(np.int16)),
                    "item_id": pa.array(test["item_id"].to_numpy(np.int32)),
                }
            ),
        )
    return paths
