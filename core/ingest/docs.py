"""What a run writes for people: GE's JSON result and Data Docs page per file, and an index page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.ingest.report import FileReport


def stem(name: str) -> str:
    return Path(name).stem


def validation_doc(name: str, results: Sequence[Any], report: FileReport) -> tuple[dict[str, Any], str]:
    """One GE suite result for the file (JSON payload) and its Data Docs HTML."""
    from core.expectations import combine_results, render_data_docs, trim_for_docs

    meta = {"file": name, "sha256": report.sha256, "rows_in": report.rows_in,
            "rows_accepted": report.rows_accepted, "rows_quarantined": report.rows_quarantined,
            "failed_rules": report.failed_rules,
            "note": "sales rules run on distinct values per column (element_count = distinct values); "
                    "rows_* and failed_rules count rows"}
    combined = trim_for_docs(combine_results(name, results, meta))
    payload = combined.to_json_dict()
    try:
        page = render_data_docs(combined)
    except Exception as err:  # noqa: BLE001 - docs must never fail the step
        page = f"<html><body><h1>{name}</h1><p>Data Docs rendering failed: {err}</p></body></html>"
    return payload, page


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
