"""Forecast ranges (core.quantiles): split-conformal offsets per segment, checked against plain-loop oracles, their
coverage on residuals of a known distribution, the quantiles file's checks, and -- on a tiny run of the protocol's
stages -- that the holdout month never enters the calibration and every exported pair gets exactly one row."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from core import quantiles
from core.aggregate import aggregate
from core.config import NestcastConfig
from core.errors import ExportCheckError
from core.ingest import ingest
from core.lake import LakePaths
from core.protocol import read_predictions
from tests.test_champion import SMALL, forecast_run

CLIP = (0.0, 20.0)
LEVELS = (0.1, 0.5, 0.9)


# --- oracles: plain Python, one row at a time -------------------------------------------------------
def oracle_quantile(values: list[float], level: float) -> float:
    ordered = sorted(values)
    rank = min(max(math.ceil((len(ordered) + 1) * level), 1), len(ordered))
    return ordered[rank - 1]


def oracle_pinball(actual: list[float], predicted: list[float], level: float) -> float:
    total = 0.0
    for y, q in zip(actual, predicted, strict=True):
        total += level * (y - q) if y >= q else (1 - level) * (q - y)
    return total / len(actual)


def oracle_leaf(new_item: bool, new_pair: bool, prev: float) -> str:
    if new_item:
        return "new_item"
    if new_pair:
        return "new_pair"
    if prev < 1:
        return "sold_0"
    if prev < 3:
        return "sold_1_2"
    return "sold_3_7" if prev < 8 else "sold_8_plus"


def synthetic_rows(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"new_item": rng.random(n) < 0.1, "new_pair": rng.random(n) < 0.2,
            "prev": rng.choice([0.0, 1.0, 2.0, 4.0, 9.0], n, p=[0.6, 0.15, 0.1, 0.1, 0.05]),
            "point": rng.uniform(0, 6, n)}


# --- the math ---------------------------------------------------------------------------------------
def test_segment_codes_agree_with_a_row_by_row_oracle() -> None:
    rows = synthetic_rows(500, 1)
    codes = quantiles.leaf_codes(rows["new_item"], rows["new_pair"], rows["prev"])
    expected = [oracle_leaf(a, b, c) for a, b, c in zip(rows["new_item"], rows["new_pair"], rows["prev"], strict=True)]
    assert [quantiles.LEAVES[c] for c in codes] == expected


def test_segment_offsets_equal_the_oracle_and_a_thin_segment_takes_its_parents() -> None:
    rows = synthetic_rows(3000, 2)
    rows["prev"][rows["prev"] >= 8] = 4.0  # no 8+ pair at all: that segment must pool into the established pairs
    rows["prev"][:5] = 9.0
    rows["new_item"][:5] = rows["new_pair"][:5] = False
    rng = np.random.default_rng(3)
    actual = np.clip(rows["point"] + rng.normal(0, 1 + rows["prev"], rows["point"].size), *CLIP)
    codes = quantiles.leaf_codes(rows["new_item"], rows["new_pair"], rows["prev"])
    calibration = quantiles.calibrate(actual, rows["point"], rows["prev"], codes, LEVELS, min_rows=200)
    residual = (actual - rows["point"]).tolist()
    leaves = [quantiles.LEAVES[c] for c in codes]
    established = [r for r, leaf in zip(residual, leaves, strict=True) if leaf.startswith("sold_")]
    assert calibration.source["sold_8_plus"] == "established"
    assert calibration.offsets["sold_8_plus"] == pytest.approx([oracle_quantile(established, lv) for lv in LEVELS])
    own = [r for r, leaf in zip(residual, leaves, strict=True) if leaf == "sold_0"]
    assert calibration.source["sold_0"] == "sold_0"
    assert calibration.offsets["sold_0"] == pytest.approx([oracle_quantile(own, lv) for lv in LEVELS])
    naive = (actual - rows["prev"]).tolist()
    assert calibration.naive == pytest.approx([oracle_quantile(naive, lv) for lv in LEVELS])


def test_pinball_loss_and_coverage_equal_the_oracle() -> None:
    rng = np.random.default_rng(4)
    actual = rng.poisson(2, 300).astype(float)
    ranges = np.sort(rng.uniform(0, 6, (300, 3)), axis=1)
    scored = quantiles.score(actual, ranges, LEVELS)
    for j, level in enumerate(LEVELS):
        assert quantiles.pinball(actual, ranges[:, j], level) == pytest.approx(
            oracle_pinball(actual.tolist(), ranges[:, j].tolist(), level))
        assert scored["coverage"][f"{level:g}"] == pytest.approx(sum(a <= q for a, q in zip(actual, ranges[:, j],
                                                                                           strict=True)) / 300)
    inside = sum(lo <= a <= hi for a, lo, hi in zip(actual, ranges[:, 0], ranges[:, 2], strict=True))
    assert scored["interval_coverage"] == pytest.approx(inside / 300)
    assert scored["interval_width"] == pytest.approx(float(np.mean(ranges[:, 2] - ranges[:, 0])))


def test_levels_stay_monotone_and_inside_the_clip_range_after_clipping() -> None:
    calibration = quantiles.calibrate(np.array([0.0, 20.0] * 300), np.full(600, 10.0), np.zeros(600),
                                      np.full(600, 2), (0.05, 0.2, 0.5, 0.8, 0.95))
    point = np.array([0.0, 0.5, 19.5, 20.0, 7.0])
    ranges = quantiles.apply(point, np.full(point.size, 2), calibration, CLIP)
    assert (np.diff(ranges, axis=1) >= 0).all()
    assert ranges.min() >= 0.0 and ranges.max() <= 20.0
    assert ranges[0, 0] == 0.0 and ranges[3, -1] == 20.0


def test_coverage_is_near_nominal_when_residuals_come_from_a_known_distribution() -> None:
    rng = np.random.default_rng(5)

    def month(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = synthetic_rows(n, int(rng.integers(1 << 30)))
        codes = quantiles.leaf_codes(rows["new_item"], rows["new_pair"], rows["prev"])
        spread = np.array([4.0, 2.0, 0.5, 1.0, 2.0, 3.0])[codes]  # each segment its own spread
        actual = rows["point"] + rng.laplace(0, spread)  # unclipped: the clip range is wide enough to hold it
        return actual, rows["point"], rows["prev"], codes

    calibration = quantiles.calibrate(*month(20_000), LEVELS, clip=(-100.0, 100.0))
    actual, point, _, codes = month(20_000)
    scored = quantiles.score(actual, quantiles.apply(point, codes, calibration, (-100.0, 100.0)), LEVELS)
    for level in LEVELS:
        assert scored["coverage"][f"{level:g}"] == pytest.approx(level, abs=0.015)
    assert scored["interval_coverage"] == pytest.approx(0.8, abs=0.015)
    new_items = codes == 0
    on_new = quantiles.score(actual[new_items], quantiles.apply(point, codes, calibration, (-100.0, 100.0))[new_items],
                             LEVELS)
    assert on_new["interval_coverage"] == pytest.approx(0.8, abs=0.05)


def test_resampled_totals_match_a_loop_over_draws_with_the_same_random_numbers() -> None:
    rows = synthetic_rows(400, 6)
    codes = quantiles.leaf_codes(rows["new_item"], rows["new_pair"], rows["prev"])
    rng = np.random.default_rng(7)
    pools = [rng.normal(0, 1 + i, 50 + i) for i in range(len(quantiles.LEAVES))]
    groups = rng.integers(-1, 3, codes.size)
    totals, everything = quantiles.resampled_totals(rows["point"], codes, pools, groups, 3, CLIP, draws=30, seed=11,
                                                    chunk=7)
    replay = np.random.default_rng(11)
    for first in range(0, 30, 7):
        count = min(7, 30 - first)
        uniforms = replay.random((count, codes.size))
        for d in range(count):
            expected, total = [0.0, 0.0, 0.0], 0.0
            for i in range(codes.size):
                pool = pools[codes[i]]
                value = min(max(rows["point"][i] + pool[int(uniforms[d, i] * len(pool))], 0.0), 20.0)
                total += value
                if groups[i] >= 0:
                    expected[groups[i]] += value
            assert totals[:, first + d] == pytest.approx(expected)
            assert everything[first + d] == pytest.approx(total)


# --- the quantiles file -----------------------------------------------------------------------------
def good_frame() -> pd.DataFrame:
    ranges = np.array([[0.0, 1.0, 3.0], [0.0, 0.0, 0.5], [2.0, 5.0, 9.0]])
    return quantiles.quantile_frame(np.array([7, 3, 5]), np.array([1, 1, 2]), np.array([10, 11, 12]), ranges, LEVELS)


def test_the_quantiles_file_is_written_atomically_sorted_by_id(tmp_path: Path) -> None:
    target = tmp_path / "2015-11.quantiles.parquet"
    quantiles.write_quantiles(target, good_frame(), np.array([3, 5, 7]), LEVELS, CLIP)
    written = pd.read_parquet(target)
    assert list(written.columns) == ["ID", "shop_id", "item_id", "q0.1", "q0.5", "q0.9"]
    assert written["ID"].tolist() == [3, 5, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left beside it


@pytest.mark.parametrize(("row", "column", "value", "rule"), [
    (1, "q0.5", 0.2, "q0.9 0.5 is below q0.5 0.6"),
    (0, "q0.9", 25.0, "outside [0, 20]"),
    (2, "q0.1", -1.0, "outside [0, 20]"),
    (2, "q0.5", np.nan, "not a finite number"),
])
def test_a_bad_quantiles_file_is_refused_naming_the_file_row_and_rule(tmp_path: Path, row: int, column: str,
                                                                       value: float, rule: str) -> None:
    frame = good_frame()
    if column == "q0.5" and value == 0.2:
        frame.loc[row, ["q0.1", "q0.5", "q0.9"]] = [0.4, 0.6, 0.5]
    else:
        frame.loc[row, column] = value
    target = tmp_path / "2015-11.quantiles.parquet"
    where = rf"2015-11\.quantiles\.parquet row {row} \(ID \d+\): "
    with pytest.raises(ExportCheckError, match=where + ".*" + re.escape(rule)):
        quantiles.write_quantiles(target, frame, np.array([3, 5, 7]), LEVELS, CLIP)
    assert not list(tmp_path.iterdir())


def test_a_quantiles_file_missing_an_exported_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportCheckError, match="one row per exported ID"):
        quantiles.write_quantiles(tmp_path / "x.quantiles.parquet", good_frame(), np.array([3, 5, 7, 9]), LEVELS,
                                  CLIP)


def test_quantile_levels_are_validated_naming_the_value() -> None:
    assert NestcastConfig().export.quantile_levels == (0.1, 0.5, 0.9)
    assert NestcastConfig().with_overrides(quantile_levels=[0.05, 0.95]).export.quantile_levels == (0.05, 0.95)
    with pytest.raises(ValueError, match="1.2 is not inside"):
        NestcastConfig().with_overrides(quantile_levels=[0.1, 1.2])
    with pytest.raises(ValueError, match="0.3 follows 0.5"):
        NestcastConfig().with_overrides(quantile_levels=[0.5, 0.3])


# --- on a tiny run of the protocol's stages ----------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data) -> dict[str, Any]:
    root = tiny_data(tmp_path_factory.mktemp("ranges"), seed=3)
    config = NestcastConfig(data_dir=root).with_overrides(**SMALL, champion_gate=False)
    ingest(config)
    aggregate(config)
    return forecast_run(config) | {"config": config}


def test_every_exported_pair_has_exactly_one_monotone_quantile_row_beside_the_submission(run) -> None:
    submission = pd.read_csv(run["submission"])
    paths = LakePaths.of(run["config"])
    label = Path(run["submission"]).stem
    table = pd.read_parquet(paths.submission_quantiles(label))
    assert table["ID"].tolist() == sorted(submission["ID"].tolist())
    values = table[["q0.1", "q0.5", "q0.9"]].to_numpy()
    assert (np.diff(values, axis=1) >= 0).all() and values.min() >= 0 and values.max() <= 20
    pairs = pd.read_parquet(paths.submission_pairs(label))
    assert table[["ID", "shop_id", "item_id"]].astype(int).equals(pairs.astype(int))
    sidecar = json.loads(Path(run["submission"]).with_suffix(".json").read_text())
    assert sidecar["quantiles"]["file"] == f"{label}.quantiles.parquet"
    assert sidecar["quantiles"]["calibration"]["forecaster"] == run["decision"].ranges["calibration"]["forecaster"]


def test_the_holdout_month_never_enters_the_calibration(run) -> None:
    config, run_dir = run["config"], Path(run["run_dir"])
    paths = LakePaths.of(config)
    windows, final = paths.windows_dir("evaluation"), paths.windows_dir("final")
    exported, chosen = run["decision"].exported, run["decision"].decision.exported
    before = quantiles.range_run(config, windows, final, run_dir, exported, chosen)
    held = read_predictions(run_dir / "holdout", "holdout")
    original = held.copy()
    try:  # the holdout predictions pushed far off: offsets taken from the holdout month would move a lot
        (held.select_dtypes("number") + 7.0).to_parquet(run_dir / "holdout" / "holdout.parquet", index=False)
        after = quantiles.range_run(config, windows, final, run_dir, exported, chosen)
    finally:
        original.to_parquet(run_dir / "holdout" / "holdout.parquet", index=False)
    assert after["calibration"] == before["calibration"]
    assert after["holdout"]["range"]["pinball"] != before["holdout"]["range"]["pinball"]  # the holdout only scores
    assert set(before["calibration"]["months"]) == set(run["selection"].validation_months)
    assert before["holdout_month"] not in before["calibration"]["months"]


def test_the_report_has_coverage_by_segment_and_a_fan_chart(run) -> None:
    ranges = run["decision"].ranges
    report = (Path(run["run_dir"]) / "report.md").read_text()
    assert "## Forecast ranges" in report and "![forecast ranges](fan.png)" in report
    assert Path(ranges["plot"]).read_bytes()[:4] == b"\x89PNG"
    segments = [row["segment"] for row in ranges["holdout"]["segments"]]
    assert segments[0] == "all" and "established" in segments
    chain = ranges["fan"]["holdout"][0]
    assert chain["group"] == "chain" and chain["low"] <= chain["high"]


# --- accountability: a forecast month's ranges scored once its actuals arrive -------------------------------------
def test_accountability_scores_the_kept_quantiles_and_the_naive_range_of_their_time(tmp_path: Path) -> None:
    from core import accountability

    paths = LakePaths(tmp_path)
    paths.submissions.mkdir(parents=True)
    actual, previous = np.array([0.0, 1.0, 5.0, 2.0]), np.array([0.0, 0.0, 4.0, 2.0])
    ranges = np.array([[0.0, 0.0, 0.5], [0.0, 1.0, 2.0], [3.0, 4.0, 4.5], [1.0, 2.0, 3.0]])
    quantiles.quantile_frame(np.array([4, 3, 2, 1]), np.zeros(4), np.arange(4), ranges, LEVELS).to_parquet(
        paths.submission_quantiles("2015-11"), index=False)
    calibration = quantiles.calibrate(np.array([0.0, 2.0, 1.0] * 100), np.ones(300), np.ones(300),
                                      np.full(300, 3), LEVELS)
    forecast = accountability.Forecast(34, "2015-11", paths.submission("2015-11"),
                                       {"quantiles": {"calibration": calibration.to_dict()}})
    scored = accountability.score_ranges(paths, forecast, np.array([4, 3, 2, 1]), actual, previous, CLIP)
    # IDs 4, 3, 2, 1 are the rows of the file sorted by ID backwards: row i of the arrays is ranges[i].
    own = quantiles.score(actual, ranges, LEVELS)
    assert scored["interval_coverage"] == pytest.approx(own["interval_coverage"]) == pytest.approx(3 / 4)
    assert scored["pinball"] == pytest.approx(np.mean([oracle_pinball(actual.tolist(), ranges[:, j].tolist(), lv)
                                                       for j, lv in enumerate(LEVELS)]))
    naive = np.clip(previous[:, None] + np.array(calibration.naive)[None, :], *CLIP)
    assert scored["pinball_naive"] == pytest.approx(quantiles.score(actual, naive, LEVELS)["pinball"])
    assert json.loads(scored["coverage_levels"]) == pytest.approx({"0.1": 0.25, "0.5": 0.75, "0.9": 0.75})  # by hand
    without = accountability.Forecast(35, "2015-12", paths.submission("2015-12"), {})
    assert math.isnan(accountability.score_ranges(paths, without, np.array([1]), actual[:1], previous[:1],
                                                  CLIP)["pinball"])


def test_the_history_plot_adds_coverage_against_nominal_once_a_month_has_ranges() -> None:
    from core import accountability

    records = pd.DataFrame({"forecast_month": [33, 34], "month_label": ["2015-10", "2015-11"],
                            "exported": ["ensemble"] * 2, "status": ["scored"] * 2, "rmse_exported": [1.0, 1.1],
                            "rmse_previous_period": [1.2, 1.3], "rmse_model": [1.05, 1.15], "n_pairs": [10, 10],
                            "note": ["", ""], "coverage_levels": ["", json.dumps({"0.1": 0.2, "0.9": 0.93})],
                            "interval_coverage": [np.nan, 0.78], "interval_width": [np.nan, 2.0],
                            "pinball": [np.nan, 0.2], "interval_coverage_naive": [np.nan, 0.7],
                            "pinball_naive": [np.nan, 0.3]})
    with_ranges = accountability.plot_history(records, "2013-01")
    without = accountability.plot_history(records.drop(columns=["coverage_levels"]), "2013-01")
    assert with_ranges[:4] == without[:4] == b"\x89PNG" and with_ranges != without
    rows = accountability.history_rows(records)
    assert rows[1]["range coverage"] == 0.78 and rows[0]["range coverage"] is None
    assert "range coverage" in accountability.history_markdown(records, None)


def test_the_forecast_rows_segments_agree_with_the_monthly_sales_before_the_month(run) -> None:
    from core.aggregate import read_monthly
    from core.window_store import WindowStore

    paths = LakePaths.of(run["config"])
    store = WindowStore.open(paths.windows_dir("final"))
    month = int(store.meta["forecast_month"])
    frame = store.forecast_frame()
    monthly = read_monthly(paths)
    before = monthly[monthly["date_block_num"] < month]
    sold_items = set(before["item_id"].astype(int))
    sold_pairs = set(zip(before["shop_id"].astype(int), before["item_id"].astype(int), strict=True))
    expected = [oracle_leaf(item not in sold_items, (shop, item) not in sold_pairs, prev) for shop, item, prev
                in zip(frame["shop_id"].astype(int), frame["item_id"].astype(int), frame["prev"], strict=True)]
    got = [quantiles.LEAVES[c] for c in quantiles.forecast_codes(store)]
    assert got == expected
    assert {"new_item", "sold_0"} <= set(got)
