"""Accountability on tiny data under a real Prefect backend: a run forecasts month 15, the drop of month 15
arrives, the next run scores that forecast; a rerun adds nothing. One module-scoped scenario, several checks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from core import accountability, champion
from core.config import DEFAULT_SHOP_MERGE_MAP, NestcastConfig
from core.lake import LakePaths
from flows.sales_forecast import sales_forecast
from tests.conftest import write_tiny_data
from tests.test_flow import artifacts_of, table

pytestmark = pytest.mark.usefixtures("harness")

#: The smallest run that still trains every stage: one epoch of a 4-unit NLSTM, no LightGBM.
CHEAP_RUN: dict[str, Any] = {
    "epochs": 1, "units": 4, "depth": 1, "lookback": 3, "batch_size": 512,
    "overrides": {"head_units": 0, "sample_budget": 1000, "retry_delay_seconds": 0, "jit_compile": "off",
                  "max_rounds": 10, "reference_enabled": False},
}
DROP_MONTH = 15
DROP = "sales_2014-04.csv"  # date_block_num 15


def split_off_month(raw: Path, month: int) -> pd.DataFrame:
    """Move ``month``'s rows out of sales_train.csv (kept aside, returned) as the history before its drop."""
    sales = pd.read_csv(raw / "sales_train.csv")
    sales[sales["date_block_num"] < month].to_csv(raw / "sales_train.csv", index=False)
    return sales[sales["date_block_num"] == month]


def reference_rmse(drop_rows: pd.DataFrame, submission: pd.DataFrame, test: pd.DataFrame,
                   predicted: pd.Series | None = None) -> float:
    """The competition's score, from the raw CSV rows alone: the ingest's price rule (rows priced at or above
    ``max_item_price`` are quarantined) and shop merges applied, summed per pair, clipped to [0, 20], zero for
    every test pair without a sale."""
    rows = drop_rows[drop_rows["item_price"] < NestcastConfig().ingest.max_item_price]
    rows = rows.assign(shop_id=rows["shop_id"].replace(DEFAULT_SHOP_MERGE_MAP))
    actual = rows.groupby(["shop_id", "item_id"])["item_cnt_day"].sum().clip(0, 20).rename("actual")
    scored = test.merge(submission, on="ID").join(actual, on=["shop_id", "item_id"])
    values = scored["item_cnt_month"] if predicted is None else predicted.reindex(scored["ID"]).to_numpy()
    return float(np.sqrt(np.mean((values - scored["actual"].fillna(0.0)) ** 2)))


@pytest.fixture(scope="module")
def cycle(tmp_path_factory) -> dict[str, Any]:
    root = write_tiny_data(tmp_path_factory.mktemp("cycle"), seed=5)
    raw = root / "raw"
    drop_rows = split_off_month(raw, DROP_MONTH)
    first = sales_forecast(data_dir=str(root), **CHEAP_RUN)
    before_drop = LakePaths(root).accountability_records.exists()
    drop_rows.to_csv(raw / DROP, index=False)
    second = sales_forecast(data_dir=str(root), **CHEAP_RUN, return_state=True)
    records_path = LakePaths(root).accountability_records
    after_second = (records_path.read_bytes(), records_path.stat().st_mtime_ns)
    index_after_second = champion.read_index(LakePaths(root))
    # A third run on the same lake: a challenger that cannot learn. A near-zero rate is no longer clearly worse (one
    # epoch of the cheap run barely moves the network from its start either); a rate of 1.0 makes Adam collapse the
    # forecast towards zero, about 10 % worse than the champion on the holdout month.
    third = sales_forecast(data_dir=str(root), **{**CHEAP_RUN, "learning_rate": 1.0, "fallback": "model"},
                           return_state=True)
    return {"root": root, "drop_rows": drop_rows, "first": first, "second": second, "third": third.result(),
            "third_state": third, "before_drop": before_drop, "after_second": after_second,
            "index_after_second": index_after_second}


