"""What a run writes for people: GE's JSON result and Data Docs page per file, and an index page."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.ingest.page import offline_page
from core.ingest.report import FileReport

# Kinds whose column rules GE runs on distinct values (see core/expectations.py): GE's "% of N rows" on the
# page counts values there, which users read as rows of the file unless told.
_VALUE_NOTES = {
    "sales": "The rules below run on the distinct values of each column (the duplicate-row rule on the rows "
             "that occur more than once), so GE's percentages and its \"of N total rows\" count distinct values "
             "of a column, not rows of the file, and its indexes are positions in that list of values. "
             "The counts above are rows of the file.",
    "test": "The ID, shop_id and item_id rules below run on the distinct values of each column, so their "
            "percentages and \"of N total rows\" count distinct values, not rows of the file; the uniqueness "
            "and ID-range rules run on the file's rows.",
}


def stem(name: str) -> str:
    return Path(name).stem


def first_lines(quarantine: pa.Table) -> dict[str, int]:
    """The first line of the file each rule quarantined (the quarantine holds line numbers already)."""
    if quarantine.num_rows == 0:
        return {}
    grouped = quarantine.group_by("rule").aggregate([("line_number", "min")])
    return dict(zip(grouped.column("rule").to_pylist(), grouped.column("line_number_min").to_pylist(),
                    strict=True))


def validation_doc(name: str, results: Sequence[Any], report: FileReport,
                   lines: Mapping[str, int] | None = None) -> tuple[dict[str, Any], str]:
    """One GE suite result for the file (JSON payload) and its Data Docs HTML (offline, summary on top).

    ``lines``: the first file line per quarantined rule (:func:`first_lines`), shown in the summary."""
    from core.expectations import combine_results, render_data_docs, trim_for_docs

    meta = {"file": name, "sha256": report.sha256, "rows_in": report.rows_in,
            "rows_accepted": report.rows_accepted, "rows_quarantined": report.rows_quarantined,
            "failed_rules": report.failed_rules,
            "note": "sales rules run on distinct values per column (element_count = distinct values); "
                    "rows_* and failed_rules count rows"}
    combined = trim_for_docs(combine_results(name, results, meta))
    payload = combined.to_json_dict()
    summary = summary_html(report, lines or {})
    try:
        page = offline_page(render_data_docs(combined), summary)
    except Exception as err:  # noqa: BLE001 - docs must never fail the step
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title></head>"
                f"<body>{summary}<p>Data Docs rendering failed: {html.escape(str(err))}</p></body></html>")
    return payload, page


def summary_html(report: FileReport, lines: Mapping[str, int]) -> str:
    """Plain HTML above GE's page: what happened to the file's rows, in rows and lines of the file."""
    name = html.escape(report.file)
    parts = [f"<section class='nc-summary'><h1>{name}</h1>",
             f"<p><strong>{report.rows_in}</strong> rows in the file (records after the header; a quoted newline "
             f"keeps a record on several lines): <strong>{report.rows_accepted}</strong> accepted, "
             f"<strong>{report.rows_quarantined}</strong> quarantined.</p>",
             _failed_rules_html(report.failed_rules, lines)]
    if report.kind in _VALUE_NOTES:
        parts.append(f"<p class='nc-note'>{html.escape(_VALUE_NOTES[report.kind])}</p>")
    return "".join(parts) + "</section>"


def _failed_rules_html(failed_rules: Mapping[str, int], lines: Mapping[str, int]) -> str:
    if not failed_rules:
        return "<p>No row was quarantined.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(rule)}</td><td>{count}</td><td>{lines.get(rule, '-')}</td></tr>"
        for rule, count in failed_rules.items()
    )
    return ("<table class='nc-rules'><thead><tr><th>rule</th><th>rows quarantined</th><th>first at line</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>"
            "<p>Each quarantined row counts once, under the first rule it broke; lake/quarantine/ holds every "
            "row with its line. Line numbers count the file's lines from 1, the header.</p>")


def index_html(manifest: dict[str, Any]) -> str:
    rows = []
    for name, entry in sorted(manifest["files"].items()):
        rules = ", ".join(f"{rule}: {count}" for rule, count in entry.get("failed_rules", {}).items()) or "-"
        page = html.escape(stem(name), quote=True)
        rows.append(
            f"<tr><td><a href='{page}.html'>{html.escape(name)}</a></td><td>{entry['rows_in']}</td>"
            f"<td>{entry['rows_accepted']}</td><td>{entry['rows_quarantined']}</td><td>{html.escape(rules)}</td>"
            f"<td>{entry['ingested_at']}</td><td><a href='{page}.json'>json</a></td></tr>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>nestcast ingest validation</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 10px;border-bottom:1px solid #ddd}</style></head>"
        "<body><h1>Ingest validation</h1><table><tr><th>file</th><th>rows in</th><th>accepted</th>"
        "<th>quarantined</th><th>quarantined by rule</th><th>ingested at</th><th>GE result</th></tr>"
        + "".join(rows) + "</table></body></html>\n"
    )
