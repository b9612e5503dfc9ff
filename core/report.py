"""A forecast run's report (``report.md``) and its plots: what was exported, how it scored against every other
forecaster, why it was chosen, and where it erred.

The verdict comes first and hides nothing: the exported forecast's holdout RMSE, and every forecaster that scored
better on that month, with how much. Months read as calendar months throughout. Pure rendering from the gate's
inputs (``core.gate.gate_run`` calls it); plots are PNGs written beside the report, inlined by the UI artifact.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core import forecasters
from core.display import change, four, month_label, versus
from core.evaluate import Evaluation, Metrics, SegmentRow
from core.files import write_bytes_atomic, write_text_atomic
from core.lake import REPORT_FILE

PLOT_FILES: dict[str, str] = {
    "totals_plot": "monthly_totals.png",
    "pairs_plot": "predicted_vs_actual.png",
    "segments_plot": "error_by_segment.png",
}
EXPORTED_COLOUR = "#111111"
ACTUAL_COLOUR = "#222222"


def label(name: str) -> str:
    """A forecaster's name in the report (``champion`` included)."""
    return "the champion's forecast" if name == "champion" else forecasters.label(name)


def short(name: str) -> str:
    return "champion" if name == "champion" else forecasters.short(name)


def colour(name: str) -> str:
    return "#17becf" if name == "champion" else forecasters.colour(name)


# --- the verdict ---------------------------------------------------------------------------------


def better_than(scores: Mapping[str, float], exported: str) -> list[tuple[str, float]]:
    """Every forecaster whose holdout RMSE is below the exported one's, best first."""
    value = scores[exported]
    return sorted(((name, s) for name, s in scores.items() if name != exported and s < value), key=lambda x: x[1])


def verdict(scores: Mapping[str, float], exported: str, month: str, forecast_month: str | None = None) -> str:
    """One paragraph: what was exported and its holdout RMSE against the previous month, then every forecaster that
    beat it on that month, with how much."""
    value, previous = scores[exported], scores["baseline"]
    target = f" for {forecast_month}" if forecast_month else ""
    text = (f"Exported {label(exported)}{target}: on the holdout month {month} it scored RMSE {four(value)}, "
            f"{versus(value, previous, f'the previous month ({four(previous)})')}.")
    beaten = better_than(scores, exported)
    if beaten:
        text += " Better on that month: " + "; ".join(
            f"{label(name)} {four(s)} ({change(s, value)} than the export)" for name, s in beaten) + "."
        text += " The export was chosen on the validation months, before the holdout month was seen."
    else:
        text += " No other forecaster scored better on that month."
    return text


# --- tables --------------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: the first column left-aligned (names), the rest right-aligned (numbers)."""
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
    return SegmentRow(key="other", label=f"all other ({len(rows)})", rows=n,
                      actual_mean=sum(r.actual_mean * r.rows for r in rows) / n, metrics=metrics)


def _top(rows: list[SegmentRow], top: int) -> list[SegmentRow]:
    return rows if len(rows) <= top + 1 else rows[:top] + [_pooled(rows[top:])]


def segment_columns(evaluation: Evaluation, exported: str) -> list[str]:
    """The forecasters a segment table shows: the export, the other trained forecasters and the previous month
    (mean of 3 and zeros stay in the overall table, so the segment tables fit a page)."""
    shown = [exported] + [p for p in evaluation.predictors if p in forecasters.PREDICTED and p != exported]
    return shown + ["baseline"]


def segment_table(rows: list[SegmentRow], title: str, columns: list[str], exported: str) -> str:
    header = [title, "rows", "actual mean", *(f"{short(p)} RMSE" + (" (exported)" if p == exported else "")
                                            for p in columns), "exported vs previous month"]
    body = [[r.label, f"{r.rows:,}", f"{r.actual_mean:.3f}", *(four(r.metrics[p].rmse) for p in columns),
             change(r.metrics[exported].rmse, r.metrics["baseline"].rmse)] for r in rows]
    return table(header, body)


