"""The run's report (core.report): the verdict names every forecaster that beat the export, the tables, the plots,
and the forecaster table every module reads (core.forecasters)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core import forecasters
from core.evaluate import Evaluation, evaluate
from core.report import better_than, verdict, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def wide_holdout(n: int = 600, seed: int = 3) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A holdout grid of 14 categories and 15 shops, and three forecasters of known quality."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "shop_id": rng.integers(0, 15, n).astype(np.int16),
            "item_id": rng.integers(0, 300, n).astype(np.int32),
            "item_category_id": rng.integers(0, 14, n).astype(np.int16),
            "actual": np.clip(rng.poisson(0.8, n), 0, 20).astype(np.float32),
            "prev": np.clip(rng.poisson(0.8, n), 0, 20).astype(np.float32),
            "mean3": rng.gamma(1.0, 0.8, n).astype(np.float32),
            "new_item": rng.random(n) < 0.1,
            "date_block_num": np.full(n, 33, dtype=np.int16),
        }
    )
    frame["new_pair"] = frame["new_item"] | (rng.random(n) < 0.3)
    actual = frame["actual"].to_numpy()
    columns = {"model": actual + rng.normal(0, 0.9, n), "reference": actual + rng.normal(0, 0.5, n),
               "ensemble": actual + rng.normal(0, 0.7, n)}
    return frame, columns


def scored(seed: int = 3) -> tuple[pd.DataFrame, Evaluation]:
    frame, columns = wide_holdout(seed=seed)
    names = {i: f"Category {i} | part" for i in range(14)}
    return frame, evaluate(frame, columns["model"], category_names=names, others={k: v for k, v in columns.items()
                                                                                 if k != "model"})


def test_the_verdict_names_the_export_and_every_forecaster_that_beat_it_with_how_much() -> None:
    scores = {"model": 1.30, "reference": 1.10, "ensemble": 1.20, "baseline": 1.60, "mean3": 1.15, "zeros": 3.0}
    assert better_than(scores, "ensemble") == [("reference", 1.10), ("mean3", 1.15)]
    text = verdict(scores, "ensemble", "2015-10", "2015-11")
    assert text.startswith("Exported ensemble (model + LightGBM) for 2015-11: on the holdout month 2015-10 it scored "
                           "RMSE 1.2000, 25.0 % better than the previous month (1.6000).")
    assert "LightGBM (recipe and launch features) 1.1000 (8.3 % better than the export)" in text
    assert "mean of last 3 months 1.1500 (4.2 % better than the export)" in text
    assert text.index("LightGBM") < text.index("mean of last 3")  # best first
    best = verdict(scores, "reference", "2015-10")
    assert "No other forecaster scored better on that month." in best


def test_the_report_opens_with_the_verdict_and_shows_every_forecaster_and_segment(tmp_path) -> None:
    frame, ev = scored()
    assert ev.month == 33 and ev.month_label == "2015-10"
    history = pd.DataFrame({"date_block_num": np.arange(20, 33), "actual": np.linspace(400, 500, 13)})
    selection = {"validation_months": [31, 32], "blend": {"known": 0.6, "launch": 0.2},
                 "validation_rmse_by_month": {"model": {"31": 1.2, "32": 1.4}, "ensemble": {"31": 1.1, "32": 1.3},
                                              "baseline": {"31": 1.5, "32": 1.7}}}
    paths = write_report(ev, tmp_path / "run", exported="ensemble", reason="the ensemble has the lowest RMSE",
                         forecast_month=34, history=history, forecast_totals={"ensemble": 480.0, "model": 470.0},
                         selection=selection, extra={"model": "nlstm"}, top=5)
    assert set(paths) == {"report", "totals_plot", "pairs_plot", "segments_plot"}
    report = paths["report"].read_text(encoding="utf-8")
    lines = report.splitlines()
    assert lines[0] == "# Forecast for 2015-11 — holdout month 2015-10"
    assert lines[2].startswith("**Exported ensemble (model + LightGBM) for 2015-11: on the holdout month 2015-10")
    assert "LightGBM (recipe and launch features)" in lines[2], "the better LightGBM is named in the verdict"
    assert "Why this one: the ensemble has the lowest RMSE." in report
    exported = ev.overall["ensemble"].rmse
    reference = ev.overall["reference"].rmse
    assert f"| ensemble (model + LightGBM) **(exported)** | {exported:.4f} |" in report
    assert f"| LightGBM (recipe and launch features) | {reference:.4f} |" in report
    assert "| 480 |" in report  # the exported forecast's total for the forecast month
    assert "## How the export was chosen: validation months 2015-08, 2015-09" in report
    assert "| model (Nested LSTM) | 1.2000 | 1.4000 | 1.3000 |" in report
    assert "0.6 × model + 0.4 × LightGBM; for items in their launch month 0.2 × model + 0.8 × LightGBM" in report
    assert "date_block_num" not in report and "month 33" not in report  # one month notation: calendar months
    assert "## By category (top 5 of 14 by rows)" in report and "\\| part |" in report  # pipes escaped
    header = next(line for line in lines if line.startswith("| segment |"))
    assert header.count("|") - 1 == 8, "segment tables keep to 8 columns, so they fit the UI"
    biggest = [int(row.key) for row in ev.segments["category"][:5]]
    rest = ~frame["item_category_id"].isin(biggest).to_numpy()
    pooled = math.sqrt(np.mean((ev._pairs["ensemble"][rest] - ev._pairs["actual"][rest]) ** 2))
    assert f"| all other (9) | {int(rest.sum()):,} |" in report and f"| {pooled:.4f} |" in report
    for key in ("totals_plot", "pairs_plot", "segments_plot"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC and paths[key].stat().st_size > 10_000, key
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp files left


def test_the_report_is_idempotent_and_a_rebuilt_evaluation_skips_only_the_pair_plot(tmp_path) -> None:
    _, ev = scored(seed=4)
    first = write_report(ev, tmp_path / "a", exported="model", reason="r", forecast_month=34)
    second = write_report(ev, tmp_path / "a", exported="model", reason="r", forecast_month=34)
    for key, path in first.items():
        assert path.read_bytes() == second[key].read_bytes(), key
    rebuilt = Evaluation.from_dict(ev.to_dict())
    paths = write_report(rebuilt, tmp_path / "b", exported="model", reason="r")
    assert "pairs_plot" not in paths and paths["totals_plot"].read_bytes()[:8] == PNG_MAGIC


def test_the_segment_plot_legend_names_every_bar_inside_the_figure() -> None:
    from core.report import segments_figure

    _, ev = scored(seed=5)
    fig = segments_figure(ev, "ensemble")
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["ensemble (exported)", "model", "LightGBM", "previous month"]
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    width, height = fig.bbox.width, fig.bbox.height
    assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height, "the legend is not clipped"
    for ax in fig.axes:
        assert not ax.get_window_extent(renderer).overlaps(box), "the legend covers no bars"


def test_every_forecaster_has_a_unique_name_a_label_a_colour_and_a_role() -> None:
    names = [f.name for f in forecasters.FORECASTERS]
    assert len(names) == len(set(names)) and len({f.colour for f in forecasters.FORECASTERS}) == len(names)
    assert forecasters.NETWORK.name == "model" and forecasters.BLEND.name == "ensemble"
    assert set(forecasters.CANDIDATES) <= set(forecasters.PREDICTED) and "baseline" not in forecasters.CANDIDATES
    for booster in forecasters.BOOSTERS:
        assert booster.features and booster.artifact, booster.name
    with pytest.raises(KeyError):
        forecasters.BY_NAME["trees"]
