"""Step 1 as a Prefect task: validated ingestion of raw/ into the lake, one table artifact per file."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from core import ingest as ingest_step
from core.config import NestcastConfig
from core.lake import LakePaths
from tasks.common import artifact_key, content_cache_key, jsonable, nestcast_task


def _recovered_first(config: NestcastConfig) -> list[Any]:
    """The raw tree the key hashes -- after finishing any interrupted commit, so that even a cached ingest
    never leaves a half-applied lake behind it (a rolled-forward manifest then misses the cache)."""
    paths = LakePaths.of(config)
    ingest_step.recover_lake(paths)
    return [paths.raw]


@nestcast_task(
    "ingest",
    tags=["io"],
    cache_key=content_cache_key("ingest", input_trees=_recovered_first),
    outputs=lambda p: ingest_step.lake_outputs(LakePaths.of(p["config"])),
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
        if result.get("rows_replaced") or result.get("months_replaced"):
            logger.info(
                "%s replaced %s rows of months %s that earlier files had written",
                result["file"], result.get("rows_replaced", 0), result.get("months_replaced", []),
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
            + [{"measure": f"rule failed: {rule}", "value": count} for rule, count in sorted(failed.items())]
            + [{"measure": "warning", "value": warning} for warning in result.get("warnings") or []],
            description=f"Great Expectations validation of {result['file']}",
        )
    for removed in summary.get("removed") or []:
        logger.info("%s", ingest_step.RemovedFile(**removed).message())
    for warning in summary.get("warnings") or []:
        logger.warning("%s", warning)
    if summary.get("rows_replaced"):
        logger.info("this ingest replaced %s lake rows in all", summary["rows_replaced"])
    return summary