def overall_table(evaluation: Evaluation, exported: str, forecast_totals: Mapping[str, float]) -> str:
    exported_rmse = evaluation.overall[exported].rmse
    rows = []
    for p in evaluation.predictors:
        m = evaluation.overall[p]
        rows.append([label(p) + (" **(exported)**" if p == exported else ""), four(m.rmse), four(m.mae),
                     "—" if p == "baseline" else change(m.rmse, evaluation.baseline_rmse),
                     "—" if p == exported else change(m.rmse, exported_rmse),
                     f"{evaluation.totals[p]:,.0f}",
                     f"{forecast_totals[p]:,.0f}" if p in forecast_totals else "—"])
    rows.append(["actual", "", "", "", "", f"{evaluation.totals['actual']:,.0f}", ""])
    return table(["forecaster", "RMSE", "MAE", "vs previous month", "vs exported", "holdout total",
                  "forecast total"], rows)


def validation_table(by_month: Mapping[str, Mapping[str, float]], first_month: str) -> str:
    """Every candidate's RMSE in each validation month and their mean (what the gate ranked)."""
    months = sorted({int(m) for scores in by_month.values() for m in scores})
    names = [n for n in (*forecasters.CANDIDATES, "baseline") if n in by_month]
    rows = [[label(n), *(four(by_month[n].get(str(m))) for m in months),
             four(float(np.mean([by_month[n][str(m)] for m in months])))] for n in names]
    return table(["candidate", *(month_label(m, first_month) for m in months), "mean"], rows)


# --- the report ----------------------------------------------------------------------------------


def render_report(
    evaluation: Evaluation,
    *,
    exported: str,
    reason: str,
    forecast_month: int | None = None,
    selection: Mapping[str, Any] | None = None,
    champion: str | None = None,
    forecast_totals: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    plots: Mapping[str, str] | None = None,
    top: int = 10,
) -> str:
    """``report.md``: the verdict, every forecaster on the holdout month, how the export was chosen (validation
    months, blend, champion), the segments, the run's settings and the plots."""
    first = evaluation.first_month
    month = evaluation.month_label or "the holdout month"
    scores = {p: evaluation.overall[p].rmse for p in evaluation.predictors}
    forecast = month_label(forecast_month, first) if forecast_month is not None else None
    low, high = evaluation.clip
    lines = [
        f"# Forecast{f' for {forecast}' if forecast else ''} — holdout month {month}",
        "",
        f"**{verdict(scores, exported, month, forecast)}**",
        "",
        f"Why this one: {reason.rstrip('.')}.",
        "",
        f"## Every forecaster on the holdout month {month} ({evaluation.rows:,} shop × item pairs, predictions "
        f"clipped to [{low:g}, {high:g}])",
        "",
        overall_table(evaluation, exported, forecast_totals or {}),
    ]
    if selection and selection.get("validation_rmse_by_month"):
        lines += _selection_lines(selection, first)
    if champion:
        lines += ["", "## Champion and challenger", "", champion]
    lines += _segment_lines(evaluation, exported, top)
    if extra:
        lines += ["", "## Run", "", table(["field", "value"], [[k, v] for k, v in extra.items()])]
    if plots:
        # Relative image links: report.md renders with its plots beside it; the UI artifact inlines them.
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots.values()]
    return "\n".join(lines) + "\n"


def _selection_lines(selection: Mapping[str, Any], first: str) -> list[str]:
    """How the export was chosen: the validation months' table, the blend weights, the launch scales."""
    months = [month_label(m, first) for m in selection.get("validation_months", [])]
    lines = ["", f"## How the export was chosen: validation months {', '.join(months)}", "",
             "Each candidate trained on the months before the first validation month; the gate ranks their "
             "mean RMSE over the validation months, each month counting alike. The holdout month took no "
             "part.", "", validation_table(selection["validation_rmse_by_month"], first)]
    blend = selection.get("blend")
    if blend:
        lines += ["", f"Ensemble: {blend['known']:g} × model + {1 - blend['known']:g} × LightGBM"
                  + (f"; for items in their launch month {blend['launch']:g} × model + "
                     f"{1 - blend['launch']:g} × LightGBM" if blend["launch"] != blend["known"] else "")
                  + " (each validation month's best weight, averaged)."]
    if selection.get("launch_scales"):
        lines += ["", "Launch scales (geometric mean of each validation month's): " + ", ".join(
            f"{short(n)} {s:g}" for n, s in selection["launch_scales"].items()) + "."]
    return lines


