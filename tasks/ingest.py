"""Step 1 as a Prefect task: validated ingestion of raw/ into the lake, one table artifact per file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from core import ingest as ingest_step
from core.config import NestcastConfig
from core.errors import DataValidationError
from core.lake import LakePaths
from tasks.common import artifact_key, content_cache_key, nestcast_task


def _recovered_first(config: NestcastConfig) -> list[Any]:
    """The raw tree the key hashes -- after finishing any interrupted commit, so that even a cached ingest
    never leaves a half-applied lake behind it (a rolled-forward manifest then misses the cache)."""
    paths = LakePaths.of(config)
    ingest_step.recover_lake(paths)
    return [paths.raw]


def _publish(summary: ingest_step.IngestSummary, parameters: Mapping[str, Any]) -> None:
    """Per raw file: the validation table, and its first quarantined lines when there are any (a cached ingest
    publishes them again, so the newest run's page is complete)."""
    paths = LakePaths.of(parameters["config"])
    for result in summary.files:
        create_table_artifact(
            key=artifact_key("validation", result.file),
            table=[
                {"measure": "rows in", "value": result.rows_in},
                {"measure": "rows accepted", "value": result.rows_accepted},
                {"measure": "rows quarantined", "value": result.rows_quarantined},
                {"measure": "status", "value": _status(result)},
                {"measure": "validation page", "value": str(ingest_step.validation_page(paths, result.file))},
            ]
            + [{"measure": f"rule failed: {rule}", "value": n} for rule, n in sorted(result.failed_rules.items())]
            + [{"measure": "warning", "value": warning} for warning in result.warnings],
            description=f"Great Expectations validation of {result.file}",
        )
        if result.rows_quarantined:
            create_markdown_artifact(key=artifact_key("quarantine", result.file),
                                     markdown=_quarantine_markdown(paths, result),
                                     description=f"First quarantined lines of {result.file}")


@nestcast_task(
    "ingest",
    cache_key=content_cache_key("ingest", input_trees=_recovered_first),
    outputs=lambda p: ingest_step.lake_outputs(LakePaths.of(p["config"])),
    publish=_publish,
)
def ingest_raw_files(config: NestcastConfig) -> ingest_step.IngestSummary:
    """Validate every raw CSV with Great Expectations; good rows to Parquet, bad rows to quarantine."""
    try:
        summary = ingest_step.ingest(config)
    except DataValidationError as error:  # the UI shows why the run stopped, not just a failed task
        create_markdown_artifact(key="validation-failed", markdown=_failed_markdown(error),
                                 description="Ingest stopped: a file failed validation")
        raise
    logger = get_run_logger()
    for result in summary.files:
        verb = "skipped (already ingested)" if result.skipped else "ingested"
        logger.info(
            "%s %s: %s rows in, %s accepted, %s quarantined",
            verb, result.file, result.rows_in, result.rows_accepted, result.rows_quarantined,
        )
        if result.rows_replaced or result.months_replaced:
            logger.info("%s replaced %s rows of months %s that earlier files had written",
                        result.file, result.rows_replaced, result.months_replaced)
        if result.months_shared:
            logger.info("%s holds months %s together with %s: the lake keeps the rows of every part",
                        result.file, result.months_shared, ", ".join(result.shares_months_with))
    for removed in summary.removed:
        logger.info("%s", removed.message())
    for warning in summary.warnings:
        logger.warning("%s", warning)
    if summary.rows_replaced:
        logger.info("this ingest replaced %s lake rows in all", summary.rows_replaced)
    return summary


def _status(result: ingest_step.FileReport) -> str:
    # In Great Expectations' words: its page says "Failed" as soon as one row breaks a rule.
    if result.skipped:
        return "skipped: same content hash, validated before"
    if result.rows_quarantined:
        return (f"failed on {result.rows_quarantined:,} rows (quarantined); "
                f"the other {result.rows_accepted:,} accepted")
    return "passed: every row met every expectation"


def _quarantine_markdown(paths: LakePaths, result: ingest_step.FileReport, limit: int = 10) -> str:
    name, total = result.file, result.rows_quarantined
    rows = ingest_step.quarantine_preview(paths, name, limit)
    shown = f"the first {len(rows)} of {total:,}" if total > len(rows) else f"all {len(rows)}"
    lines = [f"# {name}: quarantined lines ({shown})", "", "| line | rule | values as written |", "|---:|---|---|"]
    lines += ["| {} | {} | {} |".format(row["line"], row["rule"], row["values"].replace("|", r"\|")) for row in rows]
    lines += ["", f"All of them: `{ingest_step.quarantine_file(paths, name)}`",
              f"Great Expectations page: `{ingest_step.validation_page(paths, name)}`"]
    return "\n".join(lines)


def _failed_markdown(error: DataValidationError) -> str:
    return "\n".join(["# Ingest stopped: a file failed validation", "", str(error), "",
                      "Nothing was written to the lake; fix the file in raw/ and run again."])
