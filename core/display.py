"""How numbers and months read to a person: the console summary, the run's summary artifact, the report.

Pure formatting (no Prefect, no I/O). Scores show four decimals (RMSE differences that matter here are in the
third), months as calendar months (``date_block_num`` 0 is the config's ``first_month``), comparisons as
"x % better/worse than the previous month" rather than a signed "relative improvement".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from core.lake import forecast_month_label

#: Summary score keys -> what a reader calls them, in the order they are shown.
SCORE_LABELS: dict[str, str] = {
    "model_rmse": "model",
    "ensemble_rmse": "ensemble",
    "reference_rmse": "LightGBM reference",
    "baseline_rmse": "previous month",
}


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


def forecast_summary_lines(summary: Mapping[str, Any], first_month: str = "2013-01") -> list[str]:
    """The console summary of a forecast run: the verdict first, then the scores, the paths, the run's URL."""
    holdout = month_label(summary["holdout_month"], first_month)
    validation = month_label(summary["validation_month"], first_month)
    forecast = summary.get("forecast_month")
    target = f" for {month_label(forecast, first_month)}" if forecast is not None else ""
    exported, baseline = summary["exported"], summary["baseline_rmse"]
    lines = [
        f"Exported the {exported} forecast{target}: on the holdout month {holdout} it scored RMSE "
        f"{four(summary['exported_rmse'])}, {versus(summary['exported_rmse'], baseline)} "
        f"({four(baseline)}).",
        "",
        f"holdout {holdout} RMSE: "
        + ", ".join(f"{label} {four(summary[key])}" for key, label in SCORE_LABELS.items()
                    if summary.get(key) is not None),  # fmt: skip
        f"chosen on:  validation month {validation}"
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
    """The summary artifact's rows: readable names, four decimals, months as a calendar range."""
    baseline = summary["baseline_rmse"]
    rows: list[tuple[str, str]] = [
        ("verdict", f"exported the {summary['exported']} forecast, "
                    f"{versus(summary['exported_rmse'], baseline)} on the holdout month"),  # fmt: skip
        ("forecast month", month_label(summary["forecast_month"], first_month)
         if summary.get("forecast_month") is not None else "—"),  # fmt: skip
        ("holdout month", month_label(summary["holdout_month"], first_month)),
        ("validation month", month_label(summary["validation_month"], first_month)),
        ("months in the lake", month_range(summary["months"], first_month)),
        ("rows read / accepted / quarantined",
         f"{summary['rows_in']:,} / {summary['rows_accepted']:,} / {summary['rows_quarantined']:,}"),
        ("training samples", training_samples(summary).removesuffix(" training samples")),
        ("epochs (selected)", str(summary["epochs"])),
    ]  # fmt: skip
    rows += [(f"{label} RMSE", four(summary[key])) for key, label in SCORE_LABELS.items()
             if summary.get(key) is not None]  # fmt: skip
    rows += [("exported RMSE", four(summary["exported_rmse"])), ("data directory", f"`{summary['data_dir']}`"),
             ("run directory", f"`{summary['run_dir']}`"), ("submission", f"`{summary['submission']}`"),
             ("report", f"`{summary['report']}`")]  # fmt: skip
    return rows
