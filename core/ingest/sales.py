"""Sales files: GE validates each column's distinct values; the decisions come back to rows by codes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from core.expectations import COLUMNS
from core.ingest.columns import (
    NUMERIC,
    Column,
    check_parsed,
    columns_of,
    duplicate_rows,
    known,
    parse_dates,
    unique_pairs,
)
from core.ingest.context import IngestContext
from core.ingest.outcome import Outcome, outcome_of
from core.ingest.quarantine import quarantine_table
from core.ingest.read import CsvFile
from core.ingest.validate import Table, evaluate

_VALUE_COLUMNS = ("shop_id", "item_id", "item_price", "item_cnt_day")


class _Parsed:
    """The derived values of a sales file, per distinct text (``numbers``) or per (date, block) pair."""

    def __init__(self, cols: dict[str, Column], first_month: str) -> None:
        self.cols = cols
        self.numbers = {c: cols[c].number(integer) for c, integer in NUMERIC["sales"].items()}
        self.month_block, self.day_numbers = parse_dates(cols["date"], first_month)
        self.pair_codes, self.pair_date, self.pair_dbn = unique_pairs(
            cols["date"].codes, cols["date_block_num"].codes, len(cols["date_block_num"].raw))

    def value(self, column: str, rows: np.ndarray) -> np.ndarray:
        return self.numbers[column][self.cols[column].codes[rows]]


def validate_sales(ctx: IngestContext, csv_file: CsvFile, sha: str, shop_ids: Sequence[int],
                   item_ids: Sequence[int]) -> Outcome:
    from core.expectations import sales_suites

    with ctx.phase("validate"):
        n = csv_file.table.num_rows
        parsed = _Parsed(columns_of(csv_file.table, "sales"), ctx.config.ingest.first_month)
        tables = _validation_tables(parsed, {"shop_id": shop_ids, "item_id": item_ids})
        verdict = evaluate(ctx, tables, sales_suites(ctx.config.ingest, shop_ids, item_ids), n)
        primary = verdict.first_rule(n)
        quarantine, counts = quarantine_table(csv_file, parsed.cols, verdict, primary)
        ok = primary < 0
        _check_accepted_parsed(parsed, ok)
        accepted = _accepted_rows(parsed, ok)
        months = sorted(int(m) for m in np.unique(accepted.column("date_block_num").to_numpy()))
    return outcome_of(csv_file, sha, accepted, quarantine, counts, months, verdict.results, ctx.timings)


def _validation_tables(parsed: _Parsed, foreign: dict[str, Sequence[int]]) -> list[Table]:
    cols, numbers = parsed.cols, parsed.numbers
    tables = [Table("date_block", pd.DataFrame({
        "date": cols["date"].validated[parsed.pair_date],
        "date_block_num": cols["date_block_num"].validated[parsed.pair_dbn],
        "date_block_num__number": numbers["date_block_num"][parsed.pair_dbn],
        "date__month_block": parsed.month_block[parsed.pair_date],
    }), parsed.pair_codes)]
    for c in _VALUE_COLUMNS:
        frame = pd.DataFrame({c: cols[c].validated, f"{c}__number": numbers[c]})
        if c in foreign:
            frame[f"{c}__known"] = known(numbers[c], foreign[c])
        tables.append(Table(c, frame, cols[c].codes))
    tables.append(Table("duplicates", _duplicates_frame(parsed)))
    return tables


def _duplicates_frame(parsed: _Parsed) -> pd.DataFrame:
    """Rows that occur more than once (raw values equal), indexed by row position, with their occurrence."""
    cols = parsed.cols
    repeated, occurrence = duplicate_rows(
        [(parsed.pair_codes, len(parsed.pair_date))] + [(cols[c].codes, len(cols[c].raw)) for c in COLUMNS["sales"][2:]]
    )
    frame = pd.DataFrame({c: cols[c].raw[cols[c].codes[repeated]] for c in COLUMNS["sales"]},
                         index=pd.Index(repeated))
    frame["row_occurrence"] = occurrence
    return frame


def _check_accepted_parsed(parsed: _Parsed, ok: np.ndarray) -> None:
    pair_ok = np.zeros(len(parsed.pair_date), dtype=bool)
    pair_ok[parsed.pair_codes[ok]] = True
    check_parsed(pair_ok, parsed.month_block[parsed.pair_date], "date")
    check_parsed(pair_ok, parsed.numbers["date_block_num"][parsed.pair_dbn], "date_block_num")
    for c in _VALUE_COLUMNS:
        used = np.zeros(len(parsed.numbers[c]), dtype=bool)
        used[parsed.cols[c].codes[ok]] = True
        check_parsed(used, parsed.numbers[c], c)


def _accepted_rows(parsed: _Parsed, ok: np.ndarray) -> pa.Table:
    """Typed accepted rows sorted by month (stable: file order within a month), so partitions are slices."""
    months_of_rows = parsed.numbers["date_block_num"][parsed.pair_dbn][parsed.pair_codes[ok]].astype(np.int16)
    order = np.argsort(months_of_rows, kind="stable")
    rows = np.flatnonzero(ok)[order]
    return pa.table({
        "date_block_num": pa.array(months_of_rows[order], pa.int16()),
        "date": pa.array(parsed.day_numbers[parsed.pair_date][parsed.pair_codes[rows]], pa.int32()).cast(pa.date32()),
        "shop_id": pa.array(parsed.value("shop_id", rows).astype(np.int16)),
        "item_id": pa.array(parsed.value("item_id", rows).astype(np.int32)),
        "item_price": pa.array(parsed.value("item_price", rows).astype(np.float32)),
        "item_cnt_day": pa.array(parsed.value("item_cnt_day", rows).astype(np.float32)),
    })
