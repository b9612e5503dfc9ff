"""Step 2 as Prefect tasks: plan the month partitions, aggregate each month on its own, then tidy up."""

from __future__ import annotations

from prefect import get_run_logger

from core import aggregate as aggregate_step
from core.config import NestcastConfig
from core.display import month_range
from core.ingest import IngestSummary, recover_lake
from core.lake import LakePaths
from tasks.common import content_cache_key, nestcast_task


@nestcast_task("plan-months")
def plan_months(config: NestcastConfig, ingested: IngestSummary) -> dict[int, str]:
    """Every month partition in lake/sales with the content hash that keys its aggregation.

    ``ingested`` only ties this step to the ingest: the lake must be written first.
    """
    paths = LakePaths.of(config)
    recover_lake(paths)  # never read a half-applied ingest commit
    months = paths.sales_months()
    if not months:
        raise ValueError(f"no sales partitions under {paths.sales}: did ingest accept any row?")
    return {month: aggregate_step.month_input_hash(paths, month, config) for month in months}


@nestcast_task(
    "aggregate-month",
    cache_key=content_cache_key("aggregate"),
    outputs=lambda p: [LakePaths.of(p["config"]).monthly_file(p["month"])],
)
def aggregate_month(config: NestcastConfig, month: int, input_hash: str) -> str:
    """Daily rows of one month -> one row per (shop, item) in lake/monthly/date_block_num=N/."""
    return str(aggregate_step.aggregate_month(LakePaths.of(config), month, config))


@nestcast_task("finish-aggregation")
def finish_aggregation(config: NestcastConfig, input_hashes: dict[int, str]) -> aggregate_step.MonthlyLake:
    """Drop monthly partitions whose sales month is gone and record the lake's monthly state."""
    monthly = aggregate_step.finish(config, input_hashes)
    # One line for the whole fan-out: the console drops each aggregate-month's own completion line.
    get_run_logger().info(
        "aggregated %s into lake/monthly%s", month_range(input_hashes, config.ingest.first_month),
        f", removed {len(monthly.removed)} stale partition(s)" if monthly.removed else "",
    )
    return monthly