def _segment_lines(evaluation: Evaluation, exported: str, top: int) -> list[str]:
    """The novelty segments, then the ``top`` categories and shops by rows."""
    columns = segment_columns(evaluation, exported)
    lines = ["", "## By novelty", "", segment_table(evaluation.segments["novelty"], "segment", columns, exported)]
    for segment in ("category", "shop"):
        rows = evaluation.segments[segment]
        shown = f"top {top} of {len(rows)} by rows" if len(rows) > top + 1 else f"all {len(rows)}"
        lines += ["", f"## By {segment} ({shown})", "", segment_table(_top(rows, top), segment, columns, exported)]
    return lines


def replace_report_section(report: str | Path, key: str, markdown: str) -> Path:
    """Put ``markdown`` into ``report`` between ``<!-- key:begin -->`` and ``<!-- key:end -->``, replacing the
    section an earlier call wrote (so a rerun does not stack copies); appended at the end the first time."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    report = Path(report)
    text = report.read_text(encoding="utf-8") if report.exists() else ""
    before, _, rest = text.partition(begin)
    after = rest.partition(end)[2] if rest else ""
    return write_text_atomic(report, f"{before.rstrip()}\n\n{begin}\n{markdown.rstrip()}\n{end}\n{after.lstrip()}")


# --- plots ---------------------------------------------------------------------------------------


def figure(**kwargs: Any) -> Figure:
    """A bare Figure on an Agg canvas: renders without pyplot (no global backend, no display, no registry to leak
    from worker threads)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata, so a rerun on the same numbers writes the same bytes.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def month_ticks(ax: Any, months: np.ndarray, first_month: str) -> None:
    step = max(1, int(math.ceil(len(months) / 12)))
    shown = months[::step]
    ax.set_xticks(shown)
    ax.set_xticklabels([month_label(int(m), first_month) for m in shown], rotation=45, ha="right")


def legend_below(fig: Figure, ax: Any, entries: int) -> None:
    """The legend under the axes, in as many columns as fit, with room made for it (never clipped)."""
    columns = min(entries, 3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=columns, frameon=False)
    fig.tight_layout()


def plot_totals(evaluation: Evaluation, exported: str, history: pd.DataFrame | None = None,
                forecast_total: float | None = None) -> bytes:
    """Total monthly sales (sum of clipped pair counts): the history, the holdout month's totals of the export and
    the previous month, and the exported forecast's total for the next month."""
    fig = figure(figsize=(9, 5))
    ax = fig.add_subplot()
    month = evaluation.month if evaluation.month is not None else 0
    months: list[int] = [month]
    if history is not None and len(history):
        hist = history.sort_values("date_block_num")
        x = hist["date_block_num"].to_numpy(dtype=np.int64)
        months += x.tolist()
        ax.plot(x, hist["actual"].to_numpy(), color=ACTUAL_COLOUR, marker=".", label="actual")
    ax.scatter([month], [evaluation.totals["actual"]], color=ACTUAL_COLOUR, s=60, zorder=3,
               label=None if history is not None and len(history) else "actual")
    shown = [exported] + [p for p in ("baseline",) if p != exported]
    for name, marker in zip(shown, ("*", "s"), strict=False):
        ax.scatter([month], [evaluation.totals[name]], color=EXPORTED_COLOUR if name == exported else colour(name),
                   marker=marker, s=110, zorder=4,
                   label=f"{label(name)}{' (exported)' if name == exported else ''}, holdout")
    if forecast_total is not None and evaluation.month is not None:
        months.append(month + 1)
        ax.scatter([month + 1], [forecast_total], color=EXPORTED_COLOUR, marker="D", s=70, zorder=4,
                   label=f"exported forecast, {month_label(month + 1, evaluation.first_month)}")
    ax.axvline(month, color="#bbbbbb", linewidth=1, zorder=0)
    month_ticks(ax, np.unique(np.asarray(months)), evaluation.first_month)
    ax.set_ylabel("units (sum of pair counts clipped to [0, 20])")
    ax.set_ylim(bottom=0)
    ax.set_title("Total monthly sales: actual, the holdout month and the exported forecast")
    ax.grid(alpha=0.3)
    legend_below(fig, ax, 4)
    return png(fig)


_LOG_TICKS = np.array([0, 1, 2, 3, 5, 10, 20], dtype=np.float64)