def test_a_forecast_is_scored_once_the_drop_of_its_month_arrives_exactly_as_the_competition_would(cycle):
    root, first = cycle["root"], cycle["first"]
    assert first["forecast_month"] == DROP_MONTH and not cycle["before_drop"], "nothing to score before the drop"
    records = accountability.read_records(LakePaths(root))
    assert len(records) == 1
    record = records.iloc[0]
    submission = pd.read_csv(first["submission"])
    test = pd.read_csv(root / "raw" / "test.csv")
    assert record["forecast_month"] == DROP_MONTH and record["status"] == "scored"
    assert record["exported"] == first["exported"]
    assert record["run_dir"] == LakePaths(root).run_name(first["run_dir"]) == f"runs/{Path(first['run_dir']).name}"
    assert record["n_pairs"] == len(test)
    assert record["rmse_exported"] == pytest.approx(reference_rmse(cycle["drop_rows"], submission, test), abs=1e-6)
    # The previous-period forecast available then: each pair's month-14 sales, from sales_train.csv's rows.
    sales = pd.read_csv(root / "raw" / "sales_train.csv")
    previous = sales[sales["date_block_num"] == DROP_MONTH - 1]
    prev_rows = previous[previous["item_price"] < NestcastConfig().ingest.max_item_price]
    prev_rows = prev_rows.assign(shop_id=prev_rows["shop_id"].replace(DEFAULT_SHOP_MERGE_MAP))
    prev = prev_rows.groupby(["shop_id", "item_id"])["item_cnt_day"].sum().clip(0, 20)
    prev_forecast = test.join(prev.rename("p"), on=["shop_id", "item_id"]).set_index("ID")["p"].fillna(0.0)
    assert record["rmse_previous_period"] == pytest.approx(
        reference_rmse(cycle["drop_rows"], submission, test, prev_forecast), abs=1e-6)
    model = pd.read_parquet(Path(first["run_dir"]) / "forecast.parquet").set_index("ID")["model"].clip(0, 20)
    assert record["rmse_model"] == pytest.approx(
        reference_rmse(cycle["drop_rows"], submission, test, model.astype(np.float64)), abs=1e-5)


def test_a_run_on_the_same_lake_adds_no_record_and_rewrites_nothing(cycle):
    path = LakePaths(cycle["root"]).accountability_records
    assert (path.read_bytes(), path.stat().st_mtime_ns) == cycle["after_second"]
    assert cycle["third"]["accountability_months"] == [DROP_MONTH]


def test_every_run_shows_the_history_as_a_table_a_plot_inline_and_a_report_section(cycle):
    state = cycle["second"]
    artifacts = artifacts_of(state.state_details.flow_run_id)
    rows = table(artifacts["accountability"])
    assert [row["month"] for row in rows] == ["2014-04"]
    record = accountability.read_records(LakePaths(cycle["root"])).iloc[0]
    assert rows[0]["RMSE exported"] == round(record["rmse_exported"], 4)
    history = artifacts["accountability-history"].data
    assert "](data:image/png;base64,iVBORw0KGgo" in history and "file://" not in history
    report = Path(state.result()["report"]).read_text()
    assert report.count(accountability.SECTION_BEGIN) == 1 and "| 2014-04 |" in report
    assert f"| {record['rmse_exported']:.4f} | {record['rmse_previous_period']:.4f} |" in report  # four decimals
    assert f"| {record['n_pairs']:,} |" in report
    assert (Path(state.result()["run_dir"]) / accountability.HISTORY_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_a_forecast_whose_pairs_no_longer_resolve_is_reported_not_skipped(cycle, tmp_path):
    copy = tmp_path / "lake-copy"
    shutil.copytree(cycle["root"], copy, ignore=shutil.ignore_patterns("runs"))
    paths = LakePaths(copy)
    for sidecar in paths.submissions.glob("*.json"):  # the copy's submissions point at the copy
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps(meta | {"run_dir": str(copy / "runs" / "gone")}))
    paths.submission_pairs("2014-04").unlink()
    paths.reference_table("test").unlink()
    summary = accountability.update_accountability(NestcastConfig(data_dir=copy))
    assert summary.unresolved == [DROP_MONTH] and summary.months == [DROP_MONTH]
    record = accountability.read_records(paths).iloc[0]
    assert record["status"] == "unresolved" and "test.csv" in record["note"] and np.isnan(record["rmse_exported"])


def test_the_champion_is_kept_and_its_forecast_exported_when_the_challenger_is_worse(cycle):
    third, index = cycle["third"], cycle["index_after_second"]
    paths = LakePaths(cycle["root"])
    runs = {paths.run_name(run["run_dir"]) for run in (cycle["first"], cycle["second"].result())}
    assert index["champion"]["run_dir"] in runs and index["champion"]["run_dir"].startswith("runs/")
    assert paths.run_name(third["run_dir"]) != index["champion"]["run_dir"], "a different learning rate trains anew"
    assert third["exported"] == "champion"
    assert champion.read_index(LakePaths(cycle["root"]))["champion"] == index["champion"], "the champion stays"
    sidecar = json.loads(Path(third["submission"]).with_suffix(".json").read_text())
    assert sidecar["exported"] == "champion" and "worse than the champion" in sidecar["reason"]
    forecast = pd.read_parquet(Path(third["run_dir"]) / "forecast.parquet")
    submission = pd.read_csv(third["submission"])
    expected = forecast.set_index("ID")["champion"].clip(0, 20).reindex(submission["ID"]).to_numpy()
    assert np.allclose(submission["item_cnt_month"], expected, atol=1e-6)
    assert not np.allclose(submission["item_cnt_month"], forecast.set_index("ID")["model"].reindex(submission["ID"]))
    assert "## Champion and challenger" in Path(third["report"]).read_text()
    artifacts = artifacts_of(cycle["third_state"].state_details.flow_run_id)
    assert "worse than the champion" in artifacts["champion"].data


