"""The forecast flow on tiny data under a real (temporary) Prefect backend: states, retries, caching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

import core.export
import core.ingest
import core.windows
from core.aggregate import read_monthly
from core.errors import DataValidationError, ExportCheckError
from core.lake import LakePaths
from core.synthetic import write_competition_files
from flows.aggregate_months import aggregate_months
from flows.sales_forecast import build_config, sales_forecast

TINY_RUN: dict[str, Any] = {
    "epochs": 2,
    "units": 8,
    "depth": 2,
    "lookback": 6,
    "batch_size": 256,
    "overrides": {"head_units": 8, "max_train_samples": 3000, "retry_delay_seconds": 0, "retries": 2},
}
STEPS = ("ingest", "build-windows", "train", "evaluate", "export")


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def data_dir(tmp_path) -> Path:
    write_competition_files(tmp_path / "raw", scale="tiny", seed=5)
    return tmp_path


def task_runs(flow_run_id) -> dict[str, Any]:
    """The flow's own task runs by task name (sub-flow task runs are not included)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_name: dict[str, Any] = {}
    for run in runs:
        by_name[run.name.rsplit("-", 1)[0]] = run
    return by_name


def run_flow(data_dir: Path, **extra: Any):
    return sales_forecast(data_dir=str(data_dir), **{**TINY_RUN, **extra}, return_state=True)


def test_transient_errors_are_retried_data_errors_are_not_and_a_rerun_resumes_from_cache(data_dir, monkeypatch):
    real_build = core.windows.build_windows
    calls = {"windows": 0, "export": 0}

    def flaky_build(*args, **kwargs):
        calls["windows"] += 1
        if calls["windows"] <= 2:
            raise OSError("injected: the lake's disk went away for a moment")
        return real_build(*args, **kwargs)

    def broken_export(*args, **kwargs):
        calls["export"] += 1
        raise ExportCheckError("injected: submission failed its checks")

    monkeypatch.setattr(core.windows, "build_windows", flaky_build)
    monkeypatch.setattr(core.export, "export_submission", broken_export)

    first = run_flow(data_dir)
    assert first.is_failed()
    runs = task_runs(first.state_details.flow_run_id)
    assert runs["build-windows"].state.is_completed() and runs["build-windows"].run_count == 3
    assert runs["export"].state.is_failed() and runs["export"].run_count == 1, "a data error must not be retried"
    assert calls == {"windows": 3, "export": 1}
    assert not list((data_dir / "submissions").glob("*.csv")), "a failed export leaves no submission behind"

    monkeypatch.undo()
    second = run_flow(data_dir)
    assert second.is_completed(), second.message
    runs = task_runs(second.state_details.flow_run_id)
    for step in ("ingest", "build-windows", "train", "evaluate"):
        assert runs[step].state.name == "Cached", f"{step} should resume from cache, was {runs[step].state.name}"
    assert runs["export"].state.name == "Completed"

    summary = second.result()
    assert summary["rows_in"] == summary["rows_accepted"] + summary["rows_quarantined"]
    submission = pd.read_csv(summary["submission"])
    test = pd.read_csv(data_dir / "raw" / "test.csv")
    assert list(submission.columns) == ["ID", "item_cnt_month"]
    assert sorted(submission["ID"]) == sorted(test["ID"])
    assert submission["item_cnt_month"].between(0, 20).all()
    run_dir = Path(summary["run_dir"])
    for name in ("model.keras", "metadata.json", "metrics.json", "report.md", "monthly_totals.png"):
        assert (run_dir / name).exists(), name
    sidecar = json.loads(Path(summary["submission"]).with_suffix(".json").read_text())
    assert sidecar["exported"] == summary["exported"] and sidecar["run_id"] == run_dir.name


def test_a_file_level_validation_error_fails_at_once_without_retry(data_dir):
    sales = data_dir / "raw" / "sales_train.csv"
    lines = sales.read_text().splitlines()
    sales.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")  # drop item_cnt_day

    state = run_flow(data_dir)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["ingest"].run_count == 1 and runs["ingest"].state.is_failed()
    assert set(runs) == {"ingest"}, "nothing downstream of a failed ingest runs"
    with pytest.raises(DataValidationError, match="sales_train.csv"):
        state.result()


def test_per_month_aggregation_runs_on_a_local_dask_cluster(data_dir):
    config = build_config(data_dir=str(data_dir), task_runner="dask")
    ingested = core.ingest.ingest(config).model_dump(mode="json")
    summary = aggregate_months(config, ingested)
    assert summary["months"] == ingested["months"]
    partitions = sorted((data_dir / "lake" / "monthly").glob("date_block_num=*/data.parquet"))
    assert len(partitions) == len(ingested["months"])
    monthly = read_monthly(LakePaths(data_dir))
    assert monthly["item_cnt_month"].sum() == pytest.approx(
        core.ingest.read_sales(LakePaths(data_dir)).column("item_cnt_day").to_numpy().sum(), rel=1e-6
    )


def test_a_wiped_lake_or_runs_dir_is_rebuilt_instead_of_served_from_cache(data_dir):
    import shutil

    first = run_flow(data_dir)
    assert first.is_completed(), first.message
    shutil.rmtree(data_dir / "lake")
    second = run_flow(data_dir)
    assert second.is_completed(), second.message
    runs = task_runs(second.state_details.flow_run_id)
    assert runs["ingest"].state.name == "Completed" and runs["build-windows"].state.name == "Completed"
    assert list((data_dir / "lake" / "sales").glob("date_block_num=*/data.parquet"))

    # runs/ alone wiped: the data steps stay cached, the model is retrained into the same, content-named directory.
    run_dir = Path(second.result()["run_dir"])
    shutil.rmtree(data_dir / "runs")
    third = run_flow(data_dir)
    assert third.is_completed(), third.message
    runs = task_runs(third.state_details.flow_run_id)
    assert runs["ingest"].state.name == "Cached" and runs["build-windows"].state.name == "Cached"
    assert runs["train"].state.name == "Completed" and runs["evaluate"].state.name == "Completed"
    assert Path(third.result()["run_dir"]) == run_dir
    assert (run_dir / "model.keras").exists() and (run_dir / "forecast.parquet").exists()


def test_the_forecast_run_directory_is_named_by_content(tmp_path):
    from tasks.train import forecast_run_dir

    config = build_config(data_dir=str(tmp_path))
    windows = {"build_hash": "abc", "seconds": 1.0}
    same = forecast_run_dir(config, {**windows, "seconds": 9.0})
    assert forecast_run_dir(config, windows) == same, "build time must not change the directory"
    assert same.parent == tmp_path / "runs" and same.name.startswith("forecast-")
    assert forecast_run_dir(config, {**windows, "build_hash": "abd"}) != same
    assert forecast_run_dir(config.with_overrides(epochs=config.train.epochs + 1), windows) != same
    assert forecast_run_dir(config.with_overrides(units=config.model.units + 1), windows) != same
