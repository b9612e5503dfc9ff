"""Step 2: daily sales -> one row per (month, shop, item) in ``lake/monthly``.

Each month is an independent unit of work: ``aggregate_month`` reads one ``lake/sales`` partition
and writes the matching ``lake/monthly`` partition, so the orchestration can fan months out in
parallel. Whether a month needs recomputing is decided by a hash of everything its output depends on
(the sales partition, the aggregation config, the items reference), stored in the output file's own
Parquet metadata -- the data and its provenance are renamed into place together, so they can never
disagree. ``lake/monthly/_state.json`` is a readable summary written after a run (parallel month
writers never touch the shared file).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from core.config import NestcastConfig
from core.errors import DataValidationError
from core.files import file_sha256, read_json, tree_sha256, write_json_atomic, write_parquet_atomic
from core.ingest.commit import recover_lake
from core.lake import LakePaths

# Bump when the aggregation logic changes, so every month is recomputed once.
AGGREGATE_VERSION = "1"
STATE_FILE = "_state.json"
HASH_KEY = b"nestcast.input_hash"
STATS_KEY = b"nestcast.stats"

MONTHLY_SCHEMA = pa.schema(
    [
        ("shop_id", pa.int16()),
        ("item_id", pa.int32()),
        ("item_category_id", pa.int16()),
        ("item_cnt_month", pa.float32()),
        ("revenue", pa.float64()),
        ("mean_price", pa.float32()),
        ("transactions", pa.int32()),
    ]
)


@dataclass
class MonthStats:
    """Rows-in = rows-out accounting for one month."""

    month: int
    rows_in: int
    rows_dropped_returns: int
    rows_used: int
    rows_out: int
    units_in: float
    units_used: float
    units_out: float


@dataclass
class AggregateSummary:
    """What ``aggregate`` did; small and JSON-friendly so a Prefect task can return it."""

    monthly_dir: str
    months: list[int]
    recomputed: list[int]
    skipped: list[int]
    removed: list[int]
    rows_in: int = 0
    rows_out: int = 0
    units_in: float = 0.0
    units_out: float = 0.0
    seconds: float = 0.0
    month_stats: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- partitions ----------------------------------------------------------------------------------


def sales_months(paths: LakePaths) -> list[int]:
    """Months that have a partition in ``lake/sales``."""
    return paths.sales_months()


def monthly_path(paths: LakePaths, month: int) -> Path:
    """``lake/monthly/date_block_num=<month>/data.parquet`` (the catalog's ``monthly_file``)."""
    return paths.monthly_file(month)


def _aggregate_settings(config: NestcastConfig) -> dict[str, Any]:
    agg = config.aggregate
    return {
        "version": AGGREGATE_VERSION,
        "shop_merge_map": {str(k): int(v) for k, v in sorted(agg.shop_merge_map.items())},
        "daily_count_cap": agg.daily_count_cap,
        "drop_returns": agg.drop_returns,
    }


def month_input_hash(paths: LakePaths, month: int, config: NestcastConfig) -> str:
    """Hash of everything the monthly partition of ``month`` depends on."""
    items = paths.reference_table("items")
    digest = hashlib.sha256()
    digest.update(tree_sha256(paths.sales_partition(month)).encode())
    digest.update(json.dumps(_aggregate_settings(config), sort_keys=True).encode())
    digest.update((file_sha256(items) if items.exists() else "no-items").encode())
    return digest.hexdigest()


def _stored_hash(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(HASH_KEY)
    return value.decode() if value else None


def months_to_aggregate(config: NestcastConfig) -> list[int]:
    """Sales months whose monthly partition is missing, was built from different inputs, or is no longer the
    file this step wrote (its sha256 differs from ``_state.json``'s: damaged or overwritten in place)."""
    paths = LakePaths.of(config)
    recorded = (read_json(paths.monthly / STATE_FILE) or {}).get("months", {})
    return [
        m for m in sales_months(paths)
        if _stored_hash(monthly_path(paths, m)) != month_input_hash(paths, m, config)
        or not _as_written(monthly_path(paths, m), recorded.get(str(m), {}).get("sha256"))
    ]


def _as_written(path: Path, sha256: str | None) -> bool:
    """Whether a monthly file still holds the bytes aggregation recorded for it (unrecorded: trusted)."""
    return sha256 is None or (path.exists() and file_sha256(path) == sha256)


# --- the work ------------------------------------------------------------------------------------


def _category_lookup(paths: LakePaths) -> np.ndarray:
    """Dense item_id -> item_category_id array (-1 for ids the reference does not know)."""
    items_path = paths.reference_table("items")
    if not items_path.exists():
        raise DataValidationError(f"{items_path}: items reference is missing; run ingest first")
    items = pq.read_table(items_path, columns=["item_id", "item_category_id"])
    ids = items["item_id"].to_numpy().astype(np.int64)
    cats = items["item_category_id"].to_numpy().astype(np.int16)
    lookup = np.full(int(ids.max(initial=-1)) + 1, -1, dtype=np.int16)
    lookup[ids] = cats
    return lookup


def _merge_shops(shop: np.ndarray, merge_map: dict[int, int]) -> np.ndarray:
    """Fold duplicate shop ids into their canonical id (vectorised through a lookup table)."""
    if not merge_map or shop.size == 0:
        return shop
    size = max(int(shop.max()), *merge_map.keys(), *merge_map.values()) + 1
    table = np.arange(size, dtype=np.int64)
    for dup, canonical in merge_map.items():
        table[dup] = canonical
    return table[shop.astype(np.int64)].astype(shop.dtype)


def merge_shop_ids(shop: np.ndarray, config: NestcastConfig) -> np.ndarray:
    """Public form of the shop merge, for steps that read shop ids from elsewhere (test.csv)."""
    return _merge_shops(np.asarray(shop), config.aggregate.shop_merge_map)


def aggregate_month(paths: LakePaths, month: int, config: NestcastConfig) -> Path:
    """Aggregate one sales partition into ``lake/monthly/date_block_num=<month>/data.parquet``.

    Safe to run concurrently for different months. Duplicate shops are merged before grouping, so
    the two ids' sales land in one row and sum.
    """
    path, _ = _aggregate_month(paths, month, config, _category_lookup(paths))
    return path


def _aggregate_month(
    paths: LakePaths, month: int, config: NestcastConfig, categories: np.ndarray
) -> tuple[Path, MonthStats]:
    source = paths.sales_partition(month)
    if not source.exists():
        raise DataValidationError(f"{source}: no sales partition for month {month}")
    input_hash = month_input_hash(paths, month, config)
    table = ds.dataset(source, format="parquet").to_table(columns=["shop_id", "item_id", "item_price", "item_cnt_day"])
    daily, rows_dropped = _clean_daily(table, config)
    grouped = _sum_cells(daily)
    out = _monthly_table(grouped, _item_categories(grouped["item_id"].to_numpy(), categories, source))
    stats = MonthStats(
        month=month,
        rows_in=table.num_rows,
        rows_dropped_returns=rows_dropped,
        rows_used=len(daily["cnt"]),
        rows_out=out.num_rows,
        units_in=float(pc.sum(table["item_cnt_day"]).as_py() or 0.0),
        units_used=float(daily["cnt"].sum()),
        units_out=float(grouped["item_cnt_month"].sum()),
    )
    # Provenance travels inside the file so data and hash are renamed into place together.
    out = out.replace_schema_metadata({HASH_KEY: input_hash.encode(), STATS_KEY: json.dumps(asdict(stats)).encode()})
    target = monthly_path(paths, month)
    write_parquet_atomic(target, out)
    return target, stats


def _clean_daily(table: pa.Table, config: NestcastConfig) -> tuple[dict[str, np.ndarray], int]:
    """The daily rows as arrays (cnt, price, shop, item), shops merged, returns dropped and daily counts
    capped as configured; and how many rows were dropped as returns."""
    agg = config.aggregate
    cnt = table["item_cnt_day"].to_numpy(zero_copy_only=False).astype(np.float64)
    price = table["item_price"].to_numpy(zero_copy_only=False).astype(np.float64)
    shop = _merge_shops(table["shop_id"].to_numpy(zero_copy_only=False).astype(np.int16), agg.shop_merge_map)
    item = table["item_id"].to_numpy(zero_copy_only=False).astype(np.int32)
    keep = np.ones(table.num_rows, dtype=bool)
    if agg.drop_returns:
        keep &= cnt >= 0
    rows_dropped = int(table.num_rows - keep.sum())
    if agg.daily_count_cap is not None:
        cnt = np.minimum(cnt, agg.daily_count_cap)
    return {"cnt": cnt[keep], "price": price[keep], "shop": shop[keep], "item": item[keep]}, rows_dropped


def _sum_cells(daily: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per (shop, item), sorted: units, revenue, mean price and number of daily rows."""
    cnt, price = daily["cnt"], daily["price"]
    # mean_price is the plain mean of the daily price points (one per daily row): a daily row is one
    # price observation; weighting by count would let a single bulk day or a return dominate it.
    frame = pd.DataFrame({"shop_id": daily["shop"], "item_id": daily["item"], "cnt": cnt, "revenue": price * cnt,
                          "price": price})
    return (
        frame.groupby(["shop_id", "item_id"], sort=True)
        .agg(
            item_cnt_month=("cnt", "sum"),
            revenue=("revenue", "sum"),
            mean_price=("price", "mean"),
            transactions=("cnt", "size"),
        )
        .reset_index()
    )


def _item_categories(item_ids: np.ndarray, categories: np.ndarray, source: Path) -> np.ndarray:
    """Each item's category from the items reference; an item the reference lacks fails the month."""
    known = item_ids < categories.size
    category = np.full(item_ids.size, -1, dtype=np.int16)
    category[known] = categories[item_ids[known]]
    if (category < 0).any():
        unknown = np.unique(item_ids[category < 0])[:10].tolist()
        raise DataValidationError(f"{source}: item ids missing from lake/reference/items.parquet: {unknown}")
    return category


def _monthly_table(grouped: pd.DataFrame, category: np.ndarray) -> pa.Table:
    """The monthly cells in :data:`MONTHLY_SCHEMA`."""
    return pa.table(
        {
            "shop_id": pa.array(grouped["shop_id"].to_numpy(np.int16)),
            "item_id": pa.array(grouped["item_id"].to_numpy().astype(np.int32)),
            "item_category_id": pa.array(category),
            "item_cnt_month": pa.array(grouped["item_cnt_month"].to_numpy(np.float32)),
            "revenue": pa.array(grouped["revenue"].to_numpy(np.float64)),
            "mean_price": pa.array(grouped["mean_price"].to_numpy(np.float32)),
            "transactions": pa.array(grouped["transactions"].to_numpy(np.int32)),
        },
        schema=MONTHLY_SCHEMA,
    )


def _stored_stats(path: Path) -> dict[str, Any] | None:
    try:
        raw = (pq.read_schema(path).metadata or {}).get(STATS_KEY)
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(raw) if raw else None


def remove_stale_months(config: NestcastConfig) -> list[int]:
    """Delete monthly partitions whose sales partition no longer exists; returns their months."""
    paths = LakePaths.of(config)
    available = set(sales_months(paths))
    removed = [m for m in paths.monthly_months() if m not in available]
    for month in removed:
        shutil.rmtree(paths.monthly_partition(month))
    return removed


def write_state(config: NestcastConfig) -> Path:
    """Rewrite ``lake/monthly/_state.json`` from the partitions' embedded provenance.

    Deterministic (no timestamps), so an unchanged lake rewrites identical bytes.
    """
    paths = LakePaths.of(config)
    months = {}
    for month in paths.monthly_months():
        path = monthly_path(paths, month)
        months[str(month)] = {
            "input_hash": _stored_hash(path),
            "sha256": file_sha256(path),
            "stats": _stored_stats(path),
        }
    state = {"version": AGGREGATE_VERSION, "settings": _aggregate_settings(config), "months": months}
    target = paths.monthly / STATE_FILE
    old = target.read_text(encoding="utf-8") if target.exists() else None
    if old is None or json.loads(old) != json.loads(json.dumps(state, sort_keys=True, default=str)):
        write_json_atomic(target, state)
    return target


@dataclass(frozen=True)
class MonthlyLake:
    """What the aggregation step hands on: the months ``lake/monthly`` holds, the content hash of each month's
    inputs (which keys the steps downstream), the partitions it removed and where the state file is."""

    months: list[int]
    input_hashes: dict[int, str]
    removed: list[int]
    state: str

    @property
    def last_month(self) -> int:
        return max(self.months)


def finish(config: NestcastConfig, input_hashes: dict[int, str]) -> MonthlyLake:
    """After every month is aggregated: drop partitions whose sales month is gone and record the lake's state."""
    removed = remove_stale_months(config)
    state = write_state(config)
    return MonthlyLake(months=sorted(input_hashes), input_hashes=dict(input_hashes), removed=removed,
                       state=str(state))


def aggregate(config: NestcastConfig, months: Iterable[int] | None = None, workers: int = 4) -> AggregateSummary:
    """Bring ``lake/monthly`` up to date with ``lake/sales``: recompute changed months only.

    Monthly partitions whose sales partition disappeared are removed. ``months`` restricts the work.
    To fan months out elsewhere (Dask): ``months_to_aggregate`` -> ``aggregate_month`` per month ->
    ``remove_stale_months`` and ``write_state`` once at the end.
    """
    start = time.perf_counter()
    paths = LakePaths.of(config)
    recover_lake(paths)  # never read a half-applied ingest commit
    available = sales_months(paths)
    if not available:
        raise DataValidationError(f"{paths.sales}: no sales partitions; run ingest first")
    todo = set(months_to_aggregate(config))
    if months is not None:
        todo &= set(months)
    removed = remove_stale_months(config)
    categories = _category_lookup(paths)
    ordered = sorted(todo)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # pyarrow and pandas release the GIL in their heavy parts, so threads overlap usefully.
        results = list(pool.map(lambda m: _aggregate_month(paths, m, config, categories), ordered))
    write_state(config)

    stats = [s for _, s in results]
    return AggregateSummary(
        monthly_dir=str(paths.monthly),
        months=available,
        recomputed=ordered,
        skipped=[m for m in available if m not in todo],
        removed=removed,
        rows_in=sum(s.rows_in for s in stats),
        rows_out=sum(s.rows_out for s in stats),
        units_in=sum(s.units_in for s in stats),
        units_out=sum(s.units_out for s in stats),
        seconds=time.perf_counter() - start,
        month_stats=[asdict(s) for s in stats],
    )


def read_monthly_table(paths: LakePaths, months: Iterable[int] | None = None) -> pa.Table:
    """All (or some) monthly partitions as one Arrow table, with ``date_block_num`` int16 first."""
    available = paths.monthly_months()
    wanted = available if months is None else sorted(set(months) & set(available))
    schema = pa.schema([("date_block_num", pa.int16()), *MONTHLY_SCHEMA])
    tables = []
    for month in wanted:
        table = pq.read_table(monthly_path(paths, month)).replace_schema_metadata(None)
        column = pa.array(np.full(table.num_rows, month, dtype=np.int16))
        tables.append(table.add_column(0, "date_block_num", column).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_monthly(paths: LakePaths, months: Iterable[int] | None = None) -> pd.DataFrame:
    """All (or some) monthly partitions as one frame, with ``date_block_num`` int16."""
    return read_monthly_table(paths, months).to_pandas()
