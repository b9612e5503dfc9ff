"""Step 3 as a Prefect task: the windowed feature store and the sample index."""

from __future__ import annotations

from prefect import get_run_logger

from core import windows as windows_step
from core.aggregate import MonthlyLake
from core.config import NestcastConfig
from core.ingest import recover_lake
from core.lake import LakePaths
from tasks.common import content_cache_key, nestcast_task


@nestcast_task(
    "build-windows",
    task_run_name="build-windows-{purpose}",
    # The reference tables are read too: a removed test.csv (test.parquet gone) changes the forecast pairs.
    cache_key=content_cache_key("aggregate", "windows", input_trees=lambda config: [LakePaths.of(config).reference]),
    outputs=lambda p: windows_step.store_files(LakePaths.of(p["config"]).windows_dir(p["purpose"])),
)
def build_windows(config: NestcastConfig, monthly: MonthlyLake,
                  purpose: str = "evaluation") -> windows_step.WindowsSummary:
    """Features [series, month, channel] + (series, target month) samples, split by time.

    ``purpose="evaluation"``: the last month is the holdout (``lake/windows``); ``"final"``: no holdout, every
    month trains (``lake/windows-final``), for the models whose forecast is exported.
    """
    recover_lake(LakePaths.of(config))  # never read a half-applied ingest commit
    target = LakePaths.of(config).windows_dir(purpose)  # checks the purpose
    if purpose == "final":
        built = windows_step.build_windows(config, holdout_month=monthly.last_month + 1, windows_dir=target)
    else:
        built = windows_step.build_windows(config, windows_dir=target)
    get_run_logger().info(
        "windows (%s): %s series, samples %s, validation months %s, holdout month %s, forecast month %s%s",
        purpose, built.n_series, built.sample_counts, built.validation_months, built.holdout_month,
        built.forecast_month, " (unchanged, reused)" if built.skipped else "",
    )
    return built