def plot_pairs(evaluation: Evaluation, exported: str) -> bytes:
    """Predicted vs actual per pair on the holdout month, log1p axes: the export beside the previous month."""
    pairs = evaluation._pairs
    if pairs is None:
        raise ValueError("this Evaluation has no pair-level data (rebuilt from JSON?); cannot plot pairs")
    low, high = evaluation.clip
    extent_max = float(np.log1p(max(high, 1.0)))
    fig = figure(figsize=(10, 4.8))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    ticks = _LOG_TICKS[(_LOG_TICKS >= low) & (_LOG_TICKS <= high)]
    x = np.log1p(np.maximum(pairs["actual"], 0.0))
    for ax, name in zip(axes, (exported, "baseline"), strict=True):
        y = np.log1p(np.maximum(pairs[name], 0.0))
        hb = ax.hexbin(x, y, gridsize=30, bins="log", mincnt=1, cmap="viridis",
                       extent=(0.0, extent_max, 0.0, extent_max))
        ax.plot([0, extent_max], [0, extent_max], color="#d62728", linewidth=1)
        ax.set_xticks(np.log1p(ticks), [f"{t:g}" for t in ticks])
        ax.set_yticks(np.log1p(ticks), [f"{t:g}" for t in ticks])
        ax.set_xlabel("actual (clipped)")
        suffix = " (exported)" if name == exported else ""
        ax.set_title(f"{short(name)}{suffix}: RMSE {evaluation.overall[name].rmse:.3f}")
        fig.colorbar(hb, ax=ax, label="pairs (log)")
    axes[0].set_ylabel("predicted (clipped)")
    fig.suptitle(f"Predicted vs actual per pair, {evaluation.month_label} ({evaluation.rows:,} pairs, log1p axes)")
    fig.tight_layout()
    return png(fig)


def plot_segments(evaluation: Evaluation, exported: str, top: int = 8) -> bytes:
    """:func:`segments_figure` as PNG."""
    return png(segments_figure(evaluation, exported, top))


def segments_figure(evaluation: Evaluation, exported: str, top: int = 8) -> Figure:
    """RMSE by novelty segment and for the biggest categories: the export, the other trained forecasters and the
    previous month, with a legend below the bars that names every one."""
    names = {"new_item": "new item", "new_pair": "new pair", "existing_pair": "existing pair"}
    groups = [
        ("novelty", evaluation.segments["novelty"], lambda r: names.get(r.key, r.key)),
        ("category (biggest by rows)", evaluation.segments["category"][:top], lambda r: r.label[:30]),
    ]
    columns = segment_columns(evaluation, exported)
    fig = figure(figsize=(11, 6.5))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 3]})
    width = 0.8 / len(columns)
    for ax, (title, rows, row_label) in zip(axes, groups, strict=True):
        positions = np.arange(len(rows))
        for i, name in enumerate(columns):
            ax.barh(positions + (i - (len(columns) - 1) / 2) * width, [r.metrics[name].rmse for r in rows],
                    height=width, color=EXPORTED_COLOUR if name == exported else colour(name),
                    label=(f"{short(name)} (exported)" if name == exported else short(name))
                    if ax is axes[0] else None)
        ax.set_yticks(positions, [f"{row_label(r)}\n(n={r.rows:,})" for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("RMSE (clipped)")
        ax.set_title(f"by {title}")
        ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="lower center", ncols=min(len(columns), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def write_report(
    evaluation: Evaluation,
    run_dir: str | Path,
    *,
    exported: str,
    reason: str,
    history: pd.DataFrame | None = None,
    forecast_totals: Mapping[str, float] | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """Write ``report.md`` and its PNG plots into ``run_dir``, each atomically; returns the paths by name
    (``report`` and the ``*_plot`` keys of :data:`PLOT_FILES`). The pair plot needs the pair-level values that
    ``core.evaluate.evaluate`` keeps in memory and is skipped for an Evaluation rebuilt from JSON."""
    run_dir = Path(run_dir)
    totals = dict(forecast_totals or {})
    images: dict[str, bytes] = {"totals_plot": plot_totals(evaluation, exported, history, totals.get(exported))}
    if evaluation._pairs is not None and exported in evaluation._pairs:
        images["pairs_plot"] = plot_pairs(evaluation, exported)
    images["segments_plot"] = plot_segments(evaluation, exported)
    paths = {key: write_bytes_atomic(run_dir / PLOT_FILES[key], data) for key, data in images.items()}
    plots = {key: PLOT_FILES[key] for key in images}
    text = render_report(evaluation, exported=exported, reason=reason, forecast_totals=totals, plots=plots, **kwargs)
    paths["report"] = write_text_atomic(run_dir / REPORT_FILE, text)
    return paths
