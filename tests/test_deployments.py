"""The deployments are defined once (``deployments.serve.DEPLOYMENTS``): prefect.yaml must say the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.serve import DEPLOYMENTS, ENTRYPOINT, build_deployments

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
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


def test_the_deployment_form_has_the_config_s_bounds_and_choices_and_refuses_zero_epochs():
    from typing import get_args

    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from core.config import knob_field
    from flows.sales_forecast import sales_forecast

    properties = parameter_schema(sales_forecast).model_dump()["properties"]
    for name in ("epochs", "units", "lookback", "batch_size", "depth"):
        field = knob_field(name)
        bounds = {key: getattr(meta, bound) for meta in field.metadata
                  for key, bound in (("minimum", "ge"), ("maximum", "le")) if hasattr(meta, bound)}
        assert {key: properties[name][key] for key in ("minimum", "maximum") if key in properties[name]} == bounds
    assert properties["lookback"]["minimum"] == 1 and properties["lookback"]["maximum"] == 60
    for name in ("kind", "sample_policy", "device", "fallback"):
        assert properties[name]["enum"] == list(get_args(knob_field(name).annotation)), name
    with pytest.raises(ParameterTypeError, match="epochs: Input should be greater than or equal to 1"):
        sales_forecast.validate_parameters({"epochs": 0})


def test_serve_refuses_a_data_directory_without_raw_in_one_line_before_serving(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NESTCAST_", "PREFECT_API_URL"))}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", "--data-dir", str(tmp_path / "none")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'none' / 'raw'} does not exist: put the "
                                                  f"competition CSVs there or run `nestcast demo-data "
                                                  f"{tmp_path / 'none'}`"]


def test_served_deployments_default_to_the_data_directory_serve_was_given(tmp_path):
    for deployment in build_deployments({"data_dir": str(tmp_path)}):
        assert deployment.parameters["data_dir"] == str(tmp_path)
