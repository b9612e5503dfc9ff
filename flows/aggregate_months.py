"""Per-month aggregation as a sub-flow, so its fan-out can run on threads or on a Dask cluster."""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from core.aggregate import monthly_path
from core.config import NestcastConfig
from core.lake import LakePaths
from tasks.aggregate import aggregate_month, finish_aggregation, plan_months
from tasks.common import refresh_if_missing


def make_task_runner(config: NestcastConfig) -> TaskRunner:
    """The default thread pool, or Dask: a local cluster, or the cluster at ``dask_address``."""
    if config.orchestration.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.orchestration.dask_address:
            return DaskTaskRunner(address=config.orchestration.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=2)


@flow(name="aggregate-months")
def _aggregate_months(config: NestcastConfig, ingested: dict[str, Any]) -> dict[str, Any]:
    input_hashes = plan_months(config, ingested)
    months = sorted(input_hashes)
    partitions = [monthly_path(LakePaths(config.data_dir), month) for month in months]
    aggregate_month.with_options(
        retries=config.orchestration.retries,
        retry_delay_seconds=exponential_backoff(config.orchestration.retry_delay_seconds),
        **refresh_if_missing(*partitions),
    ).map(
        config=unmapped(config), month=months, input_hash=[input_hashes[month] for month in months]
    ).result()
    return finish_aggregation(config, input_hashes)


def aggregate_months(config: NestcastConfig, ingested: dict[str, Any]) -> dict[str, Any]:
    """Run the aggregation sub-flow on the task runner the config asks for."""
    return _aggregate_months.with_options(task_runner=make_task_runner(config))(config, ingested)
