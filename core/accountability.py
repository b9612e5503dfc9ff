"""Step 7: forecast accountability -- each exported forecast scored once its month's actuals are in the lake.

A run that ingests the sales of a month an earlier run forecast (a new ``raw/sales_*.csv`` drop or a replaced
``sales_train.csv``) scores that month's submission exactly as the competition would: on the submission's own
(shop, item) pairs, against the month's sales summed per pair and clipped to [0, 20], zero where nothing sold.
Beside it: the previous-period forecast that was available then (each pair's clipped sales of the month before)
and the run's raw model forecast. One record per forecast month in ``lake/accountability/records.parquet``.

Idempotent: a record is only recomputed when what it was scored from changed (the submission, its pairs, the
month's or the previous month's monthly partition), so a rerun on the same lake rewrites nothing and keeps
``scored_at``. A forecast whose pairs cannot be resolved any more, or whose submission (edited by hand) holds a
value that is not a number, empty or outside the clip range, is kept as an ``unresolved`` record with the reason
(the file, line and value), never dropped, and never stops the run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from core.config import NestcastConfig
from core.files import file_sha256, read_json, write_bytes_atomic, write_parquet_atomic
from core.lake import FORECAST_FILE, REPORT_FILE, LakePaths, forecast_month_label

#: The record's columns, in order; ``status`` is ``scored`` or ``unresolved`` (then ``note`` says why).
RECORD_SCHEMA = pa.schema([
    ("forecast_month", pa.int16()),
    ("month_label", pa.string()),
    ("exported", pa.string()),
    ("status", pa.string()),
    ("rmse_exported", pa.float64()),
    ("rmse_previous_period", pa.float64()),
    ("rmse_model", pa.float64()),
    ("n_pairs", pa.int64()),
    ("n_pairs_sold", pa.int64()),
    # The ranges beside the submission (submissions/<month>.quantiles.parquet) and the naive range, scored alike:
    # coverage of each level (JSON: level -> share of pairs at or below it), the outer interval's coverage and
    # mean width, and the mean pinball loss over the levels. NaN when the submission has no quantiles file.
    ("coverage_levels", pa.string()),
    ("interval_coverage", pa.float64()),
    ("interval_width", pa.float64()),
    ("pinball", pa.float64()),
    ("interval_coverage_naive", pa.float64()),
    ("interval_width_naive", pa.float64()),
    ("pinball_naive", pa.float64()),
    ("run_dir", pa.string()),
    ("submission", pa.string()),
    ("scored_at", pa.string()),
    ("inputs_sha256", pa.string()),
    ("note", pa.string()),
])
HISTORY_PLOT = "accountability.png"
#: report.md's history section sits between ``<!-- accountability:begin/end -->``, replaced in place on a rerun.
SECTION_KEY = "accountability"
SECTION_BEGIN = f"<!-- {SECTION_KEY}:begin -->"


@dataclass(frozen=True)
class Forecast:
    """One exported submission, as its JSON sidecar describes it."""

    month: int
    label: str
    csv: Path
    sidecar: dict[str, Any]


# --- reading the lake --------------------------------------------------------------------------------
def read_records(paths: LakePaths) -> pd.DataFrame:
    """Every accountability record, by forecast month (an empty frame with the columns when there is none)."""
    if not paths.accountability_records.exists():
        return RECORD_SCHEMA.empty_table().to_pandas()
    return pd.read_parquet(paths.accountability_records).sort_values("forecast_month").reset_index(drop=True)


def exported_forecasts(paths: LakePaths) -> list[Forecast]:
    """Every submission with its sidecar, by forecast month (a CSV without one was not written by export)."""
    found = []
    for path in sorted(paths.submissions.glob("*.csv")):
        sidecar = read_json(path.with_suffix(".json"))
        if isinstance(sidecar, dict) and "forecast_month" in sidecar:
            found.append(Forecast(int(sidecar["forecast_month"]), path.stem, path, sidecar))
    return sorted(found, key=lambda forecast: forecast.month)


def _clipped_month(paths: LakePaths, month: int, clip: tuple[float, float]) -> pd.DataFrame:
    """``shop_id, item_id, value``: month's monthly counts clipped to ``clip`` (empty if the month is missing)."""
    path = paths.monthly_file(month)
    if not path.exists():
        return pd.DataFrame({"shop_id": [], "item_id": [], "value": []})
    frame = pd.read_parquet(path, columns=["shop_id", "item_id", "item_cnt_month"])
    return pd.DataFrame({"shop_id": frame["shop_id"], "item_id": frame["item_id"],
                         "value": np.clip(frame["item_cnt_month"].to_numpy(np.float64), *clip)})


