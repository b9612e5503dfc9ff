"""The gate: the blend weight and the one decision of what is exported, all from validation-month scores."""

from __future__ import annotations

import numpy as np
import pytest

from core.blend import BlendWeights, blend, blend_weight, rmse
from core.gate import Decision, decide


def test_the_blend_weight_is_the_grid_point_with_the_lowest_rmse() -> None:
    rng = np.random.default_rng(0)
    actual = rng.poisson(2.0, 5000).astype(float)
    model = actual + rng.normal(0, 1.0, actual.size)
    reference = actual + rng.normal(0, 2.0, actual.size)
    weight = blend_weight(actual, model, reference)
    # an independent brute force over the same grid
    grid = np.linspace(1.0, 0.0, 21)
    scores = [rmse(np.clip(w * model + (1 - w) * reference, 0, 20), actual) for w in grid]
    assert weight == pytest.approx(grid[int(np.argmin(scores))])
    # independent errors with variances 1 and 4: the optimum is near 4 / (1 + 4) = 0.8
    assert 0.7 <= weight <= 0.9
    assert rmse(blend(model, reference, weight, (0, 20)), actual) <= min(
        rmse(np.clip(model, 0, 20), actual), rmse(np.clip(reference, 0, 20), actual)
    )


def test_a_useless_reference_gets_no_weight_and_a_perfect_one_all() -> None:
    actual = np.array([0.0, 1.0, 5.0, 2.0])
    assert blend_weight(actual, actual, actual[::-1] + 3) == 1.0
    assert blend_weight(actual, actual[::-1] + 3, actual) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        blend_weight(actual, actual[:2], actual)


def test_launch_rows_get_their_own_blend_weight_when_the_trees_are_better_there() -> None:
    rng = np.random.default_rng(1)
    actual = rng.poisson(2.0, 4000).astype(float)
    launch = np.zeros(actual.size, dtype=bool)
    launch[::40] = True
    noise = rng.normal(0, 1.5, actual.size)
    # the model is exact on known pairs and noisy on launches; the trees the other way round
    model = np.where(launch, actual + noise, actual)
    trees = np.where(launch, actual, actual + noise)
    weights = BlendWeights.fit(actual, model, trees, launch)
    assert (weights.known, weights.launch) == (1.0, 0.0)
    blended = blend(model, trees, weights.per_row(launch, actual.size), (0, 20))
    np.testing.assert_allclose(blended, np.clip(actual, 0, 20), atol=1e-5)
    # one weight for all rows cannot do this well
    single = blend_weight(actual, model, trees)
    assert rmse(blended, actual) < rmse(blend(model, trees, single, (0, 20)), actual)
    assert "launch month" in weights.describe()


def test_without_launch_rows_both_segments_share_the_single_blend_weight() -> None:
    rng = np.random.default_rng(2)
    actual = rng.poisson(2.0, 1000).astype(float)
    model, trees = actual + rng.normal(0, 1, actual.size), actual + rng.normal(0, 2, actual.size)
    single = blend_weight(actual, model, trees)
    for launch in (None, np.zeros(actual.size, dtype=bool), np.ones(actual.size, dtype=bool)):
        weights = BlendWeights.fit(actual, model, trees, launch)
        assert weights.known == weights.launch == single
    assert "launch" not in BlendWeights(0.5, 0.5).describe()
    # a record written before the launch weight existed reads as one weight for both segments
    assert BlendWeights.of({"blend_weight": 0.7}) == BlendWeights(0.7, 0.7)
    assert BlendWeights.of({"blend_weight": 0.7, "launch_blend_weight": 0.1}) == BlendWeights(0.7, 0.1)


