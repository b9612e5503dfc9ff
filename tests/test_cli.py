"""The `nestcast` command: help, demo data, and one-line errors on bad input (before any flow starts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from deployments.cli import app

runner = CliRunner()
NESTCAST = Path(sys.executable).parent / "nestcast"


def test_help_lists_every_command_and_explains_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo-data", "run", "serve"):
        assert command in result.output
    run_help = runner.invoke(app, ["run", "--help"]).output
    assert "--epochs" in run_help and "--submission" in run_help and "Training epochs" in run_help


@pytest.mark.parametrize("command", ["run", "backtest"])
def test_help_lists_the_choices_of_every_enumerated_option(command):
    """--kind, --device, --sample-policy, --fallback, --task-runner show their values (from the config's Literals)."""
    help_text = runner.invoke(app, [command, "--help"], terminal_width=200).output
    expected = {
        "--kind": "nlstm|lstm|gru|rnn", "--device": "auto|cpu|gpu", "--sample-policy": "grid|active|all",
        "--fallback": "baseline|model", "--task-runner": "thread|dask",
    }
    if command == "backtest":
        expected = {k: v for k, v in expected.items() if k != "--fallback"}  # origins run on threads or Dask
    for option, choices in expected.items():
        (line,) = [line for line in help_text.splitlines() if f" {option} " in line]
        assert choices in line, line


def test_demo_data_writes_the_five_competition_files(tmp_path):
    result = runner.invoke(app, ["demo-data", str(tmp_path), "--scale", "tiny", "--seed", "2"])
    assert result.exit_code == 0, result.output
    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "item_categories.csv", "items.csv", "sales_train.csv", "shops.csv", "test.csv",
    ]
    assert list(pd.read_csv(raw / "test.csv", nrows=1).columns) == ["ID", "shop_id", "item_id"]


def test_run_without_raw_data_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [str(NESTCAST), "run", "--data-dir", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0] and "nestcast demo-data" in lines[0]


def test_run_rejects_bad_options_before_running(tmp_path):
    (tmp_path / "raw").mkdir()
    bad_kind = runner.invoke(app, ["run", "--data-dir", str(tmp_path), "--kind", "transformer"])
    message = " ".join(bad_kind.output.replace("│", " ").split())  # typer's error box wraps at 80 columns
    assert bad_kind.exit_code == 2 and "'transformer' is not one of 'nlstm', 'lstm', 'gru', 'rnn'" in message
    bad_set = runner.invoke(app, ["run", "--data-dir", str(tmp_path), "--set", "no_such_field=1"])
    assert bad_set.exit_code == 2 and "unknown field 'no_such_field'" in bad_set.output
    zero_epochs = runner.invoke(app, ["run", "--data-dir", str(tmp_path), "--epochs", "0"])
    assert zero_epochs.exit_code == 2


def test_replay_checks_its_months_against_the_history_before_any_flow_starts(tmp_path):
    from core.synthetic import write_competition_files

    write_competition_files(tmp_path / "raw", scale="tiny", seed=0)  # months 0..15
    result = runner.invoke(app, ["replay", "--data-dir", str(tmp_path), "--from-month", "12", "--to-month", "16"])
    assert result.exit_code == 2 and "to_month=16" in result.output and "<= 15" in result.output
    assert not (tmp_path / "replay-12-16").exists()
    help_text = runner.invoke(app, ["replay", "--help"]).output
    assert "--from-month" in help_text and "--to-month" in help_text and "--epochs" in help_text


def test_the_flow_run_a_command_starts_carries_the_cli_tags_and_its_task_runs_none(harness):
    """A task tag costs a concurrency-slot request to the server before every task run; the CLI's tags are for
    finding its runs in the UI, so they go on the flow run alone."""
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from deployments.cli import CLI_TAGS, cli_tagged

    @task
    def step() -> int:
        return 1

    @flow
    def tiny() -> int:
        return step()

    state = cli_tagged(tiny)(return_state=True)
    assert state.is_completed() and state.result() == 1
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(flow_run_id).tags
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert set(CLI_TAGS) <= set(tags)
    assert task_runs and all(not run.tags for run in task_runs), [run.tags for run in task_runs]
