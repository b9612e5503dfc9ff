"""The replay flow: the monthly cycle over a full history, one forecast flow run per month under this one.

For each month m of K..E: stage the history before m (``core.replay``), run ``sales-forecast`` on the replay's
data directory (a child flow run, scoring the forecast of m-1 on the way); then stage E's drop and score E's
forecast (``replay-accountability``). It returns, and shows, the accountability table: one record per month.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger

from core import replay as replay_step
from core.accountability import History
from core.config import RUN_KNOBS, NestcastConfig
from core.lake import LakePaths, forecast_month_label
from core.run_names import replay_run_name
from flows.aggregate_months import aggregate_months
from flows.parameters import OVERRIDES, OVERRIDES_HELP, with_knobs
from flows.sales_forecast import build_config, sales_forecast
from tasks.accountability import publish_history, score_forecasts
from tasks.common import name_flow_run, step_options
from tasks.ingest import ingest_raw_files
from tasks.replay import stage_replay_month

DEFAULTS = NestcastConfig()
#: Where the final history goes in the replay's data directory: ``runs/replay/`` (plot and report.md).
HISTORY_RUN = "replay"


@flow(name="replay-accountability", flow_run_name="replay-accountability")
def replay_accountability(config: NestcastConfig) -> History:
    """Ingest the last drop and score the last forecast: the forecast flow's first steps, then the history."""
    options = step_options(config)
    ingested = ingest_raw_files.with_options(**options)(config)
    monthly = aggregate_months(config, ingested)
    scored = score_forecasts.with_options(**options)(config, monthly)
    run_dir = str(LakePaths.of(config).run_dir(HISTORY_RUN))
    return publish_history.with_options(**options)(config, run_dir, scored, None)


def _extra_parameters() -> list[Any]:
    import inspect

    keyword = inspect.Parameter.KEYWORD_ONLY
    return [inspect.Parameter("from_month", keyword, annotation=int),
            inspect.Parameter("to_month", keyword, default=None, annotation=int | None),
            inspect.Parameter("workspace", keyword, default=None, annotation=str | None), OVERRIDES]


# Renamed replay-<first month>-to-<last month> once the history says which months those are.
@flow(name="replay", flow_run_name="replay-from-{from_month}", log_prints=True, validate_parameters=True)
@with_knobs(
    tuple(RUN_KNOBS), defaults=DEFAULTS, extra=_extra_parameters(),
    extra_help={"from_month": "First forecast month to replay (date_block_num, at least 4).",
                "to_month": "Last forecast month to replay (default: the history's last month).",
                "workspace": "The replay's data directory (default: <data_dir>/replay-K-E).", **OVERRIDES_HELP},
)
def replay(*, from_month: int, to_month: int | None = None, workspace: str | None = None,
           overrides: dict[str, Any] | None = None, **knobs: Any) -> dict[str, Any]:
    """Replay months K..E of the history in ``data_dir`` as the monthly schedule would have run them."""
    history = build_config(**knobs, overrides=overrides)
    plan = replay_step.plan(history.data_dir, from_month, to_month, workspace)
    first_month = history.ingest.first_month
    name_flow_run(replay_run_name(*(forecast_month_label(m, first_month) for m in (plan.months[0], plan.months[-1]))))
    options = step_options(history)
    stage = stage_replay_month.with_options(**options)
    args = (str(history.data_dir), plan.months[0], plan.months[-1], str(plan.workspace))
    runs = []
    for month in plan.months:
        data_dir = stage(*args, month, history.ingest.first_month)
        runs.append(sales_forecast(**{**knobs, "data_dir": data_dir}, overrides=overrides))
    data_dir = stage(*args, plan.months[-1] + 1, history.ingest.first_month)
    history_result = replay_accountability(history.with_overrides(data_dir=data_dir))
    get_run_logger().info("replay of months %s-%s: %d accountability record(s) in %s", plan.months[0],
                          plan.months[-1], len(history_result.rows), history_result.records)
    return {"workspace": str(plan.workspace), "months": plan.months, "runs": [r["run_dir"] for r in runs],
            **dataclasses.asdict(history_result)}
