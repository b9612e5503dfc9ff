"""Step 1 — ingest: raw CSVs -> validated, typed Parquet lake, rejected rows -> quarantine.

The stages, one module each:

- :mod:`~core.ingest.plan` — which files to validate or skip, which sales file owns each month (pure);
- :mod:`~core.ingest.lines` and :mod:`~core.ingest.read` — bytes -> CSV records, each with its line;
- :mod:`~core.ingest.columns` — the header check and the typed, dictionary-encoded columns;
- :mod:`~core.ingest.validate` — Great Expectations verdicts -> row decisions;
- :mod:`~core.ingest.sales` and :mod:`~core.ingest.reference` — the rules of each kind of file;
- :mod:`~core.ingest.quarantine` — the quarantine tables; :mod:`~core.ingest.outcome` — per-file checks;
- :mod:`~core.ingest.commit` — the staging/journal transaction; :mod:`~core.ingest.run` — the step.

Two kinds of failure:

- **file-level** (:class:`core.errors.DataValidationError`, never retried): the file is empty,
  not UTF-8, not CSV, its header is not exactly the expected columns (a ``;``-delimited file shows
  up here as one unexpected column), it has no data row, more of its rows are quarantined than
  ``ingest.max_quarantined_share``; any problem at all in ``test.csv`` (the forecast's contract: a
  silently dropped test row would be a missing submission row). The step fails and writes nothing;
  the message names the file, the lines, the failed rules and offending values.
- **row-level** (sales files and the three reference files): the row goes to
  ``lake/quarantine/<stem>.parquet`` with its 1-based line number (header = line 1), the first
  rule it broke (``rule``) and all of them (``rules``), and its raw texts as written; the rest of the
  file carries on. A line with the wrong number of fields (e.g. a truncated last line) is quarantined
  under ``field_count``, a line whose quote never closes under ``unbalanced_quote`` (and the lines
  after it are read as records of their own), before GE sees the file.

Rows in = rows accepted + rows quarantined, for every file, always, where rows in is counted from the
file's bytes (every non-empty line after the header belongs to exactly one record).

Incremental rules, decided per file from ``lake/manifest.json`` (:func:`core.ingest.plan.plan_ingest`):

- a file is skipped when its sha256, the sha256 of the raw files it is validated against
  (items/categories/shops for sales and test, categories for items) and the rules (config.ingest
  and :data:`core.expectations.RULES_VERSION`) are all unchanged and its outputs exist. So a new
  ``items.csv`` revalidates every sales file: a sale of an item that disappeared must now be
  quarantined, one of a newly listed item accepted.
- sales files are applied in arrival order (``sales_train.csv`` first, new drops by name), each
  replacing the months it contains -- except that drops holding the same month are its parts, and the
  month keeps every part's rows (parts sharing identical rows are refused, naming both). When only new
  drops arrive, only their months are written;
  when a known sales file must be revalidated, all sales files are re-applied and months no present
  file contains any more are removed.

Atomicity: see :mod:`core.ingest.commit`.
"""

from __future__ import annotations

from core.ingest.columns import REFERENCE_SCHEMAS, SALES_SCHEMA
from core.ingest.commit import recover_lake
from core.ingest.lines import FIELD_COUNT_RULE, UNBALANCED_QUOTE_RULE
from core.ingest.plan import IngestPlan, plan_ingest
from core.ingest.readers import (
    quarantine_file,
    quarantine_preview,
    read_manifest,
    read_quarantine,
    read_reference,
    read_sales,
    validation_page,
)
from core.ingest.report import FileReport, IngestSummary, RemovedFile
from core.ingest.run import ingest, lake_outputs

__all__ = [
    "FIELD_COUNT_RULE",
    "REFERENCE_SCHEMAS",
    "SALES_SCHEMA",
    "UNBALANCED_QUOTE_RULE",
    "FileReport",
    "RemovedFile",
    "recover_lake",
    "IngestPlan",
    "IngestSummary",
    "ingest",
    "lake_outputs",
    "plan_ingest",
    "quarantine_file",
    "quarantine_preview",
    "read_manifest",
    "read_quarantine",
    "read_reference",
    "read_sales",
    "validation_page",
]
