"""Bad input to `nestcast` is one line, `error: ...`, exit code 2, before any flow starts: `--set` next to an
option, `--set` values, `NESTCAST_*` variables (bad values and typos), and paths that are files."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import deployments.cli
from core.config import NestcastConfig
from deployments.cli import app
from flows.sales_forecast import build_config  # imported before flow_calls stands in for the module

runner = CliRunner()
NESTCAST = Path(sys.executable).parent / "nestcast"


class StandInFlow:
    """A flow's stand-in: records the parameters the CLI calls it with, and takes the options the CLI adds."""

    on_running_hooks: list[Any] = []

    def __init__(self, result: Any) -> None:
        self.result = result

    def with_options(self, **_: Any) -> StandInFlow:
        return self

    def __call__(self, **parameters: Any) -> Any:
        return self.result(**parameters)


@pytest.fixture
def flow_calls(monkeypatch) -> list[dict[str, Any]]:
    """Stand-ins for the flows (and the temporary server): record what the CLI would start them with."""
    calls: list[dict[str, Any]] = []

    def fake_flow(**parameters: Any) -> dict[str, Any]:
        calls.append(parameters)
        return {
            "submission": "s.csv", "exported": "model", "report": "r.md", "run_dir": "runs/x",
            "holdout_rmse": {"model": 1.0, "baseline": 2.0}, "baseline_rmse": 2.0,
            "holdout_month": 33, "validation_months": [31, 32], "exported_rmse": 1.0,
        }

    module = types.ModuleType("flows.sales_forecast")
    module.sales_forecast = StandInFlow(fake_flow)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flows.sales_forecast", module)
    monkeypatch.setattr(deployments.cli, "prefect_api", contextlib.nullcontext)
    return calls


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "raw").mkdir()
    return tmp_path


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def flow_config(call: dict[str, Any]) -> NestcastConfig:
    """What the flow makes of the parameters the CLI started it with (it raised TypeError before)."""
    return build_config(**call)


# --- --set next to an option ------------------------------------------------------------------------
def test_set_of_a_field_with_its_own_option_is_applied_on_top_of_the_default(data_dir, flow_calls):
    result = runner.invoke(app, ["run", "--data-dir", str(data_dir), "--set", "epochs=2", "--set", "kind=gru"])
    assert result.exit_code == 0, result.output
    (call,) = flow_calls
    assert call["epochs"] == 2 and call["kind"] == "gru"
    assert "epochs" not in call["overrides"] and "kind" not in call["overrides"]
    config = flow_config(call)  # before: TypeError "got multiple values for keyword argument 'epochs'"
    assert (config.train.epochs, config.model.kind) == (2, "gru")


def test_set_and_an_explicit_option_agreeing_is_fine_disagreeing_names_both(data_dir, flow_calls):
    same = runner.invoke(app, ["run", "--data-dir", str(data_dir), "--learning-rate", "0.001",
                               "--set", "learning_rate=1e-3"])
    assert same.exit_code == 0, same.output
    assert flow_config(flow_calls[0]).train.learning_rate == 0.001
    clash = runner.invoke(app, ["run", "--data-dir", str(data_dir), "--epochs", "3", "--set", "epochs=2"])
    assert one_error_line(clash) == "error: --epochs 3 and --set epochs=2 disagree; give only one"
    assert len(flow_calls) == 1


def test_set_to_null_reaches_the_config_as_none_rather_than_the_default(data_dir, flow_calls):
    result = runner.invoke(app, ["run", "--data-dir", str(data_dir), "--set", "sample_budget=null"])
    assert result.exit_code == 0, result.output
    (call,) = flow_calls
    assert call["overrides"] == {"sample_budget": None}
    assert NestcastConfig().train.sample_budget is not None  # so None below is the --set, not the default
    assert flow_config(call).train.sample_budget is None  # before: None was dropped, the default budget ran


def test_set_of_data_dir_and_submission_path_reach_the_flow_parameters(tmp_path, data_dir, flow_calls):
    target = tmp_path / "out" / "sub.csv"
    result = runner.invoke(app, ["run", "--set", f"data_dir={data_dir}", "--set", f"submission_path={target}"])
    assert result.exit_code == 0, result.output
    (call,) = flow_calls
    assert call["data_dir"] == str(data_dir) and call["submission_path"] == str(target)
    assert call["overrides"] == {}


# --- --set values are validated with everything else, before the flow ---------------------------------
@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("epochs=0", "error: train.epochs: Input should be greater than or equal to 1 (got 0)"),
        ("epochs=abc", "error: train.epochs: Input should be a valid integer, unable to parse string as an integer "
                       "(got 'abc')"),
        ("kind=transformer", "error: model.kind: Input should be 'nlstm', 'lstm', 'gru' or 'rnn' (got 'transformer')"),
        ("max_item_price=-5", "error: ingest.max_item_price: Input should be greater than 0 (got -5)"),
        ("target_clip_max=-1", "error: config: Value error, windows.target_clip_max must be greater than "
                               "target_clip_min"),
    ],
)
def test_bad_set_values_are_one_line_naming_the_field_before_the_flow(data_dir, flow_calls, pair, expected):
    result = runner.invoke(app, ["run", "--data-dir", str(data_dir), "--set", pair])
    assert one_error_line(result) == expected
    assert flow_calls == []


