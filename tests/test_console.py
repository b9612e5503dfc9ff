"""What a user sees in the terminal: a quiet `nestcast run`, readable numbers, a verbose switch."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.display import change, forecast_summary_lines, four, month_range, ratio, versus
from core.errors import DataValidationError
from deployments.console import LOGGING_CONFIG, ConsoleNoise, UiLogNoise, wants_verbose

REPO = Path(__file__).resolve().parents[1]
TINY_OPTIONS = ["--epochs", "1", "--units", "4", "--lookback", "4", "--batch-size", "256", "--set", "depth=1",
                "--set", "head_units=4", "--set", "sample_budget=2000", "--set", "jit_compile=off",
                "--set", "max_rounds=20", "--set", "retry_delay_seconds=0"]


def nestcast(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command in a fresh process (TensorFlow's C++ logging is decided at its import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NESTCAST_", "TF_CPP", "PREFECT_LOGGING"))}
    env.pop("PREFECT_API_URL", None)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_tiny_cli_run_prints_no_native_logs_one_aggregation_line_and_the_verdict_first(tmp_path, tiny_data):
    tiny_data(tmp_path / "D", seed=1)
    result = nestcast("run", "--data-dir", "D", *TINY_OPTIONS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    for noise in ("cuda", "absl", "I0000", "E0000", "XLA", "cpu_feature_guard", "great_expectations"):
        assert not [line for line in lines if noise in line], noise
    assert not [line for line in lines if "aggregate-month-" in line], "one line per month is back"
    assert len([line for line in lines if "aggregated 2013-01 – " in line]) == 1
    assert not [line for line in lines if "{'" in line and "data_dir" in line], "a raw dict was printed"
    assert len([line for line in lines if "training on CPU, no GPU found" in line]) == 3  # select, 2 refits
    summary = result.stdout.strip().splitlines()
    assert summary[0].startswith("Exported ") and " than the previous month (" in summary[0]
    assert any(line.startswith("lake:       2013-01 – ") for line in summary)
    month = summary[0].split(" for ")[1][:7]
    renamed = f"Flow run 'forecast-{month}-nlstm-epochs=1-batch_size=256-lookback=4-units=4-depth=1'"
    assert f"{renamed} - Finished in state Completed('{summary[0]}')" in result.stderr, "run not renamed to the end"
    data_dir = str((tmp_path / "D").resolve())
    assert f"data directory: {data_dir}" in result.stderr and f"submission: {data_dir}/submissions/" in result.stdout
    # 45 before the champion gate and the history step, which add one "Finished" line each
    assert len(lines) <= 47, "\n".join(lines)


def test_the_console_filter_drops_fan_out_completions_and_hook_lines_but_never_failures():
    def record(message: str, task: str | None, level: int = logging.INFO) -> logging.LogRecord:
        made = logging.LogRecord("prefect.task_runs", level, __file__, 1, message, None, None)
        if task is not None:
            made.task_name = task
        return made

    noise = ConsoleNoise()
    assert not noise.filter(record("Finished in state Completed()", "aggregate-month"))
    assert not noise.filter(record("Finished in state Cached(type=COMPLETED)", "aggregate-month"))  # a rerun
    assert noise.filter(record("Finished in state Failed('boom')", "aggregate-month", logging.ERROR))
    assert noise.filter(record("Finished in state Completed()", "select"))
    assert not noise.filter(record("Running hook 'publish_artifacts' in response to entering state 'Cached'", "x"))
    assert not noise.filter(record("Hook 'publish_artifacts' finished running successfully", "x"))
    assert noise.filter(record("An error was encountered while running hook 'x'", "x", logging.ERROR))
    assert wants_verbose(["run", "--verbose"]) and not wants_verbose(["run", "--data-dir", "verbose"])


def test_numbers_read_as_four_decimals_calendar_months_and_better_or_worse():
    assert four(3.469188236036312) == "3.4692" and four(None) == "—"
    assert month_range(range(16)) == "2013-01 – 2014-04 (16 months)"
    assert month_range([0, 1, 5]) == "2013-01 – 2013-06 (3 months, 3 missing)"
    assert month_range([34], "2013-01") == "2015-11 (1 month)"
    assert versus(3.0205, 3.4147) == "11.5 % better than the previous month"
    assert versus(3.4692, 3.4147) == "1.6 % worse than the previous month"
    assert (change(3.0205, 3.4147), change(3.4692, 3.4147), change(1.0, 1.0002)) == ("11.5 % better", "1.6 % worse",
                                                                                     "the same")
    assert ratio(3.0205, 3.4147) == pytest.approx(0.8846)


def test_the_summary_puts_the_verdict_first_and_the_flow_run_url_last():
    holdout = {"model": 1.4127, "reference": 1.3999, "ensemble": 1.41262, "baseline": 1.85791, "mean3": 1.7}
    summary = {"exported": "ensemble", "exported_rmse": 1.41262, "baseline_rmse": 1.85791, "holdout_rmse": holdout,
               "beaten_by": {"reference": 1.3999}, "holdout_month": 33, "validation_months": [31, 32],
               "forecast_month": 34, "epochs": 2, "months": list(range(34)), "train_samples": 12000,
               "submission": "/d/s.csv", "report": "/d/r.md", "run_dir": "/d/run",
               "flow_run_url": "http://127.0.0.1:4200/runs/flow-run/x"}
    lines = forecast_summary_lines(summary)
    assert lines[0] == ("Exported ensemble for 2015-11: holdout 2015-10 RMSE 1.4126, 24.0 % better than the previous "
                        "month (1.8579). Better on that month: LightGBM 1.3999 (0.9 % better).")
    assert ("holdout 2015-10 RMSE: model 1.4127, LightGBM 1.3999, ensemble 1.4126, previous month 1.8579, "
            "mean of last 3 1.7000") in lines
    assert "chosen on:  validation months 2015-08, 2015-09, 2 epoch(s)" in lines
    assert lines[-1] == "flow run:   http://127.0.0.1:4200/runs/flow-run/x"
    assert not forecast_summary_lines({**summary, "flow_run_url": None})[-1].startswith("flow run")
    assert "lake:       2013-01 – 2015-10 (34 months), 12,000 training samples" in lines
    drawn = forecast_summary_lines({**summary, "train_samples": 10_333_657, "sample_budget": 1_000_000})
    assert ("lake:       2013-01 – 2015-10 (34 months), 10,333,657 training samples (1,000,000 drawn afresh each "
            "epoch, weighted)") in drawn


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_engine_s_final_line_carries_the_name_the_flow_run_was_renamed_to(harness):
    from prefect import flow

    from tasks.common import name_flow_run

    @flow(name="renamed-run", flow_run_name="before-rename")
    def renamed_run() -> None:
        name_flow_run("after-rename")

    recorded, logger = Recorded(), logging.getLogger("prefect.flow_runs")
    level = logger.level
    logger.addHandler(recorded)
    logger.setLevel(logging.INFO)  # the suite runs Prefect at WARNING
    try:
        renamed_run()
    finally:
        logger.removeHandler(recorded)
        logger.setLevel(level)
    names = {record.getMessage().split(" ")[0]: record.flow_run_name for record in recorded.records}
    assert names["Finished"] == "after-rename", names


def test_an_error_nestcast_raised_on_purpose_reaches_the_console_without_the_engines_traceback():
    def record(error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            message = "Encountered exception during execution: %r"
            return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, message, (error,), sys.exc_info())

    noise = ConsoleNoise()
    assert not noise.filter(record(DataValidationError("test.csv: ... on line 10")))
    assert noise.filter(record(RuntimeError("a bug")))  # an unexpected error keeps its traceback


def test_a_data_error_after_the_flow_started_ends_in_one_error_line_and_no_traceback(tmp_path, tiny_data):
    root = tiny_data(tmp_path / "D", seed=1)
    test_csv = root / "raw" / "test.csv"
    lines = test_csv.read_text().splitlines()
    row = lines[9].split(",")
    lines[9] = ",".join([row[0], "abc", *row[2:]])  # line 10: a shop_id that is not an integer
    test_csv.write_text("\n".join(lines) + "\n")
    result = nestcast("run", "--data-dir", "D", *TINY_OPTIONS, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Finished in state Failed" in result.stderr  # the engine's own line still says what failed
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: test.csv: ") and "line 10" in last, last


def test_the_final_error_line_spells_out_the_control_characters_a_file_s_bytes_hold(tmp_path, tiny_data):
    root = tiny_data(tmp_path / "D", seed=1)
    items = root / "raw" / "items.csv"
    lines = items.read_bytes().split(b"\n")
    lines[5] = b"\x1b[2J\x07caf\xe9 " + lines[5]  # clear the screen, ring the bell, then a byte that is not UTF-8
    items.write_bytes(b"\n".join(lines))
    result = nestcast("run", "--data-dir", "D", *TINY_OPTIONS, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: items.csv: ") and "line 6" in last, last
    assert "\\x1b[2J\\x07caf\\xe9" in last, last  # spelt out, as Prefect's own lines spell them
    assert "\x07" not in result.stderr + result.stdout and "\x1b[2J" not in result.stderr + result.stdout


def _error_record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        message = "Encountered exception during execution: %r"
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, message, (error,), sys.exc_info())


def test_the_ui_log_keeps_an_expected_error_as_one_line_and_an_unexpected_one_with_its_traceback():
    expected, unexpected = _error_record(DataValidationError("test.csv: line 10")), _error_record(KeyError("x"))
    ui, console = UiLogNoise(), ConsoleNoise()
    assert ui.filter(expected) and ui.filter(unexpected)
    one_line = logging.Formatter().format(expected)
    assert one_line == "Encountered exception during execution: DataValidationError('test.csv: line 10')", one_line
    assert "Traceback" in logging.Formatter().format(unexpected)
    assert not console.filter(expected), "the console (next handler) still knows it was expected"
    hook = logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1, "Running hook 'publish_artifacts' in "
                             "response to entering state 'Completed'", None, None)
    assert not ui.filter(hook)
    engine = _error_record(DataValidationError("test.csv: line 10"))
    engine.msg, engine.args = "Engine execution exited with unexpected exception", None
    assert not ui.filter(engine), "a served run's engine calls every error unexpected"


def test_the_logging_config_is_prefect_s_own_with_nestcast_s_filters_on_its_console_and_api_handlers():
    import prefect
    import yaml

    ours = yaml.safe_load(LOGGING_CONFIG.read_text())
    prefects = yaml.safe_load((Path(prefect.__file__).parent / "logging" / "logging.yml").read_text())
    assert ours.pop("filters") == {"console_noise": {"()": "deployments.console.console_noise"},
                                   "ui_log_noise": {"()": "deployments.console.UiLogNoise"}}
    assert ours["handlers"]["console"].pop("filters") == ["console_noise"]
    assert ours["handlers"]["api"].pop("filters") == ["ui_log_noise"]
    assert ours == prefects, "Prefect's logging.yml changed: take the new one and add the filters again"
    from prefect.logging.configuration import load_logging_config

    assert load_logging_config(LOGGING_CONFIG)["handlers"]["api"]["filters"] == ["ui_log_noise"], "Prefect reads it"


def test_tensorflow_s_warning_about_one_trace_per_new_model_goes_and_other_retracing_warnings_stay():
    from core.model import FreshModelTracing

    def warning(function: str) -> logging.LogRecord:
        message = f"5 out of the last 5 calls to <function {function} at 0x7f> triggered tf.function retracing."
        return logging.LogRecord("tensorflow", logging.WARNING, __file__, 1, message, None, None)

    fresh = FreshModelTracing()
    assert not fresh.filter(warning("TensorFlowTrainer.make_predict_function.<locals>.one_step_on_data_distributed"))
    assert fresh.filter(warning("TensorFlowTrainer.make_train_function.<locals>.one_step_on_data"))
    assert any(isinstance(f, FreshModelTracing) for f in logging.getLogger("tensorflow").filters), "not installed"
