"""Items, categories, shops (row-level rules on the rows themselves) and test.csv (every problem fails it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from core.expectations import COLUMNS
from core.ingest.columns import ID_COLUMN, NUMERIC, REFERENCE_SCHEMAS, Column, columns_of, known
from core.ingest.context import IngestContext
from core.ingest.lines import FIELD_COUNT_RULE, UNBALANCED_QUOTE_RULE, line_texts
from core.ingest.outcome import Outcome, outcome_of
from core.ingest.quarantine import empty_quarantine, quarantine_table
from core.ingest.read import CsvFile, file_error
from core.ingest.validate import Table, evaluate


def validate_reference(ctx: IngestContext, csv_file: CsvFile, sha: str, suites: dict[str, Any],
                       foreign: dict[str, Sequence[int]]) -> Outcome:
    """items / item_categories / shops: row-level rules on the rows themselves (small files)."""
    kind = csv_file.kind
    with ctx.phase("validate"):
        n = csv_file.table.num_rows
        cols = columns_of(csv_file.table, kind)
        frame, numbers = _rows_frame(kind, cols, foreign)
        verdict = evaluate(ctx, [Table("rows", frame)], suites, n)
        primary = verdict.first_rule(n)
        quarantine, counts = quarantine_table(csv_file, cols, verdict, primary)
        accepted = _typed(kind, cols, numbers, primary < 0)
    return outcome_of(csv_file, sha, accepted, quarantine, counts, [], verdict.results, ctx.timings)


def _typed(kind: str, cols: dict[str, Column], numbers: dict[str, np.ndarray], ok: np.ndarray) -> pa.Table:
    schema = REFERENCE_SCHEMAS[kind]
    arrays = []
    for f in schema:
        if f.name in numbers:
            arrays.append(pa.array(numbers[f.name][ok].astype(f.type.to_pandas_dtype()), f.type))
        else:
            arrays.append(pa.array(cols[f.name].raw[cols[f.name].codes][ok], f.type))
    return pa.Table.from_arrays(arrays, schema=schema).sort_by(ID_COLUMN[kind])


def _rows_frame(kind: str, cols: dict[str, Column], foreign: dict[str, Sequence[int]]
                ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The row-by-row frame of a small file: raw texts, ``<col>__number``, ``__occurrence``, ``__known``."""
    frame = pd.DataFrame({c: cols[c].validated[cols[c].codes] for c in COLUMNS[kind]})
    numbers = {}
    for c, integer in NUMERIC[kind].items():
        numbers[c] = cols[c].number(integer)[cols[c].codes]
        frame[f"{c}__number"] = numbers[c]
        if c in foreign:
            frame[f"{c}__known"] = known(numbers[c], foreign[c])
    ids = numbers[ID_COLUMN[kind]]
    occurrence = np.full(len(ids), np.nan)
    present = ~np.isnan(ids)
    series = pd.Series(ids[present])
    occurrence[present] = series.groupby(series, sort=False).cumcount().to_numpy() + 1
    frame[f"{ID_COLUMN[kind]}__occurrence"] = occurrence
    return frame, numbers


def validate_test(ctx: IngestContext, csv_file: CsvFile, sha: str, suites: dict[str, Any],
                  foreign: dict[str, Sequence[int]]) -> Outcome:
    """test.csv is the forecast's contract: any failed rule or unreadable line fails the file, by line."""
    with ctx.phase("validate"):
        n = csv_file.table.num_rows
        cols = columns_of(csv_file.table, "test")
        tables, numbers = _test_tables(cols, foreign)
        verdict = evaluate(ctx, tables, suites, n)
        problems = [_with_lines(p.text, csv_file.layout.records[p.rows] if p.rows is not None else None)
                    for p in verdict.file_problems]
        problems += _unread_problems(csv_file)
        if problems:
            raise file_error(csv_file.name, problems)
        schema = REFERENCE_SCHEMAS["test"]
        accepted = pa.Table.from_arrays(
            [pa.array(numbers[f.name].astype(f.type.to_pandas_dtype()), f.type) for f in schema], schema=schema
        ).sort_by("ID")
    empty = empty_quarantine(COLUMNS["test"])
    return outcome_of(csv_file, sha, accepted, empty, {}, [], verdict.results, ctx.timings)


def _test_tables(cols: dict[str, Column], foreign: dict[str, Sequence[int]]
                 ) -> tuple[list[Table], dict[str, np.ndarray]]:
    """One distinct-value table per column, and ``rows`` (the parsed numbers) for the row-wise rules."""
    tables, numbers = [], {}
    for c in COLUMNS["test"]:
        parsed = cols[c].number(integer=True)
        frame = pd.DataFrame({c: cols[c].validated, f"{c}__number": parsed})
        if c in foreign:
            frame[f"{c}__known"] = known(parsed, foreign[c])
        tables.append(Table(c, frame, cols[c].codes))
        numbers[c] = parsed[cols[c].codes]
    tables.append(Table("rows", pd.DataFrame({f"{c}__number": v for c, v in numbers.items()})))
    return tables, numbers


def _with_lines(text: str, lines: np.ndarray | None) -> str:
    if lines is None or len(lines) == 0:
        return text
    shown = lines[:10].tolist()
    more = f" and {len(lines) - 10} more" if len(lines) > 10 else ""
    return f"{text} on line{'s' if len(lines) > 1 else ''} {shown if len(lines) > 1 else shown[0]}{more}"


def _unread_problems(csv_file: CsvFile) -> list[str]:
    """Lines the reader skipped (wrong field count) or could not see (unbalanced quote)."""
    problems = []
    n_cols = len(COLUMNS["test"])
    for rule, lines, what in ((FIELD_COUNT_RULE, csv_file.layout.malformed, f"without exactly {n_cols} fields"),
                              (UNBALANCED_QUOTE_RULE, csv_file.layout.unbalanced, "with a quote that never closes")):
        if len(lines):
            problems.append(f"{rule}: {len(lines)} rows {what}, e.g. lines {lines[:5].tolist()}: "
                            f"{line_texts(csv_file.raw, lines[:3])}")
    return problems
