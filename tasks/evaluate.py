"""Step 5 as a Prefect task: the model, the ensemble and the reference against the baselines, in the UI."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from core import evaluate as evaluate_step
from core.config import NestcastConfig
from core.display import ratio
from core.lake import FORECAST_FILE
from tasks.common import content_cache_key, nestcast_task

#: The plots the report shows, as the result names them.
PLOTS = ("totals_plot", "pairs_plot", "segments_plot")


def inline_images(markdown: str, directory: Path) -> str:
    """``![x](name.png)`` -> ``![x](data:image/png;base64,...)`` for each PNG beside the report: the UI runs on
    another machine than the files, and browsers refuse ``file://`` links from an http page."""
    for path in sorted(directory.glob("*.png")):
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        markdown = markdown.replace(f"]({path.name})", f"](data:image/png;base64,{encoded})")
    return markdown


def _order(name: str) -> int:
    """The report's order: model, ensemble, reference, ..., baselines last."""
    order = evaluate_step.PREDICTORS
    return order.index(name) if name in order else len(order)


def _publish(result: Mapping[str, Any], parameters: Mapping[str, Any]) -> None:
    """The evaluation table, the report with its plots inline, and where the files are (as copyable paths)."""
    metrics = json.loads(Path(result["metrics"]).read_text())
    baseline = metrics["overall"]["baseline"]["rmse"]
    create_table_artifact(
        key="evaluation",
        table=[
            {"predictor": evaluate_step.PREDICTOR_LABELS.get(name, name), "RMSE": round(values["rmse"], 4),
             "MAE": round(values["mae"], 4), "vs previous month": ratio(values["rmse"], baseline)}
            for name, values in sorted(metrics["overall"].items(), key=lambda item: _order(item[0]))
        ],  # fmt: skip
        description=f"Holdout month {result['holdout_month']}: every forecaster's RMSE and MAE; 'vs previous month' "
        f"is its RMSE over the previous month's (below 1: better). Exported: {result['exported']} ({result['reason']})",
    )
    report = Path(result["report"])
    files = "\n".join(f"- {name.replace('_', ' ')}: `{Path(result[name]).resolve()}`"
                      for name in ("report", "metrics", "forecast", *PLOTS) if name in result)  # fmt: skip
    create_markdown_artifact(
        key="evaluation-report",
        markdown=inline_images(report.read_text(), report.parent) + "\n## Files\n\n" + files + "\n",
        description=f"report.md of run {report.parent.name}, plots inline",
    )


@nestcast_task(
    "evaluate",
    cache_key=content_cache_key("windows", "export"),
    outputs=lambda p: [Path(p["run_dir"]) / FORECAST_FILE],
    publish=_publish,
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
    return result
