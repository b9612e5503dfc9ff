"""Step 6 as a Prefect task: the gated, checked submission, linked from the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact

from core import export as export_step
from core.config import NestcastConfig
from tasks.common import nestcast_task


@nestcast_task("export", tags=["io"])
def export_forecast(
    config: NestcastConfig, windows: dict[str, Any], run_dir: str, evaluation: dict[str, Any]
) -> dict[str, Any]:
    """Write submissions/<month>.csv (the forecast the gate chose) and its JSON sidecar, after its checks."""
    result = export_step.export_run(config, windows["windows_dir"], run_dir, evaluation)
    get_run_logger().info("exported the %s forecast to %s (%s)", evaluation["exported"], result.csv_path,
                          evaluation["reason"])
    create_link_artifact(
        key="submission",
        link=Path(result.csv_path).resolve().as_uri(),
        link_text=f"submission {result.forecast_month} ({result.rows} rows, {evaluation['exported']} forecast)",
        description=evaluation["reason"],
    )
    return {**result.to_dict(), "submission": str(result.csv_path), "exported": evaluation["exported"]}
