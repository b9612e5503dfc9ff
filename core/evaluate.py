"""Step 5: score the model against simple baselines on the holdout month, the way the competition scores.

The holdout frame is the Kaggle-style grid of the holdout month (every shop with sales that month x every
item with sales that month), one row per pair, with the clipped actual count and the baselines' inputs
(``prev``: the pair's clipped count the month before; ``mean3``: the mean of the three months before).
Every prediction is clipped to [0, 20] before scoring because the competition clips the same way, so a
model is not punished for excursions the submission would never contain.

Four predictors are scored: ``model``, ``baseline`` (previous period), ``mean3`` and ``zeros``. The verdict
``beats_baseline`` (model RMSE strictly below the previous-period baseline's) is the export gate's input.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, PrivateAttr

from core.config import DEFAULT_CLIP
from core.display import change, versus
from core.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from core.gate import BlendWeights
from core.lake import FORECAST_FILE, METRICS_FILE, REPORT_FILE, forecast_month_label

#: Every predictor an evaluation may score, in report order; model, baseline, mean3 and zeros always are.
PREDICTORS: tuple[str, ...] = ("model", "ensemble", "reference", "reference_calibrated", "trees",
                                "model_uncalibrated", "baseline", "mean3", "zeros")  # fmt: skip
OPTIONAL_PREDICTORS: tuple[str, ...] = ("ensemble", "reference", "reference_calibrated", "trees",
                                         "model_uncalibrated")  # fmt: skip
PREDICTOR_LABELS: dict[str, str] = {
    "model": "model (Nested LSTM)",
    "ensemble": "ensemble (model + LightGBM)",
    "reference": "LightGBM reference",
    "reference_calibrated": "LightGBM reference, launch-calibrated",
    "trees": "LightGBM, extended features (ensemble member)",
    "model_uncalibrated": "model without launch calibration",
    "baseline": "previous month (baseline)",
    "mean3": "mean of last 3 months",
    "zeros": "zeros",
}
#: The same, short enough for a segment table's column headers.
SHORT_LABELS: dict[str, str] = {
    "model": "model", "ensemble": "ensemble", "reference": "LightGBM reference",
    "reference_calibrated": "reference, calibrated", "trees": "LightGBM extended", "model_uncalibrated": "model, raw",
    "baseline": "previous month", "mean3": "mean of last 3", "zeros": "zeros",
}  # fmt: skip
# The novelty segments partition the grid, so their rows add up to the whole.
NOVELTY_SEGMENTS: tuple[tuple[str, str], ...] = (
    ("new_item", "new item (never sold before)"),
    ("new_pair", "new pair (item sold before, not in this shop)"),
    ("existing_pair", "existing pair"),
)
HOLDOUT_COLUMNS: tuple[str, ...] = (
    "shop_id",
    "item_id",
    "item_category_id",
    "actual",
    "prev",
    "mean3",
    "new_item",
    "new_pair",
)
PLOT_FILES: dict[str, str] = {
    "totals_plot": "monthly_totals.png",
    "pairs_plot": "predicted_vs_actual.png",
    "segments_plot": "error_by_segment.png",
}
_KEY_SHIFT = np.int64(1 << 32)


# --- the holdout grid ------------------------------------------------------------------------------


def _pair_key(shop_id: Any, item_id: Any) -> np.ndarray:
    # One int64 per (shop, item) so pair lookups are array operations instead of multi-column merges.
    return np.asarray(shop_id, dtype=np.int64) * _KEY_SHIFT + np.asarray(item_id, dtype=np.int64)


def build_grid(monthly: pd.DataFrame, month: int) -> pd.DataFrame:
    """The Kaggle-style grid of ``month``: every shop with a monthly row that month x every such item.

    ``monthly`` has one row per (month, shop, item) with ``date_block_num, shop_id, item_id, item_cnt_month``
    (``item_category_id`` is carried over when present). Pairs without a row get ``item_cnt_month`` 0.
    The count is left unclipped. Rows are sorted by shop, then item.
    """
    missing = {"date_block_num", "shop_id", "item_id", "item_cnt_month"} - set(monthly.columns)
    if missing:
        raise ValueError(f"monthly frame lacks column(s) {sorted(missing)}")
    rows = monthly.loc[monthly["date_block_num"].to_numpy() == month]
    if rows.empty:
        raise ValueError(f"no monthly rows for date_block_num {month}; cannot build its grid")
    shops = np.unique(rows["shop_id"].to_numpy())
    items = np.unique(rows["item_id"].to_numpy())
    shop_col = np.repeat(shops, len(items))
    item_col = np.tile(items, len(shops))

    keys = _pair_key(rows["shop_id"], rows["item_id"])
    # Sum in case the caller passes daily-grained or duplicated rows; the grid has one row per pair.
    counts = pd.Series(rows["item_cnt_month"].to_numpy(dtype=np.float64)).groupby(keys).sum()
    position = counts.index.get_indexer(_pair_key(shop_col, item_col))
    cnt = np.where(position >= 0, counts.to_numpy()[position], 0.0)

    grid = pd.DataFrame(
        {
            "date_block_num": np.full(len(shop_col), month, dtype=np.int16),
            "shop_id": shop_col.astype(np.int16),
            "item_id": item_col.astype(np.int32),
        }
    )
    if "item_category_id" in rows.columns:
        category = rows.drop_duplicates("item_id").set_index("item_id")["item_category_id"]
        grid["item_category_id"] = category.reindex(item_col).to_numpy().astype(np.int16)
    grid["item_cnt_month"] = cnt.astype(np.float32)
    return grid


def backtest_frame(monthly: pd.DataFrame, month: int, clip: tuple[float, float] = DEFAULT_CLIP) -> pd.DataFrame:
    """A holdout frame for ``month`` built straight from monthly rows (for backtests and baselines).

    Same columns as the windows step's holdout frame, less ``series_idx``: the grid of ``month`` with
    ``actual`` (clipped count), ``prev`` (clipped count of ``month - 1``), ``mean3`` (mean clipped count of
    the three months before, months before the data counting as 0), ``new_item`` (no monthly row for the
    item before ``month``) and ``new_pair`` (no row for the pair before ``month``).
    """
    low, high = clip
    grid = build_grid(monthly, month)
    keys = _pair_key(grid["shop_id"], grid["item_id"])
    months = monthly["date_block_num"].to_numpy()
    before = monthly.loc[months < month]
    clipped = np.clip(before["item_cnt_month"].to_numpy(dtype=np.float64), low, high)
    before_keys = _pair_key(before["shop_id"], before["item_id"])
    before_months = before["date_block_num"].to_numpy()

    def pair_sum(mask: np.ndarray) -> np.ndarray:
        sums = pd.Series(clipped[mask]).groupby(before_keys[mask]).sum()
        position = sums.index.get_indexer(keys)
        return np.where(position >= 0, sums.to_numpy()[position], 0.0)

    out = grid.drop(columns=["date_block_num", "item_cnt_month"])
    out["actual"] = np.clip(grid["item_cnt_month"].to_numpy(dtype=np.float64), low, high).astype(np.float32)
    out["prev"] = pair_sum(before_months == month - 1).astype(np.float32)
    out["mean3"] = (pair_sum(before_months >= month - 3) / 3.0).astype(np.float32)
    out["new_item"] = ~np.isin(grid["item_id"].to_numpy(), before["item_id"].to_numpy())
    out["new_pair"] = ~np.isin(keys, before_keys)
    return out


def monthly_totals(monthly: pd.DataFrame, clip: tuple[float, float] = DEFAULT_CLIP) -> pd.DataFrame:
    """Per month, the total of clipped pair counts: ``date_block_num, actual``.

    This equals the sum of ``actual`` over that month's grid (absent pairs are 0), so it is comparable to
    the holdout totals in :class:`Evaluation` and is the ``history`` that :func:`write_report` plots.
    """
    clipped = np.clip(monthly["item_cnt_month"].to_numpy(dtype=np.float64), *clip)
    totals = pd.Series(clipped).groupby(monthly["date_block_num"].to_numpy()).sum()
    return pd.DataFrame({"date_block_num": totals.index.astype(np.int16), "actual": totals.to_numpy()})


# --- metrics --------------------------------------------------------------------------------------


class Metrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    rmse: float
    mae: float


class SegmentRow(BaseModel):
    """Metrics of every predictor on one segment of the grid."""

    model_config = ConfigDict(frozen=True)

    key: str
    label: str
    rows: int
    actual_mean: float
    metrics: dict[str, Metrics]
    improvement_rmse: float | None = None


class Evaluation(BaseModel):
    """Scores of the model and the baselines on the holdout month; ``to_dict()`` is JSON-ready.

    ``overall`` and each segment row map predictor name (:data:`PREDICTORS`) to RMSE and MAE.
    ``improvement_rmse``/``improvement_mae`` are the model's relative improvement over the previous-period
    baseline, ``(baseline - model) / baseline`` (None when the baseline scores 0). ``segments`` has
    ``novelty`` (new items, new pairs, existing pairs), ``category`` and ``shop`` rows, biggest first.
    """

    month: int | None = None
    month_label: str | None = None
    first_month: str = "2013-01"
    rows: int
    clip: tuple[float, float]
    overall: dict[str, Metrics]
    totals: dict[str, float]
    improvement_rmse: float | None
    improvement_mae: float | None
    beats_baseline: bool
    segments: dict[str, list[SegmentRow]]

    # Pair-level clipped arrays for the scatter plot; not serialised, so absent after from_dict().
    _pairs: dict[str, np.ndarray] | None = PrivateAttr(default=None)

    @property
    def predictors(self) -> list[str]:
        """The predictors this evaluation scored, in :data:`PREDICTORS` order."""
        return [p for p in PREDICTORS if p in self.overall]

    @property
    def model_rmse(self) -> float:
        return self.overall["model"].rmse

    @property
    def baseline_rmse(self) -> float:
        return self.overall["baseline"].rmse

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        return cls.model_validate(dict(data))

    def headline(self) -> str:
        verdict = "beats" if self.beats_baseline else "does not beat"
        change = "" if self.improvement_rmse is None else f", {self.improvement_rmse:+.1%}"
        return (
            f"model {verdict} the previous-period baseline: RMSE {self.model_rmse:.4f} vs "
            f"{self.baseline_rmse:.4f}{change}"
        )


def _relative(baseline: float, model: float) -> float | None:
    return None if baseline <= 0 else (baseline - model) / baseline


def _grouped(codes: np.ndarray, n_groups: int, actual: np.ndarray, preds: Mapping[str, np.ndarray]) -> dict:
    # bincount does the per-group sums in one pass per predictor, whatever the number of groups.
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    out: dict[str, Any] = {
        "rows": counts,
        "actual_mean": np.bincount(codes, weights=actual, minlength=n_groups) / safe,
    }
    for name, pred in preds.items():
        error = pred - actual
        out[name] = (
            np.sqrt(np.bincount(codes, weights=error * error, minlength=n_groups) / safe),
            np.bincount(codes, weights=np.abs(error), minlength=n_groups) / safe,
        )
    return out


def _segment_rows(
    codes: np.ndarray,
    keys: list[str],
    labels: list[str],
    actual: np.ndarray,
    preds: Mapping[str, np.ndarray],
    order_by_rows: bool,
) -> list[SegmentRow]:
    stats = _grouped(codes, len(keys), actual, preds)
    rows = stats["rows"]
    order = np.arange(len(keys))
    if order_by_rows:
        order = np.lexsort((order, -rows))
    result = []
    for g in order:
        if rows[g] == 0:
            continue
        metrics = {name: Metrics(rmse=float(stats[name][0][g]), mae=float(stats[name][1][g])) for name in preds}
        result.append(
            SegmentRow(
                key=keys[g],
                label=labels[g],
                rows=int(rows[g]),
                actual_mean=float(stats["actual_mean"][g]),
                metrics=metrics,
                improvement_rmse=_relative(metrics["baseline"].rmse, metrics["model"].rmse),
            )
        )
    return result


def _named(ids: np.ndarray, names: Mapping[Any, str] | None) -> tuple[list[str], list[str]]:
    keys = [str(int(i)) for i in ids]
    if not names:
        return keys, keys
    labels = []
    for i, key in zip(ids, keys, strict=True):
        name = names.get(int(i), names.get(key))
        labels.append(f"{key} · {name}" if name else key)
    return keys, labels


def evaluate(
    holdout: pd.DataFrame,
    model_pred: np.ndarray,
    clip: tuple[float, float] = DEFAULT_CLIP,
    category_names: Mapping[Any, str] | None = None,
    *,
    shop_names: Mapping[Any, str] | None = None,
    month: int | None = None,
    first_month: str = "2013-01",
    others: Mapping[str, np.ndarray] | None = None,
) -> Evaluation:
    """Score ``model_pred`` (one value per holdout row) and the baselines on the holdout grid.

    ``others`` adds the optional predictors (:data:`OPTIONAL_PREDICTORS`: ``ensemble``, ``reference``),
    one value per holdout row each, scored like the model.

    ``holdout`` needs ``shop_id, item_id, item_category_id, actual, prev, mean3, new_item, new_pair``.
    Missing ``prev``/``mean3`` values count as 0 (no sales). ``month`` defaults to the frame's
    ``date_block_num`` when it has one. Names label the category and shop segments when given.
    """
    missing = [c for c in HOLDOUT_COLUMNS if c not in holdout.columns]
    if missing:
        raise ValueError(f"holdout frame lacks column(s) {missing}")
    if holdout.empty:
        raise ValueError("holdout frame is empty; nothing to evaluate")
    low, high = float(clip[0]), float(clip[1])
    if not high > low:
        raise ValueError(f"clip must be (low, high) with high > low, got {clip}")
    pred = np.asarray(model_pred, dtype=np.float64).reshape(-1)
    if pred.size != len(holdout):
        raise ValueError(f"model_pred has {pred.size} values for {len(holdout)} holdout rows")
    extra = {}
    for name, values in (others or {}).items():
        if name not in OPTIONAL_PREDICTORS:
            raise ValueError(f"unknown predictor {name!r}; optional predictors: {OPTIONAL_PREDICTORS}")
        extra[name] = np.asarray(values, dtype=np.float64).reshape(-1)
    for name, values in {"model_pred": pred, **extra}.items():
        if values.size != len(holdout):
            raise ValueError(f"{name} has {values.size} values for {len(holdout)} holdout rows")
        if not np.isfinite(values).all():
            raise ValueError(f"{name} has {int((~np.isfinite(values)).sum())} NaN/inf value(s)")
    actual_raw = holdout["actual"].to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(actual_raw).any():
        raise ValueError(f"holdout actual has {int(np.isnan(actual_raw).sum())} NaN value(s)")

    actual = np.clip(actual_raw, low, high)
    preds = {
        "model": np.clip(pred, low, high),
        **{name: np.clip(extra[name], low, high) for name in OPTIONAL_PREDICTORS if name in extra},
        "baseline": np.clip(np.nan_to_num(holdout["prev"].to_numpy(dtype=np.float64, na_value=0.0)), low, high),
        "mean3": np.clip(np.nan_to_num(holdout["mean3"].to_numpy(dtype=np.float64, na_value=0.0)), low, high),
        "zeros": np.clip(np.zeros_like(actual), low, high),
    }
    overall = {}
    for name, values in preds.items():
        error = values - actual
        overall[name] = Metrics(rmse=float(np.sqrt(np.mean(error * error))), mae=float(np.mean(np.abs(error))))

    new_item = holdout["new_item"].to_numpy(dtype=bool)
    new_pair = holdout["new_pair"].to_numpy(dtype=bool)
    novelty = np.where(new_item, 0, np.where(new_pair, 1, 2))
    segments = {
        "novelty": _segment_rows(
            novelty,
            [key for key, _ in NOVELTY_SEGMENTS],
            [label for _, label in NOVELTY_SEGMENTS],
            actual,
            preds,
            order_by_rows=False,
        )
    }
    for segment, column, names in (("category", "item_category_id", category_names), ("shop", "shop_id", shop_names)):
        codes, uniques = pd.factorize(holdout[column].to_numpy(), sort=True)
        keys, labels = _named(np.asarray(uniques), names)
        segments[segment] = _segment_rows(codes, keys, labels, actual, preds, order_by_rows=True)

    if month is None and "date_block_num" in holdout.columns:
        months = pd.unique(holdout["date_block_num"])
        month = int(months[0]) if len(months) == 1 else None
    totals = {"actual": float(actual.sum())} | {name: float(values.sum()) for name, values in preds.items()}
    evaluation = Evaluation(
        month=month,
        month_label=None if month is None else forecast_month_label(month, first_month),
        first_month=first_month,
        rows=len(holdout),
        clip=(low, high),
        overall=overall,
        totals=totals,
        improvement_rmse=_relative(overall["baseline"].rmse, overall["model"].rmse),
        improvement_mae=_relative(overall["baseline"].mae, overall["model"].mae),
        beats_baseline=overall["model"].rmse < overall["baseline"].rmse,
        segments=segments,
    )
    evaluation._pairs = {
        "actual": actual.astype(np.float32),
        "model": preds["model"].astype(np.float32),
        "baseline": preds["baseline"].astype(np.float32),
    }
    return evaluation


# --- report ---------------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    # First column left-aligned (names), the numbers right-aligned.
    align = "|".join("---" if i == 0 else "---:" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", f"|{align}|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pooled(rows: list[SegmentRow]) -> SegmentRow:
    # Exact pooled metrics from per-segment ones: RMSE via summed squared errors, MAE via summed absolute ones.
    n = sum(r.rows for r in rows)
    metrics = {}
    for name in rows[0].metrics:
        sse = sum(r.metrics[name].rmse ** 2 * r.rows for r in rows)
        sae = sum(r.metrics[name].mae * r.rows for r in rows)
        metrics[name] = Metrics(rmse=math.sqrt(sse / n), mae=sae / n)
    return SegmentRow(
        key="other",
        label=f"all other ({len(rows)})",
        rows=n,
        actual_mean=sum(r.actual_mean * r.rows for r in rows) / n,
        metrics=metrics,
        improvement_rmse=_relative(metrics["baseline"].rmse, metrics["model"].rmse),
    )


def _segment_table(rows: list[SegmentRow], title: str) -> str:
    predictors = [p for p in PREDICTORS if p in rows[0].metrics]
    header = [
        title,
        "rows",
        "actual mean",
        *(f"{SHORT_LABELS.get(p, p)} RMSE" for p in predictors),
        "model MAE",
        "previous month MAE",
        "model vs previous month (RMSE)",
    ]
    body = [
        [
            r.label,
            f"{r.rows:,}",
            f"{r.actual_mean:.3f}",
            *(f"{r.metrics[p].rmse:.4f}" for p in predictors),
            f"{r.metrics['model'].mae:.4f}",
            f"{r.metrics['baseline'].mae:.4f}",
            change(r.metrics["model"].rmse, r.metrics["baseline"].rmse),
        ]
        for r in rows
    ]
    return _table(header, body)


def _top(rows: list[SegmentRow], top: int) -> list[SegmentRow]:
    if len(rows) <= top + 1:
        return rows
    return rows[:top] + [_pooled(rows[top:])]


def render_report(
    evaluation: Evaluation,
    *,
    exported: str,
    reason: str,
    extra: Mapping[str, Any] | None = None,
    plots: Mapping[str, str] | None = None,
    top: int = 10,
    decision: Mapping[str, Any] | None = None,
) -> str:
    """The markdown report: verdict, what was exported and why, overall and per-segment tables.

    ``decision`` (``core.gate.Decision.to_dict()``) adds the validation-month scores the gate decided on.
    """
    month = (
        f"{evaluation.month_label} (date_block_num {evaluation.month})" if evaluation.month is not None else "holdout"
    )
    verdict = "beats" if evaluation.beats_baseline else "does not beat"
    low, high = evaluation.clip
    lines = [
        f"# Evaluation — holdout month {month}",
        "",
        f"**Verdict: the model {verdict} the previous-period baseline** — RMSE {evaluation.model_rmse:.4f} vs "
        f"{evaluation.baseline_rmse:.4f}, {versus(evaluation.model_rmse, evaluation.baseline_rmse)} "
        f"(MAE {change(evaluation.overall['model'].mae, evaluation.overall['baseline'].mae)}).",
        "",
        f"**Exported: {exported} forecast** — {reason.rstrip('.')}.",
        "",
        f"## Overall ({evaluation.rows:,} shop × item pairs, predictions clipped to [{low:g}, {high:g}])",
        "",
        _table(
            ["predictor", "RMSE", "MAE", "RMSE vs previous month", "predicted total"],
            [
                [
                    PREDICTOR_LABELS[p],
                    f"{evaluation.overall[p].rmse:.4f}",
                    f"{evaluation.overall[p].mae:.4f}",
                    "—" if p == "baseline" else change(evaluation.overall[p].rmse, evaluation.baseline_rmse),
                    f"{evaluation.totals[p]:,.0f}",
                ]
                for p in evaluation.predictors
            ]
            + [["actual", "", "", "", f"{evaluation.totals['actual']:,.0f}"]],
        ),
        "",
    ]
    if decision and decision.get("validation_rmse"):
        scores = decision["validation_rmse"]
        weight = decision.get("blend_weight")
        weights = None if weight is None else BlendWeights.of(decision)
        lines += [
            "",
            f"## The gate: validation month {decision.get('validation_month')}",
            "",
            "Chosen on this month, which the holdout month's score above never influenced"
            + (f"; the ensemble is {weights.describe()}." if weights is not None else "."),
            "",
            _table(
                ["candidate", "validation RMSE"], [[PREDICTOR_LABELS.get(k, k), f"{v:.4f}"] for k, v in scores.items()]
            ),
        ]
    lines += [
        "",
        "## By novelty",
        "",
        _segment_table(evaluation.segments["novelty"], "segment"),
    ]
    for segment, title in (("category", "category"), ("shop", "shop")):
        rows = evaluation.segments[segment]
        shown = f"top {top} of {len(rows)} by rows" if len(rows) > top + 1 else f"all {len(rows)}"
        lines += ["", f"## By {title} ({shown})", "", _segment_table(_top(rows, top), title)]
    if extra:
        lines += ["", "## Run", "", _table(["field", "value"], [[k, v] for k, v in extra.items()])]
    if plots:
        # Relative image links: report.md renders with its plots beside it; the UI artifact inlines them.
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots.values()]
    return "\n".join(lines) + "\n"


def replace_report_section(report: str | Path, key: str, markdown: str) -> Path:
    """Put ``markdown`` into ``report`` between ``<!-- key:begin -->`` and ``<!-- key:end -->``, replacing the
    section an earlier call wrote (so a rerun does not stack copies); appended at the end the first time."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    report = Path(report)
    text = report.read_text(encoding="utf-8") if report.exists() else ""
    before, _, rest = text.partition(begin)
    after = rest.partition(end)[2] if rest else ""
    return write_text_atomic(report, f"{before.rstrip()}\n\n{begin}\n{markdown.rstrip()}\n{end}\n{after.lstrip()}")