def _on_pairs(pairs: pd.DataFrame, values: pd.DataFrame) -> np.ndarray:
    """``values`` looked up for each of ``pairs``' rows; 0 where the pair has no row (nothing sold)."""
    joined = pairs[["shop_id", "item_id"]].merge(values, on=["shop_id", "item_id"], how="left", validate="m:1")
    return joined["value"].fillna(0.0).to_numpy(np.float64)


def _rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predicted - actual) ** 2))) if actual.size else math.nan


# --- reading a submission, which a person may have edited -------------------------------------------------
SUBMISSION_COLUMNS = ("ID", "item_cnt_month")


@dataclass(frozen=True)
class Submission:
    """A submission's rows as numbers (``ID``, ``item_cnt_month``), or None and why (``problem``)."""

    frame: pd.DataFrame | None
    problem: str
    rows: int


def read_submission(paths: LakePaths, forecast: Forecast, clip: tuple[float, float]) -> Submission:
    """The submission's IDs and values, checked as export wrote them: an integer ID once each, a number within
    ``clip`` -- or the first problem, naming the file, the line and the value as written."""
    name = f"{paths.submissions.name}/{forecast.csv.name}"
    try:
        text = pd.read_csv(forecast.csv, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as error:  # pandas' ParserError is a ValueError
        return Submission(None, f"{name}: not readable as a CSV file ({' '.join(str(error).split())})", 0)
    missing = [column for column in SUBMISSION_COLUMNS if column not in text.columns]
    if missing:
        return Submission(None, f"{name}: the header has no column {', '.join(missing)}", len(text))
    ids = pd.to_numeric(text["ID"], errors="coerce")
    values = pd.to_numeric(text["item_cnt_month"], errors="coerce")
    bad = (ids.isna() | (ids != np.floor(ids)) | ids.duplicated(keep="first") | ~np.isfinite(values)
           | (values < clip[0]) | (values > clip[1])).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        why = _value_problem(text.iloc[row], ids, row, clip)
        return Submission(None, f"{name} line {_line_of(forecast.csv, row)}: {why}", len(text))
    return Submission(pd.DataFrame({"ID": ids.astype(np.int64), "item_cnt_month": values.astype(np.float64)}),
                      "", len(text))


def _value_problem(row: pd.Series, ids: pd.Series, index: int, clip: tuple[float, float]) -> str:
    """What is wrong with one row: its ID, else its value (as written)."""
    raw_id, raw_value = row["ID"], row["item_cnt_month"]
    if pd.isna(pd.to_numeric(raw_id, errors="coerce")) or float(ids.iloc[index]) != math.floor(ids.iloc[index]):
        return f"ID {raw_id!r} is not an integer" if raw_id.strip() else "ID is empty"
    if ids.duplicated(keep="first").iloc[index]:
        return f"ID {raw_id} is there twice"
    if not raw_value.strip():
        return "item_cnt_month is empty"
    value = pd.to_numeric(raw_value, errors="coerce")
    if pd.isna(value) or not math.isfinite(value):
        return f"item_cnt_month {raw_value!r} is not a number"
    return f"item_cnt_month {float(value)} is outside [{clip[0]:g}, {clip[1]:g}], the range export writes"


def _line_of(path: Path, index: int) -> int:
    """The line a CSV data record starts on (``index`` counts records after the header; blank lines hold none)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        records = (reader.line_num for row in reader if any(cell.strip() for cell in row))
        for number, line in enumerate(records):
            if number == index:
                return line
    return index + 2


# --- resolving a forecast's pairs --------------------------------------------------------------------
def resolve_pairs(paths: LakePaths, forecast: Forecast, ids: pd.Series) -> tuple[pd.DataFrame | None, str]:
    """``ID, shop_id, item_id`` of each submission row, and where they came from (or why they cannot be had).

    The pairs file export keeps beside the submission says it; an older submission without one falls back on
    ``test.csv`` as it is now, only if that holds exactly the submission's IDs.
    """
    kept = paths.submission_pairs(forecast.label)
    if kept.exists():
        source, pairs = kept, pd.read_parquet(kept, columns=["ID", "shop_id", "item_id"])
    elif paths.reference_table("test").exists():
        source = paths.reference_table("test")
        pairs = pd.read_parquet(source, columns=["ID", "shop_id", "item_id"])
    else:
        return None, f"no {kept.name} beside the submission and no test.csv to resolve its IDs"
    missing = pd.Index(ids).difference(pd.Index(pairs["ID"]))
    if len(missing) or len(pairs) != len(ids):
        return None, (f"{source.name} does not hold the submission's {len(ids):,} IDs "
                      f"({len(missing):,} missing, {len(pairs):,} rows)")
    return pairs, str(source)


def _inputs_sha256(paths: LakePaths, forecast: Forecast, pairs_source: str) -> str:
    """What a record is scored from: the submission, its pairs, the month's and the previous month's actuals."""
    digest = hashlib.sha256(file_sha256(forecast.csv).encode())
    for path in (Path(pairs_source), paths.monthly_file(forecast.month), paths.monthly_file(forecast.month - 1),
                 paths.submission_quantiles(forecast.label)):
        digest.update(file_sha256(path).encode() if path.is_file() else b"missing")
    return digest.hexdigest()


# --- scoring -----------------------------------------------------------------------------------------
def _model_forecast(paths: LakePaths, run_dir: str, ids: np.ndarray) -> np.ndarray | None:
    """The run's model column on the submission's IDs, clipped -- or None when the run directory is gone."""
    path = paths.run_path(run_dir) / FORECAST_FILE
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    if "model" not in frame.columns:
        return None
    by_id = frame.set_index("ID")["model"].reindex(ids)
    return None if by_id.isna().any() else by_id.to_numpy(np.float64)


def score_forecast(
    paths: LakePaths, forecast: Forecast, pairs: pd.DataFrame, clip: tuple[float, float],
    submission: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """RMSEs of the exported, previous-period and model forecasts of one month on the submission's pairs
    (``submission``: its rows as :func:`read_submission` checked them; read here when not given)."""
    if submission is None:
        submission = pd.read_csv(forecast.csv)
    frame = pairs.merge(submission, on="ID", how="inner", validate="1:1").sort_values("ID")
    actual = _on_pairs(frame, _clipped_month(paths, forecast.month, clip))
    previous = _on_pairs(frame, _clipped_month(paths, forecast.month - 1, clip))
    model = _model_forecast(paths, str(forecast.sidecar.get("run_dir", "")), frame["ID"].to_numpy())
    return {
        "rmse_exported": _rmse(frame["item_cnt_month"].to_numpy(np.float64), actual),
        "rmse_previous_period": _rmse(previous, actual),
        "rmse_model": math.nan if model is None else _rmse(np.clip(model, *clip), actual),
        "n_pairs": len(frame),
        "n_pairs_sold": int((actual > 0).sum()),
        "note": "" if model is not None else "run directory gone: no model forecast to score",
    } | score_ranges(paths, forecast, frame["ID"].to_numpy(), actual, previous, clip)


NO_RANGES: dict[str, Any] = {"coverage_levels": "", **{name: math.nan for name in RECORD_SCHEMA.names
                                                        if name.startswith(("interval_", "pinball"))}}


def score_ranges(paths: LakePaths, forecast: Forecast, ids: np.ndarray, actual: np.ndarray, previous: np.ndarray,
                 clip: tuple[float, float]) -> dict[str, Any]:
    """The submission's quantiles and the naive range of its time (the previous month plus the offsets its
    sidecar recorded), scored on the month's actuals (:data:`NO_RANGES` without a quantiles file)."""
    from core import quantiles

    path, recorded = paths.submission_quantiles(forecast.label), forecast.sidecar.get("quantiles")
    if not path.exists() or not isinstance(recorded, dict):
        return dict(NO_RANGES)
    calibration = quantiles.Calibration.from_dict(recorded["calibration"])
    columns = [quantiles.level_column(level) for level in calibration.levels]
    table = pd.read_parquet(path).set_index("ID").reindex(ids)
    if table[columns].isna().any().any():
        return dict(NO_RANGES)
    own = quantiles.score(actual, table[columns].to_numpy(np.float64), calibration.levels)
    naive = quantiles.score(actual, quantiles.apply_naive(previous, calibration, clip), calibration.levels)
    return {"coverage_levels": json.dumps(own["coverage"]), "interval_coverage": own["interval_coverage"],
            "interval_width": own["interval_width"], "pinball": own["pinball"],
            "interval_coverage_naive": naive["interval_coverage"], "interval_width_naive": naive["interval_width"],
            "pinball_naive": naive["pinball"]}


