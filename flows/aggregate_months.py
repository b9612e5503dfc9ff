"""Per-month aggregation as a sub-flow, so its fan-out can run on threads or on a Dask cluster."""

from __future__ import annotations

from prefect import flow, unmapped
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from core.aggregate import MonthlyLake
from core.config import NestcastConfig
from core.ingest import IngestSummary
from tasks.aggregate import aggregate_month, finish_aggregation, plan_months
from tasks.common import step_options

LOOPBACK = "127.0.0.1"


def make_task_runner(config: NestcastConfig) -> TaskRunner:
    """The default thread pool, or Dask: a local cluster on 127.0.0.1, or the cluster at ``dask_address``."""
    if config.orchestration.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.orchestration.dask_address:
            return DaskTaskRunner(address=config.orchestration.dask_address)
        # Scheduler, nannies and workers listen on loopback only; so does the dashboard unless
        # `dask_dashboard` names another address (distributed's own default, ":8787", is every interface).
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": 2,
                "threads_per_worker": 1,
                "processes": True,
                "host": LOOPBACK,
                "dashboard_address": config.orchestration.dask_dashboard or None,
                "worker_dashboard_address": None,
            }
        )
    return ThreadPoolTaskRunner(max_workers=2)


@flow(name="aggregate-months", flow_run_name="aggregate-months")
def _aggregate_months(config: NestcastConfig, ingested: IngestSummary) -> MonthlyLake:
    options = step_options(config, timeout=False)  # mapped on the runner's threads or workers
    input_hashes = plan_months.with_options(**options)(config, ingested)
    months = sorted(input_hashes)
    aggregate_month.with_options(**options).map(
        config=unmapped(config), month=months, input_hash=[input_hashes[month] for month in months]
    ).result()
    return finish_aggregation.with_options(**options)(config, input_hashes)


def aggregate_months(config: NestcastConfig, ingested: IngestSummary) -> MonthlyLake:
    """Run the aggregation sub-flow on the task runner the config asks for."""
    return _aggregate_months.with_options(task_runner=make_task_runner(config))(config, ingested)
