"""What validating one file produced, and the checks every file's counts must pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from core.config import IngestConfig
from core.errors import DataValidationError
from core.ingest.lines import FIELD_COUNT_RULE, UNBALANCED_QUOTE_RULE
from core.ingest.read import CsvFile
from core.ingest.report import FileReport


@dataclass
class Outcome:
    report: FileReport
    accepted: pa.Table
    quarantine: pa.Table
    validation: list[Any]


def outcome_of(csv_file: CsvFile, sha: str, accepted: pa.Table, quarantine: pa.Table, counts: dict[str, int],
               months: list[int], validation: list[Any], timings: dict[str, float]) -> Outcome:
    """The report, after the one invariant of the step: rows in (from the bytes) = accepted + quarantined."""
    rows_in = csv_file.rows_in
    if accepted.num_rows + quarantine.num_rows != rows_in:
        raise RuntimeError(f"{csv_file.name}: {rows_in} rows in != {accepted.num_rows} accepted + "
                           f"{quarantine.num_rows} quarantined")
    report = FileReport(file=csv_file.name, kind=csv_file.kind, sha256=sha, skipped=False, rows_in=rows_in,
                        rows_accepted=accepted.num_rows, rows_quarantined=quarantine.num_rows,
                        failed_rules=counts, months=months, timings=timings)
    return Outcome(report, accepted, quarantine, validation)


def quarantined_share_warnings(report: FileReport, rules: IngestConfig, outcome: Outcome | None = None
                               ) -> list[str]:
    """Fail a file whose quarantined share is above ``max_quarantined_share``; a warning above
    ``warn_quarantined_share``. Mostly-rejected input is a broken export, not bad rows, and accepting
    what is left would only surface later as missing months.

    ``outcome``: the file's validation in this run, when it was validated now (nothing of it is in the lake yet,
    so the error says what each top rule expects and shows a line that broke it); None for a file ingested before
    (its quarantine and validation page are in the lake)."""
    if report.rows_in == 0 or report.rows_quarantined == 0:
        return []
    share = report.rows_quarantined / report.rows_in
    top_rules = [rule for rule, _ in sorted(report.failed_rules.items(), key=lambda item: -item[1])[:3]]
    top = ", ".join(f"{rule} {report.failed_rules[rule]}" for rule in top_rules)
    what = (f"{report.file}: {report.rows_quarantined} of {report.rows_in} rows quarantined ({share:.1%}); "
            f"top rules: {top}")
    if share > rules.max_quarantined_share:
        where = (" (see lake/quarantine and lake/validation for the rows)" if outcome is None
                 else f". {_rule_examples(outcome, top_rules)}. Nothing was written to the lake")
        raise DataValidationError(f"{what}; above ingest.max_quarantined_share = {rules.max_quarantined_share:g}"
                                  f"{where}")
    if share > rules.warn_quarantined_share:
        return [f"{what}; above the warning level ingest.warn_quarantined_share = "
                f"{rules.warn_quarantined_share:g}"]
    return []


#: What the rules checked before Great Expectations sees a file expect (GE's rules carry their own description).
_READER_RULES = {FIELD_COUNT_RULE: "every line has the header's number of fields",
                 UNBALANCED_QUOTE_RULE: "every quote closes on its line"}


def _rule_examples(outcome: Outcome, rules: list[str]) -> str:
    """``rule (what it expects): line N reads ...`` for each of ``rules``: the first line that broke it."""
    expects = {**_READER_RULES, **{result.expectation_config.meta["rule"]: result.expectation_config.description
                                   for suite in outcome.validation for result in suite.results}}
    quarantine = outcome.quarantine.sort_by("line_number").to_pylist()
    columns = [c for c in outcome.quarantine.column_names if c not in ("source_file", "line_number", "rule",
                                                                         "rules", "raw_line")]
    parts = []
    for rule in rules:
        row = next(r for r in quarantine if r["rule"] == rule)
        line = row["raw_line"] if row.get("raw_line") is not None else ",".join(
            "" if row[c] is None else str(row[c]) for c in columns)
        parts.append(f"{rule} ({expects.get(rule, 'see the rule in core/expectations.py')}): line "
                     f"{row['line_number']} reads {line!r}")
    return "; ".join(parts)
