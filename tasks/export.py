"""Step 6 as a Prefect task: the gated, checked submission, shown in the UI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from core import export as export_step
from core.config import NestcastConfig
from core.gate import ExportDecision
from core.windows import WindowsSummary
from tasks.common import flow_run_record, nestcast_task

HEAD_ROWS = 10


def _markdown_table(frame: pd.DataFrame) -> str:
    rows = [" | ".join(map(str, frame.columns)), " | ".join("---:" for _ in frame.columns)]
    rows += [" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row)
             for row in frame.itertuples(index=False)]
    return "\n".join(f"| {row} |" for row in rows)


def _publish(result: export_step.ExportResult, parameters: Mapping[str, Any]) -> None:
    """The submission's first rows inline and its absolute path to copy (a ``file://`` link does not open from
    the UI's page)."""
    path = Path(result.csv_path).resolve()
    head = pd.read_csv(path, nrows=HEAD_ROWS)
    create_markdown_artifact(
        key="submission",
        markdown=f"## Submission {result.forecast_month}: {result.rows:,} rows, the {result.exported} "
        f"forecast\n\n`{path}`\n\nFirst {len(head)} rows:\n\n{_markdown_table(head)}\n",
        description=f"submission {result.forecast_month} ({result.exported} forecast)",
    )


@nestcast_task("export", publish=_publish)
def export_forecast(
    config: NestcastConfig, windows: WindowsSummary, run_dir: str, decision: ExportDecision
) -> export_step.ExportResult:
    """Write submissions/<month>.csv (the forecast the gate chose) and its JSON sidecar, after its checks."""
    result = export_step.export_run(config, windows.windows_dir, run_dir, decision, extra=flow_run_record())
    get_run_logger().info("exported the %s forecast to %s (%s)", decision.exported, result.csv_path, decision.reason)
    if result.previous_path is not None:
        get_run_logger().info("the month's earlier submission is kept as %s", result.previous_path)
    return result