# --- plots ----------------------------------------------------------------------------------------

_COLOURS = {"actual": "#222222", "model": "#d62728", "ensemble": "#ff7f0e", "reference": "#8c564b", "trees": "#e377c2",
            "baseline": "#1f77b4", "mean3": "#2ca02c", "zeros": "#7f7f7f", "reference_calibrated": "#bcbd22",
            "model_uncalibrated": "#9467bd"}  # fmt: skip


def _figure(**kwargs: Any) -> Figure:
    # An Agg canvas on a bare Figure renders without pyplot: no global backend switch, no display,
    # no figure registry to leak from worker threads.
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata, so a rerun on the same numbers writes the same bytes.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _month_ticks(ax: Any, months: np.ndarray, first_month: str) -> None:
    step = max(1, int(math.ceil(len(months) / 12)))
    shown = months[::step]
    ax.set_xticks(shown)
    ax.set_xticklabels([forecast_month_label(int(m), first_month) for m in shown], rotation=45, ha="right")


def plot_totals(
    evaluation: Evaluation, history: pd.DataFrame | None = None, forecast_total: float | None = None
) -> bytes:
    """Total monthly sales (sum of clipped pair counts) over time, with the holdout month's predictions."""
    fig = _figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    month = evaluation.month if evaluation.month is not None else 0
    months: list[int] = [month]
    if history is not None and len(history):
        hist = history.sort_values("date_block_num")
        x = hist["date_block_num"].to_numpy(dtype=np.int64)
        months += x.tolist()
        ax.plot(x, hist["actual"].to_numpy(), color=_COLOURS["actual"], marker=".", label="actual")
        for name in ("model", "baseline", "mean3"):
            if name in hist.columns:
                ax.plot(x, hist[name].to_numpy(), color=_COLOURS[name], linestyle="--", label=f"{name} (backtest)")
    ax.scatter(
        [month],
        [evaluation.totals["actual"]],
        color=_COLOURS["actual"],
        s=60,
        zorder=3,
        label=None if history is not None else "actual",
    )
    for name, marker in (("baseline", "s"), ("mean3", "^"), ("model", "*")):
        ax.scatter(
            [month],
            [evaluation.totals[name]],
            color=_COLOURS[name],
            marker=marker,
            s=90,
            zorder=4,
            label=f"{PREDICTOR_LABELS[name]} (holdout)",
        )
    if forecast_total is not None and evaluation.month is not None:
        months.append(month + 1)
        ax.scatter(
            [month + 1],
            [forecast_total],
            color="#9467bd",
            marker="D",
            s=60,
            zorder=4,
            label="exported forecast (test pairs)",
        )
    ax.axvline(month, color="#bbbbbb", linewidth=1, zorder=0)
    _month_ticks(ax, np.unique(np.asarray(months)), evaluation.first_month)
    ax.set_ylabel("units (sum of pair counts clipped to [0, 20])")
    ax.set_ylim(bottom=0)
    ax.set_title("Total monthly sales: actual vs predicted")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig)


