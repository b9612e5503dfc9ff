"""How numbers and months read to a person: the console summary, the run's summary artifact, the report.

Pure formatting (no Prefect, no I/O). Scores show four decimals (RMSE differences that matter here are in the
third), months as calendar months (``date_block_num`` 0 is the config's ``first_month``), comparisons as
"x % better/worse than the previous month" rather than a signed "relative improvement".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from core.lake import forecast_month_label


def four(value: float | None) -> str:
    """A score with four decimals; ``—`` for a missing one."""
    return "—" if value is None else f"{value:.4f}"


def month_label(month: int, first_month: str = "2013-01") -> str:
    return forecast_month_label(int(month), first_month)


def month_range(months: Iterable[int], first_month: str = "2013-01") -> str:
    """``2013-01 – 2014-04 (16 months)``; a gap in the months is said, not hidden."""
    ordered = sorted({int(m) for m in months})
    if not ordered:
        return "no months"
    first, last = month_label(ordered[0], first_month), month_label(ordered[-1], first_month)
    count = f"{len(ordered)} month{'s' if len(ordered) != 1 else ''}"
    missing = (ordered[-1] - ordered[0] + 1) - len(ordered)
    gap = f", {missing} missing" if missing else ""
    return f"{first} ({count})" if len(ordered) == 1 else f"{first} – {last} ({count}{gap})"


def versus(value: float, reference: float, what: str = "the previous month") -> str:
    """``11.5 % better than the previous month`` (lower RMSE is better); ``the same as`` within 0.05 %."""
    if reference <= 0:
        return f"n/a against {what} (its RMSE is 0)"
    said = change(value, reference)
    return f"the same as {what}" if said == "the same" else f"{said} than {what}"


def change(value: float, reference: float) -> str:
    """``11.5 % better`` / ``3.0 % worse`` (lower RMSE is better), ``the same`` within 0.05 %, for a table cell."""
    if reference <= 0:
        return "n/a"
    relative = (reference - value) / reference
    if abs(relative) < 0.0005:
        return "the same"
    return f"{abs(relative):.1%} {'better' if relative > 0 else 'worse'}".replace("%", " %", 1)


def ratio(value: float, reference: float) -> float | None:
    """``value / reference`` to four decimals (below 1: better than the reference)."""
    return None if reference <= 0 else round(value / reference, 4)


def forecaster_label(name: str) -> str:
    """What a reader calls a forecaster (the champion's forecast included)."""
    from core import forecasters

    return "the champion's forecast" if name == "champion" else forecasters.short(name)


def verdict(summary: Mapping[str, Any], first_month: str = "2013-01") -> str:
    """The run's verdict in one line: what was exported for which month, its holdout RMSE against the previous
    month, and every forecaster that scored better on that month (with how much)."""
    holdout = month_label(summary["holdout_month"], first_month)
    forecast = summary.get("forecast_month")
    target = f" for {month_label(forecast, first_month)}" if forecast is not None else ""
    exported, value, baseline = summary["exported"], summary["exported_rmse"], summary["baseline_rmse"]
    text = (f"Exported {forecaster_label(exported)}{target}: holdout {holdout} RMSE {four(value)}, "
            f"{versus(value, baseline, f'the previous month ({four(baseline)})')}.")
    beaten = summary.get("beaten_by") or {}
    if beaten:
        text += " Better on that month: " + ", ".join(
            f"{forecaster_label(name)} {four(score)} ({change(score, value)})" for name, score in beaten.items()) + "."
    return text


def _scores(summary: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(label, holdout RMSE) of every forecaster the run scored, in report order."""
    return [(forecaster_label(name), value) for name, value in (summary.get("holdout_rmse") or {}).items()]


def forecast_summary_lines(summary: Mapping[str, Any], first_month: str = "2013-01") -> list[str]:
    """The console summary of a forecast run: the verdict first, then the scores, the paths, the run's URL."""
    holdout = month_label(summary["holdout_month"], first_month)
    validation = ", ".join(month_label(m, first_month) for m in summary["validation_months"])
    lines = [
        verdict(summary, first_month),
        "",
        f"holdout {holdout} RMSE: " + ", ".join(f"{name} {four(value)}" for name, value in _scores(summary)),
        f"chosen on:  validation months {validation}"
        + (f", {summary['epochs']} epoch(s)" if summary.get("epochs") is not None else ""),
    ]
    if summary.get("months"):
        samples = f", {training_samples(summary)}" if summary.get("train_samples") else ""
        lines.append(f"lake:       {month_range(summary['months'], first_month)}{samples}")
    lines += [
        f"submission: {summary['submission']}",
        f"report:     {summary['report']}",
        f"run:        {summary['run_dir']}",
    ]
    if summary.get("flow_run_url"):
        lines.append(f"flow run:   {summary['flow_run_url']}")
    return lines


def training_samples(summary: Mapping[str, Any]) -> str:
    """``10,333,657 training samples (600,000 drawn afresh each epoch, weighted)`` when the sample budget drew."""
    count, budget = int(summary["train_samples"]), summary.get("sample_budget")
    drawn = f" ({int(budget):,} drawn afresh each epoch, weighted)" if budget and count > int(budget) else ""
    return f"{count:,} training samples{drawn}"


def summary_rows(summary: Mapping[str, Any], first_month: str = "2013-01") -> list[tuple[str, str]]:
    """The summary artifact's rows: the verdict first, readable names, four decimals, calendar months."""
    rows: list[tuple[str, str]] = [
        ("verdict", verdict(summary, first_month)),
        ("forecast month", month_label(summary["forecast_month"], first_month)
         if summary.get("forecast_month") is not None else "—"),
        ("holdout month", month_label(summary["holdout_month"], first_month)),
        ("validation months", ", ".join(month_label(m, first_month) for m in summary["validation_months"])),
        ("months in the lake", month_range(summary["months"], first_month)),
        ("rows read / accepted / quarantined",
         f"{summary['rows_in']:,} / {summary['rows_accepted']:,} / {summary['rows_quarantined']:,}"),
        ("training samples", training_samples(summary).removesuffix(" training samples")),
        ("epochs (selected)", str(summary["epochs"])),
    ]
    rows += [(f"{name} RMSE", four(value)) for name, value in _scores(summary)]
    rows += [("exported", forecaster_label(summary["exported"])), ("exported RMSE", four(summary["exported_rmse"])),
             ("why", summary.get("reason") or "—"), ("data directory", f"`{summary['data_dir']}`"),
             ("run directory", f"`{summary['run_dir']}`"), ("submission", f"`{summary['submission']}`"),
             ("report", f"`{summary['report']}`")]
    return rows
