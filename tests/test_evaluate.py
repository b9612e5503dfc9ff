"""Step 5: metrics against hand-computed values, the baselines and the grid."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.evaluate import backtest_frame, build_grid, evaluate, monthly_totals


@pytest.fixture
def small_holdout() -> pd.DataFrame:
    """Four pairs whose metrics are worked out by hand in the tests below."""
    return pd.DataFrame(
        {
            "series_idx": np.arange(4, dtype=np.int32),
            "shop_id": np.array([5, 6, 5, 6], dtype=np.int16),
            "item_id": np.array([100, 100, 200, 300], dtype=np.int32),
            "item_category_id": np.array([1, 1, 2, 2], dtype=np.int16),
            # 25 is above the clip: it scores as 20.
            "actual": np.array([0.0, 3.0, 25.0, 1.0], dtype=np.float32),
            "prev": np.array([1.0, 3.0, 10.0, 0.0], dtype=np.float32),
            "mean3": np.array([0.5, 2.0, 30.0, 0.0], dtype=np.float32),
            "new_item": [False, False, False, True],
            "new_pair": [False, False, True, True],
        }
    )


# model -1 -> 0 and 22 -> 20 after clipping.
SMALL_MODEL = np.array([-1.0, 4.0, 22.0, 2.0])


def test_overall_metrics_match_hand_computed_values(small_holdout: pd.DataFrame) -> None:
    ev = evaluate(small_holdout, SMALL_MODEL, category_names={1: "Games", 2: "Films"})
    # clipped actual [0, 3, 20, 1]
    # model [0, 4, 20, 2]: errors [0, 1, 0, 1]
    assert ev.overall["model"].rmse == pytest.approx(math.sqrt(2 / 4))
    assert ev.overall["model"].mae == pytest.approx(2 / 4)
    # baseline (prev) [1, 3, 10, 0]: errors [1, 0, -10, -1]
    assert ev.overall["baseline"].rmse == pytest.approx(math.sqrt(102 / 4))
    assert ev.overall["baseline"].mae == pytest.approx(12 / 4)
    # mean3 [0.5, 2, 20, 0]: errors [0.5, -1, 0, -1]
    assert ev.overall["mean3"].rmse == pytest.approx(math.sqrt(2.25 / 4))
    assert ev.overall["mean3"].mae == pytest.approx(2.5 / 4)
    # zeros: errors [0, -3, -20, -1]
    assert ev.overall["zeros"].rmse == pytest.approx(math.sqrt(410 / 4))
    assert ev.overall["zeros"].mae == pytest.approx(24 / 4)

    assert ev.improvement_rmse == pytest.approx(1 - math.sqrt(2 / 102))
    assert ev.improvement_mae == pytest.approx((3 - 0.5) / 3)
    assert ev.beats_baseline is True
    assert ev.rows == 4
    assert ev.totals == pytest.approx({"actual": 24.0, "model": 26.0, "baseline": 14.0, "mean3": 22.5, "zeros": 0.0})


def test_segment_metrics_match_hand_computed_values(small_holdout: pd.DataFrame) -> None:
    ev = evaluate(small_holdout, SMALL_MODEL, category_names={1: "Games", 2: "Films"})
    novelty = {row.key: row for row in ev.segments["novelty"]}
    assert [row.key for row in ev.segments["novelty"]] == ["new_item", "new_pair", "existing_pair"]
    # new item: row 3 only (actual 1, model 2, prev 0)
    assert novelty["new_item"].rows == 1
    assert novelty["new_item"].metrics["model"].rmse == pytest.approx(1.0)
    assert novelty["new_item"].metrics["baseline"].rmse == pytest.approx(1.0)
    # new pair of a known item: row 2 only (actual 20, model 20, prev 10)
    assert novelty["new_pair"].rows == 1
    assert novelty["new_pair"].metrics["model"].rmse == pytest.approx(0.0)
    assert novelty["new_pair"].metrics["baseline"].mae == pytest.approx(10.0)
    assert novelty["new_pair"].improvement_rmse == pytest.approx(1.0)
    # existing pairs: rows 0 and 1, model errors [0, 1], baseline errors [1, 0]
    assert novelty["existing_pair"].rows == 2
    assert novelty["existing_pair"].actual_mean == pytest.approx(1.5)
    assert novelty["existing_pair"].metrics["model"].rmse == pytest.approx(math.sqrt(0.5))
    assert novelty["existing_pair"].improvement_rmse == pytest.approx(0.0)

    categories = {row.key: row for row in ev.segments["category"]}
    assert categories["2"].label == "2 · Films"
    assert categories["2"].metrics["model"].rmse == pytest.approx(math.sqrt(1 / 2))
    assert categories["2"].metrics["baseline"].rmse == pytest.approx(math.sqrt(101 / 2))
    assert categories["1"].metrics["zeros"].mae == pytest.approx(1.5)

    shops = {row.key: row for row in ev.segments["shop"]}
    assert shops["5"].label == "5"  # no shop names given
    assert shops["5"].metrics["model"].rmse == pytest.approx(0.0)
    assert shops["5"].metrics["baseline"].mae == pytest.approx(5.5)
    assert shops["6"].metrics["model"].mae == pytest.approx(1.0)
    assert sum(row.rows for row in ev.segments["shop"]) == 4


def test_predictions_are_clipped_before_scoring(small_holdout: pd.DataFrame) -> None:
    far_above = evaluate(small_holdout, np.full(4, 1000.0))
    at_clip = evaluate(small_holdout, np.full(4, 20.0))
    assert far_above.overall["model"].rmse == pytest.approx(at_clip.overall["model"].rmse)
    # errors against clipped actual [0, 3, 20, 1]: [20, 17, 0, 19]
    assert at_clip.overall["model"].mae == pytest.approx(56 / 4)
    below = evaluate(small_holdout, np.full(4, -5.0))
    assert below.overall["model"].rmse == pytest.approx(below.overall["zeros"].rmse)
    # A tighter clip changes the scores: actual and predictions both clip to [0, 2].
    tight = evaluate(small_holdout, SMALL_MODEL, clip=(0.0, 2.0))
    # actual [0, 2, 2, 1], model [0, 2, 2, 2], prev [1, 2, 2, 0]
    assert tight.overall["model"].rmse == pytest.approx(math.sqrt(1 / 4))
    assert tight.overall["baseline"].rmse == pytest.approx(math.sqrt(2 / 4))


def test_losing_model_and_ties_do_not_beat_the_baseline(small_holdout: pd.DataFrame) -> None:
    tie = evaluate(small_holdout, small_holdout["prev"].to_numpy())
    assert tie.overall["model"].rmse == pytest.approx(tie.overall["baseline"].rmse)
    assert tie.beats_baseline is False
    worse = evaluate(small_holdout, np.zeros(4))
    assert worse.beats_baseline is False
    assert worse.improvement_rmse is not None and worse.improvement_rmse < 0


def test_evaluate_rejects_bad_inputs(small_holdout: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="3 values for 4"):
        evaluate(small_holdout, np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        evaluate(small_holdout, np.array([0.0, np.nan, 1.0, 1.0]))
    with pytest.raises(ValueError, match="mean3"):
        evaluate(small_holdout.drop(columns=["mean3"]), np.zeros(4))


def _monthly(rows: list[tuple[int, int, int, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["date_block_num", "shop_id", "item_id", "item_cnt_month"])
    # Category = item // 10 so the grid's category mapping is checkable.
    frame["item_category_id"] = (frame["item_id"] // 10).astype(np.int16)
    return frame


def test_build_grid_is_shops_times_items_of_the_month_with_zeros() -> None:
    monthly = _monthly(
        [
            (1, 3, 12, 9.0),  # another month: neither shop 3 nor item 12 joins the grid
            (2, 1, 10, 3.0),
            (2, 2, 11, 5.0),
            (2, 2, 25, -1.0),  # a return still puts its pair's shop and item on the grid
        ]
    )
    grid = build_grid(monthly, 2)
    assert list(grid.columns) == ["date_block_num", "shop_id", "item_id", "item_category_id", "item_cnt_month"]
    assert list(zip(grid["shop_id"], grid["item_id"], grid["item_cnt_month"], strict=True)) == [
        (1, 10, 3.0),
        (1, 11, 0.0),
        (1, 25, 0.0),
        (2, 10, 0.0),
        (2, 11, 5.0),
        (2, 25, -1.0),
    ]
    assert grid["item_category_id"].tolist() == [1, 1, 2, 1, 1, 2]
    assert (grid["date_block_num"] == 2).all()
    assert grid["shop_id"].dtype == np.int16 and grid["item_id"].dtype == np.int32
    with pytest.raises(ValueError, match="no monthly rows"):
        build_grid(monthly, 7)


@pytest.fixture
def tiny_monthly() -> pd.DataFrame:
    return _monthly(
        [
            (0, 1, 10, 2.0),
            (0, 1, 11, 30.0),
            (1, 1, 10, 4.0),
            (1, 2, 11, -1.0),
            (2, 1, 10, 1.0),
            (2, 2, 10, 2.0),
            (2, 1, 12, 7.0),
            (3, 1, 10, 5.0),
            (3, 2, 11, 25.0),
            (3, 2, 12, 1.0),
            (3, 1, 13, 2.0),
        ]
    )


def test_backtest_frame_baselines_on_tiny_data(tiny_monthly: pd.DataFrame) -> None:
    frame = backtest_frame(tiny_monthly, 3).set_index(["shop_id", "item_id"])
    assert len(frame) == 8  # shops {1, 2} x items {10, 11, 12, 13}
    expected = {
        # pair: (actual, prev, mean3, new_item, new_pair)
        (1, 10): (5, 1, 7 / 3, False, False),
        (1, 11): (0, 0, 20 / 3, False, False),  # 30 clips to 20 before averaging
        (1, 12): (0, 7, 7 / 3, False, False),
        (1, 13): (2, 0, 0, True, True),
        (2, 10): (0, 2, 2 / 3, False, False),
        (2, 11): (20, 0, 0, False, False),  # a return (-1) clips to 0
        (2, 12): (1, 0, 0, False, True),
        (2, 13): (0, 0, 0, True, True),
    }
    for pair, (actual, prev, mean3, new_item, new_pair) in expected.items():
        row = frame.loc[pair]
        assert row["actual"] == pytest.approx(actual), pair
        assert row["prev"] == pytest.approx(prev), pair
        assert row["mean3"] == pytest.approx(mean3), pair
        assert bool(row["new_item"]) is new_item, pair
        assert bool(row["new_pair"]) is new_pair, pair

    ev = evaluate(backtest_frame(tiny_monthly, 3), np.zeros(8), month=3)
    # baseline errors (prev - actual): [-4, 0, 7, -2, 2, -20, -1, 0] -> SSE 16+49+4+4+400+1 = 474
    assert ev.overall["baseline"].rmse == pytest.approx(math.sqrt(474 / 8))
    assert ev.overall["baseline"].mae == pytest.approx(36 / 8)
    assert ev.month_label == "2013-04"


def test_monthly_totals_sum_clipped_counts(tiny_monthly: pd.DataFrame) -> None:
    totals = monthly_totals(tiny_monthly)
    assert totals["date_block_num"].tolist() == [0, 1, 2, 3]
    assert totals["actual"].tolist() == pytest.approx([22.0, 4.0, 10.0, 28.0])
    # The same total as the holdout grid's clipped actuals.
    assert backtest_frame(tiny_monthly, 3)["actual"].sum() == pytest.approx(28.0)


def test_the_ensemble_and_the_reference_are_scored_like_the_model(small_holdout: pd.DataFrame) -> None:
    # clipped actual [0, 3, 20, 1]; reference [0, 3, 18, 1] -> errors [0, 0, 2, 0]
    reference = np.array([0.0, 3.0, 18.0, 1.0])
    ensemble = np.array([0.0, 3.5, 30.0, 1.5])  # -> [0, 3.5, 20, 1.5]: errors [0, .5, 0, .5]
    ev = evaluate(small_holdout, SMALL_MODEL, others={"reference": reference, "ensemble": ensemble})
    assert ev.predictors == ["model", "reference", "ensemble", "baseline", "mean3", "zeros"]
    assert ev.overall["reference"].rmse == pytest.approx(math.sqrt(4 / 4))
    assert ev.overall["ensemble"].rmse == pytest.approx(math.sqrt(0.5 / 4))
    assert ev.overall["ensemble"].mae == pytest.approx(1.0 / 4)
    novelty = {row.key: row for row in ev.segments["novelty"]}
    assert novelty["existing_pair"].metrics["reference"].rmse == pytest.approx(0.0)
    with pytest.raises(ValueError, match="'baseline' is scored from the holdout frame"):
        evaluate(small_holdout, SMALL_MODEL, others={"baseline": reference})
    with pytest.raises(ValueError, match="reference has 3 values"):
        evaluate(small_holdout, SMALL_MODEL, others={"reference": reference[:3]})
    # a forecaster outside the table (a re-applied champion) is scored after the table's own
    champion = evaluate(small_holdout, SMALL_MODEL, others={"champion": reference})
    assert champion.predictors[-1] == "champion" and champion.overall["champion"].rmse == pytest.approx(1.0)