def _record(paths: LakePaths, forecast: Forecast, clip: tuple[float, float], known: Mapping[str, Any] | None
            ) -> dict[str, Any]:
    """The month's record: the one already kept if its inputs are unchanged, else scored (or unresolved) now."""
    submission = read_submission(paths, forecast, clip)
    if submission.frame is None:
        pairs, source = None, submission.problem
    else:
        pairs, source = resolve_pairs(paths, forecast, submission.frame["ID"])
    inputs = _inputs_sha256(paths, forecast, source if pairs is not None else "")
    if known is not None and known["inputs_sha256"] == inputs:
        return dict(known)
    base = {
        "forecast_month": forecast.month, "month_label": forecast.label,
        "exported": str(forecast.sidecar.get("exported", "")), "run_dir": str(forecast.sidecar.get("run_dir", "")),
        "submission": str(forecast.csv), "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs_sha256": inputs,
    }
    if pairs is None:
        return base | NO_RANGES | {"status": "unresolved", "rmse_exported": math.nan, "rmse_previous_period": math.nan,
                                   "rmse_model": math.nan, "n_pairs": submission.rows, "n_pairs_sold": 0,
                                   "note": source}
    return base | {"status": "scored"} | score_forecast(paths, forecast, pairs, clip, submission.frame)