def test_the_gate_exports_the_best_candidate_that_beats_the_previous_period() -> None:
    decision = decide({"model": 1.5, "ensemble": 1.4, "baseline": 2.0}, validation_months=[26, 27], blend_weight=0.6)
    assert decision.exported == "ensemble" and decision.blend_weight == 0.6
    assert "months 2015-03 and 2015-04" in decision.reason and "ensemble 1.4000" in decision.reason
    assert decide({"model": 1.3, "ensemble": 1.4, "baseline": 2.0}).exported == "model"
    # the LightGBM booster is a candidate too: a run never hides a better forecaster it made
    assert decide({"model": 1.5, "reference": 1.3, "ensemble": 1.4, "baseline": 2.0}).exported == "reference"
    # a tie goes to the first candidate of the table (the plain model)
    assert decide({"model": 1.4, "ensemble": 1.4, "baseline": 2.0}).exported == "model"
    # without a booster there is no ensemble and no weight
    alone = decide({"model": 1.4, "baseline": 2.0}, blend_weight=0.5)
    assert alone.exported == "model" and alone.blend_weight is None


def test_the_gate_falls_back_when_nothing_beats_the_previous_period() -> None:
    scores = {"model": 2.1, "ensemble": 2.0, "baseline": 2.0}
    baseline = decide(scores)
    assert baseline.exported == "baseline" and "fallback=baseline" in baseline.reason
    anyway = decide(scores, fallback="model")
    assert anyway.exported == "model" and "fallback=model" in anyway.reason
    with pytest.raises(ValueError, match="fallback"):
        decide(scores, fallback="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="baseline"):
        decide({"model": 1.0})


def test_a_decision_survives_json() -> None:
    decision = decide({"model": 1.0, "ensemble": 0.9, "baseline": 2.0}, validation_months=[2, 3], blend_weight=0.25,
                      launch_blend_weight=0.0)
    assert Decision.from_dict(decision.to_dict()) == decision and decision.launch_blend_weight == 0.0


def two_months_one_of_extreme_launches(seed: int = 7) -> dict[str, np.ndarray]:
    """Two validation months of 3,000 pairs each. In month 1 the launch rows sold as usual and both forecasters
    err alike on them; in month 2 launches sold ten times as much, which the booster half saw and the model not
    at all."""
    rng = np.random.default_rng(seed)
    n = 3000
    months = np.repeat([1, 2], n)
    launch = rng.random(2 * n) < 0.03
    actual = rng.poisson(1.5, 2 * n).astype(float)
    extreme = launch & (months == 2)
    actual[extreme] = 15.0 + rng.poisson(3.0, extreme.sum())
    usual = np.where(launch, 1.5, actual)
    model = usual + rng.normal(0, 0.8, 2 * n)
    booster = np.where(extreme, 8.0, usual) + rng.normal(0, 0.8, 2 * n)
    return {"actual": actual, "model": np.clip(model, 0, 20), "booster": np.clip(booster, 0, 20), "launch": launch,
            "months": months}


def test_one_month_of_extreme_launches_cannot_move_a_choice_to_its_bound() -> None:
    from core.calibration import SCALES, launch_scale
    from core.config import NestcastConfig
    from core.protocol import choose

    d = two_months_one_of_extreme_launches()
    odd = d["months"] == 2
    # Alone, the odd month drives both choices to the edge of their ranges ...
    alone = BlendWeights.fit(d["actual"][odd], d["model"][odd], d["booster"][odd], d["launch"][odd])
    assert alone.launch == 0.0
    assert launch_scale(d["actual"][odd], d["model"][odd], d["launch"][odd], (0, 20)) == SCALES.max()
    # ... and pooled into one sample with the usual month it still would: its squared errors dominate.
    pooled = BlendWeights.fit(d["actual"], d["model"], d["booster"], d["launch"])
    assert pooled.launch == 0.0
    # Each month counting alike, it moves them by its share only.
    config = NestcastConfig().with_overrides(launch_calibration=True)
    raw = {"model": d["model"], "reference": d["booster"]}
    scales, weights = choose(d["actual"], raw, d["launch"], d["months"], config, (0.0, 20.0))
    assert weights is not None and 0.0 < weights.launch < 1.0
    usual = launch_scale(d["actual"][~odd], d["model"][~odd], d["launch"][~odd], (0, 20))
    assert scales["model"] == pytest.approx(np.sqrt(usual * SCALES.max()), abs=0.006)
    assert scales["model"] < SCALES.max()
    assert 0.0 < weights.known < 1.0
