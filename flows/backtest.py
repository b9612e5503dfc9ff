"""The backtest flow: ingest -> aggregate -> for each origin month (train on the months before, score it) -> report.

Each origin is one task (``backtest-origin``); the flow ends with one table artifact (RMSE per origin
for the model and the baselines) and ``runs/backtest-<id>/backtest.md``, where ``<id>`` hashes the
configuration and the origins, so a rerun of the same backtest finds its finished origins in the cache.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from core import backtest as backtest_step
from core.config import BACKTEST_KNOBS, NestcastConfig
from flows.aggregate_months import aggregate_months
from flows.parameters import OVERRIDES, OVERRIDES_HELP, with_knobs
from flows.sales_forecast import build_config
from tasks.backtest import backtest_origin, backtest_report
from tasks.common import step_options
from tasks.ingest import ingest_raw_files

DEFAULTS = NestcastConfig()
ORIGINS = inspect.Parameter("origins", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=list[int] | None)


@flow(name="backtest", log_prints=True, validate_parameters=True)
@with_knobs(
    BACKTEST_KNOBS, defaults=DEFAULTS, extra=[ORIGINS, OVERRIDES],
    extra_help={"origins": "Origin months to score (default: the last three months in the lake).", **OVERRIDES_HELP},
)  # fmt: skip
def backtest(
    *, origins: list[int] | None = None, overrides: dict[str, Any] | None = None, **knobs: Any
) -> dict[str, Any]:
    """Rolling-origin backtest: for each origin month, train on the months before it and score that month.

    The loop over origins is ``core.backtest.backtest``'s (the only one); here each origin and the report are
    Prefect tasks.
    """
    config = build_config(**knobs, overrides=overrides)
    options = step_options(config)
    ingested = ingest_raw_files.with_options(**options)(config)
    monthly = aggregate_months(config, ingested)
    months = backtest_step.parse_origins(origins if origins else monthly["months"][-3:],
                                         last_month=max(monthly["months"]))  # fmt: skip
    root = backtest_step.default_run_dir(config, months)
    reports: list[dict[str, Any]] = []

    def run_origin(origin: int, root: Path) -> backtest_step.OriginResult:
        outcome = backtest_origin.with_options(**options)(config, origin, str(root), monthly)
        return backtest_step.OriginResult.from_dict(outcome)

    def finish(result: backtest_step.BacktestResult, root: Path) -> None:
        origins_done = [o.to_dict() for o in result.origins]
        reports.append(backtest_report.with_options(**options)(config, origins_done, str(root)))

    backtest_step.backtest(config, months, root, prepare=False, run_origin=run_origin, finish=finish)
    (report,) = reports
    get_run_logger().info("backtest report: %s (mean model / previous %.4f)", report["report"], report["mean_ratio"])
    return {"run_dir": str(root), "origins": months, **report}
