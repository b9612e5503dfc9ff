"""Step 6a as a Prefect task: the one decision of what is exported (validation months, then the champion), and
the report that says so, in the UI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from core import gate, quantiles
from core.config import NestcastConfig
from core.evaluate import RunScores
from core.protocol import Selection
from core.windows import WindowsSummary
from tasks.common import nestcast_task
from tasks.evaluate import inline_images


def _publish(result: gate.ExportDecision, parameters: Mapping[str, Any]) -> None:
    """The report with its plots inline, and the files' paths to copy."""
    report = Path(result.report)
    files = "\n".join(f"- {name.replace('_', ' ')}: `{Path(path).resolve()}`"
                      for name, path in {"report": result.report, **result.plots}.items())
    create_markdown_artifact(
        key="evaluation-report",
        markdown=inline_images(report.read_text(encoding="utf-8"), report.parent) + "\n## Files\n\n" + files + "\n",
        description=f"report.md of run {report.parent.name}: exported {result.exported}, plots inline",
    )
    if result.ranges:
        create_table_artifact(
            key="ranges",
            table=quantiles.segment_table_rows(result.ranges),
            description=f"The {result.exported} forecast's range on the holdout month, by segment, beside the naive "
            "range: interval coverage, mean width and pinball loss (report.md has the fan chart)",
        )
    if result.champion is not None:
        create_markdown_artifact(
            key="champion",
            markdown=f"## Champion and challenger\n\n- exported: **{result.exported}**\n- {result.champion.reason}\n"
            f"- champion before this run: `{result.champion_run or 'none'}`\n",
            description="Whether this run's forecast (the challenger) replaced the champion's",
        )


# Not cached: it reads runs/index.json, which other runs change.
@nestcast_task("gate", publish=_publish)
def decide_export(config: NestcastConfig, windows: WindowsSummary, final_windows: WindowsSummary, run_dir: str,
                  selection: Selection, scores: RunScores) -> gate.ExportDecision:
    """What is exported: the validation months' best candidate, unless the champion beats it on the holdout
    month; the run's report."""
    result = gate.gate_run(config, windows.windows_dir, final_windows.windows_dir, run_dir, selection, scores)
    logger = get_run_logger()
    logger.info("gate: exported the %s forecast: %s", result.exported, result.reason)
    if result.champion is not None:
        logger.info("champion gate: %s", result.champion.reason)
    return result
