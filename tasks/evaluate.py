"""Step 5 as a Prefect task: the model, the ensemble and the reference against the baselines, in the UI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from core import evaluate as evaluate_step
from core.config import NestcastConfig
from core.lake import FORECAST_FILE
from tasks.common import artifact_key, content_cache_key, nestcast_task


@nestcast_task(
    "evaluate",
    cache_key=content_cache_key("windows", "export"),
    outputs=lambda p: [Path(p["run_dir"]) / FORECAST_FILE],
)
def evaluate_model(
    config: NestcastConfig,
    windows: dict[str, Any],
    final_windows: dict[str, Any],
    selection: dict[str, Any],
    run_dir: str,
    fits: list[dict[str, Any]],
) -> dict[str, Any]:
    """RMSE/MAE of every forecaster and baseline on the holdout grid, the gate's decision, the report.

    ``fits`` (the refit stages' results) only tie this step to them, in the cache key and the task graph.
    """
    result = evaluate_step.evaluate_run(
        config, windows["windows_dir"], final_windows["windows_dir"], run_dir, selection
    )
    logger = get_run_logger()
    logger.info(result["headline"])
    logger.info("gate: exported the %s forecast: %s", result["exported"], result["reason"])
    metrics = json.loads(Path(result["metrics"]).read_text())
    create_table_artifact(
        key="evaluation",
        table=[
            {"predictor": evaluate_step.PREDICTOR_LABELS.get(name, name), "rmse": round(values["rmse"], 4),
             "mae": round(values["mae"], 4),
             "vs previous month": round(values["rmse"] / metrics["overall"]["baseline"]["rmse"], 4)}
            for name, values in metrics["overall"].items()
        ],  # fmt: skip
        description=f"Holdout month {result['holdout_month']}: every forecaster vs the baselines. "
        f"Exported: {result['exported']} ({result['reason']})",
    )
    create_markdown_artifact(
        key="evaluation-report", markdown=Path(result["report"]).read_text(), description="report.md of this run"
    )
    for name in ("report", "totals_plot", "pairs_plot", "segments_plot"):
        if name in result:
            create_link_artifact(
                key=artifact_key(name),
                link=Path(result[name]).resolve().as_uri(),
                link_text=Path(result[name]).name,
                description=f"{name.replace('_', ' ')} of run {Path(run_dir).name}",
            )
    return result