def test_backtest_and_search_take_set_of_an_option_field_too(data_dir, monkeypatch):
    calls: list[dict[str, Any]] = []
    report = data_dir / "report.md"
    report.write_text("report")
    for name in ("backtest", "search"):
        module = types.ModuleType(f"flows.{name}")
        setattr(module, name, StandInFlow(lambda **kw: calls.append(kw) or {"report": str(report)}))
        monkeypatch.setitem(sys.modules, f"flows.{name}", module)
    monkeypatch.setattr(deployments.cli, "prefect_api", contextlib.nullcontext)
    assert runner.invoke(app, ["backtest", "--data-dir", str(data_dir), "--set", "epochs=2"]).exit_code == 0
    assert calls[-1]["epochs"] == 2 and calls[-1]["overrides"] == {}
    result = runner.invoke(app, ["search", "--set", f"data_dir={data_dir}", "--set", "units=8"])
    assert result.exit_code == 0, result.output
    assert calls[-1]["data_dir"] == str(data_dir) and calls[-1]["overrides"] == {"units": 8}


# --- paths that are files -----------------------------------------------------------------------------
def test_a_data_dir_under_a_file_is_one_line_naming_the_file(tmp_path, flow_calls):
    (tmp_path / "somefile").write_text("x")
    result = runner.invoke(app, ["run", "--data-dir", str(tmp_path / "somefile" / "data")])
    assert one_error_line(result) == (
        f"error: data directory {tmp_path / 'somefile' / 'data'} cannot be created: "
        f"{tmp_path / 'somefile'} is a file, not a directory"
    )
    demo = runner.invoke(app, ["demo-data", str(tmp_path / "somefile" / "data"), "--scale", "tiny"])
    assert "somefile is a file, not a directory" in one_error_line(demo)  # before: NotADirectoryError traceback
    assert flow_calls == []


@pytest.mark.parametrize("name", ["lake", "runs", "submissions", "lake/monthly"])
def test_lake_runs_submissions_existing_as_files_are_one_line(data_dir, flow_calls, name):
    (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / name).write_text("not a directory")
    result = runner.invoke(app, ["run", "--data-dir", str(data_dir)])
    line = one_error_line(result)
    assert line.endswith(f"{data_dir / name} is a file, not a directory"), line
    assert flow_calls == []


def test_raw_as_a_file_and_a_submission_under_a_file_are_one_line(tmp_path, data_dir, flow_calls):
    other = tmp_path / "other"
    other.mkdir()
    (other / "raw").write_text("x")
    assert "raw is a file, not a directory" in one_error_line(runner.invoke(app, ["run", "--data-dir", str(other)]))
    (tmp_path / "somefile").write_text("x")
    result = runner.invoke(app, ["run", "--data-dir", str(data_dir), "--submission", str(tmp_path / "somefile/s.csv")])
    assert one_error_line(result).endswith(f"{tmp_path / 'somefile'} is a file, not a directory")
    assert flow_calls == []


# --- NESTCAST_* environment variables (read at import: a fresh process each) ----------------------------
def nestcast(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("NESTCAST_")}
    return subprocess.run([str(NESTCAST), *args], capture_output=True, text=True, timeout=120, env={**environ, **env})


def test_a_bad_environment_value_names_the_variable_even_for_help():
    result = nestcast("--help", NESTCAST_TRAIN__EPOCHS="abc")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: environment variable NESTCAST_TRAIN__EPOCHS='abc': Input should be a valid integer, "
        "unable to parse string as an integer"
    ]
    assert result.stdout == ""


def test_environment_typos_warn_or_fail_with_the_intended_name(tmp_path):
    # a typo in a known section is rejected by the section's extra="forbid": an error, with the right name
    inside = nestcast("--help", NESTCAST_TRAIN__EPOCH="5")
    assert inside.returncode == 2
    assert inside.stderr.strip().splitlines() == [
        "error: environment variable NESTCAST_TRAIN__EPOCH='5': no config field train.epoch; "
        "did you mean NESTCAST_TRAIN__EPOCHS?"
    ]
    # elsewhere pydantic-settings ignores it silently: a warning line, and the command goes on
    outside = nestcast("run", "--data-dir", str(tmp_path / "nowhere"), NESTCAST_TRAINN__EPOCHS="5")
    lines = outside.stderr.strip().splitlines()
    assert outside.returncode == 2 and len(lines) == 2, outside.stderr
    assert lines[0] == (
        "warning: unknown environment variable NESTCAST_TRAINN__EPOCHS is ignored; did you mean NESTCAST_TRAIN__EPOCHS?"
    )
    assert lines[1].startswith("error: ") and "does not exist" in lines[1]
