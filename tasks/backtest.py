"""Backtest and search steps as Prefect tasks: one origin's train-and-score, the report, one search trial.

The origin and trial tasks train, so they carry the ``gpu`` tag like the forecast's training task
(a tag concurrency limit keeps one training per GPU). Flows submit them to their task runner
(``flows.backtest.training_task_runner``): one at a time on threads, side by side on Dask workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from core import backtest as backtest_step
from core.aggregate import MonthlyLake
from core.config import NestcastConfig
from tasks.common import artifact_key, content_cache_key, nestcast_task


def _log_epochs(label: str, epochs: int) -> Any:
    logger = get_run_logger()

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        logger.info(
            "%s epoch %d/%d: %s", label, epoch + 1, epochs, ", ".join(f"{k}={v:.4f}" for k, v in logs.items())
        )

    return on_epoch


@nestcast_task(
    "backtest-origin",
    tags=["gpu"],
    cache_key=content_cache_key("windows", "model", "train"),
    outputs=lambda p: backtest_step.origin_outputs(p["config"], p["origin"], p["root"]),
)
def backtest_origin(
    config: NestcastConfig, origin: int, root: str, monthly: MonthlyLake
) -> backtest_step.OriginResult:
    """Windows with ``origin`` held out, the model trained on the months before, the origin's grid scored.

    ``monthly`` (the aggregation summary, with its input hashes) ties the cache key to the data.
    """
    result = backtest_step.backtest_origin(
        config, origin, root, on_epoch=_log_epochs(f"origin {origin}", config.train.epochs)
    )
    get_run_logger().info(
        "origin %d: model RMSE %.4f vs previous month %.4f (x%.3f), %d parameters, %.0f s training",
        origin, result.rmse["model"], result.rmse["baseline"], result.ratio, result.params, result.train_seconds,
    )
    return result


@nestcast_task("backtest-report")
def backtest_report(config: NestcastConfig, origins: list[backtest_step.OriginResult], root: str) -> dict[str, Any]:
    """``backtest.md`` + ``backtest.json`` under ``root``, and the per-origin RMSE table artifact."""
    result = backtest_step.BacktestResult(config=config.flat(), origins=list(origins))
    report = backtest_step.write_backtest_files(result, root)
    create_table_artifact(
        key="backtest",
        table=result.rows(),
        description=f"Backtest of {config.model.kind}: RMSE per origin for the model and the baselines "
        f"(mean model / previous month = {result.mean_ratio:.3f}); {report}",
    )
    return {"report": str(report), "mean_ratio": result.mean_ratio, "rows": result.rows()}


def _trial_root(root: str, number: int) -> Path:
    return Path(root) / f"trial-{number:03d}"


def _trial_outputs(parameters: Mapping[str, Any]) -> list[Path]:
    """A trial's backtest result and what each of its origins left (as ``backtest-origin``'s outputs)."""
    root = _trial_root(parameters["root"], parameters["number"])
    origins = [backtest_step.origin_outputs(parameters["config"], origin, root) for origin in parameters["origins"]]
    return [root / backtest_step.RESULT_FILE, *(path for paths in origins for path in paths)]


@nestcast_task(
    "search-trial",
    tags=["gpu"],
    cache_key=content_cache_key("windows", "model", "train"),
    outputs=_trial_outputs,
)
def search_trial(
    config: NestcastConfig, number: int, origins: list[int], root: str, monthly: MonthlyLake
) -> backtest_step.BacktestResult:
    """One hyperparameter trial: a backtest of ``config`` over ``origins``; its mean ratio is the objective."""
    result = backtest_step.backtest(config, origins, _trial_root(root, number), prepare=False)
    get_run_logger().info(
        "trial %d: mean model / previous %.4f, %d parameters, %.0f s training",
        number, result.mean_ratio, result.params, result.train_seconds,
    )
    return result


@nestcast_task("search-report")
def search_report(
    config: NestcastConfig, rows: list[dict[str, Any]], root: str, best: dict[str, Any]
) -> dict[str, Any]:
    """``search.md`` under ``root`` and the trials table artifact (best first); ``config`` names the data
    directory the report is committed to when it is an object store."""
    from core import search as search_step

    report = search_step.write_search_report(rows, best, Path(root) / search_step.REPORT_FILE)
    create_table_artifact(
        key="search-trials",
        table=search_step.sorted_rows(rows),
        description=f"Hyperparameter trials, best first (objective: mean model / previous-month RMSE); {report}",
    )
    create_markdown_artifact(
        key=artifact_key("search", "best"), markdown=report.read_text(encoding="utf-8"), description="search.md"
    )
    return {"report": str(report)}
