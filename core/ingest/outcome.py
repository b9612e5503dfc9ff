"""What validating one file produced, and the checks every file's counts must pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from core.config import IngestConfig
from core.errors import DataValidationError
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


def quarantined_share_warnings(report: FileReport, rules: IngestConfig) -> list[str]:
    """Fail a file whose quarantined share is above ``max_quarantined_share``; a warning above
    ``warn_quarantined_share``. Mostly-rejected input is a broken export, not bad rows, and accepting
    what is left would only surface later as missing months."""
    if report.rows_in == 0 or report.rows_quarantined == 0:
        return []
    share = report.rows_quarantined / report.rows_in
    top = ", ".join(f"{rule} {count}" for rule, count in
                    sorted(report.failed_rules.items(), key=lambda item: -item[1])[:3])
    what = (f"{report.file}: {report.rows_quarantined} of {report.rows_in} rows quarantined ({share:.1%}); "
            f"top rules: {top}")
    if share > rules.max_quarantined_share:
        raise DataValidationError(f"{what}; above ingest.max_quarantined_share = {rules.max_quarantined_share:g} "
                                  f"(see lake/quarantine and lake/validation for the rows)")
    if share > rules.warn_quarantined_share:
        return [f"{what}; above the warning level ingest.warn_quarantined_share = "
                f"{rules.warn_quarantined_share:g}"]
    return []
