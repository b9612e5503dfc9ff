"""Header checks and typed columns: the structure suite, dictionary-encoded columns and what is derived
from them (parsed numbers, the month a date falls in, duplicate rows, membership in reference ids)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.expectations import COLUMNS, DATE_PARTS_PATTERN, INTEGER_PATTERN, NUMBER_PATTERN
from core.ingest.context import IngestContext
from core.ingest.read import STRING_DICT, body_of, file_error, head_records
from core.ingest.validate import file_problems

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
NUMERIC: dict[str, dict[str, bool]] = {  # numeric columns per kind -> integer?
    "sales": {"date_block_num": True, "shop_id": True, "item_id": True, "item_price": False, "item_cnt_day": False},
    "test": {"ID": True, "shop_id": True, "item_id": True},
    "items": {"item_id": True, "item_category_id": True},
    "item_categories": {"item_category_id": True},
    "shops": {"shop_id": True},
}
ID_COLUMN = {"items": "item_id", "item_categories": "item_category_id", "shops": "shop_id", "test": "ID"}
# In number-only files the usual spellings of NaN are "missing" (-> <col>_not_null) rather than
# "not a number"; names have no null spelling but the empty field (a shop may be called "NA").
_NULL_SPELLINGS = {"sales": ("NaN", "nan", "NA", "N/A", "NULL", "null", "None"),
                   "test": ("NaN", "nan", "NA", "N/A", "NULL", "null", "None")}


def check_structure(ctx: IngestContext, name: str, raw: bytes, kind: str) -> object:
    """File-level: not empty, UTF-8 and the exact header (GE's structure suite on the header and a sample)."""
    from core.expectations import structure_suite

    if not body_of(raw).strip():
        raise file_error(name, ["file_not_empty: the file has no header and no rows"])
    records = head_records(name, raw, limit=5)
    header, sample = records[0], records[1:]
    frame = pd.DataFrame([(r + [None] * len(header))[: len(header)] for r in sample], columns=header, dtype=object)
    structure = ctx.ge.validate(frame, structure_suite(kind))
    if not structure.success:
        problems = file_problems(structure)
        if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
            problems.append(f"the header {header[0]!r} looks delimited by something other than ','")
        raise file_error(name, problems)
    return structure


@dataclass
class Column:
    """One dictionary-encoded column: ``codes[row]`` indexes ``raw`` (distinct texts, None last if any)."""

    codes: np.ndarray
    values: pa.Array
    has_null: bool
    null_spellings: tuple[str, ...] = ()

    @classmethod
    def of(cls, chunked: pa.ChunkedArray, kind: str) -> Column:
        array = chunked.combine_chunks() if chunked.num_chunks else pa.array([], type=STRING_DICT)
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        has_null = array.null_count > 0
        indices = pc.fill_null(array.indices, len(array.dictionary)) if has_null else array.indices
        codes = indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        return cls(codes=codes, values=array.dictionary, has_null=has_null,
                   null_spellings=_NULL_SPELLINGS.get(kind, ()))

    @functools.cached_property
    def raw(self) -> np.ndarray:
        """The distinct texts as written in the file (the quarantine's values)."""
        texts = self.values.to_numpy(zero_copy_only=False).astype(object)
        return np.append(texts, None) if self.has_null else texts

    @functools.cached_property
    def validated(self) -> np.ndarray:
        """The distinct texts GE sees: a null spelling ("NaN") is missing."""
        if not self.null_spellings:
            return self.raw
        texts = self.raw.copy()
        texts[np.isin(texts, np.asarray(self.null_spellings, dtype=object))] = None
        return texts

    def number(self, integer: bool) -> np.ndarray:
        """Each distinct text as float64, NaN where missing or not matching the rule's pattern."""
        pattern = INTEGER_PATTERN if integer else NUMBER_PATTERN
        ok = pc.match_substring_regex(self.values, pattern)
        gated = pc.if_else(ok, self.values, pa.scalar(None, pa.string()))
        parsed = pc.cast(gated, pa.float64()).to_numpy(zero_copy_only=False)
        return np.append(parsed, np.nan) if self.has_null else parsed


def columns_of(table: pa.Table, kind: str) -> dict[str, Column]:
    return {c: Column.of(table.column(c), kind) for c in COLUMNS[kind]}


def parse_dates(column: Column, first_month: str) -> tuple[np.ndarray, np.ndarray]:
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


def unique_pairs(a: np.ndarray, b: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def duplicate_rows(parts: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
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


def known(numbers: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """True/False: is the number one of ``ids``; None where there is no number (another rule's case)."""
    flags = np.isin(numbers, np.asarray(ids, dtype=np.float64)).astype(object)
    flags[np.isnan(numbers)] = None
    return flags


def check_parsed(rule_ok: np.ndarray, parsed: np.ndarray, what: str) -> None:
    """Values GE accepted must have parsed: GE and the parser share their patterns, so this is a bug check."""
    if np.isnan(parsed[rule_ok]).any():
        raise RuntimeError(f"{what}: a value accepted by the rules did not parse")
