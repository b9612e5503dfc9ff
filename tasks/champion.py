"""The champion/challenger gate as a Prefect task: this run's gated forecast against the champion's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from core import champion as champion_step
from core.config import NestcastConfig
from tasks.common import nestcast_task


def _publish(result: Mapping[str, Any], parameters: Mapping[str, Any]) -> None:
    decision = result.get("champion")
    if decision is None:
        return
    create_markdown_artifact(
        key="champion",
        markdown=f"## Champion and challenger\n\n- exported: **{result['exported']}**\n- {decision['reason']}\n"
        f"- champion before this run: `{decision['champion_run'] or 'none'}`\n",
        description="Whether this run's forecast (the challenger) replaced the champion's",
    )


# Not cached: it reads runs/index.json, which other runs change.
@nestcast_task("challenge-champion", publish=_publish)
def challenge_champion(config: NestcastConfig, windows: dict[str, Any], final_windows: dict[str, Any],
                       run_dir: str, evaluation: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The evaluation, with the export switched to the champion's forecast when the challenger is worse."""
    result = champion_step.challenge_run(config, windows["windows_dir"], final_windows["windows_dir"], run_dir,
                                         evaluation)  # fmt: skip
    if result.get("champion"):
        get_run_logger().info("champion gate: %s", result["champion"]["reason"])
    return result
