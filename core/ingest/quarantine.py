"""Quarantine tables: every rejected row of a file with its line number, first rule, all rules, raw texts."""

from __future__ import annotations

import csv
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from core.expectations import COLUMNS
from core.ingest.columns import Column
from core.ingest.lines import FIELD_COUNT_RULE, UNBALANCED_QUOTE_RULE, line_texts
from core.ingest.read import CsvFile
from core.ingest.validate import Verdict


def empty_quarantine(names: Sequence[str]) -> pa.Table:
    fields = [("source_file", pa.string()), ("line_number", pa.int64()), ("rule", pa.string()),
              ("rules", pa.string()), *[(c, pa.string()) for c in names], ("raw_line", pa.string())]
    return pa.schema(fields).empty_table()


def quarantine_table(csv_file: CsvFile, columns: dict[str, Column], verdict: Verdict, primary: np.ndarray
                     ) -> tuple[pa.Table, dict[str, int]]:
    """Rejected rows ordered by line number, and the count per first rule (in rule order)."""
    names = list(COLUMNS[csv_file.kind])
    rows = np.flatnonzero(primary >= 0)
    layout = csv_file.layout
    if len(rows) == 0 and layout.rows_in == len(layout.records):
        return empty_quarantine(names), {}
    parts = [_rejected_records(csv_file, columns, verdict, primary, rows),
             _unread_lines(csv_file, layout.malformed, FIELD_COUNT_RULE),
             _unread_lines(csv_file, layout.unbalanced, UNBALANCED_QUOTE_RULE)]
    table = pa.concat_tables(parts).sort_by("line_number")
    found, found_counts = np.unique(np.asarray(table.column("rule").to_pylist(), dtype=str), return_counts=True)
    counts = dict(zip(found.tolist(), found_counts.tolist(), strict=True))
    order = [*verdict.rules, FIELD_COUNT_RULE, UNBALANCED_QUOTE_RULE]
    return table, {rule: counts[rule] for rule in order if rule in counts}


def _rejected_records(csv_file: CsvFile, columns: dict[str, Column], verdict: Verdict, primary: np.ndarray,
                      rows: np.ndarray) -> pa.Table:
    """Records GE rejected: the raw texts as read, the first rule and every rule broken."""
    every = np.full(len(rows), "", dtype=object)
    for rule in verdict.rules:
        mask = verdict.masks.get(rule)
        if mask is not None:
            hit = mask[rows]
            every[hit] = every[hit] + (rule + ";")
    values = {c: columns[c].raw[columns[c].codes[rows]] for c in COLUMNS[csv_file.kind]}
    return _table(csv_file, csv_file.layout.records[rows], np.asarray(verdict.rules, dtype=object)[primary[rows]],
                  np.asarray([r[:-1] for r in every], dtype=object), values, np.full(len(rows), None, dtype=object))


def _unread_lines(csv_file: CsvFile, lines: np.ndarray, rule: str) -> pa.Table:
    """Lines the reader skipped or never saw: their text, split on commas where it splits."""
    names = list(COLUMNS[csv_file.kind])
    texts = line_texts(csv_file.raw, lines)
    split = [_split(text, len(names)) for text in texts]
    values = {c: np.asarray([fields[i] for fields in split], dtype=object) for i, c in enumerate(names)}
    same = np.full(len(lines), rule, dtype=object)
    return _table(csv_file, lines, same, same, values, np.asarray(texts, dtype=object))


def _split(text: str, n_cols: int) -> list[str | None]:
    try:
        fields: list[str | None] = list(next(csv.reader([text]), []))
    except csv.Error:
        fields = []
    fields = [field if field != "" else None for field in fields]
    return (fields + [None] * n_cols)[:n_cols]


def _table(csv_file: CsvFile, lines: np.ndarray, first: np.ndarray, every: np.ndarray,
           values: dict[str, np.ndarray], raw_line: np.ndarray) -> pa.Table:
    arrays = {"source_file": pa.array([csv_file.name] * len(lines), pa.string()),
              "line_number": pa.array(np.asarray(lines, dtype=np.int64), pa.int64()),
              "rule": pa.array(first, pa.string()), "rules": pa.array(every, pa.string())}
    for column, texts in values.items():
        arrays[column] = pa.array(texts, pa.string())
    arrays["raw_line"] = pa.array(raw_line, pa.string())
    return pa.table(arrays)
