"""The forecast flow on tiny data under a real (temporary) Prefect backend: states, retries, caching."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

import core.export
import core.ingest
import core.windows
from core.aggregate import read_monthly
from core.errors import DataValidationError, ExportCheckError
from core.lake import LakePaths
from flows.aggregate_months import aggregate_months
from flows.sales_forecast import build_config, sales_forecast
from tasks.ingest import ingest_raw_files

TINY_RUN: dict[str, Any] = {
    "epochs": 2,  # two: the epoch table's rows are numbered 1, 2
    "units": 4,
    "depth": 1,
    "lookback": 4,
    "batch_size": 256,
    # XLA compiles cost more than they save on tiny data. Every stage still trains a network and a booster; what
    # the tests check (retries, the cache, rebuilt and retrained steps, files) does not depend on their size.
    "overrides": {"head_units": 4, "sample_budget": 2000, "retry_delay_seconds": 0, "retries": 2,
                  "jit_compile": "off", "max_rounds": 20},
}
STEPS = ("ingest", "build-windows-evaluation", "build-windows-final", "select", "refit-holdout", "refit-final",
         "evaluate", "export")
NAMED_RUNS = ("build-windows-", "refit-")  # task_run_name templates: the run name is the whole key


pytestmark = pytest.mark.usefixtures("harness")


@pytest.fixture
def data_dir(tmp_path, tiny_data) -> Path:
    return tiny_data(tmp_path, seed=5)


def task_runs(flow_run_id, settle_seconds: float = 120) -> dict[str, Any]:
    """The flow's own task runs by task name (sub-flow task runs are not included), once each is in a final state.

    The API records task-run states from events that its recorder service writes a moment later, so right after
    the flow returned a loaded machine can still show a finished task as Pending or Running.
    """
    deadline = time.monotonic() + settle_seconds
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    by_name: dict[str, Any] = {}
    for run in runs:
        by_name[run.name if run.name.startswith(NAMED_RUNS) else run.name.rsplit("-", 1)[0]] = run
    return by_name


def artifacts_of(flow_run_id) -> dict[str, Any]:
    """The flow run's artifacts by key (task runs' included: they carry the flow run's id)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found if artifact.key}


