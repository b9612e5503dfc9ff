"""Backtest and search on tiny synthetic data: per-origin rows, baselines checked independently, reports, flows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client
from prefect.client.orchestration import get_client
from process_helpers import free_port, stop

from core.aggregate import read_monthly
from core.backtest import REPORT_FILE, RESULT_FILE, BacktestResult, backtest, backtest_id, parse_origins
from core.config import NestcastConfig
from core.evaluate import backtest_frame
from core.lake import LakePaths
from core.window_store import WindowStore

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "units": 4, "depth": 1, "lookback": 4, "epochs": 1, "batch_size": 256, "head_units": 4,
    "embedding_dim": 2, "sample_budget": 2000, "retries": 0, "jit_compile": "off", "max_rounds": 50,
}


@pytest.fixture(scope="module")
def lake(tmp_path_factory, tiny_data) -> Path:
    return tiny_data(tmp_path_factory.mktemp("backtest"), seed=3)


@pytest.fixture(scope="module")
def result(lake) -> tuple[BacktestResult, list[int], NestcastConfig]:
    config = NestcastConfig(data_dir=lake).with_overrides(**SMALL)
    # ingest + aggregate first, to learn the months; backtest() then finds the lake current.
    from core.backtest import prepare_lake

    prepare_lake(config)
    last = int(read_monthly(LakePaths(lake))["date_block_num"].max())
    origins = [last - 1, last]
    return backtest(config, origins, run_dir=lake / "runs" / "bt"), origins, config


def rmse(pred: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - np.asarray(actual, np.float64)) ** 2)))


def test_one_row_per_origin_with_model_baselines_and_cost(result):
    res, origins, _ = result
    assert [o.origin for o in res.origins] == origins
    for o in res.origins:
        assert set(o.rmse) == {"model", "ensemble", "reference", "baseline", "mean3", "zeros"}
        assert all(np.isfinite(v) and v >= 0 for v in o.rmse.values())
        assert o.params > 0 and o.train_seconds > 0 and o.reference_seconds > 0
        assert o.epochs_run == 2, "one selection epoch, then one refit epoch from the selected network"
        assert o.train_samples <= SMALL["sample_budget"]
    rows = res.rows()
    assert [r["origin"] for r in rows] == [str(m) for m in origins] + ["mean"]
    assert rows[-1]["model_rmse"] == pytest.approx(np.mean([o.rmse["model"] for o in res.origins]), abs=1e-4)
    # Each origin's range: the gate's pick calibrated on the validation months, scored on the origin.
    for o, row in zip(res.origins, rows, strict=False):
        assert o.ranges["exported"] in {"model", "reference", "ensemble", "baseline"}
        assert 0.0 <= o.ranges["range_coverage"] <= 1.0 and o.ranges["range_width"] >= 0.0
        assert o.ranges["range_pinball"] > 0 and o.ranges["naive_pinball"] > 0
        assert row["range_pinball"] == pytest.approx(o.ranges["range_pinball"], abs=1e-4)
    assert rows[-1]["range_coverage"] == pytest.approx(np.mean([o.ranges["range_coverage"] for o in res.origins]),
                                                       abs=1e-4)


def test_baselines_match_an_independent_computation_from_monthly_data(result, lake):
    res, _, _ = result
    monthly = read_monthly(LakePaths(lake))
    for o in res.origins:
        frame = backtest_frame(monthly, o.origin)
        assert o.rows == len(frame)
        assert o.rmse["baseline"] == pytest.approx(rmse(frame["prev"], frame["actual"]), rel=1e-5)
        assert o.rmse["mean3"] == pytest.approx(rmse(frame["mean3"], frame["actual"]), rel=1e-5)
        assert o.rmse["zeros"] == pytest.approx(rmse(np.zeros(len(frame)), frame["actual"]), rel=1e-5)


def test_each_origin_trains_only_on_earlier_months_in_its_own_windows_dir(result, lake):
    res, _, _ = result
    assert not (LakePaths(lake).windows / "meta.json").exists(), "the main lake/windows must stay untouched"
    dirs = {o.windows_dir for o in res.origins}
    assert len(dirs) == len(res.origins)
    for o in res.origins:
        assert Path(o.windows_dir).parent == LakePaths(lake).lake / "backtest"
        store = WindowStore.open(o.windows_dir)
        assert store.holdout_month == o.origin
        assert int(store.train_index[:, 1].max()) < o.origin
        # The protocol: select below the two months before the origin, early-stopped on them; refit through them.
        select = json.loads((Path(o.run_dir) / "select" / "metadata.json").read_text())
        refit = json.loads((Path(o.run_dir) / "refit" / "metadata.json").read_text())
        assert o.selection["validation_months"] == select["validation_months"] == [o.origin - 2, o.origin - 1]
        assert select["trained_below_month"] == o.origin - 2 and select["stage"] == "select"
        assert refit["trained_below_month"] == o.origin and refit["validation_months"] is None
        # The refit continues the selection's network for train.refit_epochs (1) epochs.
        assert refit["epochs_run"] == 1 and refit["started_from"] == str(Path(o.run_dir) / "select" / "model.keras")
        blend = o.selection["blend"]
        assert 0.0 <= blend["known"] <= 1.0 and 0.0 <= blend["launch"] <= 1.0
        assert o.selection["rounds"]["reference"] >= 1
        assert set(o.selection["validation_rmse_by_month"]["model"]) == {str(o.origin - 2), str(o.origin - 1)}
        # the ensemble column is the selected blend of the model and the booster, launch rows weighted apart
        holdout = pd.read_parquet(Path(o.run_dir) / "refit" / "holdout.parquet")
        launch = store.holdout_frame()["new_item"].to_numpy()
        weight = np.where(launch, blend["launch"], blend["known"])
        expected = np.clip(weight * holdout["model"] + (1 - weight) * holdout["reference"], 0, 20)
        np.testing.assert_allclose(holdout["ensemble"], expected, rtol=1e-5, atol=1e-5)
        for stage in ("select", "refit"):
            for name in ("model.keras", "reference.txt"):
                assert (Path(o.run_dir) / stage / name).exists(), (stage, name)


def _said(value: float, against: float) -> str:
    change = 1 - value / against
    if abs(change) < 0.0005:
        return "the same as"
    return f"{abs(change):.1%} {'better' if change > 0 else 'worse'} than".replace("%", " %")


def test_report_and_json_are_written(result, lake):
    res, origins, _ = result
    report = (lake / "runs" / "bt" / REPORT_FILE).read_text()
    assert report.startswith("# Backtest")
    # The verdict comes first: mean RMSEs against the previous month and the reference, computed here again.
    model, baseline, reference = (np.mean([o.rmse[p] for o in res.origins]) for p in ("model", "baseline", "reference"))
    verdict = f"- **model {model:.4f}**: {_said(model, baseline)} the previous month ({baseline:.4f}), " \
              f"{_said(model, reference)} the LightGBM ({reference:.4f})"
    assert verdict in report.split("| origin |")[0], report[:800]
    for o in res.origins:
        scores = " | ".join(f"{o.rmse[p]:.4f}" for p in ("model", "reference", "ensemble", "baseline"))
        assert f"| {o.origin} | {o.rows:,} | {scores} |" in report
    saved = BacktestResult.from_dict(json.loads((lake / "runs" / "bt" / RESULT_FILE).read_text()))
    assert saved.mean_ratio == pytest.approx(res.mean_ratio)


def test_origins_are_parsed_and_checked():
    assert parse_origins("28, 26,27") == [26, 27, 28]
    with pytest.raises(ValueError):
        parse_origins("")
    with pytest.raises(ValueError):
        parse_origins([1])
    with pytest.raises(ValueError, match="ends at month 15"):
        parse_origins("15,16", last_month=15)


# --- the flows, under one temporary Prefect backend -------------------------------------------------


FLOW_KNOBS = ("units", "depth", "lookback", "epochs", "batch_size")
SEARCH_OVERRIDES = {**SMALL, "epochs": 1, "batch_size": 512}


def search_flow_on(lake: Path, **placement):
    from flows.search import search as search_flow

    last = int(read_monthly(LakePaths(lake))["date_block_num"].max())
    return search_flow(data_dir=str(lake), trials=2, origins=[last], overrides={**SEARCH_OVERRIDES, **placement})


def backtest_flow_on(lake: Path, origin: int) -> dict:
    from flows.backtest import backtest as backtest_flow

    overrides = {k: v for k, v in SMALL.items() if k not in FLOW_KNOBS}
    return backtest_flow(
        data_dir=str(lake), origins=[origin], units=4, depth=1, lookback=4, epochs=1, batch_size=256,
        overrides=overrides,
    )


@pytest.fixture(scope="module")
def thread_flows(harness, result, lake) -> dict:
    """The backtest and search flows on the default task runner (threads), once for the tests below."""
    _, origins, _ = result
    return {"backtest": backtest_flow_on(lake, origins[-1]), "search": search_flow_on(lake)}


def test_backtest_and_search_flows_write_reports_and_table_artifacts(thread_flows, result):
    _, origins, _ = result
    summary = thread_flows["backtest"]
    assert [r["origin"] for r in summary["rows"]] == [str(origins[-1]), "mean"]
    assert (Path(summary["run_dir"]) / REPORT_FILE).exists()
    assert Path(summary["run_dir"]).name.startswith("backtest-")

    found = thread_flows["search"]
    rows = found["rows"]
    assert sorted(r["trial"] for r in rows) == [0, 1]
    assert all(r["state"] == "complete" and r["model_vs_previous"] > 0 for r in rows)
    assert all(r["params"] > 0 and r["train_s"] >= 0 for r in rows), "each trial's cost comes from its backtest"
    assert all("learning_rate" in r and "epochs" not in r for r in rows), "pinned parameters leave the space"
    assert found["best"]["model_vs_previous"] == pytest.approx(min(r["model_vs_previous"] for r in rows), abs=1e-4)
    assert (Path(found["run_dir"]) / "search.md").exists() and (Path(found["run_dir"]) / "best.json").exists()

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"backtest", "search-trials"} <= keys


def test_a_backtest_rerun_after_its_run_directory_was_deleted_trains_again_instead_of_linking_gone_runs(
    thread_flows, result, lake
):
    _, origins, _ = result
    first = thread_flows["backtest"]
    (before,) = json.loads((Path(first["run_dir"]) / RESULT_FILE).read_text())["origins"]
    shutil.rmtree(first["run_dir"])
    again = backtest_flow_on(lake, origins[-1])
    assert again["run_dir"] == first["run_dir"]
    (origin,) = json.loads((Path(again["run_dir"]) / RESULT_FILE).read_text())["origins"]
    assert (Path(origin["run_dir"]) / "refit" / "holdout.parquet").exists(), "served from the cache: the run is gone"
    assert origin["run_dir"] == before["run_dir"] and origin["rmse"]["baseline"] == before["rmse"]["baseline"]


# --- the same flows on a real Dask cluster: scheduler and workers in their own processes -------------


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory) -> Iterator[str]:
    """``dask scheduler`` and ``dask worker`` (two single-threaded worker processes) on 127.0.0.1, no dashboard."""
    logs = tmp_path_factory.mktemp("dask-logs")
    address = f"tcp://127.0.0.1:{free_port()}"
    # tests/ too: client.run ships trained_here by reference to this module, which the workers must import
    path = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    dask = str(Path(sys.executable).parent / "dask")
    commands = {
        "scheduler": [dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                      "--no-dashboard"],
        "worker": [dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1",
                   "--no-dashboard"],
    }
    processes = []
    try:
        for name, command in commands.items():
            log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process below
            processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True), log))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process, log in reversed(processes):
            stop(process)
            log.close()


def trained_here() -> bool:
    return "core.protocol" in sys.modules  # imported by an origin's training, by nothing else a worker runs


def copy_without_runs(lake: Path, target: Path) -> Path:
    """The lake's data (raw, ingested, aggregated, windows built), none of its trainings or cache records.

    A new data directory is a new cache key for every task, so the copy's origins and trials train afresh;
    the ingest, aggregation and windows steps find their work done (content hashes) and skip it.
    """
    shutil.copytree(lake, target, ignore=lambda folder, names: {"runs", ".task-outputs"} & set(names))
    return target


def test_origins_run_on_dask_worker_processes_and_score_as_on_threads(result, lake, dask_cluster, tmp_path_factory):
    from flows.backtest import backtest as backtest_flow

    thread, origins, config = result
    lake = copy_without_runs(lake, tmp_path_factory.mktemp("dask") / "lake")
    summary = backtest_flow(
        data_dir=str(lake), origins=origins, **{k: SMALL[k] for k in FLOW_KNOBS}, task_runner="dask",
        dask_address=dask_cluster, overrides={k: v for k, v in SMALL.items() if k not in FLOW_KNOBS},
    )
    on_dask = BacktestResult.from_dict(json.loads((Path(summary["run_dir"]) / RESULT_FILE).read_text()))
    assert [o.origin for o in on_dask.origins] == origins and on_dask.config["task_runner"] == "dask"
    assert Path(summary["run_dir"]).name == f"backtest-{backtest_id(config, origins)}", "the id ignores the runner"
    with Client(dask_cluster, timeout=60) as client:
        trained = client.run(trained_here)
    assert len(trained) == 2 and all(trained.values()), f"each worker process trains an origin: {trained}"
    for got, want in zip(on_dask.origins, thread.origins, strict=True):
        # Two trainings at once on two worker processes, each seeded, reproduce the ones made alone on threads:
        # every forecaster, the network included, scores exactly the same.
        assert got.rows == want.rows and got.selection["rounds"] == want.selection["rounds"]
        assert got.rmse == want.rmse, f"origin {got.origin}"


def test_cli_backtest_and_search_check_their_options_before_running(tmp_path):
    from typer.testing import CliRunner

    from deployments.cli import app

    runner = CliRunner()
    assert "--origins" in runner.invoke(app, ["backtest", "--help"]).output
    assert "--trials" in runner.invoke(app, ["search", "--help"]).output
    (tmp_path / "raw").mkdir()
    bad = runner.invoke(app, ["backtest", "--data-dir", str(tmp_path), "--origins", "1,2"])
    assert bad.exit_code == 2 and "origin months must be >= 2" in bad.output
    bad = runner.invoke(app, ["search", "--data-dir", str(tmp_path), "--set", "units=0"])
    assert bad.exit_code == 2 and "units" in bad.output
    missing = runner.invoke(app, ["search", "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "demo-data" in missing.output