@dataclass(frozen=True)
class AccountabilitySummary:
    """What the step found: every record, the months it (re)scored now, and those it could not resolve."""

    records: str
    months: list[int]
    scored_now: list[int]
    unresolved: list[int]
    written: bool
    #: ``<month label>: <note>`` of each unresolved month, for the run's log
    unresolved_notes: list[str] = field(default_factory=list)


def update_accountability(config: NestcastConfig) -> AccountabilitySummary:
    """Score every exported forecast whose month is now in the lake, and keep one record per month.

    A forecast's month is "in the lake" once ``lake/monthly`` has its partition (the forecast months of the
    submissions after the lake's last month are still open). The file is only rewritten when a record changed.
    """
    paths = LakePaths.of(config)
    in_lake = set(paths.monthly_months())
    existing = read_records(paths)
    known = {int(row["forecast_month"]): row for row in existing.to_dict("records")}
    due = [forecast for forecast in exported_forecasts(paths) if forecast.month in in_lake]
    records = [_record(paths, forecast, config.windows.clip, known.get(forecast.month)) for forecast in due]
    # Records of months whose submission is gone stay: the history is not rewritten by a cleanup.
    kept = [row for month, row in known.items() if month not in {forecast.month for forecast in due}]
    fresh = [int(r["forecast_month"]) for r in records
             if (known.get(int(r["forecast_month"])) or {}).get("inputs_sha256") != r["inputs_sha256"]]
    frame = pd.DataFrame(kept + records, columns=RECORD_SCHEMA.names).sort_values("forecast_month")
    frame = frame.reset_index(drop=True)
    changed = bool(fresh) or len(frame) != len(existing)
    if changed:
        write_parquet_atomic(paths.accountability_records,
                             pa.Table.from_pandas(frame, schema=RECORD_SCHEMA, preserve_index=False))
    return AccountabilitySummary(
        records=str(paths.accountability_records),
        months=[int(m) for m in frame["forecast_month"]],
        scored_now=fresh,
        unresolved=[int(m) for m in frame.loc[frame["status"] == "unresolved", "forecast_month"]],
        written=changed,
        unresolved_notes=[f"{row['month_label']}: {row['note']}"
                          for row in frame[frame["status"] == "unresolved"].to_dict("records")],
    )


