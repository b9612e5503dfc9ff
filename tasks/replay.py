"""The replay's own step as a Prefect task: stage the history up to a month in the replay's raw/ folder."""

from __future__ import annotations

from core import replay as replay_step
from tasks.common import nestcast_task


@nestcast_task("stage-replay-month", task_run_name="stage-replay-month-{month}")
def stage_replay_month(history: str, from_month: int, to_month: int, workspace: str, month: int,
                       first_month: str) -> str:
    """The replay's raw/ as it was before ``month`` (sales_train before ``from_month``, then one drop a month)."""
    return str(replay_step.stage(history, from_month, to_month, workspace, month, first_month))
