"""The two deployments of the forecast flow, defined once: served from one process here (no worker), and
written out in ``deployments/prefect.yaml`` for ``prefect deploy`` (``tests/test_deployments.py`` checks
that the YAML says the same: names, descriptions, entrypoint, tags, schedule, timezone, concurrency limit).

    nestcast serve          # or: python -m deployments.serve

'monthly' runs on the 1st of each month at 06:00 Europe/Moscow (the chain's timezone); 'manual'
has no schedule and is triggered from the UI or `prefect deployment run 'sales-forecast/manual'`.
Both allow one run at a time: SQLite behind a local server does not take concurrent writers well.
"""

from __future__ import annotations

from deployments import console

if __name__ == "__main__" and not console.wants_verbose():  # before the flow's imports load TensorFlow
    console.quiet_native_logs()

from dataclasses import dataclass
from typing import Any

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment

from core.config import NestcastConfig
from core.store import data_dir_identity
from flows.sales_forecast import sales_forecast

ENTRYPOINT = "flows/sales_forecast.py:sales_forecast"
MONTHLY_CRON = "0 6 1 * *"
TIMEZONE = "Europe/Moscow"
TAGS: tuple[str, ...] = ("nestcast",)
CONCURRENCY_LIMIT = 1


@dataclass(frozen=True)
class Deployment:
    """One deployment of the forecast flow, as both ``serve`` and ``prefect.yaml`` declare it."""

    name: str
    description: str
    cron: str | None = None  # in TIMEZONE; None: triggered by hand only

    def yaml_fields(self) -> dict[str, Any]:
        """The fields of this deployment's entry in prefect.yaml (less the work pool)."""
        fields: dict[str, Any] = {
            "name": self.name, "description": self.description, "entrypoint": ENTRYPOINT, "tags": list(TAGS),
            "parameters": {}, "concurrency_limit": CONCURRENCY_LIMIT,
        }
        if self.cron is not None:
            fields["schedules"] = [{"cron": self.cron, "timezone": TIMEZONE, "active": True}]
        return fields


DEPLOYMENTS: tuple[Deployment, ...] = (
    Deployment(
        "monthly",
        "Monthly forecast on the 1st, after the previous month's sales have landed in raw/.",
        cron=MONTHLY_CRON,
    ),
    Deployment("manual", "Triggered by hand with new parameters (UI custom run or `prefect deployment run`)."),
)


def build_deployments(parameters: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    """The served deployments; their ``data_dir`` default is made absolute here, where ``serve`` starts, so the
    form shows (and every run uses) one directory whatever the runs' working directory."""
    defaults = {"data_dir": data_dir_identity(NestcastConfig().data_dir)}
    shared = {"parameters": defaults | (parameters or {}), "concurrency_limit": CONCURRENCY_LIMIT,
              "tags": list(TAGS)}
    return [
        sales_forecast.to_deployment(
            name=spec.name,
            description=spec.description,
            **({"schedule": CronSchedule(cron=spec.cron, timezone=TIMEZONE)} if spec.cron else {}),
            **shared,
        )
        for spec in DEPLOYMENTS
    ]


def serve_deployments(parameters: dict[str, Any] | None = None) -> None:
    serve(*build_deployments(parameters), limit=1)


if __name__ == "__main__":
    console.quiet_console(console.wants_verbose())
    serve_deployments()
