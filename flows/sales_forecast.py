"""The forecast flow: ingest -> aggregate -> windows -> train -> evaluate -> export.

Each parameter defaults to the value in ``core.config.NestcastConfig`` (which reads ``NESTCAST_*``
environment variables); ``overrides`` takes any other config field by its flat name.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from core import display
from core.config import RUN_KNOBS, NestcastConfig
from core.lake import forecast_month_label
from core.protocol import forecast_run_dir
from core.run_names import forecast_run_name
from core.store import data_dir_identity
from flows.aggregate_months import aggregate_months
from flows.parameters import OVERRIDES, OVERRIDES_HELP, with_knobs
from tasks.accountability import publish_history, score_forecasts
from tasks.common import flow_run_url, name_failed_flow_run, name_flow_run, step_options
from tasks.evaluate import evaluate_model
from tasks.export import export_forecast
from tasks.gate import decide_export
from tasks.ingest import ingest_raw_files
from tasks.train import refit_models, select_models
from tasks.windows import build_windows

DEFAULTS = NestcastConfig()


def build_config(**parameters: Any) -> NestcastConfig:
    """The run's config; ``data_dir`` made absolute here, once, so every path the run logs and records says
    where it is (a served deployment's relative default would otherwise depend on where ``serve`` started)."""
    overrides = dict(parameters.pop("overrides", None) or {})
    config = NestcastConfig().with_overrides(overrides, **parameters)
    return config.with_overrides(data_dir=data_dir_identity(config.data_dir))


def initial_run_name() -> str:
    """``forecast-<kind>[-<knob>=<value>...]`` (``core.run_names``) from the run's parameters; the month is added
    once the lake says which is forecast, and ``failed`` if the run fails."""
    from prefect.runtime import flow_run

    try:
        return forecast_run_name(build_config(**flow_run.parameters), DEFAULTS)
    except ValueError:  # parameters the config refuses: the run fails at once, under a name that says so
        return "forecast-failed-parameters"


@flow(name="sales-forecast", flow_run_name=initial_run_name, log_prints=True, validate_parameters=True,
      on_failure=[name_failed_flow_run])
@with_knobs(tuple(RUN_KNOBS), defaults=DEFAULTS, extra=[OVERRIDES], extra_help=OVERRIDES_HELP)
def sales_forecast(*, overrides: dict[str, Any] | None = None, **knobs: Any) -> dict[str, Any]:
    """Forecast next month's sales for every test.csv pair and export a checked submission; score the earlier
    forecasts whose month this run's data brought (accountability) and show their history.

    Protocol (README "Training protocol"): the epoch count, the boosting rounds, the blend weights and the export
    are chosen on the validation months before M-1; the reported score is the holdout month M-1, seen by none of
    those choices; the exported forecast of M comes from the same models refitted on every month through M-1.
    """
    config = build_config(**knobs, overrides=overrides)
    options = step_options(config)
    first_month = config.ingest.first_month
    get_run_logger().info("data directory: %s", config.data_dir)

    ingested = ingest_raw_files.with_options(**options)(config)
    monthly = aggregate_months(config, ingested)
    scored = score_forecasts.with_options(**options)(config, monthly)
    forecast_month = monthly.last_month + 1
    name_flow_run(forecast_run_name(config, DEFAULTS, forecast_month_label(forecast_month, first_month)))
    windows = build_windows.with_options(**options)(config, monthly, purpose="evaluation")
    final_windows = build_windows.with_options(**options)(config, monthly, purpose="final")
    run_dir = str(forecast_run_dir(config, windows, final_windows))
    selection = select_models.with_options(**options)(config, windows, run_dir)
    holdout_fit = refit_models.with_options(**options)(config, windows, selection, run_dir, stage="holdout")
    final_fit = refit_models.with_options(**options)(config, final_windows, selection, run_dir, stage="final")
    scores = evaluate_model.with_options(**options)(config, windows, final_windows, run_dir, [holdout_fit, final_fit])
    decision = decide_export.with_options(**options)(config, windows, final_windows, run_dir, selection, scores)
    exported = export_forecast.with_options(**options)(config, final_windows, run_dir, decision)
    history = publish_history.with_options(**options)(config, run_dir, scored, exported)

    summary = {
        "data_dir": str(config.data_dir),
        "rows_in": ingested.rows_in,
        "rows_accepted": ingested.rows_accepted,
        "rows_quarantined": ingested.rows_quarantined,
        "months": monthly.months,
        "forecast_month": forecast_month,
        "train_samples": windows.sample_counts["train"],
        "sample_budget": config.train.sample_budget,
        "run_dir": run_dir,
        "validation_months": selection.validation_months,
        "holdout_month": scores.holdout_month,
        "epochs": selection.epochs,
        "holdout_rmse": scores.rmse,
        **{f"{name}_rmse": value for name, value in scores.rmse.items()},
        "exported": decision.exported,
        "exported_rmse": decision.exported_rmse,
        "beaten_by": decision.beaten_by,
        "reason": decision.reason,
        "submission": str(exported.csv_path),
        "report": decision.report,
        "accountability": history.records,
        "accountability_months": scored.months,
        "flow_run_url": flow_run_url(),
    }
    verdict = display.verdict(summary, first_month)
    get_run_logger().info(verdict)
    create_markdown_artifact(
        key="sales-forecast-summary",
        markdown="## Sales forecast\n\n| | |\n|---|---|\n"
        + "\n".join(f"| {name} | {value} |" for name, value in display.summary_rows(summary, first_month)),
        description="What this run read, trained, scored and exported",
    )
    # The verdict is the run's state message: the UI's run list and page say what was exported, and what beat it.
    return Completed(message=verdict, data=summary)
