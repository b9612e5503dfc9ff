"""``nestcast replay`` on tiny data under a real Prefect backend: three months replayed, one forecast flow run each
under one parent flow run, and one accountability record per month, each equal to a computation from raw rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

from core import accountability
from core.config import DEFAULT_SHOP_MERGE_MAP, NestcastConfig
from core.lake import LakePaths, forecast_month_label
from flows.replay import replay
from tests.conftest import write_tiny_data
from tests.test_accountability import CHEAP_RUN

pytestmark = [pytest.mark.usefixtures("harness"), pytest.mark.slow]
MONTHS = [13, 14, 15]


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    history = write_tiny_data(tmp_path_factory.mktemp("history"), seed=5)
    state = replay(data_dir=str(history), from_month=MONTHS[0], to_month=MONTHS[-1], **CHEAP_RUN, return_state=True)
    return history, state


def test_a_replay_over_three_months_leaves_one_scored_record_per_month(replayed):
    history, state = replayed
    assert state.is_completed(), state.message
    result = state.result()
    workspace = LakePaths(result["workspace"])
    records = accountability.read_records(workspace)
    assert records["forecast_month"].tolist() == MONTHS and (records["status"] == "scored").all()
    sales = pd.read_csv(history / "raw" / "sales_train.csv")
    sales = sales[sales["item_price"] < NestcastConfig().ingest.max_item_price]
    sales = sales.assign(shop_id=sales["shop_id"].replace(DEFAULT_SHOP_MERGE_MAP))
    for record in records.itertuples():  # three months: the check, not the computation, loops
        label = forecast_month_label(record.forecast_month)
        pairs = pd.read_parquet(workspace.submission_pairs(label))
        submission = pd.read_csv(workspace.submission(label))
        month = sales[sales["date_block_num"] == record.forecast_month]
        actual = month.groupby(["shop_id", "item_id"])["item_cnt_day"].sum().clip(0, 20).rename("actual")
        scored = pairs.merge(submission, on="ID").join(actual, on=["shop_id", "item_id"])
        expected = np.sqrt(np.mean((scored["item_cnt_month"] - scored["actual"].fillna(0.0)) ** 2))
        assert record.rmse_exported == pytest.approx(expected, abs=1e-6) and record.n_pairs == len(pairs)
    assert [row["month"] for row in result["rows"]] == [forecast_month_label(m) for m in MONTHS]


def test_each_replayed_month_is_its_own_forecast_flow_run_under_the_replay_run(replayed):
    _, state = replayed
    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        parent_task_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
    names = sorted(run.name for run in parent_task_runs)
    assert [name for name in names if name.startswith("forecast-")] == [
        f"forecast-{forecast_month_label(m)}-nlstm-epochs=1-batch_size=512-lookback=3-units=4-depth=1" for m in MONTHS]
    assert "replay-accountability" in names
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(parent).name == f"replay-{forecast_month_label(MONTHS[0])}-to-" \
            f"{forecast_month_label(MONTHS[-1])}"
