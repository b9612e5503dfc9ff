"""Step 6: the chosen forecast, the submission checks (nothing left on disk on failure) and the written format."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import ExportCheckError
from core.export import (
    check_submission,
    chosen_forecast,
    export_submission,
    forecast_month_label,
)

# The head of Kaggle's sample_submission.csv for "Predict Future Sales".
KAGGLE_SAMPLE = "ID,item_cnt_month\n0,0.5\n1,0.5\n2,0.5\n3,0.5\n4,0.5\n5,0.5\n"


@pytest.fixture
def test_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ID": np.arange(6, dtype=np.int32),
            "shop_id": np.array([5, 5, 5, 4, 4, 4], dtype=np.int16),
            "item_id": np.array([5037, 5320, 5233, 5232, 5268, 5039], dtype=np.int32),
        }
    )


def good_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {"ID": np.arange(6, dtype=np.int64), "item_cnt_month": np.array([0.0, 0.5, 1.25, 20.0, 3.0, 0.1])}
    )


def _with(column: str, index: int, value: object) -> pd.DataFrame:
    frame = good_frame()
    frame.loc[index, column] = value
    return frame


BAD_FRAMES = {
    "missing ID": (good_frame().iloc[1:], "1 test ID(s) missing: 0"),
    "duplicate ID": (_with("ID", 5, 4), "1 duplicate ID(s): 4"),
    "extra ID": (pd.concat([good_frame(), pd.DataFrame({"ID": [99], "item_cnt_month": [1.0]})]), "not in test.csv: 99"),
    "NaN": (_with("item_cnt_month", 2, np.nan), "1 NaN value(s), at ID 2"),
    "inf": (_with("item_cnt_month", 3, np.inf), "1 infinite value(s), at ID 3"),
    "above range": (_with("item_cnt_month", 1, 20.5), "outside [0, 20]"),
    "below range": (_with("item_cnt_month", 1, -0.1), "outside [0, 20]"),
    "wrong column name": (good_frame().rename(columns={"item_cnt_month": "prediction"}), "missing ['item_cnt_month']"),
    "extra column": (good_frame().assign(shop_id=5), "unexpected ['shop_id']"),
    "column order": (good_frame()[["item_cnt_month", "ID"]], "wrong order"),
    "float IDs": (good_frame().astype({"ID": np.float64}), "ID must have an integer dtype"),
    "string values": (good_frame().astype({"item_cnt_month": str}), "item_cnt_month must have a numeric dtype"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_check_submission_rejects_each_bad_frame(case: str, test_frame: pd.DataFrame) -> None:
    frame, message = BAD_FRAMES[case]
    with pytest.raises(ExportCheckError, match=None) as info:
        check_submission(frame, test_frame)
    assert message in str(info.value)


def test_check_submission_accepts_a_good_frame_and_reports_every_problem(test_frame: pd.DataFrame) -> None:
    check_submission(good_frame(), test_frame)
    check_submission(good_frame().astype({"ID": np.int32, "item_cnt_month": np.float32}), test_frame)
    frame = good_frame()
    frame.loc[0, "ID"] = 42
    frame.loc[4, "item_cnt_month"] = np.nan
    with pytest.raises(ExportCheckError) as info:
        check_submission(frame, test_frame)
    text = str(info.value)
    assert "missing: 0" in text and "not in test.csv: 42" in text and "NaN value(s), at ID 4" in text


# Bad forecasts as export_submission receives them (ID + values, any order); each must leave nothing on disk.
BAD_FORECASTS = {
    "missing ID": good_frame().iloc[:-1],
    "duplicate ID": _with("ID", 0, 1),
    "extra ID": pd.concat([good_frame(), pd.DataFrame({"ID": [6], "item_cnt_month": [1.0]})]),
    "NaN": _with("item_cnt_month", 0, np.nan),
    "inf": _with("item_cnt_month", 0, -np.inf),
    "out of range": _with("item_cnt_month", 5, 21.0),
    "wrong columns": good_frame().assign(extra=1.0),
    "no ID column": good_frame().rename(columns={"ID": "id"}),
}


@pytest.mark.parametrize("case", list(BAD_FORECASTS))
def test_failed_export_leaves_nothing_behind(case: str, test_frame: pd.DataFrame, tmp_path: Path) -> None:
    out_dir = tmp_path / "submissions"
    copy = tmp_path / "copy.csv"
    with pytest.raises(ExportCheckError):
        export_submission(BAD_FORECASTS[case], test_frame, out_dir, "2015-11", {"run_id": "r"}, copy_to=copy)
    leftovers = [p for p in tmp_path.rglob("*")]
    assert leftovers == [] or leftovers == [out_dir] and not any(out_dir.iterdir())


def test_failed_export_keeps_the_previous_submission(test_frame: pd.DataFrame, tmp_path: Path) -> None:
    result = export_submission(good_frame(), test_frame, tmp_path, "2015-11", {"run_id": "first"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ExportCheckError):
        export_submission(_with("item_cnt_month", 0, np.nan), test_frame, tmp_path, "2015-11", {"run_id": "second"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert result.csv_path.name == "2015-11.csv"


def test_round_trip_matches_kaggle_sample_format(test_frame: pd.DataFrame, tmp_path: Path) -> None:
    forecast = good_frame().sample(frac=1.0, random_state=0)  # shuffled: the export sorts by ID
    forecast = forecast.rename(columns={"item_cnt_month": "prediction"})  # one value column of any name
    forecast["prediction"] = forecast["prediction"].astype(np.float32)
    sidecar = {"run_id": "run-7", "model": "nlstm", "exported": "model", "metrics": {"rmse": 0.9}}
    result = export_submission(
        forecast, test_frame, tmp_path / "submissions", "2015-11", sidecar, copy_to=tmp_path / "kaggle"
    )

    text = result.csv_path.read_text(encoding="utf-8")
    assert result.csv_path == tmp_path / "submissions" / "2015-11.csv"
    assert text.splitlines()[0] == "ID,item_cnt_month"
    assert text.endswith("\n") and "\r" not in text
    assert len(text.splitlines()) == len(test_frame) + 1
    written = pd.read_csv(result.csv_path)
    sample = pd.read_csv(io.StringIO(KAGGLE_SAMPLE))
    assert list(written.columns) == list(sample.columns)
    assert written.dtypes.to_dict() == sample.dtypes.to_dict()
    assert written["ID"].tolist() == list(range(6))
    np.testing.assert_allclose(written["item_cnt_month"], good_frame()["item_cnt_month"], atol=1e-6)
    check_submission(written, test_frame)

    meta = json.loads(result.sidecar_path.read_text(encoding="utf-8"))
    assert result.sidecar_path.name == "2015-11.json"
    assert meta["run_id"] == "run-7" and meta["model"] == "nlstm" and meta["metrics"] == {"rmse": 0.9}
    assert meta["submission"]["rows"] == 6
    assert meta["submission"]["sha256"] == hashlib.sha256(result.csv_path.read_bytes()).hexdigest() == result.sha256
    assert meta["submission"]["total"] == pytest.approx(24.85, abs=1e-5)

    # copy_to an existing directory receives the same bytes under the same name.
    (tmp_path / "kaggle2").mkdir()
    again = export_submission(forecast, test_frame, tmp_path / "submissions", "2015-11", sidecar, tmp_path / "kaggle2")
    assert result.copy_path is not None and result.copy_path.read_bytes() == result.csv_path.read_bytes()
    assert again.copy_path == tmp_path / "kaggle2" / "2015-11.csv"
    assert again.copy_path.read_bytes() == result.csv_path.read_bytes()
    assert again.sha256 == result.sha256  # a rerun writes the same bytes
    assert not [p for p in (tmp_path / "submissions").iterdir() if p.name.startswith(".")]


def test_the_chosen_column_is_clipped_and_float32() -> None:
    forecast = pd.DataFrame({"ID": [0, 1, 2], "model": [0.5, 25.0, -1.0], "baseline": [np.nan, 1.0, 2.0]})
    values = chosen_forecast(forecast, "model")
    assert values.tolist() == [0.5, 20.0, 0.0]  # clipped to [0, 20]
    assert values.dtype == np.float32
    # a broken forecast that is not chosen is irrelevant
    assert chosen_forecast(forecast.assign(baseline=[1.0, 30.0, 0.0]), "baseline").tolist() == [1.0, 20.0, 0.0]


def test_a_chosen_forecast_with_nan_or_a_missing_column_is_refused() -> None:
    forecast = pd.DataFrame({"ID": [0, 1], "model": [np.inf, 1.0], "baseline": [1.0, 1.0]})
    with pytest.raises(ExportCheckError, match="model forecast has 1 NaN/inf"):
        chosen_forecast(forecast, "model")
    with pytest.raises(ExportCheckError, match="'ensemble'.*does not hold"):
        chosen_forecast(forecast, "ensemble")
    with pytest.raises(ExportCheckError, match="does not hold"):
        chosen_forecast(forecast, "ID")


def test_gate_output_passes_the_export(test_frame: pd.DataFrame, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = rng.normal(2.0, 10.0, len(test_frame))  # unclipped network output
    baseline = rng.integers(0, 40, len(test_frame)).astype(np.float32)
    values = chosen_forecast(pd.DataFrame({"ID": test_frame["ID"], "model": model, "baseline": baseline}), "baseline")
    exported, reason = "baseline", "the model lost on the validation month"
    forecast = pd.DataFrame({"ID": test_frame["ID"], "item_cnt_month": values})
    result = export_submission(forecast, test_frame, tmp_path, "2015-11", {"exported": exported, "reason": reason})
    written = pd.read_csv(result.csv_path)
    np.testing.assert_allclose(written["item_cnt_month"], np.clip(baseline, 0, 20), atol=1e-6)
    assert json.loads(result.sidecar_path.read_text())["exported"] == "baseline"


@pytest.mark.parametrize(
    ("month", "first", "label"),
    [
        (34, "2013-01", "2015-11"),
        (0, "2013-01", "2013-01"),
        (11, "2013-01", "2013-12"),
        (12, "2013-01", "2014-01"),
        (7, "2014-06", "2015-01"),
    ],
)
def test_forecast_month_label(month: int, first: str, label: str) -> None:
    assert forecast_month_label(month, first) == label


def test_forecast_month_label_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        forecast_month_label(-1)
    with pytest.raises(ValueError):
        forecast_month_label(3, "2013-13")
    with pytest.raises(ValueError):
        export_submission(good_frame(), good_frame(), Path("/nonexistent"), "Nov 2015", {})


def test_an_earlier_different_submission_of_the_month_is_kept_in_history_and_a_rerun_keeps_nothing_more(
    test_frame: pd.DataFrame, tmp_path: Path
) -> None:
    from core.accountability import exported_forecasts
    from core.lake import LakePaths

    submissions = tmp_path / "submissions"
    first_run = {"forecast_month": 34, "flow_run": {"id": "run-1", "written_at": "2015-11-01T06:00:07+00:00"}}
    first = export_submission(good_frame(), test_frame, submissions, "2015-11", first_run)
    first_bytes, first_sidecar = first.csv_path.read_bytes(), first.sidecar_path.read_bytes()
    assert first.previous_path is None

    rerun_run = {"forecast_month": 34, "flow_run": {"id": "run-2", "written_at": "2015-11-01T07:00:00+00:00"}}
    rerun = export_submission(good_frame(), test_frame, submissions, "2015-11", rerun_run)
    assert rerun.previous_path is None and not (submissions / "history").exists(), "the same bytes pile up no copy"

    second_run = {"forecast_month": 34, "flow_run": {"id": "run-3", "written_at": "2015-11-02T06:00:00+00:00"}}
    second = export_submission(_with("item_cnt_month", 0, 7.0), test_frame, submissions, "2015-11", second_run)
    kept = submissions / "history" / "2015-11" / "20151101T070000Z.csv"  # written (again) by the rerun
    assert second.previous_path == kept and kept.read_bytes() == first_bytes
    assert json.loads(kept.with_suffix(".json").read_text())["flow_run"]["id"] == "run-2"  # the rerun's sidecar
    assert second.csv_path.read_bytes() != first_bytes and first_sidecar != second.sidecar_path.read_bytes()
    assert [f.csv.name for f in exported_forecasts(LakePaths(tmp_path))] == ["2015-11.csv"], "history is not read"
    assert not [p for p in submissions.rglob(".*")], "no temporary left behind"
