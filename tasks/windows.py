"""Step 3 as a Prefect task: the windowed feature store and the sample index."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from core import windows as windows_step
from core.config import NestcastConfig
from tasks.common import RETRY_OPTIONS, content_cache_key, jsonable, retry_transient_only


@task(
    name="build-windows",
    tags=["nestcast"],
    retry_condition_fn=retry_transient_only,
    cache_key_fn=content_cache_key("aggregate", "windows"),
    **RETRY_OPTIONS,
)
def build_windows(config: NestcastConfig, monthly: dict[str, Any]) -> dict[str, Any]:
    """Features [series, month, channel] + (series, target month) samples, split by time."""
    summary = jsonable(windows_step.build_windows(config))
    get_run_logger().info(
        "windows: %s series, samples %s, holdout month %s, forecast month %s%s",
        summary["n_series"], summary["sample_counts"], summary["holdout_month"], summary["forecast_month"],
        " (unchanged, reused)" if summary["skipped"] else "",
    )  # fmt: skip
    return summary