_LOG_TICKS = np.array([0, 1, 2, 3, 5, 10, 20], dtype=np.float64)


def plot_pairs(evaluation: Evaluation) -> bytes:
    """Predicted vs actual per pair, log1p axes, for the model and the baseline side by side."""
    pairs = evaluation._pairs
    if pairs is None:
        raise ValueError("this Evaluation has no pair-level data (rebuilt from JSON?); cannot plot pairs")
    low, high = evaluation.clip
    extent_max = float(np.log1p(max(high, 1.0)))
    fig = _figure(figsize=(10, 4.8))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    ticks = _LOG_TICKS[(_LOG_TICKS >= low) & (_LOG_TICKS <= high)]
    x = np.log1p(np.maximum(pairs["actual"], 0.0))
    for ax, name in zip(axes, ("model", "baseline"), strict=True):
        y = np.log1p(np.maximum(pairs[name], 0.0))
        hb = ax.hexbin(
            x, y, gridsize=30, bins="log", mincnt=1, cmap="viridis", extent=(0.0, extent_max, 0.0, extent_max)
        )
        ax.plot([0, extent_max], [0, extent_max], color="#d62728", linewidth=1)
        ax.set_xticks(np.log1p(ticks))
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_yticks(np.log1p(ticks))
        ax.set_yticklabels([f"{t:g}" for t in ticks])
        ax.set_xlabel("actual (clipped)")
        ax.set_title(f"{PREDICTOR_LABELS[name]}: RMSE {evaluation.overall[name].rmse:.3f}")
        fig.colorbar(hb, ax=ax, label="pairs (log)")
    axes[0].set_ylabel("predicted (clipped)")
    fig.suptitle(f"Predicted vs actual per pair ({evaluation.rows:,} pairs, log1p axes)")
    fig.tight_layout()
    return _png(fig)


