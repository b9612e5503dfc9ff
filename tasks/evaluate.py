"""Step 5 as a Prefect task: the model against the previous-period baseline, as a table in the UI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from core import evaluate as evaluate_step
from core.config import NestcastConfig
from tasks.common import RETRY_OPTIONS, artifact_key, content_cache_key, retry_transient_only


@task(
    name="evaluate",
    tags=["nestcast"],
    retry_condition_fn=retry_transient_only,
    cache_key_fn=content_cache_key("windows", "export"),
    **RETRY_OPTIONS,
)
def evaluate_model(config: NestcastConfig, windows: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """RMSE/MAE of model, previous month, mean of 3 months and zeros on the holdout grid; the verdict."""
    result = evaluate_step.evaluate_run(config, windows["windows_dir"], trained["model_path"], trained["run_dir"])
    get_run_logger().info(result["headline"])
    metrics = json.loads(Path(result["metrics"]).read_text())
    create_table_artifact(
        key="evaluation",
        table=[
            {"predictor": name, "rmse": round(values["rmse"], 4), "mae": round(values["mae"], 4)}
            for name, values in metrics["overall"].items()
        ],
        description=f"Holdout month: model vs baselines. {result['headline']}",
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
                description=f"{name.replace('_', ' ')} of run {Path(trained['run_dir']).name}",
            )
    return result