def table(artifact: Any) -> list[dict[str, Any]]:
    """A table artifact's rows (the API stores them as a JSON string)."""
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def flow_run_name(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).name


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
    windows = runs["build-windows-evaluation"]
    assert windows.state.is_completed() and windows.run_count == 3
    assert runs["build-windows-final"].run_count == 1
    assert runs["export"].state.is_failed() and runs["export"].run_count == 1, "a data error must not be retried"
    assert calls == {"windows": 4, "export": 1}
    assert not list((data_dir / "submissions").glob("*.csv")), "a failed export leaves no submission behind"

    monkeypatch.undo()
    second = run_flow(data_dir)
    assert second.is_completed(), second.message
    runs = task_runs(second.state_details.flow_run_id)
    for step in STEPS[:-1]:
        assert runs[step].state.name == "Cached", f"{step} should resume from cache, was {runs[step].state.name}"
    assert runs["export"].state.name == "Completed"
    # Cached steps republish their artifacts, so the newest run's page is complete.
    artifacts = artifacts_of(second.state_details.flow_run_id)
    for key in ("evaluation", "evaluation-report", "training-epochs-select", "training-epochs-refit-holdout",
                "training-epochs-refit-final", "submission", "sales-forecast-summary",
                "validation-sales-train-csv", "ranges"):
        assert key in artifacts, f"{key} missing from the cached rerun; has {sorted(artifacts)}"
    report = artifacts["evaluation-report"].data
    assert "](data:image/png;base64,iVBORw0KGgo" in report and "file://" not in report
    assert [row["forecaster"] for row in table(artifacts["evaluation"])][:1] == ["model (Nested LSTM)"]
    shown = {row["forecaster"] for row in table(artifacts["evaluation"])}
    assert {"previous month (baseline)", "mean of last 3 months"} <= shown
    assert all("vs previous month" in row for row in table(artifacts["evaluation"]))
    epochs = [row["epoch"] for row in table(artifacts["training-epochs-select"])]
    assert epochs and epochs == list(range(1, len(epochs) + 1))

    summary = second.result()
    assert flow_run_name(second.state_details.flow_run_id) == (
        f"forecast-{summary['submission'][-11:-4]}-nlstm-epochs=2-batch_size=256-lookback=4-units=4-depth=1")
    assert "| months in the lake | 2013-01 – " in artifacts["sales-forecast-summary"].data
    assert f"rows, the {summary['exported']} forecast" in artifacts["submission"].data, "the gate's choice, named"
    assert summary["rows_in"] == summary["rows_accepted"] + summary["rows_quarantined"]
    submission = pd.read_csv(summary["submission"])
    test = pd.read_csv(data_dir / "raw" / "test.csv")
    assert list(submission.columns) == ["ID", "item_cnt_month"]
    assert sorted(submission["ID"]) == sorted(test["ID"])
    assert submission["item_cnt_month"].between(0, 20).all()
    # The ranges beside it: one row per exported ID, a column per level; the UI shows them by segment.
    ranges = pd.read_parquet(Path(summary["submission"]).with_suffix(".quantiles.parquet"))
    assert ranges["ID"].tolist() == sorted(test["ID"]) and list(ranges.columns)[3:] == ["q0.1", "q0.5", "q0.9"]
    assert table(artifacts["ranges"])[0]["segment"] == "every pair" and "## Forecast ranges" in report
    run_dir = Path(summary["run_dir"])
    for name in ("metrics.json", "report.md", "monthly_totals.png", "forecast.parquet", "select/selection.json",
                 "ranges.json", "fan.png",
                 "select/validation.parquet", "holdout/holdout.parquet", "final/forecast.parquet"):
        assert (run_dir / name).exists(), name
    for stage in ("select", "holdout", "final"):
        for name in ("model.keras", "reference.txt"):
            assert (run_dir / stage / name).exists(), (stage, name)
    # The protocol: selection below the validation months, the reported score on the holdout, the forecast from
    # models trained through the last month.
    months = summary["months"]
    assert summary["validation_months"] == months[-3:-1] and summary["holdout_month"] == months[-1]
    stages = ("select", "holdout", "final")
    meta = {stage: json.loads((run_dir / stage / "metadata.json").read_text()) for stage in stages}
    assert meta["select"]["trained_below_month"] == months[-3]
    assert meta["holdout"]["trained_below_month"] == months[-1]
    assert meta["final"]["trained_below_month"] == months[-1] + 1
    # Both refits continue the selection's network for train.refit_epochs (1) epochs.
    assert meta["holdout"]["epochs_run"] == meta["final"]["epochs_run"] == 1
    assert meta["holdout"]["started_from"] == meta["final"]["started_from"] == str(run_dir / "select" / "model.keras")
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
    # failed before the month was known: named by what it ran with, and as failed
    named = flow_run_name(state.state_details.flow_run_id)
    assert named == "forecast-failed-nlstm-epochs=2-batch_size=256-lookback=4-units=4-depth=1", named
    with pytest.raises(DataValidationError, match="sales_train.csv"):
        state.result()
    failed = artifacts_of(state.state_details.flow_run_id)["validation-failed"]  # the UI says why it stopped
    assert "sales_train.csv" in failed.data and "Nothing was written to the lake" in failed.data


@flow(name="ingest-only")
def _ingest_only(config: Any) -> core.ingest.IngestSummary:
    return ingest_raw_files(config)


def test_the_validation_artifacts_show_the_first_quarantined_lines_and_the_ge_page(data_dir):
    sales = data_dir / "raw" / "sales_train.csv"
    with sales.open("a") as handle:  # a negative price and a line with a field missing, at the end
        handle.write("02.01.2013,0,1,1,-5.0,1.0\n02.01.2013,0,1,1,5.0\n")
    state = _ingest_only(build_config(data_dir=str(data_dir)), return_state=True)
    summary = state.result()
    report = summary.file("sales_train.csv")
    artifacts = artifacts_of(state.state_details.flow_run_id)
    measures = {row["measure"]: row["value"] for row in table(artifacts["validation-sales-train-csv"])}
    assert measures["status"] == (f"failed on {report.rows_quarantined:,} rows (quarantined); "
                                  f"the other {report.rows_accepted:,} accepted")
    assert Path(measures["validation page"]).is_file() and measures["validation page"].endswith(".html")
    quarantine = pd.read_parquet(data_dir / "lake" / "quarantine" / "sales_train.parquet").sort_values("line_number")
    markdown = artifacts["quarantine-sales-train-csv"].data
    for row in quarantine.head(10).itertuples():
        assert f"| {row.line_number} | {row.rule} | " in markdown, (row.line_number, markdown)
    last = len(sales.read_text().splitlines())  # the header is line 1, so the last line's number is the count
    assert {last - 1, last} <= set(quarantine["line_number"]), "the two appended lines are quarantined"
    assert "quarantine-items-csv" not in artifacts, "a file with nothing quarantined gets no quarantine artifact"
    again = _ingest_only(build_config(data_dir=str(data_dir)), return_state=True)  # a cached ingest ...
    assert task_runs(again.state_details.flow_run_id)["ingest"].state.name == "Cached"
    republished = artifacts_of(again.state_details.flow_run_id)  # ... shows the same on the newest run's page
    assert republished["quarantine-sales-train-csv"].data == markdown
    assert {row["measure"]: row["value"] for row in table(republished["validation-sales-train-csv"])} == measures


