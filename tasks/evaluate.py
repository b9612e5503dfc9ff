"""Step 5 as a Prefect task: every forecaster scored on the holdout month, in the UI."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import create_table_artifact

from core import evaluate as evaluate_step
from core import forecasters
from core.config import NestcastConfig
from core.display import ratio
from core.lake import FORECAST_FILE
from core.protocol import RefitResult
from core.windows import WindowsSummary
from tasks.common import content_cache_key, nestcast_task


def inline_images(markdown: str, directory: Path) -> str:
    """``![x](name.png)`` -> ``![x](data:image/png;base64,...)`` for each PNG beside the report: the UI runs on
    another machine than the files, and browsers refuse ``file://`` links from an http page."""
    for path in sorted(directory.glob("*.png")):
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        markdown = markdown.replace(f"]({path.name})", f"](data:image/png;base64,{encoded})")
    return markdown


def _publish(result: evaluate_step.RunScores, parameters: Mapping[str, Any]) -> None:
    """Every forecaster's holdout RMSE and MAE as a table."""
    baseline = result.rmse["baseline"]
    create_table_artifact(
        key="evaluation",
        table=[{"forecaster": forecasters.label(name), "RMSE": round(value, 4), "MAE": round(result.mae[name], 4),
                "vs previous month": ratio(value, baseline)} for name, value in result.rmse.items()],
        description=f"Holdout month {result.holdout_month}: every forecaster's RMSE and MAE; 'vs previous month' is "
        "its RMSE over the previous month's (below 1: better). What was exported: the export-decision artifact.",
    )


@nestcast_task(
    "evaluate",
    cache_key=content_cache_key("windows", "export"),
    outputs=lambda p: [Path(p["run_dir"]) / FORECAST_FILE],
    publish=_publish,
)
def evaluate_model(config: NestcastConfig, windows: WindowsSummary, final_windows: WindowsSummary, run_dir: str,
                   fits: list[RefitResult]) -> evaluate_step.RunScores:
    """RMSE/MAE of every forecaster and baseline on the holdout grid; every candidate forecast side by side.

    ``fits`` (the refit stages' results) only tie this step to them, in the cache key and the task graph.
    """
    return evaluate_step.evaluate_run(config, windows.windows_dir, final_windows.windows_dir, run_dir)
