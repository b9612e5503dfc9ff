"""Serve the two deployments of deployments/prefect.yaml from one process, with no worker.

    nestcast serve          # or: python -m deployments.serve

'monthly' runs on the 1st of each month at 06:00 Europe/Moscow (the chain's timezone); 'manual'
has no schedule and is triggered from the UI or `prefect deployment run 'sales-forecast/manual'`.
Both allow one run at a time: SQLite behind a local server does not take concurrent writers well.
"""

from __future__ import annotations

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment

from flows.sales_forecast import sales_forecast

MONTHLY_CRON = "0 6 1 * *"
TIMEZONE = "Europe/Moscow"


def build_deployments(parameters: dict | None = None) -> list[RunnerDeployment]:
    shared = {"parameters": parameters or {}, "concurrency_limit": 1, "tags": ["nestcast"]}
    monthly = sales_forecast.to_deployment(
        name="monthly",
        schedule=CronSchedule(cron=MONTHLY_CRON, timezone=TIMEZONE),
        description="Monthly forecast on the 1st, after the previous month's sales have landed in raw/.",
        **shared,
    )
    manual = sales_forecast.to_deployment(
        name="manual",
        description="Triggered by hand with new parameters (UI custom run or `prefect deployment run`).",
        **shared,
    )
    return [monthly, manual]


def serve_deployments(parameters: dict | None = None) -> None:
    serve(*build_deployments(parameters), limit=1)


if __name__ == "__main__":
    serve_deployments()
