"""Step 1 as a Prefect task: validated ingestion of raw/ into the lake, one table artifact per file."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from core import ingest as ingest_step
from core.config import NestcastConfig
from core.lake import LakePaths
from tasks.common import RETRY_OPTIONS, artifact_key, content_cache_key, jsonable, retry_transient_only


@task(
    name="ingest",
    tags=["nestcast", "io"],
    retry_condition_fn=retry_transient_only,
    cache_key_fn=content_cache_key("ingest", input_trees=lambda config: [LakePaths(config.data_dir).raw]),
    **RETRY_OPTIONS,
)
def ingest_raw_files(config: NestcastConfig) -> dict[str, Any]:
    """Validate every raw CSV with Great Expectations; good rows to Parquet, bad rows to quarantine."""
    summary = jsonable(ingest_step.ingest(config))
    logger = get_run_logger()
    for result in summary["files"]:
        verb = "skipped (already ingested)" if result.get("skipped") else "ingested"
        logger.info(
            "%s %s: %s rows in, %s accepted, %s quarantined",
            verb, result["file"], result["rows_in"], result["rows_accepted"], result["rows_quarantined"],
        )  # fmt: skip
        failed = result.get("failed_rules") or {}
        create_table_artifact(
            key=artifact_key("validation", result["file"]),
            table=[
                {"measure": "rows in", "value": result["rows_in"]},
                {"measure": "rows accepted", "value": result["rows_accepted"]},
                {"measure": "rows quarantined", "value": result["rows_quarantined"]},
                {"measure": "status", "value": "skipped: same content hash" if result.get("skipped") else "validated"},
            ]
            + [{"measure": f"rule failed: {rule}", "value": count} for rule, count in sorted(failed.items())],
            description=f"Great Expectations validation of {result['file']}",
        )
    return summary