def test_the_history_table_shows_status_and_note_only_when_a_month_needs_them():
    scored = {"month_label": "2014-04", "exported": "model", "status": "scored", "rmse_exported": 1.23456,
              "rmse_previous_period": 2.0, "rmse_model": 1.3, "n_pairs": 1234, "note": ""}
    unresolved = {**scored, "month_label": "2014-05", "status": "unresolved", "rmse_exported": np.nan,
                  "rmse_model": np.nan, "note": "no pairs file"}
    narrow = accountability.history_markdown(pd.DataFrame([scored]), "plot.png")
    assert "| month | exported | RMSE exported |" in narrow and "note" not in narrow and "status" not in narrow
    assert "| 2014-04 | model | 1.2346 | 2.0000 | 1.3000 | 0.6173 | 1,234 |" in narrow
    wide = accountability.history_markdown(pd.DataFrame([scored, unresolved]), "plot.png")
    assert "| month | exported | status | RMSE exported |" in wide and wide.rstrip().count("| note |") == 1
    assert "| 2014-05 | model | unresolved |  | 2.0000 |  |  | 1,234 | no pairs file |" in wide


# --- a submission edited by hand (issue 29) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def lake_with_a_submission(tmp_path_factory) -> Path:
    """The actuals of DROP_MONTH in the lake (ingest and aggregation, no training) and a submission for that month
    as export writes it: the CSV (every test pair at 1.0), its sidecar and its pairs file."""
    from core.backtest import prepare_lake
    from core.export import export_submission
    from core.lake import forecast_month_label

    root = write_tiny_data(tmp_path_factory.mktemp("hand-edited"), seed=5)
    prepare_lake(NestcastConfig(data_dir=root))
    paths = LakePaths(root)
    test = pd.read_parquet(paths.reference_table("test"))
    label = forecast_month_label(DROP_MONTH)
    export_submission(pd.DataFrame({"ID": test["ID"], "item_cnt_month": 1.0}), test, paths.submissions, label,
                      {"forecast_month": DROP_MONTH, "exported": "model", "run_dir": str(root / "runs" / "gone")})
    test[["ID", "shop_id", "item_id"]].to_parquet(paths.submission_pairs(label), index=False)
    return root


BAD_VALUES = {"not a number": ("abc", "'abc' is not a number"), "empty": ("", "is empty"),
              "out of range": ("25", "25.0 is outside [0, 20]"), "infinite": ("inf", "'inf' is not a number")}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_bad_value_in_a_hand_edited_submission_leaves_its_month_unresolved_with_a_warning_and_the_run_goes_on(
    lake_with_a_submission, tmp_path, case
):
    from tasks.accountability import score_forecasts

    root = tmp_path / "lake"
    shutil.copytree(lake_with_a_submission, root)
    submission = LakePaths(root).submission("2014-04")
    lines = submission.read_text().splitlines()
    row_id = lines[2].split(",")[0]
    lines[2] = f"{row_id},{BAD_VALUES[case][0]}"  # line 3
    submission.write_text("\n".join(lines) + "\n")

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("prefect.task_runs").addHandler(handler)
    try:
        summary = score_forecasts(NestcastConfig(data_dir=root), monthly=None)  # a real task run: it completes
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(handler)
    assert summary.unresolved == [DROP_MONTH]
    record = accountability.read_records(LakePaths(root)).iloc[0]
    assert record["status"] == "unresolved" and np.isnan(record["rmse_exported"])
    expected = f"submissions/2014-04.csv line 3: item_cnt_month {BAD_VALUES[case][1]}"
    assert record["note"].startswith(expected), record["note"]
    assert any(expected in warning and "2014-04" in warning for warning in warnings), warnings

    lines[2] = f"{row_id},1.0"  # fixed by hand: the next run scores the month
    submission.write_text("\n".join(lines) + "\n")
    assert accountability.update_accountability(NestcastConfig(data_dir=root)).unresolved == []
    assert accountability.read_records(LakePaths(root)).iloc[0]["status"] == "scored"
