"""Step 7 as Prefect tasks: score the exported forecasts whose month arrived, and show the history in the UI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from core import accountability as accountability_step
from core.aggregate import MonthlyLake
from core.config import NestcastConfig
from core.export import ExportResult
from tasks.common import nestcast_task
from tasks.evaluate import inline_images


# Not cached: the step is cheap (a few Parquet reads per forecast month) and idempotent on its own -- it only
# rewrites a record whose inputs changed -- and a cache key would have to hash every submission and partition.
@nestcast_task("score-forecasts")
def score_forecasts(config: NestcastConfig, monthly: MonthlyLake | None) -> accountability_step.AccountabilitySummary:
    """Score every exported forecast whose month's actuals the lake now holds (``lake/accountability/``).

    ``monthly`` (the aggregation's result) only ties this step to it: the actuals must be aggregated first.
    """
    summary = accountability_step.update_accountability(config)
    logger = get_run_logger()
    if summary.scored_now:
        logger.info("accountability: scored the forecasts of month(s) %s", summary.scored_now)
    for note in summary.unresolved_notes:  # the run goes on: the month's record is kept as unresolved
        logger.warning("accountability: cannot score the forecast of %s (kept as unresolved in "
                       "lake/accountability/records.parquet)", note)
    return summary


def _publish(result: accountability_step.History, parameters: Mapping[str, Any]) -> None:
    """The history as a table artifact and as a markdown artifact with its plot inline (a data: URI)."""
    create_table_artifact(
        key="accountability",
        table=list(result.rows) or [{"month": None, "note": "no forecast month has actuals yet"}],
        description="Every exported forecast, scored once its month's actuals arrived: RMSE of the exported "
        "forecast, of the previous period (each pair's sales the month before) and of the raw model",
    )
    markdown = inline_images(result.markdown, Path(result.plot).parent) if result.plot else result.markdown
    create_markdown_artifact(
        key="accountability-history",
        markdown=markdown + f"\n`{Path(result.records).resolve()}`\n",
        description="Accuracy over the months: exported vs previous period",
    )


@nestcast_task("publish-history", publish=_publish)
def publish_history(config: NestcastConfig, run_dir: str, scored: accountability_step.AccountabilitySummary,
                    exported: ExportResult | None) -> accountability_step.History:
    """The accountability plot and its section in the run's report.md; the artifacts come from ``_publish``.

    ``scored`` and ``exported`` tie the step to the scoring and to the export (report.md must exist; a replay,
    which exports nothing, passes None).
    """
    return accountability_step.write_history(config, run_dir)
