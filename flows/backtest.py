"""The backtest flow: ingest -> aggregate -> every origin month at once (train on the months before, score it)
-> report.

Each origin is one task (``backtest-origin``), submitted to the configured task runner by the sub-flow
``backtest-origins``: on threads one origin trains at a time (each already uses every core, and Keras' seed is
global to a process); on ``task_runner=dask`` each runs on a Dask worker process, so origins train side by side.
The flow ends with one table artifact (RMSE per origin for the model and the baselines) and
``runs/backtest-<id>/backtest.md``, where ``<id>`` hashes the configuration and the origins (not where they
ran), so a rerun of the same backtest finds its finished origins in the cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from core import backtest as backtest_step
from core.aggregate import MonthlyLake
from core.config import BACKTEST_KNOBS, NestcastConfig
from flows.aggregate_months import aggregate_months, make_task_runner
from flows.parameters import OVERRIDES, OVERRIDES_HELP, with_knobs
from flows.sales_forecast import build_config
from tasks.backtest import backtest_origin, backtest_report
from tasks.common import step_options
from tasks.ingest import ingest_raw_files

DEFAULTS = NestcastConfig()
ORIGINS = inspect.Parameter("origins", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=list[int] | None)


def training_task_runner(config: NestcastConfig) -> TaskRunner:
    """Where trainings submitted by a flow run: Dask workers (one training each), or one thread at a time.

    Threads share one process: two trainings there would compete for the same cores and reseed each other
    (``keras.utils.set_random_seed`` is process-wide), so the thread path runs them in turn.
    """
    if config.orchestration.task_runner == "dask":
        return make_task_runner(config)
    return ThreadPoolTaskRunner(max_workers=1)


@flow(name="backtest-origins", flow_run_name="backtest-origins")
def _backtest_origins(
    config: NestcastConfig, months: list[int], root: str, monthly: MonthlyLake
) -> dict[str, Any]:
    options = step_options(config, timeout=False)  # submitted: a timeout could not interrupt a worker thread
    reports: list[dict[str, Any]] = []

    def start_origin(origin: int, root: Path) -> Callable[[], backtest_step.OriginResult]:
        future = backtest_origin.with_options(**options).submit(config, origin, str(root), monthly)
        return future.result

    def finish(result: backtest_step.BacktestResult, root: Path) -> None:
        reports.append(backtest_report.with_options(**options)(config, result.origins, str(root)))

    backtest_step.backtest(config, months, Path(root), prepare=False, start_origin=start_origin, finish=finish)
    (report,) = reports
    return report


@flow(name="backtest", log_prints=True, validate_parameters=True)
@with_knobs(
    BACKTEST_KNOBS, defaults=DEFAULTS, extra=[ORIGINS, OVERRIDES],
    extra_help={"origins": "Origin months to score (default: the last three months in the lake).", **OVERRIDES_HELP},
)
def backtest(
    *, origins: list[int] | None = None, overrides: dict[str, Any] | None = None, **knobs: Any
) -> dict[str, Any]:
    """Rolling-origin backtest: for each origin month, train on the months before it and score that month.

    The loop over origins is ``core.backtest.backtest``'s (the only one); here each origin and the report are
    Prefect tasks, the origins submitted together to the configured task runner.
    """
    config = build_config(**knobs, overrides=overrides)
    options = step_options(config)
    ingested = ingest_raw_files.with_options(**options)(config)
    monthly = aggregate_months(config, ingested)
    months = backtest_step.parse_origins(origins if origins else monthly.months[-3:],
                                         last_month=monthly.last_month)
    root = backtest_step.default_run_dir(config, months)
    runner = training_task_runner(config)
    report = _backtest_origins.with_options(task_runner=runner)(config, months, str(root), monthly)
    get_run_logger().info("backtest report: %s (mean model / previous %.4f)", report["report"], report["mean_ratio"])
    return {"run_dir": str(root), "origins": months, **report}