def plot_segments(evaluation: Evaluation, top: int = 8) -> bytes:
    """RMSE of each predictor by novelty segment and for the biggest categories."""
    short = {"new_item": "new item", "new_pair": "new pair", "existing_pair": "existing pair"}
    groups = [
        ("novelty", evaluation.segments["novelty"], lambda r: short.get(r.key, r.key)),
        ("category (biggest by rows)", evaluation.segments["category"][:top], lambda r: r.label[:30]),
    ]
    fig = _figure(figsize=(11, 6))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 3]})
    predictors = evaluation.predictors
    width = 0.8 / len(predictors)
    for ax, (title, rows, label) in zip(axes, groups, strict=True):
        positions = np.arange(len(rows))
        for i, name in enumerate(predictors):
            ax.barh(
                positions + (i - (len(predictors) - 1) / 2) * width,
                [r.metrics[name].rmse for r in rows],
                height=width,
                color=_COLOURS[name],
                label=PREDICTOR_LABELS[name] if ax is axes[0] else None,
            )
        ax.set_yticks(positions)
        ax.set_yticklabels([f"{label(r)}\n(n={r.rows:,})" for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("RMSE (clipped)")
        ax.set_title(f"by {title}")
        ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="upper center", ncols=len(predictors), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _png(fig)


def write_report(
    evaluation: Evaluation,
    run_dir: str | Path,
    *,
    exported: str,
    reason: str,
    extra: Mapping[str, Any] | None = None,
    history: pd.DataFrame | None = None,
    forecast_total: float | None = None,
    decision: Mapping[str, Any] | None = None,
    top: int = 10,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and the PNG plots into ``run_dir``, each atomically.

    ``history`` (``date_block_num, actual`` and optionally backtest ``model``/``baseline``/``mean3`` totals,
    e.g. from :func:`monthly_totals`) draws the months before the holdout; ``forecast_total`` adds the
    exported forecast's total at the month after. The pair scatter needs the pair-level data that
    :func:`evaluate` keeps in memory and is skipped for an Evaluation rebuilt from JSON.
    Returns the written paths by name: ``metrics``, ``report`` and the ``*_plot`` keys of :data:`PLOT_FILES`.
    """
    run_dir = Path(run_dir)
    images: dict[str, bytes] = {"totals_plot": plot_totals(evaluation, history, forecast_total)}
    if evaluation._pairs is not None:
        images["pairs_plot"] = plot_pairs(evaluation)
    images["segments_plot"] = plot_segments(evaluation)

    paths: dict[str, Path] = {}
    for key, data in images.items():
        paths[key] = write_bytes_atomic(run_dir / PLOT_FILES[key], data)
    plots = {key: PLOT_FILES[key] for key in images}
    metrics = evaluation.to_dict() | {
        "exported": exported,
        "reason": reason,
        "decision": dict(decision or {}),
        "extra": dict(extra or {}),
        "plots": plots,
    }
    paths["metrics"] = write_json_atomic(run_dir / METRICS_FILE, metrics)
    report = render_report(
        evaluation, exported=exported, reason=reason, extra=extra, plots=plots, top=top, decision=decision
    )
    paths["report"] = write_text_atomic(run_dir / REPORT_FILE, report)
    return paths


# --- the whole step, as the orchestration calls it ----------------------------------------------


def _names(reference_dir: Path, table: str, id_column: str, name_column: str) -> dict[int, str] | None:
    path = reference_dir / f"{table}.parquet"
    if not path.exists():
        return None
    frame = pd.read_parquet(path, columns=[id_column, name_column])
    return dict(zip(frame[id_column].astype(int), frame[name_column].astype(str), strict=True))


def _forecast_frame(store: Any, predictions: pd.DataFrame, clip: tuple[float, float]) -> pd.DataFrame:
    """Every candidate forecast of the store's forecast pairs side by side, by ``ID``."""
    forecast = store.forecast_frame()
    frame = {"ID": forecast["ID"].to_numpy()}
    frame |= {name: predictions[name].to_numpy(np.float32) for name in ("model", *OPTIONAL_PREDICTORS)
              if name in predictions}  # fmt: skip
    frame["baseline"] = np.clip(forecast["prev"].to_numpy(dtype=np.float32), *clip)
    return pd.DataFrame(frame)


def evaluate_run(
    config: Any,
    windows_dir: str | Path,
    final_windows_dir: str | Path,
    run_dir: str | Path,
    selection: Mapping[str, Any],
) -> dict[str, Any]:
    """Score the holdout refit's predictions, let the gate decide, and write the run's report and forecast.

    The holdout month's predictions come from ``run_dir/holdout`` (models refitted through the validation
    month), the forecast's from ``run_dir/final`` (refitted through the last month); ``core.protocol`` wrote
    both. The gate (:func:`core.gate.decide`) decides on the validation-month scores in ``selection``; every
    candidate goes to ``run_dir/forecast.parquet`` so that export only picks the decided column.
    """
    from core import gate, protocol
    from core.aggregate import read_monthly
    from core.files import atomic_path
    from core.lake import LakePaths
    from core.window_store import WindowStore

    paths = LakePaths.of(config)
    store = WindowStore.open(windows_dir)
    clip = config.windows.clip
    run_dir = Path(run_dir)
    predictions = protocol.read_predictions(run_dir / "holdout", "holdout")
    holdout_month = int(store.meta["holdout_month"])
    evaluation = evaluate(
        store.holdout_frame(),
        predictions["model"].to_numpy(),
        clip,
        _names(paths.reference, "item_categories", "item_category_id", "item_category_name"),
        shop_names=_names(paths.reference, "shops", "shop_id", "shop_name"),
        month=holdout_month,
        first_month=config.ingest.first_month,
        others={name: predictions[name].to_numpy() for name in OPTIONAL_PREDICTORS if name in predictions},
    )
    candidates = {k: v for k, v in selection["validation_rmse"].items() if k in ("model", "ensemble", "baseline")}
    decision = gate.decide(
        candidates,
        fallback=config.export.fallback,
        validation_month=selection["validation_month"],
        blend_weight=selection["blend_weight"],
        launch_blend_weight=selection.get("launch_blend_weight"),
    )

    final = WindowStore.open(final_windows_dir)
    forecast = _forecast_frame(final, protocol.read_predictions(run_dir / "final", "forecast"), clip)
    with atomic_path(run_dir / FORECAST_FILE) as tmp:
        forecast.to_parquet(tmp, index=False)

    monthly = read_monthly(paths)
    history = monthly_totals(monthly[monthly["date_block_num"] < holdout_month], clip)
    exported_rmse = evaluation.overall[decision.exported].rmse
    written = write_report(
        evaluation, run_dir, exported=decision.exported, reason=decision.reason, history=history,
        forecast_total=float(forecast[decision.exported].sum()), decision=decision.to_dict(),
        extra={"model": config.model.kind, "units": config.model.units, "depth": config.model.depth,
               "lookback": config.windows.lookback, "validation_month": selection["validation_month"],
               "holdout_month": holdout_month, "forecast_month": int(final.meta["forecast_month"]),
               "epochs (selected on the validation month)": selection["epochs"],
               "reference boosting rounds": selection["rounds"],
               "model weight in the ensemble": selection["blend_weight"],
               "model weight in the ensemble, launch-month items": selection.get("launch_blend_weight"),
               "launch scales (validation month; core.calibration)": ", ".join(
                   f"{name} {scale:g}" for name, scale in (selection.get("launch_scales") or {}).items()) or None},
    )  # fmt: skip
    return {
        "model_rmse": evaluation.model_rmse,
        "baseline_rmse": evaluation.baseline_rmse,
        **{f"{name}_rmse": evaluation.overall[name].rmse for name in OPTIONAL_PREDICTORS if name in evaluation.overall},
        "beats_baseline": evaluation.beats_baseline,
        "exported": decision.exported,
        "exported_rmse": exported_rmse,
        "reason": decision.reason,
        "decision": decision.to_dict(),
        "holdout_month": holdout_month,
        "headline": evaluation.headline(),
        "forecast": str(run_dir / FORECAST_FILE),
        **{name: str(path) for name, path in written.items()},
    }