# --- the history: table, plot, report section --------------------------------------------------------
def history_rows(records: pd.DataFrame) -> list[dict[str, Any]]:
    """The history as display rows: month, what was exported, the three RMSEs and exported / previous period."""
    ratio = records["rmse_exported"] / records["rmse_previous_period"]
    table = pd.DataFrame({
        "month": records["month_label"], "exported": records["exported"], "status": records["status"],
        "RMSE exported": records["rmse_exported"].round(4), "RMSE previous period":
        records["rmse_previous_period"].round(4), "RMSE model": records["rmse_model"].round(4),
        "exported / previous": ratio.round(4), "range coverage": _column(records, "interval_coverage").round(4),
        "range width": _column(records, "interval_width").round(3), "pinball": _column(records, "pinball").round(4),
        "naive coverage": _column(records, "interval_coverage_naive").round(4),
        "naive pinball": _column(records, "pinball_naive").round(4), "pairs": records["n_pairs"],
        "note": records["note"],
    })
    # None, not NaN, where nothing was scored: the UI's table and JSON show an empty cell.
    return table.astype(object).where(table.notna(), None).to_dict("records")


def _column(records: pd.DataFrame, name: str) -> pd.Series:
    """A record column as numbers (NaN throughout in records written before the column existed)."""
    return pd.to_numeric(records[name], errors="coerce") if name in records else pd.Series(np.nan, records.index)


def plot_history(records: pd.DataFrame, first_month: str) -> bytes | None:
    """RMSE per forecast month: the exported forecast against the previous period (and the raw model); None
    before any month is scored (an empty chart says nothing)."""
    from core import forecasters
    from core.report import EXPORTED_COLOUR, figure, legend_below, month_ticks, png  # the report's plot style

    scored = records[records["status"] == "scored"]
    months = scored["forecast_month"].to_numpy(np.int64)
    if not len(months):
        return None
    coverage = _coverage_by_level(scored)
    fig = figure(figsize=(9, 8.5 if coverage else 4.5))
    ax = fig.add_subplot(2 if coverage else 1, 1, 1)
    for column, label, colour in (("rmse_exported", "exported", EXPORTED_COLOUR),
                                  ("rmse_previous_period", "previous period", forecasters.colour("baseline")),
                                  ("rmse_model", "model", forecasters.colour("model"))):
        ax.plot(months, scored[column].to_numpy(np.float64), marker="o", label=label, color=colour)
    month_ticks(ax, months, first_month)
    ax.set_ylabel("RMSE (clipped to [0, 20])")
    ax.set_title("Exported forecasts, scored once their month arrived")
    ax.grid(alpha=0.3)
    legend_below(fig, ax, 3)
    if coverage:
        plot_coverage(fig.add_subplot(2, 1, 2), months, coverage, first_month)
        fig.tight_layout()
    return png(fig)


