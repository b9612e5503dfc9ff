"""Champion and challenger are whole forecasters (core.champion, core.gate.gate_run): the champion is scored as the
forecast it exported -- its blend and calibration included -- on the same month as the challenger, and a kept
champion exports that same forecaster. Runs the protocol's stages directly (no Prefect) on tiny data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from core import champion, protocol
from core.aggregate import aggregate
from core.config import NestcastConfig
from core.evaluate import evaluate_run
from core.export import export_run
from core.gate import gate_run
from core.ingest import ingest
from core.lake import LakePaths
from core.windows import build_windows

SMALL: dict[str, Any] = {
    "units": 4, "depth": 1, "lookback": 4, "epochs": 1, "batch_size": 256, "head_units": 4, "embedding_dim": 2,
    "sample_budget": 2000, "jit_compile": "off", "max_rounds": 60, "early_stopping_rounds": 10,
}


def forecast_run(config: NestcastConfig) -> dict[str, Any]:
    """Every stage of the forecast flow on ``config``'s lake, as the flow chains them."""
    paths = LakePaths.of(config)
    monthly = paths.monthly_months()
    windows = build_windows(config, windows_dir=paths.windows_dir("evaluation"))
    final = build_windows(config, holdout_month=max(monthly) + 1, windows_dir=paths.windows_dir("final"))
    run_dir = protocol.forecast_run_dir(config, windows, final)
    selection = protocol.select(config, windows.windows_dir, run_dir / "select")
    protocol.refit(config, windows.windows_dir, run_dir / "holdout", selection)
    protocol.refit(config, final.windows_dir, run_dir / "final", selection)
    scores = evaluate_run(config, windows.windows_dir, final.windows_dir, run_dir)
    decision = gate_run(config, windows.windows_dir, final.windows_dir, run_dir, selection, scores)
    exported = export_run(config, final.windows_dir, run_dir, decision)
    return {"run_dir": run_dir, "selection": selection, "scores": scores, "decision": decision,
            "submission": exported.csv_path}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_data) -> dict[str, Any]:
    root = tiny_data(tmp_path_factory.mktemp("champion"), seed=2)
    first_config = NestcastConfig(data_dir=root).with_overrides(**SMALL, ensemble_segments="none")
    ingest(first_config)
    aggregate(first_config)
    first = forecast_run(first_config)
    # The same lake, another seed, a near-zero learning rate and no trees: a worse challenger whatever its network
    # starts from (a refit continues the selection's barely trained weights), so the champion stays.
    second = forecast_run(first_config.with_overrides(seed=7, learning_rate=1e-9, reference_enabled=False))
    return {"root": root, "first": first, "second": second, "config": first_config}


def test_the_champion_is_scored_as_the_forecast_it_exported_not_as_its_bare_network(two_runs) -> None:
    first, second = two_runs["first"], two_runs["second"]
    exported = first["decision"].exported
    assert exported in ("reference", "ensemble"), f"the test needs an export that is not the bare network: {exported}"
    verdict = second["decision"].champion
    assert verdict is not None and verdict.champion_rmse is not None
    # Both runs hold out the same month, and the champion forecast the month after it: it is re-applied with its
    # holdout stage, which made its own reported score. The same forecaster on the same month scores the same.
    assert verdict.champion_rmse == pytest.approx(first["decision"].exported_rmse, abs=1e-6)
    assert verdict.champion_rmse != pytest.approx(first["scores"].rmse["model"], abs=1e-6)


def test_a_kept_champion_exports_the_same_forecaster_it_was_crowned_with(two_runs) -> None:
    first, second = two_runs["first"], two_runs["second"]
    decision = second["decision"]
    assert decision.exported == "champion" and decision.champion.keep_champion
    index = champion.read_index(LakePaths(two_runs["root"]))["champion"]
    assert index["run_dir"] == f"runs/{first['run_dir'].name}", "records name runs inside the data directory"
    assert index["exported"] == first["decision"].exported
    # The champion's final stage forecast the same month: its exported column, re-applied, is what is exported.
    own = pd.read_parquet(first["run_dir"] / "forecast.parquet").set_index("ID")[index["exported"]]
    submitted = pd.read_csv(second["submission"]).set_index("ID")["item_cnt_month"]
    np.testing.assert_allclose(submitted.to_numpy(), own.reindex(submitted.index).clip(0, 20).to_numpy(), atol=1e-4)
    sidecar = json.loads(Path(second["submission"]).with_suffix(".json").read_text())
    assert sidecar["exported"] == "champion" and "worse than the champion" in sidecar["reason"]
    report = Path(decision.report).read_text()
    assert "Exported the champion's forecast" in report and "## Champion and challenger" in report


def test_the_champion_is_found_through_the_catalog_from_another_copy_of_the_lake(two_runs, tmp_path) -> None:
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(two_runs["root"], moved)
    config = two_runs["config"].with_overrides(data_dir=moved)
    paths = LakePaths.of(config)
    record = champion.read_index(paths)["champion"]
    assert paths.run_path(record["run_dir"]).is_relative_to(moved)
    score = champion.score_champion(config, paths.monthly_months()[-1], paths.windows, paths.windows_final)
    assert score.rmse == pytest.approx(two_runs["first"]["decision"].exported_rmse, abs=1e-6), score.why_not
