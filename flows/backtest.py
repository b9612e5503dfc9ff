"""The backtest flow: ingest -> aggregate -> for each origin month (train on the months before, score it) -> report.

Each origin is one task (``backtest-origin``); the flow ends with one table artifact (RMSE per origin
for the model and the baselines) and ``runs/backtest-<id>/backtest.md``, where ``<id>`` hashes the
configuration and the origins, so a rerun of the same backtest finds its finished origins in the cache.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.tasks import exponential_backoff

from core.backtest import default_run_dir, parse_origins
from core.config import NestcastConfig
from core.lake import LakePaths
from flows.aggregate_months import aggregate_months
from flows.sales_forecast import build_config
from tasks.backtest import backtest_origin, backtest_report
from tasks.common import refresh_if_missing
from tasks.ingest import ingest_raw_files

DEFAULTS = NestcastConfig()


def retry_options(config: NestcastConfig) -> dict[str, Any]:
    return {
        "retries": config.orchestration.retries,
        "retry_delay_seconds": exponential_backoff(config.orchestration.retry_delay_seconds),
    }


@flow(name="backtest", log_prints=True, validate_parameters=True)
def backtest(
    data_dir: str = str(DEFAULTS.data_dir),
    origins: list[int] | None = None,
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
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rolling-origin backtest: for each origin month, train on the months before it and score that month.

    ``origins`` default to the last three months in the lake.
    """
    config = build_config(
        data_dir=data_dir, lookback=lookback, sample_policy=sample_policy, kind=kind, units=units, depth=depth,
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed, device=device,
        overrides=overrides,
    )  # fmt: skip
    retries = retry_options(config)
    ingested = ingest_raw_files.with_options(**retries, **refresh_if_missing(LakePaths(config.data_dir).manifest))(
        config
    )
    monthly = aggregate_months(config, ingested)
    months = parse_origins(origins if origins else monthly["months"][-3:], last_month=max(monthly["months"]))
    root = default_run_dir(config, months)
    results = [
        backtest_origin.with_options(**retries, timeout_seconds=config.orchestration.task_timeout_seconds)(
            config, origin, str(root), monthly
        )
        for origin in months
    ]
    report = backtest_report.with_options(**retries)(config, results, str(root))
    get_run_logger().info("backtest report: %s (mean model / previous %.4f)", report["report"], report["mean_ratio"])
    return {"run_dir": str(root), "origins": months, **report}
