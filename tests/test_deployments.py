"""The deployments are defined once (``deployments.serve.DEPLOYMENTS``): prefect.yaml must say the same."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployments.serve import DEPLOYMENTS, ENTRYPOINT, build_deployments

PREFECT_YAML = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"
WORK_POOL = {"name": "nestcast-process", "work_queue_name": "default", "job_variables": {}}


def test_prefect_yaml_declares_the_served_deployments():
    declared = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    assert [d["name"] for d in declared] == [spec.name for spec in DEPLOYMENTS]
    for entry, spec in zip(declared, DEPLOYMENTS, strict=True):
        assert entry.pop("work_pool") == WORK_POOL, spec.name
        assert entry == spec.yaml_fields(), spec.name


def test_served_deployments_follow_the_spec():
    for deployment, spec in zip(build_deployments(), DEPLOYMENTS, strict=True):
        assert deployment.name == spec.name and deployment.description == spec.description
        assert deployment.tags == ["nestcast"] and deployment.concurrency_limit == 1
        crons = [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules or []]
        assert crons == ([(spec.cron, "Europe/Moscow")] if spec.cron else [])
        assert deployment.entrypoint.endswith(ENTRYPOINT.replace("/", ".").replace(".py:", ".")) or (
            deployment.entrypoint.endswith(ENTRYPOINT)
        ), deployment.entrypoint


def test_the_deployment_form_describes_every_parameter_and_defaults_data_dir_to_an_absolute_path():
    for deployment in build_deployments():
        properties = deployment._parameter_openapi_schema.properties
        assert set(properties) >= {"data_dir", "epochs", "kind", "device", "overrides"}
        undescribed = [name for name, schema in properties.items() if not schema.get("description")]
        assert undescribed == [], undescribed
        assert Path(deployment.parameters["data_dir"]).is_absolute()