def test_per_month_aggregation_runs_on_a_local_dask_cluster(data_dir):
    config = build_config(data_dir=str(data_dir), task_runner="dask")
    ingested = core.ingest.ingest(config)
    summary = aggregate_months(config, ingested)
    assert summary.months == ingested.months and summary.last_month == max(ingested.months)
    assert sorted(summary.input_hashes) == summary.months and summary.removed == []
    partitions = sorted((data_dir / "lake" / "monthly").glob("date_block_num=*/data.parquet"))
    assert len(partitions) == len(ingested.months)
    monthly = read_monthly(LakePaths(data_dir))
    assert monthly["item_cnt_month"].sum() == pytest.approx(
        core.ingest.read_sales(LakePaths(data_dir)).column("item_cnt_day").to_numpy().sum(), rel=1e-6
    )


@pytest.mark.slow
def test_a_wiped_data_dir_or_runs_dir_is_rebuilt_instead_of_served_from_cache(data_dir, tmp_path_factory):
    import shutil

    first = run_flow(data_dir)
    assert first.is_completed(), first.message
    # The whole directory wiped and its raw files written back at the same path (before: ingest was served from
    # the cache, its output records having gone with the directory, and aggregation found no sales).
    raw = shutil.copytree(data_dir / "raw", tmp_path_factory.mktemp("raw-copy") / "raw")
    shutil.rmtree(data_dir)
    shutil.copytree(raw, data_dir / "raw")
    second = run_flow(data_dir)
    assert second.is_completed(), second.message
    runs = task_runs(second.state_details.flow_run_id)
    assert runs["ingest"].state.name == "Completed" and runs["build-windows-evaluation"].state.name == "Completed"
    assert list((data_dir / "lake" / "sales").glob("date_block_num=*/data.parquet"))

    # runs/ alone wiped: the data steps stay cached, the model is retrained into the same, content-named directory.
    run_dir = Path(second.result()["run_dir"])
    shutil.rmtree(data_dir / "runs")
    third = run_flow(data_dir)
    assert third.is_completed(), third.message
    runs = task_runs(third.state_details.flow_run_id)
    assert runs["ingest"].state.name == "Cached" and runs["build-windows-final"].state.name == "Cached"
    for step in ("select", "refit-holdout", "refit-final", "evaluate"):
        assert runs[step].state.name == "Completed", step
    assert Path(third.result()["run_dir"]) == run_dir
    assert (run_dir / "final" / "model.keras").exists() and (run_dir / "forecast.parquet").exists()


def test_the_forecast_run_directory_is_named_by_content(tmp_path):
    from core.protocol import forecast_run_dir

    config = build_config(data_dir=str(tmp_path))
    windows, final = {"build_hash": "abc", "seconds": 1.0}, {"build_hash": "fin", "seconds": 1.0}
    same = forecast_run_dir(config, {**windows, "seconds": 9.0}, final)
    assert forecast_run_dir(config, windows, final) == same, "build time must not change the directory"
    assert same.parent == tmp_path / "runs" and same.name.startswith("forecast-")
    assert forecast_run_dir(config, {**windows, "build_hash": "abd"}, final) != same
    assert forecast_run_dir(config, windows, {**final, "build_hash": "fio"}) != same
    assert forecast_run_dir(config.with_overrides(epochs=config.train.epochs + 1), windows, final) != same
    assert forecast_run_dir(config.with_overrides(units=config.model.units + 1), windows, final) != same
    assert forecast_run_dir(config.with_overrides(num_leaves=7), windows, final) != same