def _coverage_by_level(scored: pd.DataFrame) -> dict[float, np.ndarray]:
    """Level -> each scored month's coverage of that level (NaN where the month had no quantiles file)."""
    parsed = [json.loads(text) if isinstance(text, str) and text else {}
              for text in (scored["coverage_levels"] if "coverage_levels" in scored else [])]
    levels = sorted({float(level) for row in parsed for level in row})
    return {level: np.asarray([row.get(f"{level:g}", np.nan) for row in parsed], np.float64) for level in levels}


def plot_coverage(ax: Any, months: np.ndarray, coverage: Mapping[float, np.ndarray], first_month: str) -> None:
    """Each level's coverage per forecast month against its nominal line (dashed, the same colour)."""
    from core.report import month_ticks

    colours = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for index, (level, values) in enumerate(coverage.items()):
        colour = colours[index % len(colours)]
        ax.plot(months, values, marker="o", color=colour, label=f"P{level * 100:g}")
        ax.axhline(level, color=colour, linestyle="--", linewidth=1)
    month_ticks(ax, months, first_month)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of pairs at or below the quantile")
    ax.set_title("Coverage of each quantile level against its nominal line (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def history_markdown(records: pd.DataFrame, plot_name: str | None) -> str:
    """The history section (a markdown table and the plot, linked relatively as report.md's other plots)."""
    rows = history_rows(records)
    lines = ["## Accountability: exported forecasts against their months' actuals", ""]
    if not rows:
        lines.append("No exported forecast has its month's actuals in the lake yet.")
    else:
        header = _shown_columns(rows)
        align = ["---:" if any(isinstance(row[k], (int, float, np.number)) for row in rows) else "---"
                 for k in header]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(_history_cell(row[k]) for k in header) + " |" for row in rows]
    plot = ["", f"![accountability history]({plot_name})"] if plot_name else []
    return "\n".join([*lines, *plot, ""])


def _shown_columns(rows: list[dict[str, Any]]) -> list[str]:
    # The UI's markdown pane cuts a wide table on the right: "status" and "note" only when some row needs them,
    # the range columns only when some month had a quantiles file.
    ranged = any(row["range coverage"] is not None for row in rows)
    said = {"status": any(row["status"] != "scored" for row in rows), "note": any(row["note"] for row in rows),
            **{key: ranged for key in ("range coverage", "range width", "pinball", "naive coverage", "naive pinball")}}
    return [column for column in rows[0] if said.get(column, True)]


def _history_cell(value: Any) -> str:
    # Scores with four decimals and counts with separators, as in the evaluation report.
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


@dataclass(frozen=True)
class History:
    """The accuracy history as the run shows it: the records file, its table rows, the report section (and where
    it went), the plot (None before any month is scored) and the forecast months' labels."""

    records: str
    rows: list[dict[str, Any]]
    report: str
    markdown: str
    plot: str | None
    months: list[str]


def write_history(config: NestcastConfig, run_dir: str | Path) -> History:
    """The history plot into ``run_dir`` and its section into ``run_dir/report.md`` (replacing an older one)."""
    from core.report import replace_report_section

    paths = LakePaths.of(config)
    records = read_records(paths)
    run_dir = Path(run_dir)
    image = plot_history(records, config.ingest.first_month)
    plot = write_bytes_atomic(run_dir / HISTORY_PLOT, image) if image is not None else None
    section = history_markdown(records, HISTORY_PLOT if plot is not None else None)
    report = replace_report_section(run_dir / REPORT_FILE, SECTION_KEY, section)
    return History(records=str(paths.accountability_records), rows=history_rows(records), report=str(report),
                   markdown=section, plot=None if plot is None else str(plot),
                   months=[forecast_month_label(int(m), config.ingest.first_month) for m in records["forecast_month"]])
