"""Step 1 — ingest: raw CSVs -> validated, typed Parquet lake, rejected rows -> quarantine.

Two kinds of failure:

- **file-level** (:class:`core.errors.DataValidationError`, never retried): the file is empty,
  not UTF-8, not CSV, its header is not exactly the expected columns (a ``;``-delimited file shows
  up here as one unexpected column), it has no data row; any problem at all in ``test.csv`` (the
  forecast's contract: a silently dropped test row would be a missing submission row). The step
  fails and writes nothing; the message names the file, the failed rules and offending values.
- **row-level** (sales files and the three reference files): the row goes to
  ``lake/quarantine/<stem>.parquet`` with its 1-based line number (header = line 1), the first
  rule it broke (``rule``) and all of them (``rules``); the rest of the file carries on.
  A row with the wrong number of fields (e.g. a truncated last line) is quarantined under
  ``field_count`` by the CSV reader, before GE sees the file.

Rows in = rows accepted + rows quarantined, for every file, always.

Incremental rules, decided per file from ``lake/manifest.json``:

- a file is skipped when its sha256, the sha256 of the raw files it is validated against
  (items/categories/shops for sales and test, categories for items) and the rules (config.ingest
  and :data:`core.expectations.RULES_VERSION`) are all unchanged and its outputs exist. So a new
  ``items.csv`` revalidates every sales file: a sale of an item that disappeared must now be
  quarantined, one of a newly listed item accepted.
- sales files are applied in arrival order (``sales_train.csv`` first, new drops by name), each
  replacing the months it contains. When only new drops arrive, only their months are written;
  when a known sales file must be revalidated, all sales files are re-applied and months no present
  file contains any more are removed.

Atomicity: every output of a run is written to ``lake/.staging-*`` (each file temp + rename), then a
journal listing the renames is written atomically, then the files are renamed into place with the
manifest last. A crash before the journal leaves the lake exactly as it was (staging is removed);
a crash after it is rolled forward at the start of the next run.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import html
import io
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from core.config import NestcastConfig
from core.errors import DataValidationError
from core.expectations import (
    COLUMNS,
    DATE_PARTS_PATTERN,
    INTEGER_PATTERN,
    NUMBER_PATTERN,
    REFERENCE_FILES,
    RULES_VERSION,
    TEST_FILE,
    kind_of,
)
from core.lake import LakePaths, read_json, write_json_atomic, write_parquet_atomic, write_text_atomic

if TYPE_CHECKING:
    from core.expectations import GEValidator

SALES_SCHEMA = pa.schema([
    ("date", pa.date32()),
    ("shop_id", pa.int16()),
    ("item_id", pa.int32()),
    ("item_price", pa.float32()),
    ("item_cnt_day", pa.float32()),
])
REFERENCE_SCHEMAS: dict[str, pa.Schema] = {
    "items": pa.schema([("item_id", pa.int32()), ("item_name", pa.string()), ("item_category_id", pa.int16())]),
    "item_categories": pa.schema([("item_category_id", pa.int16()), ("item_category_name", pa.string())]),
    "shops": pa.schema([("shop_id", pa.int16()), ("shop_name", pa.string())]),
    "test": pa.schema([("ID", pa.int32()), ("shop_id", pa.int16()), ("item_id", pa.int32())]),
}
_NUMERIC: dict[str, dict[str, bool]] = {  # numeric columns per kind -> integer?
    "sales": {"date_block_num": True, "shop_id": True, "item_id": True, "item_price": False, "item_cnt_day": False},
    "test": {"ID": True, "shop_id": True, "item_id": True},
    "items": {"item_id": True, "item_category_id": True},
    "item_categories": {"item_category_id": True},
    "shops": {"shop_id": True},
}
_ID_COLUMN = {"items": "item_id", "item_categories": "item_category_id", "shops": "shop_id", "test": "ID"}
_DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "item_categories": (),
    "shops": (),
    "items": ("item_categories.csv",),
    "sales": ("items.csv", "item_categories.csv", "shops.csv"),
    "test": ("items.csv", "item_categories.csv", "shops.csv"),
}
# Names have no null spelling but the empty field; in number-only files the usual spellings of NaN
# are "missing" (-> <col>_not_null) rather than "not a number".
_NULLS_TEXT = [""]
_NULLS_NUMERIC = ["", "NaN", "nan", "NA", "N/A", "NULL", "null", "None"]
_DICT = pa.dictionary(pa.int32(), pa.string())
_BOM = b"\xef\xbb\xbf"
_HEAD_BYTES = 1 << 16
_JOURNAL = ".journal.json"
_MANIFEST_VERSION = 1
FIELD_COUNT_RULE = "field_count"


# --- results -------------------------------------------------------------------------------------


class FileReport(BaseModel):
    """What ingest did with one raw file."""

    file: str
    kind: str
    sha256: str
    skipped: bool = Field(description="Already ingested with the same content, dependencies and rules.")
    rows_in: int
    rows_accepted: int
    rows_quarantined: int
    failed_rules: dict[str, int] = Field(
        default_factory=dict, description="Quarantined rows per rule (the first rule each row broke)."
    )
    months: list[int] = Field(default_factory=list, description="Months with accepted rows (sales).")
    timings: dict[str, float] = Field(default_factory=dict)


class IngestSummary(BaseModel):
    """The result of one ingest run; ``model_dump()`` is JSON-serialisable."""

    data_dir: str
    files: list[FileReport]
    rows_in: int
    rows_accepted: int
    rows_quarantined: int
    months: list[int] = Field(description="Months present in lake/sales after the run.")
    changed: bool = Field(description="Whether the run wrote anything.")
    written: list[str] = Field(default_factory=list, description="Lake paths written, relative to lake/.")
    deleted: list[str] = Field(default_factory=list)
    manifest: str
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds: ge_setup, read, validate, write, total."
    )

    def file(self, name: str) -> FileReport:
        for report in self.files:
            if report.file == name:
                return report
        raise KeyError(name)


# --- timing --------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, *others: dict[str, float]) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            for target in (self.seconds, *others):
                target[name] = target.get(name, 0.0) + elapsed


# --- reading -------------------------------------------------------------------------------------


@dataclass
class _Csv:
    """A raw file parsed into dictionary-encoded string columns (one code per row, distinct raw texts)."""

    name: str
    kind: str
    raw: bytes
    table: pa.Table
    malformed: list[str]
    _lines: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_cols(self) -> int:
        return len(COLUMNS[self.kind])

    def lines(self) -> tuple[np.ndarray, np.ndarray]:
        """1-based line numbers of (the records read, the rows skipped as malformed), computed on demand."""
        if self._lines is None:
            self._lines = _line_numbers(self.name, self.raw, self.n_cols, self.table.num_rows, len(self.malformed))
        return self._lines


def _fail(name: str, problems: Sequence[str]) -> DataValidationError:
    return DataValidationError(f"{name}: file-level validation failed: " + "; ".join(problems))


def _not_utf8(name: str, raw: bytes) -> DataValidationError:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        start = raw.rfind(b"\n", 0, err.start) + 1
        end = raw.find(b"\n", err.start)
        snippet = raw[start : end if end >= 0 else len(raw)][:80].decode("utf-8", "backslashreplace")
        line = raw.count(b"\n", 0, err.start) + 1
        return _fail(name, [
            f"file_is_utf8: byte 0x{raw[err.start]:02x} on line {line} is not UTF-8 "
            f"(the line reads: {snippet}); re-save the file as UTF-8"
        ])
    return _fail(name, ["file_is_utf8: the CSV reader reported invalid UTF-8"])


def _head_records(name: str, raw: bytes, limit: int) -> list[list[str]]:
    body = raw[len(_BOM):] if raw.startswith(_BOM) else raw
    head = body[:_HEAD_BYTES]
    if len(body) > _HEAD_BYTES and b"\n" in head:
        head = head[: head.rfind(b"\n") + 1]  # never cut a multi-byte character
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(name, raw) from None
    records: list[list[str]] = []
    for record in csv.reader(io.StringIO(text, newline="")):
        if record:
            records.append(record)
            if len(records) > limit:
                break
    return records


def _file_problems(result: Any, frame: pd.DataFrame | None = None) -> list[str]:
    """One line per failed expectation: rule, GE type, and a few offending raw values."""
    from core.expectations import expectation_rule

    problems = []
    for expectation_result in result.results:
        if expectation_result.success:
            continue
        rule, _, _ = expectation_rule(expectation_result)
        values = expectation_result.result or {}
        config = expectation_result.expectation_config
        if "details" in values and "mismatched" in (values["details"] or {}):
            mismatch = values["details"]["mismatched"]
            detail = ", ".join(f"{key} {sorted(map(str, value))}" for key, value in mismatch.items() if value)
        elif "observed_value" in values:
            detail = f"observed {_plain(values['observed_value'])!r}"
        else:
            examples = [_plain(v) for v in values.get("partial_unexpected_list", [])[:5]]
            index = values.get("unexpected_index_list") or []
            # Show the raw texts behind derived columns (``item_id__known`` is just True/False).
            columns = [config.kwargs["column"]] if "column" in config.kwargs else config.kwargs.get("column_list", [])
            raw = [c.split("__")[0] for c in columns]
            if frame is not None and index and raw and all(c in frame.columns for c in raw):
                picked = frame.loc[index[:5], raw]
                examples = picked.iloc[:, 0].tolist() if len(raw) == 1 else list(map(tuple, picked.values.tolist()))
            detail = f"{values.get('unexpected_count')} unexpected, e.g. {examples}"
        problems.append(f"{rule} ({config.type}): {detail}")
    return problems


def _plain(value: Any) -> Any:
    """GE's numpy scalars as plain Python, whole floats as ints, ``x__number`` keys as ``x``."""
    if isinstance(value, dict):
        return {str(k).split("__")[0]: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _read_csv(name: str, raw: bytes, kind: str, ge: GEValidator, clock: _Clock, timings: dict[str, float]
              ) -> tuple[_Csv, Any]:
    """File-level checks (before GE, then GE's structure suite on the header and a sample), then the read."""
    from core.expectations import structure_suite

    expected = list(COLUMNS[kind])
    with clock.phase("validate", timings):
        body = raw[len(_BOM):] if raw.startswith(_BOM) else raw
        if not body.strip():
            raise _fail(name, ["file_not_empty: the file has no header and no rows"])
        records = _head_records(name, raw, limit=5)
        header, sample = records[0], records[1:]
        frame = pd.DataFrame([(r + [None] * len(header))[: len(header)] for r in sample],
                             columns=header, dtype=object)
        structure = ge.validate(frame, structure_suite(kind))
        if not structure.success:
            problems = _file_problems(structure)
            if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
                problems.append(f"the header {header[0]!r} looks delimited by something other than ','")
            raise _fail(name, problems)
    with clock.phase("read", timings):
        malformed: list[str] = []

        def skip(row: Any) -> str:
            malformed.append(row.text)
            return "skip"

        try:
            table = pcsv.read_csv(
                pa.BufferReader(raw),
                read_options=pcsv.ReadOptions(use_threads=True, block_size=1 << 23),
                # Sales files are never quoted across lines; allowing it would disable parallel parsing.
                parse_options=pcsv.ParseOptions(newlines_in_values=kind != "sales", invalid_row_handler=skip),
                convert_options=pcsv.ConvertOptions(
                    column_types={c: _DICT for c in expected}, include_columns=expected,
                    strings_can_be_null=True, quoted_strings_can_be_null=True,
                    null_values=_NULLS_TEXT if kind in ("items", "item_categories", "shops") else _NULLS_NUMERIC,
                ),
            )
        except pa.ArrowInvalid as err:
            if "UTF8" in str(err) or "UTF-8" in str(err):
                raise _not_utf8(name, raw) from None
            raise _fail(name, [f"csv_parses: {err}"]) from None
    return _Csv(name=name, kind=kind, raw=raw, table=table, malformed=malformed), structure


# --- line numbers --------------------------------------------------------------------------------


def _line_numbers(name: str, raw: bytes, n_cols: int, n_records: int, n_malformed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Map the reader's records and skipped rows back to physical lines (header = line 1).

    Unquoted files: a vectorised scan of newlines (and commas, only when rows were skipped).
    Quoted files (a name may hold a comma or a newline): the csv module walks the records.
    Both are checked against what pyarrow read, so a disagreement fails loudly instead of
    quarantining under the wrong line.
    """
    candidates: list[Any] = []
    quoted = b'"' in raw
    lines_in_file = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    if not quoted and n_malformed == 0 and lines_in_file == n_records + 1:
        # Every line is the header or a record (a blank line would make one more): record i is line i + 2.
        candidates.append((np.arange(n_records, dtype=np.int64) + 2, np.empty(0, dtype=np.int64)))
    elif not quoted:
        candidates.append(_scan_lines(raw, n_cols, with_fields=n_malformed > 0))
    candidates.append(lambda: _csv_lines(raw, n_cols))
    for candidate in candidates:
        records, malformed = candidate() if callable(candidate) else candidate
        if len(records) == n_records and len(malformed) == n_malformed:
            return records, malformed
    raise _fail(name, [f"line_numbers: cannot map the {n_records} records read back to lines of the file"])


def _scan_lines(raw: bytes, n_cols: int, with_fields: bool) -> tuple[np.ndarray, np.ndarray]:
    buf = np.frombuffer(raw, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(buf)]))
    lengths = ends - starts
    has_cr = np.zeros(len(starts), dtype=bool)
    nonzero = lengths > 0
    has_cr[nonzero] = buf[ends[nonzero] - 1] == 13
    content = np.flatnonzero(lengths - has_cr > 0)  # pyarrow skips empty lines
    data = content[1:]  # the first non-empty line is the header
    if not with_fields or len(data) == 0:
        return data + 1, np.empty(0, dtype=np.int64)
    commas = (buf == 44).view(np.uint8)
    # reduceat sums up to the next data line's start: the empty lines between hold no commas.
    fields = np.add.reduceat(commas, starts[data], dtype=np.int64) + 1
    ok = fields == n_cols
    return data[ok] + 1, data[~ok] + 1


def _line_texts(raw: bytes, lines: np.ndarray) -> list[str]:
    """The text of some physical lines (1-based, the skipped rows: few), without the line break."""
    if len(lines) == 0:
        return []
    newlines = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == 10)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(raw)]))
    return [raw[starts[line - 1] : ends[line - 1]].decode("utf-8", "replace").rstrip("\r") for line in lines]


def _csv_lines(raw: bytes, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    body = raw[len(_BOM):] if raw.startswith(_BOM) else raw
    reader = csv.reader(io.StringIO(body.decode("utf-8"), newline=""))
    records: list[int] = []
    malformed: list[int] = []
    seen_header = False
    previous = 0
    for row in reader:
        first_line = previous + 1
        previous = reader.line_num
        if not row:
            continue
        if not seen_header:
            seen_header = True
            continue
        (records if len(row) == n_cols else malformed).append(first_line)
    return np.asarray(records, dtype=np.int64), np.asarray(malformed, dtype=np.int64)


# --- columns and validation tables ---------------------------------------------------------------


@dataclass
class _Column:
    """One dictionary-encoded column: ``codes[row]`` indexes ``raw`` (distinct texts, None last if any)."""

    codes: np.ndarray
    values: pa.Array
    has_null: bool

    @classmethod
    def of(cls, chunked: pa.ChunkedArray) -> _Column:
        array = chunked.combine_chunks() if chunked.num_chunks else pa.array([], type=_DICT)
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        values = array.dictionary
        has_null = array.null_count > 0
        indices = pc.fill_null(array.indices, len(values)) if has_null else array.indices
        codes = indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        return cls(codes=codes, values=values, has_null=has_null)

    @functools.cached_property
    def raw(self) -> np.ndarray:
        texts = self.values.to_numpy(zero_copy_only=False).astype(object)
        return np.append(texts, None) if self.has_null else texts

    def number(self, integer: bool) -> np.ndarray:
        """Each distinct text as float64, NaN where missing or not matching the rule's pattern."""
        pattern = INTEGER_PATTERN if integer else NUMBER_PATTERN
        ok = pc.match_substring_regex(self.values, pattern)
        gated = pc.if_else(ok, self.values, pa.scalar(None, pa.string()))
        parsed = pc.cast(gated, pa.float64()).to_numpy(zero_copy_only=False)
        return np.append(parsed, np.nan) if self.has_null else parsed


@dataclass
class _Table:
    """A frame GE validates; ``codes[row]`` is the frame position a row maps to (None: index = row)."""

    name: str
    frame: pd.DataFrame
    codes: np.ndarray | None = None


@dataclass
class _Verdict:
    results: list[Any]
    rules: list[str]
    masks: dict[str, np.ndarray]  # only the rules that failed some row
    file_problems: list[str] = field(default_factory=list)


def _evaluate(ge: GEValidator, tables: Sequence[_Table], suites: dict[str, Any], n_rows: int) -> _Verdict:
    """Run GE on each table; turn each expectation's unexpected_index_list into a row mask."""
    from core.expectations import expectation_rule, rule_names

    results = []
    masks: dict[str, np.ndarray] = {}
    file_problems: list[str] = []
    for table in tables:
        result = ge.validate(table.frame, suites[table.name])
        results.append(result)
        if result.success:
            continue
        for expectation_result in result.results:
            if expectation_result.success:
                continue
            rule, level, _ = expectation_rule(expectation_result)
            if level == "file":
                continue
            positions = np.asarray(expectation_result.result.get("unexpected_index_list") or [], dtype=np.int64)
            if table.codes is None:
                mask = np.zeros(n_rows, dtype=bool)
                mask[positions] = True
            else:
                bad = np.zeros(len(table.frame), dtype=bool)
                bad[positions] = True
                mask = bad[table.codes]
            masks[rule] = masks[rule] | mask if rule in masks else mask
        failed = [r for r in result.results if not r.success]
        file_problems.extend(problem for problem, r in zip(_file_problems(result, table.frame), failed, strict=True)
                             if expectation_rule(r)[1] == "file")
    return _Verdict(results=results, rules=rule_names(suites), masks=masks, file_problems=file_problems)


def _primary_rule(verdict: _Verdict, n_rows: int) -> np.ndarray:
    """Index (into verdict.rules) of the first rule each row broke; -1 for accepted rows."""
    primary = np.full(n_rows, -1, dtype=np.int16)
    for index, rule in enumerate(verdict.rules):
        mask = verdict.masks.get(rule)
        if mask is not None:
            primary[(primary < 0) & mask] = index
    return primary


def _quarantine(csv_file: _Csv, columns: dict[str, _Column], verdict: _Verdict, primary: np.ndarray
                ) -> tuple[pa.Table, dict[str, int]]:
    """Rejected rows (failed rules, then malformed rows), ordered by line number; counts by first rule."""
    names = list(COLUMNS[csv_file.kind])
    rows = np.flatnonzero(primary >= 0)
    counts: dict[str, int] = {}
    if len(rows) == 0 and not csv_file.malformed:
        return _empty_quarantine(names), counts
    record_lines, malformed_lines = csv_file.lines()
    first = np.asarray(verdict.rules, dtype=object)[primary[rows]] if len(rows) else np.empty(0, dtype=object)
    every = np.full(len(rows), "", dtype=object)
    for rule in verdict.rules:
        mask = verdict.masks.get(rule)
        if mask is not None:
            hit = mask[rows]
            every[hit] = every[hit] + (rule + ";")
    data: dict[str, list[Any] | np.ndarray] = {
        "line_number": np.concatenate((record_lines[rows], malformed_lines)),
        "rule": np.concatenate((first, np.full(len(malformed_lines), FIELD_COUNT_RULE, dtype=object))),
        "rules": np.concatenate((pd.Series(every, dtype=object).str[:-1].to_numpy(dtype=object),
                                 np.full(len(malformed_lines), FIELD_COUNT_RULE, dtype=object))),
    }
    # The reader reports skipped rows from parallel blocks, so their texts are taken from the lines.
    texts = _line_texts(csv_file.raw, malformed_lines)
    split = pd.DataFrame(list(csv.reader(texts)), columns=None, dtype=object).reindex(columns=range(len(names)))
    for position, column in enumerate(names):
        kept = columns[column].raw[columns[column].codes[rows]] if len(rows) else np.empty(0, dtype=object)
        broken = split[position].to_numpy(dtype=object)
        broken[pd.isna(broken)] = None
        data[column] = np.concatenate((kept, broken))
    data["raw_line"] = np.concatenate((np.full(len(rows), None, dtype=object), np.asarray(texts, dtype=object)))
    found, found_counts = np.unique(np.asarray(data["rule"], dtype=str), return_counts=True)
    counts = dict(zip(found.tolist(), found_counts.tolist(), strict=True))
    order = np.argsort(data["line_number"], kind="stable")
    arrays = {"source_file": pa.array(np.full(len(order), csv_file.name, dtype=object), pa.string()),
              "line_number": pa.array(np.asarray(data["line_number"])[order], pa.int64())}
    for key in ("rule", "rules", *names, "raw_line"):
        arrays[key] = pa.array(np.asarray(data[key], dtype=object)[order], pa.string())
    ordered = {rule: counts[rule] for rule in [*verdict.rules, FIELD_COUNT_RULE] if rule in counts}
    return pa.table(arrays), ordered


def _empty_quarantine(names: Sequence[str]) -> pa.Table:
    fields = [("source_file", pa.string()), ("line_number", pa.int64()), ("rule", pa.string()),
              ("rules", pa.string()), *[(c, pa.string()) for c in names], ("raw_line", pa.string())]
    return pa.schema(fields).empty_table()


def _parse_dates(column: _Column, first_month: str) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct date text: months since ``first_month`` (float, NaN when not a dd.mm.yyyy calendar
    day) and days since 1970-01-01 (int32, 0 when not). Vectorised with numpy's calendar, which, unlike
    pandas' nanosecond timestamps, covers every year ``datetime.strptime`` (GE's rule) accepts."""
    parts = pc.extract_regex(column.values, DATE_PARTS_PATTERN)
    matched = parts.is_valid().to_numpy(zero_copy_only=False)

    def part(name: str) -> np.ndarray:
        text = pc.if_else(parts.is_valid(), pc.struct_field(parts, name), "0")
        return pc.cast(text, pa.int64()).to_numpy(zero_copy_only=False)

    day, month, year = part("day"), part("month"), part("year")
    ok = matched & (year >= 1) & (month >= 1) & (month <= 12) & (day >= 1)
    month_index = np.where(ok, (year - 1970) * 12 + month - 1, 0)
    start = month_index.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
    following = (month_index + 1).astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
    ok &= day <= following - start
    first_year, first_month_number = (int(p) for p in first_month.split("-"))
    block = np.where(ok, (year * 12 + month - 1) - (first_year * 12 + first_month_number - 1), np.nan)
    days = np.where(ok, start + day - 1, 0).astype(np.int32)
    if column.has_null:
        block, days = np.append(block, np.nan), np.append(days, np.int32(0))
    return block.astype(np.float64), days


def _unique_pairs(a: np.ndarray, b: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense codes for the distinct (a, b) code pairs: (pair code per row, a per pair, b per pair)."""
    key = a.astype(np.int64) * nb + b
    span = int(key.max()) + 1 if len(key) else 0
    if span <= 50_000_000:  # a bitmap over the key space beats hashing 3 M keys
        present = np.zeros(span, dtype=bool)
        present[key] = True
        uniques = np.flatnonzero(present)
        lookup = np.zeros(span, dtype=np.int32)
        lookup[uniques] = np.arange(len(uniques), dtype=np.int32)
        codes = lookup[key]
    else:
        codes_, uniques = pd.factorize(key)
        codes = codes_.astype(np.int32)
    return codes, uniques // nb, uniques % nb


def _duplicate_rows(parts: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose raw values occur more than once, and each one's 1-based occurrence in file order."""
    radix = 1
    for _, size in parts:
        radix *= max(size, 1)
    if radix < 2**62:
        key = np.zeros(len(parts[0][0]), dtype=np.int64)
        for codes, size in parts:
            key = key * max(size, 1) + codes
        keys = pd.Series(key)
    else:  # too many distinct values to pack into one integer
        keys = pd.DataFrame({str(i): codes for i, (codes, _) in enumerate(parts)})
    repeated = np.flatnonzero(keys.duplicated(keep=False).to_numpy())
    if len(repeated) == 0:
        return repeated, np.empty(0, dtype=np.int64)
    subset = keys.iloc[repeated]
    group = subset if isinstance(subset, pd.Series) else [subset[c] for c in subset.columns]
    occurrence = subset.groupby(group, sort=False).cumcount().to_numpy() + 1
    return repeated, occurrence


# --- per-kind validation -------------------------------------------------------------------------


@dataclass
class _Outcome:
    report: FileReport
    accepted: pa.Table
    quarantine: pa.Table
    validation: Any


def _report(csv_file: _Csv, sha: str, n_accepted: int, quarantine: pa.Table, counts: dict[str, int],
            months: list[int], timings: dict[str, float]) -> FileReport:
    rows_in = csv_file.table.num_rows + len(csv_file.malformed)
    if n_accepted + quarantine.num_rows != rows_in:  # the one invariant of the step
        raise RuntimeError(f"{csv_file.name}: {rows_in} rows in != {n_accepted} accepted + "
                           f"{quarantine.num_rows} quarantined")
    return FileReport(file=csv_file.name, kind=csv_file.kind, sha256=sha, skipped=False, rows_in=rows_in,
                      rows_accepted=n_accepted, rows_quarantined=quarantine.num_rows, failed_rules=counts,
                      months=months, timings=timings)


def _check_parsed(rule_ok: np.ndarray, parsed: np.ndarray, what: str) -> None:
    """Values GE accepted must have parsed: GE and the parser share their patterns, so this is a bug check."""
    if np.isnan(parsed[rule_ok]).any():
        raise RuntimeError(f"{what}: a value accepted by the rules did not parse")


def _validate_sales(csv_file: _Csv, sha: str, config: NestcastConfig, shop_ids: Sequence[int],
                    item_ids: Sequence[int], ge: GEValidator, clock: _Clock, timings: dict[str, float]) -> _Outcome:
    from core.expectations import sales_suites

    with clock.phase("validate", timings):
        n = csv_file.table.num_rows
        cols = {c: _Column.of(csv_file.table.column(c)) for c in COLUMNS["sales"]}
        numbers = {c: cols[c].number(integer) for c, integer in _NUMERIC["sales"].items()}
        date_raw = cols["date"].raw
        month_block, day_numbers = _parse_dates(cols["date"], config.ingest.first_month)
        n_dbn = len(cols["date_block_num"].raw)
        pair_codes, pair_date, pair_dbn = _unique_pairs(cols["date"].codes, cols["date_block_num"].codes, n_dbn)
        tables = [_Table("date_block", pd.DataFrame({
            "date": date_raw[pair_date],
            "date_block_num": cols["date_block_num"].raw[pair_dbn],
            "date_block_num__number": numbers["date_block_num"][pair_dbn],
            "date__month_block": month_block[pair_date],
        }), pair_codes)]
        foreign = {"shop_id": shop_ids, "item_id": item_ids}
        for c in ("shop_id", "item_id", "item_price", "item_cnt_day"):
            frame = pd.DataFrame({c: cols[c].raw, f"{c}__number": numbers[c]})
            if c in foreign:
                frame[f"{c}__known"] = _known(numbers[c], foreign[c])
            tables.append(_Table(c, frame, cols[c].codes))
        repeated, occurrence = _duplicate_rows(
            [(pair_codes, len(pair_date))] + [(cols[c].codes, len(cols[c].raw)) for c in COLUMNS["sales"][2:]]
        )
        duplicates = pd.DataFrame({c: cols[c].raw[cols[c].codes[repeated]] for c in COLUMNS["sales"]},
                                  index=pd.Index(repeated))
        duplicates["row_occurrence"] = occurrence
        tables.append(_Table("duplicates", duplicates))
        suites = sales_suites(config.ingest, shop_ids, item_ids)
        verdict = _evaluate(ge, tables, suites, n)
        primary = _primary_rule(verdict, n)
        quarantine, counts = _quarantine(csv_file, cols, verdict, primary)

        ok = primary < 0
        pair_ok = np.zeros(len(pair_date), dtype=bool)
        pair_ok[pair_codes[ok]] = True
        _check_parsed(pair_ok, month_block[pair_date], "date")
        _check_parsed(pair_ok, numbers["date_block_num"][pair_dbn], "date_block_num")
        for c in ("shop_id", "item_id", "item_price", "item_cnt_day"):
            used = np.zeros(len(numbers[c]), dtype=bool)
            used[cols[c].codes[ok]] = True
            _check_parsed(used, numbers[c], c)
        months_of_rows = numbers["date_block_num"][pair_dbn][pair_codes[ok]].astype(np.int16)
        order = np.argsort(months_of_rows, kind="stable")  # partitions are contiguous slices; file order kept
        rows = np.flatnonzero(ok)[order]
        accepted = pa.table({
            "date_block_num": pa.array(months_of_rows[order], pa.int16()),
            "date": pa.array(day_numbers[pair_date][pair_codes[rows]], pa.int32()).cast(pa.date32()),
            "shop_id": pa.array(numbers["shop_id"][cols["shop_id"].codes[rows]].astype(np.int16)),
            "item_id": pa.array(numbers["item_id"][cols["item_id"].codes[rows]].astype(np.int32)),
            "item_price": pa.array(numbers["item_price"][cols["item_price"].codes[rows]].astype(np.float32)),
            "item_cnt_day": pa.array(numbers["item_cnt_day"][cols["item_cnt_day"].codes[rows]].astype(np.float32)),
        })
        months = sorted(int(m) for m in np.unique(months_of_rows))
    report = _report(csv_file, sha, accepted.num_rows, quarantine, counts, months, timings)
    return _Outcome(report, accepted, quarantine, verdict.results)


def _known(numbers: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """True/False: is the number one of ``ids``; None where there is no number (another rule's case)."""
    known = np.isin(numbers, np.asarray(ids, dtype=np.float64)).astype(object)
    known[np.isnan(numbers)] = None
    return known


def _rows_frame(kind: str, cols: dict[str, _Column], foreign: dict[str, Sequence[int]]
                ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The row-by-row frame of a small file: raw texts, ``<col>__number``, ``__occurrence``, ``__known``."""
    frame = pd.DataFrame({c: cols[c].raw[cols[c].codes] for c in COLUMNS[kind]})
    numbers = {}
    for c, integer in _NUMERIC[kind].items():
        numbers[c] = cols[c].number(integer)[cols[c].codes]
        frame[f"{c}__number"] = numbers[c]
        if c in foreign:
            frame[f"{c}__known"] = _known(numbers[c], foreign[c])
    ids = numbers[_ID_COLUMN[kind]]
    occurrence = np.full(len(ids), np.nan)
    present = ~np.isnan(ids)
    series = pd.Series(ids[present])
    occurrence[present] = series.groupby(series, sort=False).cumcount().to_numpy() + 1
    frame[f"{_ID_COLUMN[kind]}__occurrence"] = occurrence
    return frame, numbers


def _validate_test(csv_file: _Csv, sha: str, suites: dict[str, Any], foreign: dict[str, Sequence[int]],
                   ge: GEValidator, clock: _Clock, timings: dict[str, float]) -> _Outcome:
    """test.csv: any failed rule, or a row without exactly three fields, fails the file."""
    with clock.phase("validate", timings):
        n = csv_file.table.num_rows
        cols = {c: _Column.of(csv_file.table.column(c)) for c in COLUMNS["test"]}
        tables = []
        numbers = {}
        for c in COLUMNS["test"]:
            parsed = cols[c].number(integer=True)
            frame = pd.DataFrame({c: cols[c].raw, f"{c}__number": parsed})
            if c in foreign:
                frame[f"{c}__known"] = _known(parsed, foreign[c])
            tables.append(_Table(c, frame, cols[c].codes))
            numbers[c] = parsed[cols[c].codes]
        tables.append(_Table("rows", pd.DataFrame({f"{c}__number": v for c, v in numbers.items()})))
        verdict = _evaluate(ge, tables, suites, n)
        problems = list(verdict.file_problems)
        if csv_file.malformed:
            lines = csv_file.lines()[1]
            problems.append(f"{FIELD_COUNT_RULE}: {len(lines)} rows without exactly 3 fields, "
                            f"e.g. lines {lines[:5].tolist()}: {_line_texts(csv_file.raw, lines[:3])}")
        if problems:
            raise _fail(csv_file.name, problems)
        schema = REFERENCE_SCHEMAS["test"]
        accepted = pa.Table.from_arrays(
            [pa.array(numbers[f.name].astype(f.type.to_pandas_dtype()), f.type) for f in schema], schema=schema
        ).sort_by("ID")
    report = _report(csv_file, sha, accepted.num_rows, _empty_quarantine(COLUMNS["test"]), {}, [], timings)
    return _Outcome(report, accepted, _empty_quarantine(COLUMNS["test"]), verdict.results)


def _validate_small(csv_file: _Csv, sha: str, suites: dict[str, Any], foreign: dict[str, Sequence[int]],
                    ge: GEValidator, clock: _Clock, timings: dict[str, float]) -> _Outcome:
    """items / item_categories / shops: row-level rules on the rows themselves (small files)."""
    kind = csv_file.kind
    with clock.phase("validate", timings):
        n = csv_file.table.num_rows
        cols = {c: _Column.of(csv_file.table.column(c)) for c in COLUMNS[kind]}
        frame, numbers = _rows_frame(kind, cols, foreign)
        verdict = _evaluate(ge, [_Table("rows", frame)], suites, n)
        primary = _primary_rule(verdict, n)
        quarantine, counts = _quarantine(csv_file, cols, verdict, primary)
        ok = primary < 0
        schema = REFERENCE_SCHEMAS[kind]
        arrays = []
        for f in schema:
            source = numbers[f.name] if f.name in numbers else cols[f.name].raw[cols[f.name].codes]
            values = source[ok]
            arrays.append(pa.array(values.astype(f.type.to_pandas_dtype()) if f.name in numbers else values, f.type))
        accepted = pa.Table.from_arrays(arrays, schema=schema).sort_by(_ID_COLUMN[kind])
    report = _report(csv_file, sha, accepted.num_rows, quarantine, counts, [], timings)
    return _Outcome(report, accepted, quarantine, verdict.results)


# --- the transaction -----------------------------------------------------------------------------


class _Transaction:
    """Stage every output under lake/.staging-*, then journal + rename into place (manifest last)."""

    def __init__(self, lake: Path) -> None:
        self.lake = lake
        self.staging = lake / f".staging-{uuid.uuid4().hex[:12]}"
        self.moves: list[str] = []
        self.deletes: list[str] = []
        self.committing = False

    def _stage(self, target: Path) -> Path:
        rel = target.relative_to(self.lake).as_posix()
        if rel not in self.moves:
            self.moves.append(rel)
        return self.staging / rel

    def parquet(self, target: Path, table: pa.Table) -> None:
        write_parquet_atomic(self._stage(target), table)

    def json(self, target: Path, payload: Any) -> None:
        write_json_atomic(self._stage(target), payload)

    def text(self, target: Path, text: str) -> None:
        write_text_atomic(self._stage(target), text)

    def delete(self, target: Path) -> None:
        self.deletes.append(target.relative_to(self.lake).as_posix())

    @property
    def empty(self) -> bool:
        return not self.moves and not self.deletes

    def commit(self) -> None:
        manifest = [m for m in self.moves if m == "manifest.json"]
        journal = {"staging": self.staging.name, "moves": [m for m in self.moves if m != "manifest.json"] + manifest,
                   "deletes": self.deletes}
        self.committing = True
        write_json_atomic(self.lake / _JOURNAL, journal)
        _apply_journal(self.lake)

    def abort(self) -> None:
        if not self.committing:  # after the journal, the staging area is needed to roll forward
            shutil.rmtree(self.staging, ignore_errors=True)


def _apply_journal(lake: Path) -> None:
    journal = read_json(lake / _JOURNAL)
    staging = lake / journal["staging"]
    moves = list(journal["moves"])
    last = [m for m in moves if m == "manifest.json"]
    for rel in [m for m in moves if m != "manifest.json"]:
        _move(staging / rel, lake / rel)
    for rel in journal["deletes"]:
        target = lake / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
            with contextlib.suppress(OSError):
                target.parent.rmdir()  # the empty month directory
    for rel in last:
        _move(staging / rel, lake / rel)
    (lake / _JOURNAL).unlink()
    shutil.rmtree(staging, ignore_errors=True)


def _move(source: Path, target: Path) -> None:
    if source.exists():  # already moved by an interrupted attempt
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


_TMP_NAME = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


def _recover(paths: LakePaths) -> None:
    """Finish a commit that was interrupted after its journal; drop debris of runs that died before it."""
    if (paths.lake / _JOURNAL).exists():
        _apply_journal(paths.lake)
    if not paths.lake.exists():
        return
    for stale in paths.lake.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for area in (paths.lake, paths.sales, paths.reference, paths.quarantine, paths.validation):
        if area.exists():
            for entry in [area, *area.glob("date_block_num=*")]:
                for path in entry.iterdir() if entry.is_dir() else []:
                    if _TMP_NAME.match(path.name):
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


# --- the step ------------------------------------------------------------------------------------


def _rules_sha(config: NestcastConfig) -> str:
    payload = json.dumps({"rules": RULES_VERSION, "ingest": config.ingest.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _partition(paths: LakePaths, month: int) -> Path:
    return paths.sales / f"date_block_num={month}" / "data.parquet"


def _stem(name: str) -> str:
    return Path(name).stem


def _validation_doc(outcome_name: str, sha: str, results: Sequence[Any], report: FileReport) -> tuple[dict, str]:
    from core.expectations import combine_results, render_data_docs, trim_for_docs

    meta = {"file": outcome_name, "sha256": sha, "rows_in": report.rows_in, "rows_accepted": report.rows_accepted,
            "rows_quarantined": report.rows_quarantined, "failed_rules": report.failed_rules,
            "note": "sales rules run on distinct values per column (element_count = distinct values); "
                    "rows_* and failed_rules count rows"}
    combined = trim_for_docs(combine_results(outcome_name, results, meta))
    payload = combined.to_json_dict()
    try:
        html = render_data_docs(combined)
    except Exception as err:  # noqa: BLE001 - docs must never fail the step
        html = f"<html><body><h1>{outcome_name}</h1><p>Data Docs rendering failed: {err}</p></body></html>"
    return payload, html


def _index_html(manifest: dict[str, Any]) -> str:
    rows = []
    for name, entry in sorted(manifest["files"].items()):
        rules = ", ".join(f"{rule}: {count}" for rule, count in entry.get("failed_rules", {}).items()) or "-"
        stem = html.escape(_stem(name), quote=True)
        rows.append(
            f"<tr><td><a href='{stem}.html'>{html.escape(name)}</a></td><td>{entry['rows_in']}</td>"
            f"<td>{entry['rows_accepted']}</td><td>{entry['rows_quarantined']}</td><td>{html.escape(rules)}</td>"
            f"<td>{entry['ingested_at']}</td><td><a href='{stem}.json'>json</a></td></tr>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>nestcast ingest validation</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 10px;border-bottom:1px solid #ddd}</style></head>"
        "<body><h1>Ingest validation</h1><table><tr><th>file</th><th>rows in</th><th>accepted</th>"
        "<th>quarantined</th><th>quarantined by rule</th><th>ingested at</th><th>GE result</th></tr>"
        + "".join(rows) + "</table></body></html>\n"
    )


def _discover(paths: LakePaths) -> dict[str, Path]:
    if not paths.raw.is_dir():
        raise DataValidationError(f"raw directory {paths.raw} does not exist")
    found = {p.name: p for p in sorted(paths.raw.iterdir()) if p.is_file() and kind_of(p.name)}
    missing = [name for name in REFERENCE_FILES.values() if name not in found]
    if not any(kind_of(name) == "sales" for name in found):
        missing.append("sales_train.csv (or any sales_*.csv)")
    if missing:
        raise DataValidationError(f"{paths.raw}: required raw files missing: {', '.join(missing)}")
    return found


def _sales_order(names: Sequence[str], known: dict[str, Any]) -> list[str]:
    """Arrival order: files already ingested by their sequence, then new ones (sales_train.csv first)."""
    return sorted(names, key=lambda n: (known[n].get("seq", 0) if n in known else float("inf"),
                                        n != "sales_train.csv", n))


@contextlib.contextmanager
def _exclusive(paths: LakePaths) -> Iterator[None]:
    """One ingest per data dir at a time (a cron and a manual run may overlap): the second waits.

    An OS file lock, so a crashed holder releases it; where fcntl is missing the lock is skipped.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / ".ingest.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ingest(config: NestcastConfig) -> IngestSummary:
    """Validate the raw files of ``config.data_dir`` and bring the lake up to date with them."""
    with _exclusive(LakePaths(config.data_dir)):
        return _ingest(config)


def _ingest(config: NestcastConfig) -> IngestSummary:
    clock = _Clock()
    start = time.perf_counter()
    paths = LakePaths(config.data_dir)
    _recover(paths)
    raw_files = _discover(paths)
    manifest = read_json(paths.manifest, None) or {"version": _MANIFEST_VERSION, "files": {}, "months": {}}
    rules_sha = _rules_sha(config)
    with clock.phase("read"):
        shas = {name: _file_sha(path) for name, path in raw_files.items()}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    state = _Run(config, paths, clock, manifest, shas, rules_sha, now)

    tx = _Transaction(paths.lake)
    try:
        for kind, name in REFERENCE_FILES.items():
            state.reference(kind, name, raw_files[name])
        state.sales({n: p for n, p in raw_files.items() if kind_of(n) == "sales"})
        if TEST_FILE in raw_files:
            state.test(raw_files[TEST_FILE])
        if state.outcomes or state.deletes:
            with clock.phase("write"):
                state.stage(tx)
                tx.commit()
    except BaseException:
        tx.abort()
        raise
    clock.seconds["total"] = time.perf_counter() - start
    reports = state.reports
    months = sorted(int(m) for m in manifest["months"])
    return IngestSummary(
        data_dir=str(config.data_dir), files=reports,
        rows_in=sum(r.rows_in for r in reports), rows_accepted=sum(r.rows_accepted for r in reports),
        rows_quarantined=sum(r.rows_quarantined for r in reports), months=months,
        changed=not tx.empty, written=list(tx.moves), deleted=list(tx.deletes), manifest=str(paths.manifest),
        timings={k: round(v, 4) for k, v in clock.seconds.items()},
    )


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class _Run:
    """The bookkeeping of one ingest run: what to skip, what was validated, what to stage."""

    def __init__(self, config: NestcastConfig, paths: LakePaths, clock: _Clock, manifest: dict[str, Any],
                 shas: dict[str, str], rules_sha: str, now: str) -> None:
        self.config, self.paths, self.clock, self.manifest = config, paths, clock, manifest
        self.shas, self.rules_sha, self.now = shas, rules_sha, now
        self.outcomes: dict[str, _Outcome] = {}
        self.reports: list[FileReport] = []
        self.ids: dict[str, list[int]] = {}
        self.month_owner: dict[int, str] = {int(m): f for m, f in manifest.get("months", {}).items()}
        self.sales_tables: dict[str, pa.Table] = {}
        self.deletes: list[Path] = []
        self._ge: GEValidator | None = None
        self._structure: dict[str, Any] = {}

    @property
    def ge(self) -> GEValidator:
        if self._ge is None:
            with self.clock.phase("ge_setup"):
                from core.expectations import GEValidator

                self._ge = GEValidator()
        return self._ge

    def _depends(self, kind: str) -> dict[str, str]:
        return {name: self.shas[name] for name in _DEPENDS_ON[kind]}

    def _unchanged(self, name: str, kind: str, outputs: Sequence[Path]) -> bool:
        entry = self.manifest["files"].get(name)
        return bool(
            entry and entry["sha256"] == self.shas[name] and entry.get("depends_on") == self._depends(kind)
            and entry.get("rules_sha256") == self.rules_sha and all(p.exists() for p in outputs)
        )

    def _skipped(self, name: str) -> None:
        entry = self.manifest["files"][name]
        self.reports.append(FileReport(
            file=name, kind=entry["kind"], sha256=entry["sha256"], skipped=True, rows_in=entry["rows_in"],
            rows_accepted=entry["rows_accepted"], rows_quarantined=entry["rows_quarantined"],
            failed_rules=entry.get("failed_rules", {}), months=entry.get("months", []),
        ))

    def _load(self, name: str, path: Path, kind: str, timings: dict[str, float]) -> _Csv:
        with self.clock.phase("read", timings):
            raw = path.read_bytes()
        csv_file, structure = _read_csv(name, raw, kind, self.ge, self.clock, timings)
        self._structure[name] = structure
        return csv_file

    def _accept(self, name: str, outcome: _Outcome) -> None:
        outcome.validation = [self._structure.pop(name), *outcome.validation]
        self.outcomes[name] = outcome
        self.reports.append(outcome.report)

    def reference(self, kind: str, name: str, path: Path) -> None:
        target = self.paths.reference / f"{kind}.parquet"
        if self._unchanged(name, kind, [target]):
            self._skipped(name)
            self.ids[kind] = pq.read_table(target, columns=[_ID_COLUMN[kind]]).column(0).to_pylist()
            return
        from core.expectations import item_categories_suites, items_suites, shops_suites

        timings: dict[str, float] = {}
        csv_file = self._load(name, path, kind, timings)
        if kind == "items":
            categories = self.ids["item_categories"]
            suites, foreign = items_suites(categories), {"item_category_id": categories}
        else:
            suites, foreign = (item_categories_suites() if kind == "item_categories" else shops_suites()), {}
        outcome = _validate_small(csv_file, self.shas[name], suites, foreign, self.ge, self.clock, timings)
        self.ids[kind] = outcome.accepted.column(_ID_COLUMN[kind]).to_pylist()
        self._accept(name, outcome)

    def test(self, path: Path) -> None:
        target = self.paths.reference / "test.parquet"
        if self._unchanged(TEST_FILE, "test", [target]):
            self._skipped(TEST_FILE)
            return
        from core.expectations import test_suites

        timings: dict[str, float] = {}
        csv_file = self._load(TEST_FILE, path, "test", timings)
        suites = test_suites(csv_file.table.num_rows, self.ids["shops"], self.ids["items"])
        foreign = {"shop_id": self.ids["shops"], "item_id": self.ids["items"]}
        self._accept(TEST_FILE, _validate_test(csv_file, self.shas[TEST_FILE], suites, foreign, self.ge,
                                               self.clock, timings))

    def sales(self, files: dict[str, Path]) -> None:
        known = self.manifest["files"]
        order = _sales_order(list(files), known)
        owned = {name: [_partition(self.paths, m) for m, owner in self.month_owner.items() if owner == name]
                 for name in order}
        stale = [n for n in order if not self._unchanged(n, "sales", owned[n])]
        rebuild = any(n in known for n in stale)
        todo = order if rebuild else stale
        if rebuild:  # ownership is recomputed from the files present, in arrival order
            previous = dict(self.month_owner)
            self.month_owner = {m: f for m, f in previous.items() if f not in files}
        for name in order:
            if name not in todo:
                self._skipped(name)
                continue
            timings: dict[str, float] = {}
            csv_file = self._load(name, files[name], "sales", timings)
            outcome = _validate_sales(csv_file, self.shas[name], self.config, self.ids["shops"],
                                      self.ids["items"], self.ge, self.clock, timings)
            for month in outcome.report.months:
                self.month_owner[month] = name
            self._accept(name, outcome)
        if rebuild:
            self.deletes = [_partition(self.paths, m) for m in previous if m not in self.month_owner]

    def stage(self, tx: _Transaction) -> None:
        """Write every output of the run to staging, and the new manifest last."""
        files = self.manifest["files"]
        next_seq = max((entry.get("seq", 0) for entry in files.values()), default=-1) + 1
        sales_jobs: list[tuple[Path, pa.Table]] = []
        for name, outcome in self.outcomes.items():
            report = outcome.report
            if report.kind == "sales":
                table = outcome.accepted
                bounds = np.append(np.searchsorted(table.column("date_block_num").to_numpy(), report.months),
                                   table.num_rows)
                for index, month in enumerate(report.months):
                    if self.month_owner.get(month) == name:
                        part = table.slice(bounds[index], bounds[index + 1] - bounds[index]).drop_columns(
                            ["date_block_num"])
                        sales_jobs.append((_partition(self.paths, month), part))
            else:
                tx.parquet(self.paths.reference / f"{report.kind}.parquet", outcome.accepted)
            tx.parquet(self.paths.quarantine / f"{_stem(name)}.parquet", outcome.quarantine)
            payload, html = _validation_doc(name, report.sha256, outcome.validation, report)
            tx.json(self.paths.validation / f"{_stem(name)}.json", payload)
            tx.text(self.paths.validation / f"{_stem(name)}.html", html)
            entry = files.get(name, {})
            files[name] = {
                "sha256": report.sha256, "kind": report.kind, "rows_in": report.rows_in,
                "rows_accepted": report.rows_accepted, "rows_quarantined": report.rows_quarantined,
                "months": report.months, "ingested_at": self.now, "failed_rules": report.failed_rules,
                "depends_on": self._depends(report.kind), "rules_sha256": self.rules_sha,
                "seq": entry.get("seq", next_seq),
            }
            if "seq" not in entry:
                next_seq += 1
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            list(pool.map(lambda job: tx.parquet(*job), sales_jobs))
        for path in self.deletes:
            tx.delete(path)
        self.manifest["months"] = {str(m): f for m, f in sorted(self.month_owner.items())}
        self.manifest["version"] = _MANIFEST_VERSION
        tx.text(self.paths.validation / "index.html", _index_html(self.manifest))
        tx.json(self.paths.manifest, self.manifest)


# --- readers -------------------------------------------------------------------------------------


def _lake_paths(paths: LakePaths | str | os.PathLike[str]) -> LakePaths:
    return paths if isinstance(paths, LakePaths) else LakePaths(paths)


def read_sales(paths: LakePaths | str | os.PathLike[str], months: Sequence[int] | None = None) -> pa.Table:
    """Validated daily sales, months ascending (file order within a month), with date_block_num int16."""
    paths = _lake_paths(paths)
    parts = []
    if paths.sales.is_dir():
        for directory in paths.sales.glob("date_block_num=*"):
            with contextlib.suppress(ValueError):
                if (directory / "data.parquet").exists():
                    parts.append((int(directory.name.split("=", 1)[1]), directory / "data.parquet"))
    if months is not None:
        wanted = {int(m) for m in months}
        parts = [part for part in parts if part[0] in wanted]
    parts.sort()
    schema = SALES_SCHEMA.insert(1, pa.field("date_block_num", pa.int16()))
    if not parts:
        return schema.empty_table()
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        tables = list(pool.map(lambda part: pq.read_table(part[1], schema=SALES_SCHEMA), parts))
    tables = [t.add_column(1, "date_block_num", pa.array(np.full(t.num_rows, m, dtype=np.int16)))
              for (m, _), t in zip(parts, tables, strict=True)]
    return pa.concat_tables(tables).cast(schema)


def read_reference(paths: LakePaths | str | os.PathLike[str], name: str) -> pd.DataFrame:
    """``items``, ``item_categories``, ``shops`` or ``test`` from lake/reference, typed as in the contract."""
    paths = _lake_paths(paths)
    stem = Path(name).stem
    if stem not in REFERENCE_SCHEMAS:
        raise ValueError(f"unknown reference table {name!r}; known: {', '.join(REFERENCE_SCHEMAS)}")
    target = paths.reference / f"{stem}.parquet"
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist: run the ingest step first")
    return pq.read_table(target).to_pandas()


def read_quarantine(paths: LakePaths | str | os.PathLike[str], file_name: str) -> pd.DataFrame:
    """The rows of one raw file that ingest rejected (empty frame if none, or never ingested)."""
    target = _lake_paths(paths).quarantine / f"{_stem(file_name)}.parquet"
    if not target.exists():
        return _empty_quarantine(COLUMNS.get(kind_of(file_name) or "sales", ())).to_pandas()
    return pq.read_table(target).to_pandas()


def read_manifest(paths: LakePaths | str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(_lake_paths(paths).manifest, None) or {"version": _MANIFEST_VERSION, "files": {}, "months": {}}
