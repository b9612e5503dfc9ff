"""Step 2 as Prefect tasks: plan the month partitions, then aggregate each month on its own."""

from __future__ import annotations

import re
from typing import Any

from prefect import task

from core import aggregate as aggregate_step
from core.config import NestcastConfig
from core.lake import LakePaths, tree_sha256
from tasks.common import RETRY_OPTIONS, content_cache_key, retry_transient_only

_PARTITION = re.compile(r"^date_block_num=(\d+)$")


@task(name="plan-months", tags=["nestcast"], retry_condition_fn=retry_transient_only, **RETRY_OPTIONS)
def plan_months(config: NestcastConfig, ingested: dict[str, Any]) -> dict[str, Any]:
    """Every month partition in lake/sales with the content hash that keys its aggregation."""
    paths = LakePaths(config.data_dir)
    months = sorted(
        int(match.group(1))
        for entry in (paths.sales.iterdir() if paths.sales.exists() else [])
        if (match := _PARTITION.match(entry.name))
    )
    if not months:
        raise ValueError(f"no sales partitions under {paths.sales}: did ingest accept any row?")
    reference_hash = tree_sha256(paths.reference / "items.parquet")
    hashes = {month: tree_sha256(paths.sales / f"date_block_num={month}") + reference_hash for month in months}
    return {"all": months, "hashes": hashes, "monthly_dir": str(paths.monthly)}


@task(
    name="aggregate-month",
    tags=["nestcast", "io"],
    retry_condition_fn=retry_transient_only,
    cache_key_fn=content_cache_key("aggregate"),
    **RETRY_OPTIONS,
)
def aggregate_month(config: NestcastConfig, month: int, sales_partition_hash: str) -> str:
    """Daily rows of one month -> one row per (shop, item) in lake/monthly/date_block_num=N/."""
    return str(aggregate_step.aggregate_month(LakePaths(config.data_dir), month, config))
