"""The forecast flow: ingest -> aggregate -> windows -> train -> evaluate -> export.

Each parameter defaults to the value in ``core.config.NestcastConfig`` (which reads ``NESTCAST_*``
environment variables); ``overrides`` takes any other config field by its flat name.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from core.config import NestcastConfig
from core.evaluate import FORECAST_FILE
from core.lake import LakePaths
from core.model import MODEL_FILE
from flows.aggregate_months import aggregate_months
from tasks.common import refresh_if_missing
from tasks.evaluate import evaluate_model
from tasks.export import export_forecast
from tasks.ingest import ingest_raw_files
from tasks.train import forecast_run_dir, train_model
from tasks.windows import build_windows

DEFAULTS = NestcastConfig()


def build_config(**parameters: Any) -> NestcastConfig:
    overrides = dict(parameters.pop("overrides", None) or {})
    return NestcastConfig().with_overrides(**overrides, **parameters)


@flow(name="sales-forecast", log_prints=True, validate_parameters=True)
def sales_forecast(
    data_dir: str = str(DEFAULTS.data_dir),
    lookback: int = DEFAULTS.windows.lookback,
    sample_policy: Literal["grid", "active", "all"] = DEFAULTS.windows.sample_policy,
    kind: Literal["nlstm", "lstm", "gru", "rnn"] = DEFAULTS.model.kind,
    units: int = DEFAULTS.model.units,
    depth: int = DEFAULTS.model.depth,
    epochs: int = DEFAULTS.train.epochs,
    batch_size: int = DEFAULTS.train.batch_size,
    learning_rate: float = DEFAULTS.train.learning_rate,
    seed: int = DEFAULTS.train.seed,
    device: Literal["auto", "cpu", "gpu"] = DEFAULTS.train.device,
    fallback: Literal["baseline", "model"] = DEFAULTS.export.fallback,
    task_runner: Literal["thread", "dask"] = DEFAULTS.orchestration.task_runner,
    dask_address: str | None = DEFAULTS.orchestration.dask_address,
    submission_path: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Forecast next month's sales for every test.csv pair and export a checked submission."""
    config = build_config(
        data_dir=data_dir, lookback=lookback, sample_policy=sample_policy, kind=kind, units=units,
        depth=depth, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
        device=device, fallback=fallback, task_runner=task_runner, dask_address=dask_address,
        submission_path=submission_path, overrides=overrides,
    )  # fmt: skip
    step_options = {
        "retries": config.orchestration.retries,
        "retry_delay_seconds": exponential_backoff(config.orchestration.retry_delay_seconds),
        "timeout_seconds": config.orchestration.task_timeout_seconds,
    }

    lake = LakePaths(config.data_dir)
    ingested = ingest_raw_files.with_options(**step_options, **refresh_if_missing(lake.manifest))(config)
    monthly = aggregate_months(config, ingested)
    windows = build_windows.with_options(**step_options, **refresh_if_missing(lake.windows / "meta.json"))(
        config, monthly
    )
    run_dir = forecast_run_dir(config, windows)
    trained = train_model.with_options(**step_options, **refresh_if_missing(run_dir / MODEL_FILE))(config, windows)
    evaluation = evaluate_model.with_options(**step_options, **refresh_if_missing(run_dir / FORECAST_FILE))(
        config, windows, trained
    )
    exported = export_forecast.with_options(**step_options)(config, windows, trained, evaluation)

    summary = {
        "data_dir": str(config.data_dir),
        "rows_in": ingested["rows_in"],
        "rows_accepted": ingested["rows_accepted"],
        "rows_quarantined": ingested["rows_quarantined"],
        "months": monthly["months"],
        "train_samples": windows["sample_counts"]["train"],
        "run_dir": trained["run_dir"],
        "model_rmse": evaluation["model_rmse"],
        "baseline_rmse": evaluation["baseline_rmse"],
        "beats_baseline": evaluation["beats_baseline"],
        "exported": exported["exported"],
        "submission": exported["submission"],
        "report": evaluation["report"],
    }
    get_run_logger().info("Forecast finished: %s", summary)
    create_markdown_artifact(
        key="sales-forecast-summary",
        markdown="## Sales forecast\n\n| | |\n|---|---|\n"
        + "\n".join(f"| {name} | {value} |" for name, value in summary.items()),
        description="What this run read, trained, scored and exported",
    )
    return summary
