"""Bytes -> CSV records: encoding, the header sample, the Arrow read, and the line of every record.

The reader sees the file without its ``unbalanced_quote`` lines (see :mod:`core.ingest.lines`), and
what it returns is checked against the layout counted from the bytes: a disagreement fails the file
(naming it) instead of losing rows silently.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pcsv

from core.errors import DataValidationError
from core.expectations import COLUMNS
from core.ingest.lines import BOM, LineLayout, layout_of, simple_layout, without_lines

HEAD_BYTES = 1 << 16
STRING_DICT = pa.dictionary(pa.int32(), pa.string())


@dataclass(frozen=True)
class CsvFile:
    """A raw file read into dictionary-encoded string columns, with where each record came from."""

    name: str
    kind: str
    raw: bytes
    table: pa.Table
    layout: LineLayout

    @property
    def rows_in(self) -> int:
        return self.layout.rows_in


def file_error(name: str, problems: Sequence[str]) -> DataValidationError:
    return DataValidationError(f"{name}: file-level validation failed: " + "; ".join(problems))


def not_utf8(name: str, raw: bytes) -> DataValidationError:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        start = raw.rfind(b"\n", 0, err.start) + 1
        end = raw.find(b"\n", err.start)
        snippet = raw[start : end if end >= 0 else len(raw)][:80].decode("utf-8", "backslashreplace")
        line = raw.count(b"\n", 0, err.start) + 1
        return file_error(name, [
            f"file_is_utf8: byte 0x{raw[err.start]:02x} on line {line} is not UTF-8 "
            f"(the line reads: {snippet}); re-save the file as UTF-8"
        ])
    return file_error(name, ["file_is_utf8: the CSV reader reported invalid UTF-8"])


def body_of(raw: bytes) -> bytes:
    return raw[len(BOM):] if raw.startswith(BOM) else raw


def head_records(name: str, raw: bytes, limit: int) -> list[list[str]]:
    """The header and up to ``limit`` records from the first 64 KiB (never cutting a character)."""
    body = body_of(raw)
    head = body[:HEAD_BYTES]
    if len(body) > HEAD_BYTES and b"\n" in head:
        head = head[: head.rfind(b"\n") + 1]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise not_utf8(name, raw) from None
    records: list[list[str]] = []
    try:
        for record in csv.reader(io.StringIO(text, newline="")):
            if record:
                records.append(record)
                if len(records) > limit:
                    break
    except csv.Error as err:
        raise file_error(name, [f"csv_parses: {err} (within the first {len(text)} characters)"]) from None
    return records


def read_records(name: str, raw: bytes, kind: str) -> CsvFile:
    """Read a file whose header passed the structure check; every data line ends up in the layout."""
    n_cols = len(COLUMNS[kind])
    # Sales files are never quoted across lines; allowing it would disable parallel parsing.
    newlines_in_values = kind != "sales"
    layout = layout_of(raw, n_cols, newlines_in_values) if b'"' in raw else None
    readable = without_lines(raw, layout.unbalanced) if layout is not None else raw
    table, n_malformed = _arrow_read(name, readable, kind, newlines_in_values)
    if layout is None:
        layout = simple_layout(raw, table.num_rows) if n_malformed == 0 else None
        layout = layout or layout_of(raw, n_cols, newlines_in_values)
    if len(layout.records) != table.num_rows or len(layout.malformed) != n_malformed \
            or not layout.covers_every_line():
        raise file_error(name, [
            f"line_accounting: the file has {layout.data_lines} data lines holding {len(layout.records)} "
            f"records and {len(layout.malformed)} malformed rows, but the CSV reader returned "
            f"{table.num_rows} records and {n_malformed} malformed rows"])
    return CsvFile(name=name, kind=kind, raw=raw, table=table, layout=layout)


def _arrow_read(name: str, raw: bytes, kind: str, newlines_in_values: bool) -> tuple[pa.Table, int]:
    """Every expected column as dictionary-encoded text, only the empty field null (the quarantine keeps
    "NaN" as written; the validation tables treat the null spellings as missing)."""
    expected = list(COLUMNS[kind])
    malformed = [0]

    def skip(row: object) -> str:
        malformed[0] += 1
        return "skip"

    try:
        table = pcsv.read_csv(
            pa.BufferReader(raw),
            read_options=pcsv.ReadOptions(use_threads=True, block_size=1 << 23),
            parse_options=pcsv.ParseOptions(newlines_in_values=newlines_in_values, invalid_row_handler=skip),
            convert_options=pcsv.ConvertOptions(
                column_types={c: STRING_DICT for c in expected}, include_columns=expected,
                strings_can_be_null=True, quoted_strings_can_be_null=True, null_values=[""],
            ),
        )
    except pa.ArrowInvalid as err:
        if "UTF8" in str(err) or "UTF-8" in str(err):
            raise not_utf8(name, raw) from None
        raise file_error(name, [f"csv_parses: {err}"]) from None
    return table, malformed[0]
