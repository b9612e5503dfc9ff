"""Ingest: a bad-input corpus with exact outcomes, incremental and crash behaviour, the readers.

Every case builds the five raw files by hand (a handful of rows, so each expected line number and
rule is known), runs the real step with real Great Expectations, and checks
rows in = rows accepted + rows quarantined for every file.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.config import NestcastConfig
from core.errors import DataValidationError
from core.ingest import (
    SALES_SCHEMA,
    IngestSummary,
    ingest,
    read_manifest,
    read_quarantine,
    read_reference,
    read_sales,
    validation_page,
)
from core.lake import LakePaths

HEADER = "date,date_block_num,shop_id,item_id,item_price,item_cnt_day"
# Lines 2..8 of sales_train.csv: months 0, 1, 2; every row valid.
SALES = [
    "02.01.2013,0,0,0,999.00,1.0",
    "03.01.2013,0,1,1,199.0,2.0",
    "15.02.2013,1,2,2,349.0,1.0",
    "16.02.2013,1,0,3,99.5,-1.0",
    "01.03.2013,2,1,0,999.0,3.0",
    "31.03.2013,2,2,1,199.0,1.0",
    "31.03.2013,2,2,4,15.0,2.0",
]
N_GOOD = len(SALES)
FIRST_BAD = N_GOOD + 2  # line number of the first appended row
CATEGORIES = 'item_category_name,item_category_id\n"Games, PC",0\nMusic,1\n"Movies ""DVD""",2\n'
SHOPS = 'shop_name,shop_id\n"Shop ""Central""",0\n"Moscow, Mega",1\nKazan,2\n'
# Item 2's name holds a quoted newline: line numbers after it are one more than the record count.
ITEMS = ('item_name,item_id,item_category_id\n"Game ""X"", deluxe",0,0\nAlbum,1,1\n"Film\ntwo lines",2,2\n'
         "Book,3,1\nPoster,4,2\n")
TEST = "ID,shop_id,item_id\n0,0,0\n1,0,1\n2,1,2\n3,2,3\n"


def _sales(*extra: str, rows: list[str] | None = None, newline: str = "\n", final_newline: bool = True) -> bytes:
    lines = [HEADER, *(SALES if rows is None else rows), *extra]
    text = newline.join(lines) + (newline if final_newline else "")
    return text.encode("utf-8")


def _write_raw(root: Path, **files: str | bytes) -> NestcastConfig:
    """Write the five raw files (overrides by stem, e.g. ``sales_train=b"..."``; None drops a file)."""
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    contents: dict[str, str | bytes | None] = {
        "item_categories": CATEGORIES, "shops": SHOPS, "items": ITEMS, "test": TEST, "sales_train": _sales(),
    }
    contents.update(files)
    for stem, content in contents.items():
        path = raw / f"{stem}.csv"
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return NestcastConfig(data_dir=root)


def _check_invariant(summary: IngestSummary) -> None:
    for report in summary.files:
        assert report.rows_in == report.rows_accepted + report.rows_quarantined, report
        assert sum(report.failed_rules.values()) == report.rows_quarantined, report
    assert summary.rows_in == summary.rows_accepted + summary.rows_quarantined
    json.dumps(summary.model_dump())  # the summary travels as JSON (Prefect artifacts, CLI)


def _quarantined(config: NestcastConfig, file_name: str = "sales_train.csv") -> dict[int, str]:
    frame = read_quarantine(LakePaths(config.data_dir), file_name)
    return dict(zip(frame["line_number"].tolist(), frame["rule"].tolist(), strict=True))


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` (hidden ones too): content hash and modification time."""
    import hashlib

    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _debris(lake: Path) -> list[str]:
    return [str(p) for p in lake.rglob("*") if ".tmp-" in p.name or ".staging-" in p.name or ".journal" in p.name
            or ".old-" in p.name]


# --- the happy path --------------------------------------------------------------------------------


def test_clean_files_land_in_the_lake_typed_and_partitioned(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    summary = ingest(config)
    _check_invariant(summary)
    paths = LakePaths(tmp_path)
    assert summary.rows_quarantined == 0
    assert summary.months == [0, 1, 2]
    assert summary.changed
    sales = summary.file("sales_train.csv")
    assert (sales.rows_in, sales.rows_accepted, sales.months) == (N_GOOD, N_GOOD, [0, 1, 2])
    for month in (0, 1, 2):
        part = paths.sales / f"date_block_num={month}" / "data.parquet"
        assert pq.read_schema(part).remove_metadata().equals(SALES_SCHEMA)

    table = read_sales(paths)
    assert table.schema.names == ["date", "date_block_num", "shop_id", "item_id", "item_price", "item_cnt_day"]
    assert [str(t) for t in table.schema.types] == ["date32[day]", "int16", "int16", "int32", "float", "float"]
    assert table.column("date_block_num").to_pylist() == [0, 0, 1, 1, 2, 2, 2]
    assert table.column("item_price").to_pylist() == [999.0, 199.0, 349.0, 99.5, 999.0, 199.0, 15.0]
    assert str(table.column("date")[3]) == "2013-02-16"
    assert read_sales(paths, months=[1]).column("item_id").to_pylist() == [2, 3]
    assert read_sales(paths, months=[]).num_rows == 0

    items = read_reference(paths, "items")
    assert items["item_id"].tolist() == [0, 1, 2, 3, 4]
    assert items.loc[2, "item_name"] == "Film\ntwo lines"
    assert items.loc[0, "item_name"] == 'Game "X", deluxe'
    assert str(items["item_category_id"].dtype) == "int16"
    assert read_reference(paths, "shops")["shop_name"].tolist() == ['Shop "Central"', "Moscow, Mega", "Kazan"]
    assert read_reference(paths, "test.csv")[["ID", "shop_id", "item_id"]].values.tolist() == [
        [0, 0, 0], [1, 0, 1], [2, 1, 2], [3, 2, 3]]
    assert str(read_reference(paths, "test")["ID"].dtype) == "int32"

    manifest = read_manifest(paths)
    entry = manifest["files"]["sales_train.csv"]
    assert entry["rows_in"] == N_GOOD and entry["months"] == [0, 1, 2] and len(entry["sha256"]) == 64
    assert manifest["months"] == {"0": "sales_train.csv", "1": "sales_train.csv", "2": "sales_train.csv"}
    for stem in ("sales_train", "items", "shops", "item_categories", "test"):
        assert (paths.validation / f"{stem}.json").exists()
        assert "<html" in (paths.validation / f"{stem}.html").read_text().lower()
    assert "sales_train.csv" in (paths.validation / "index.html").read_text()
    assert _debris(paths.lake) == []


# --- row-level corpus ------------------------------------------------------------------------------

ROW_CASES = {
    "iso_date": (["2013-01-05,0,0,0,999.0,1.0"], ["date_format"]),
    "feb_31": (["31.02.2013,1,0,0,999.0,1.0"], ["date_is_calendar_date"]),
    "day_not_padded": (["5.01.2013,0,0,0,999.0,1.0"], ["date_format"]),
    "date_missing": ([",0,0,0,999.0,1.0"], ["date_not_null"]),
    "date_wrong_month_for_block": (["05.01.2013,1,0,0,999.0,1.0"], ["date_matches_block"]),
    "block_negative": (["05.01.2013,-1,0,0,999.0,1.0"], ["date_block_num_in_range"]),
    "text_in_price": (["05.01.2013,0,0,0,abc,1.0"], ["item_price_is_number"]),
    "text_in_shop_id": (["05.01.2013,0,x1,0,999.0,1.0"], ["shop_id_is_integer"]),
    "decimal_item_id": (["05.01.2013,0,0,1.5,999.0,1.0"], ["item_id_is_integer"]),
    "nan_and_empty_count": (["05.01.2013,0,0,0,999.0,NaN", "06.01.2013,0,0,0,999.0,"],
                            ["item_cnt_day_not_null", "item_cnt_day_not_null"]),
    "price_zero_and_minus_one": (["05.01.2013,0,0,0,0,1.0", "06.01.2013,0,0,0,-1,1.0"],
                                 ["item_price_positive", "item_price_positive"]),
    "price_at_ceiling": (["05.01.2013,0,0,0,100000,1.0"], ["item_price_below_max"]),
    "count_5000": (["05.01.2013,0,0,0,999.0,5000"], ["item_cnt_day_in_range"]),
    "unknown_shop": (["05.01.2013,0,99,0,999.0,1.0"], ["shop_id_known"]),
    "unknown_item": (["05.01.2013,0,0,12345,999.0,1.0"], ["item_id_known"]),
    "exact_duplicates": ([SALES[0], SALES[2], SALES[0]], ["no_duplicate_rows"] * 3),
    "extra_field": (["05.01.2013,0,0,0,999.0,1.0,7"], ["field_count"]),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_rows_are_quarantined_with_line_and_rule(tmp_path: Path, case: str) -> None:
    extra, rules = ROW_CASES[case]
    config = _write_raw(tmp_path, sales_train=_sales(*extra))
    summary = ingest(config)
    _check_invariant(summary)
    report = summary.file("sales_train.csv")
    assert (report.rows_in, report.rows_accepted, report.rows_quarantined) == (
        N_GOOD + len(extra), N_GOOD, len(extra))
    expected = {FIRST_BAD + i: rule for i, rule in enumerate(rules)}
    assert _quarantined(config) == expected
    counts: dict[str, int] = {}
    for rule in rules:
        counts[rule] = counts.get(rule, 0) + 1
    assert report.failed_rules == counts
    # The quarantine keeps the raw texts of the row as written ("NaN" stays "NaN"; an empty field is
    # missing), the lake the good rows.
    frame = read_quarantine(LakePaths(tmp_path), "sales_train.csv")
    assert frame.loc[0, "source_file"] == "sales_train.csv"
    raw_fields = [None if field == "" else field for field in extra[0].split(",")][:6]
    assert frame.loc[0, HEADER.split(",")].tolist() == raw_fields
    assert read_sales(LakePaths(tmp_path)).num_rows == N_GOOD


def test_a_row_breaking_several_rules_names_the_first_and_lists_all(tmp_path: Path) -> None:
    config = _write_raw(tmp_path, sales_train=_sales("2013-01-05,0,99,12345,-1,5000"))
    ingest(config)
    frame = read_quarantine(LakePaths(tmp_path), "sales_train.csv")
    assert frame["rule"].tolist() == ["date_format"]
    assert frame["rules"].tolist() == [
        "date_format;date_is_calendar_date;shop_id_known;item_id_known;item_price_positive;item_cnt_day_in_range"]
    assert frame.loc[0, "date"] == "2013-01-05" and frame.loc[0, "item_cnt_day"] == "5000"


def test_truncated_last_line_is_quarantined_with_its_text(tmp_path: Path) -> None:
    config = _write_raw(tmp_path, sales_train=_sales("05.01.2013,0,0,0,99", final_newline=False))
    summary = ingest(config)
    _check_invariant(summary)
    frame = read_quarantine(LakePaths(tmp_path), "sales_train.csv")
    assert frame["line_number"].tolist() == [FIRST_BAD]
    assert frame["rule"].tolist() == ["field_count"]
    assert frame.loc[0, "raw_line"] == "05.01.2013,0,0,0,99"
    assert frame.loc[0, "item_price"] == "99" and frame.loc[0, "item_cnt_day"] is None
    assert summary.file("sales_train.csv").rows_accepted == N_GOOD


def test_line_numbers_count_blank_lines_crlf_and_quoted_fields(tmp_path: Path) -> None:
    # CRLF, a blank line inside the file and quoted fields: the csv-module path maps records to lines.
    rows = [SALES[0], SALES[1], "", '"15.02.2013",1,2,2,"349.0",1.0', "05.01.2013,0,0,0,-1,1.0", "1,2", SALES[3]]
    config = _write_raw(tmp_path, sales_train=_sales(rows=rows, newline="\r\n"))
    summary = ingest(config)
    _check_invariant(summary)
    assert _quarantined(config) == {6: "item_price_positive", 7: "field_count"}
    assert summary.file("sales_train.csv").rows_accepted == 4


def test_line_numbers_count_blank_lines_and_skipped_rows_without_quotes(tmp_path: Path) -> None:
    # No quote in the file: the vectorised newline/comma scan maps records to lines.
    rows = [SALES[0], "", "", "05.01.2013,0,0", SALES[1], "   ", "05.01.2013,0,0,0,-1,1.0", SALES[2]]
    config = _write_raw(tmp_path, sales_train=_sales(rows=rows))
    summary = ingest(config)
    _check_invariant(summary)
    assert _quarantined(config) == {5: "field_count", 7: "field_count", 8: "item_price_positive"}
    frame = read_quarantine(LakePaths(tmp_path), "sales_train.csv")
    assert frame["raw_line"].tolist() == ["05.01.2013,0,0", "   ", None]
    assert summary.file("sales_train.csv").rows_accepted == 3


def test_crlf_line_endings_are_read_transparently(tmp_path: Path) -> None:
    config = _write_raw(tmp_path, sales_train=_sales("05.01.2013,0,0,0,-1,1.0", newline="\r\n"))
    summary = ingest(config)
    _check_invariant(summary)
    assert _quarantined(config) == {FIRST_BAD: "item_price_positive"}
    plain = _write_raw(tmp_path / "plain")
    ingest(plain)
    assert read_sales(LakePaths(tmp_path)).equals(read_sales(LakePaths(tmp_path / "plain")))


def test_utf8_bom_is_stripped(tmp_path: Path) -> None:
    config = _write_raw(tmp_path, sales_train=b"\xef\xbb\xbf" + _sales("05.01.2013,0,0,0,-1,1.0"),
                        items=b"\xef\xbb\xbf" + ITEMS.encode())
    summary = ingest(config)
    _check_invariant(summary)
    assert summary.file("sales_train.csv").rows_accepted == N_GOOD
    assert _quarantined(config) == {FIRST_BAD: "item_price_positive"}
    assert read_reference(LakePaths(tmp_path), "items")["item_id"].tolist() == [0, 1, 2, 3, 4]


def test_reference_rows_are_quarantined_and_their_ids_become_unknown(tmp_path: Path) -> None:
    # Line 7: duplicate item id (kept: line 2), line 8: unknown category, line 9: no name.
    items = ITEMS + "Copy of game,0,1\nGadget,5,9\n,6,1\n"
    sales = _sales("05.01.2013,0,0,5,10.0,1.0")
    config = _write_raw(tmp_path, items=items, sales_train=sales)
    summary = ingest(config)
    _check_invariant(summary)
    assert _quarantined(config, "items.csv") == {8: "item_id_unique", 9: "item_category_id_known",
                                                 10: "item_name_not_null"}
    assert summary.file("items.csv").rows_accepted == 5
    assert read_reference(LakePaths(tmp_path), "items").loc[0, "item_name"] == 'Game "X", deluxe'
    assert _quarantined(config) == {FIRST_BAD: "item_id_known"}


# --- file-level failures ---------------------------------------------------------------------------

FILE_CASES = {
    "empty_file": ({"sales_train": b""}, ["sales_train.csv", "file_not_empty"]),
    "header_only": ({"sales_train": (HEADER + "\n").encode()}, ["sales_train.csv", "has_data_rows", "observed 0"]),
    "missing_column": (
        {"sales_train": "date,date_block_num,shop_id,item_id,item_price\n02.01.2013,0,0,0,999.0\n"},
        ["sales_train.csv", "columns_match", "missing ['item_cnt_day']"]),
    "extra_column": ({"sales_train": HEADER + ",note\n02.01.2013,0,0,0,999.0,1.0,x\n"},
                     ["sales_train.csv", "columns_match", "unexpected ['note']"]),
    "repeated_column": ({"sales_train": HEADER + ",shop_id\n02.01.2013,0,0,0,999.0,1.0,0\n"},
                        ["sales_train.csv", "column_count", "observed 7"]),
    "semicolon_delimiter": ({"sales_train": HEADER.replace(",", ";") + "\n02.01.2013;0;0;0;999.0;1.0\n"},
                            ["sales_train.csv", "columns_match", "missing ['date', 'date_block_num'",
                             "delimited by something other than ','"]),
    "latin1_sales": ({"sales_train": _sales() + "05.01.2013,0,0,0,99\xe9,1.0\n".encode("latin-1")},
                     ["sales_train.csv", "file_is_utf8", "0xe9", f"line {FIRST_BAD}"]),
    "latin1_items": ({"items": ITEMS.encode() + "Caf\xe9 music,5,1\n".encode("latin-1")},
                     ["items.csv", "file_is_utf8", "0xe9", "line 8", "Caf\\xe9 music"]),
    "items_missing_column": ({"items": "item_name,item_id\nA,0\n"}, ["items.csv", "missing ['item_category_id']"]),
    "test_duplicate_id": ({"test": "ID,shop_id,item_id\n0,0,0\n1,0,1\n1,1,2\n"},
                          ["test.csv", "ID_unique", "2 unexpected, e.g. [1, 1]"]),
    "test_ids_not_contiguous": ({"test": "ID,shop_id,item_id\n0,0,0\n1,0,1\n5,1,2\n"},
                                ["test.csv", "ID_contiguous", "observed 5"]),
    "test_duplicate_pair": ({"test": "ID,shop_id,item_id\n0,0,0\n1,0,1\n2,0,1\n"},
                            ["test.csv", "pairs_unique", "2 unexpected, e.g. [{'shop_id': 0, 'item_id': 1}"]),
    "test_unknown_item": ({"test": "ID,shop_id,item_id\n0,0,0\n1,0,777\n"}, ["test.csv", "item_id_known", "'777'"]),
    "test_truncated_row": ({"test": "ID,shop_id,item_id\n0,0,0\n1,0\n"}, ["test.csv", "field_count", "[3]"]),
    "missing_raw_file": ({"shops": None}, ["required raw files missing", "shops.csv"]),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_file_level_problems_fail_the_step_and_write_nothing(tmp_path: Path, case: str) -> None:
    files, fragments = FILE_CASES[case]
    config = _write_raw(tmp_path, **files)
    with pytest.raises(DataValidationError) as caught:
        ingest(config)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    lake = LakePaths(tmp_path).lake
    assert not (lake / "manifest.json").exists()
    assert [p for p in lake.rglob("*") if p.is_file()] == [] if lake.exists() else True


def test_a_failed_file_leaves_an_earlier_lake_untouched(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    ingest(config)
    before = _snapshot(LakePaths(tmp_path).lake)
    _write_raw(tmp_path, test="ID,shop_id,item_id\n0,0,0\n0,0,1\n")
    with pytest.raises(DataValidationError, match="ID_unique"):
        ingest(config)
    assert _snapshot(LakePaths(tmp_path).lake) == before


# --- idempotent, incremental, atomic ---------------------------------------------------------------


def test_second_ingest_of_the_same_files_is_a_no_op(tmp_path: Path) -> None:
    config = _write_raw(tmp_path, sales_train=_sales("05.01.2013,0,0,0,-1,1.0"))
    first = ingest(config)
    before = _snapshot(LakePaths(tmp_path).lake)
    second = ingest(config)
    _check_invariant(second)
    assert not second.changed and second.written == []
    assert all(report.skipped for report in second.files)
    assert "validate" not in second.timings and "ge_setup" not in second.timings
    assert [(r.file, r.rows_in, r.rows_quarantined, r.failed_rules) for r in second.files] == [
        (r.file, r.rows_in, r.rows_quarantined, r.failed_rules) for r in first.files]
    assert _snapshot(LakePaths(tmp_path).lake) == before


def test_a_new_drop_adds_and_replaces_only_its_months(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    ingest(config)
    paths = LakePaths(tmp_path)
    before = _snapshot(paths.sales)
    drop = _sales("10.04.2013,3,0,0,5.0,1.0", rows=["20.03.2013,2,0,1,7.0,4.0"])
    (paths.raw / "sales_2013-04.csv").write_bytes(drop)
    summary = ingest(config)
    _check_invariant(summary)
    assert summary.file("sales_train.csv").skipped and not summary.file("sales_2013-04.csv").skipped
    assert summary.file("items.csv").skipped and summary.file("test.csv").skipped
    after = _snapshot(paths.sales)
    for month in (0, 1):  # untouched: same bytes, same mtime
        key = f"date_block_num={month}/data.parquet"
        assert after[key] == before[key]
    assert after["date_block_num=2/data.parquet"] != before["date_block_num=2/data.parquet"]
    assert read_sales(paths, months=[2]).column("item_price").to_pylist() == [7.0]
    assert read_sales(paths, months=[3]).column("item_cnt_day").to_pylist() == [1.0]
    assert summary.months == [0, 1, 2, 3]
    assert read_manifest(paths)["months"] == {"0": "sales_train.csv", "1": "sales_train.csv",
                                              "2": "sales_2013-04.csv", "3": "sales_2013-04.csv"}

    # A known sales file that changes re-applies every sales file in arrival order: month 0 is gone
    # from sales_train.csv now, and month 2 stays the drop's (it arrived later).
    _write_raw(tmp_path, sales_train=_sales(rows=SALES[2:]))
    summary = ingest(config)
    _check_invariant(summary)
    assert summary.months == [1, 2, 3] and summary.deleted == ["sales/date_block_num=0/data.parquet"]
    assert not (paths.sales / "date_block_num=0").exists()
    assert read_sales(paths, months=[2]).column("item_price").to_pylist() == [7.0]


# --- several drop files for one month (issue 29) ----------------------------------------------------------
PART1, PART2 = "sales_2013-04_part1.csv", "sales_2013-04_part2.csv"
# Month 3 split in two: part 1 holds one row ingest quarantines (price -1), part 2 also a row of month 2.
PART1_ROWS = ["10.04.2013,3,0,0,5.0,1.0", "11.04.2013,3,1,1,6.0,2.0", "12.04.2013,3,2,2,-1,1.0"]
PART2_ROWS = ["13.04.2013,3,2,2,7.0,3.0", "14.04.2013,3,0,3,8.0,1.0", "20.03.2013,2,0,1,7.0,4.0"]


def _month_rows(paths: LakePaths, month: int) -> list[tuple]:
    table = read_sales(paths, months=[month])
    return sorted(zip(*(table.column(c).to_pylist() for c in ("shop_id", "item_id", "item_price")), strict=True))


def test_two_drop_files_of_one_month_are_both_ingested_and_every_row_is_counted(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    ingest(config)
    paths = LakePaths(tmp_path)
    (paths.raw / PART1).write_bytes(_sales(rows=PART1_ROWS))
    (paths.raw / PART2).write_bytes(_sales(rows=PART2_ROWS))
    summary = ingest(config)
    _check_invariant(summary)
    one, two = summary.file(PART1), summary.file(PART2)
    assert (one.rows_in, one.rows_accepted, one.rows_quarantined) == (3, 2, 1)
    assert (two.rows_in, two.rows_accepted, two.rows_quarantined) == (3, 3, 0)
    # Rows in = accepted + quarantined across the drops: month 3 holds every accepted row of both.
    assert _month_rows(paths, 3) == [(0, 0, 5.0), (0, 3, 8.0), (1, 1, 6.0), (2, 2, 7.0)]
    assert _month_rows(paths, 2) == [(0, 1, 7.0)]  # part 2 alone restates month 2 of sales_train.csv
    assert read_manifest(paths)["months"]["3"] == [PART1, PART2]
    assert (two.months_shared, two.shares_months_with) == ([3], [PART1])


def test_a_part_arriving_a_run_later_joins_its_month_and_a_removed_part_takes_only_its_rows(tmp_path: Path
                                                                                          ) -> None:
    config = _write_raw(tmp_path)
    paths = LakePaths(tmp_path)
    (paths.raw / PART1).write_bytes(_sales(rows=PART1_ROWS))
    ingest(config)
    (paths.raw / PART2).write_bytes(_sales(rows=PART2_ROWS))
    summary = ingest(config)
    _check_invariant(summary)
    assert summary.file(PART1).skipped and not summary.file(PART2).skipped
    assert _month_rows(paths, 3) == [(0, 0, 5.0), (0, 3, 8.0), (1, 1, 6.0), (2, 2, 7.0)]
    (paths.raw / PART1).unlink()
    summary = ingest(config)
    _check_invariant(summary)
    assert _month_rows(paths, 3) == [(0, 3, 8.0), (2, 2, 7.0)]
    assert read_manifest(paths)["months"]["3"] == PART2


def test_two_drop_files_of_one_month_sharing_rows_are_refused_naming_both_and_nothing_is_written(tmp_path: Path
                                                                                                ) -> None:
    config = _write_raw(tmp_path)
    paths = LakePaths(tmp_path)
    (paths.raw / PART1).write_bytes(_sales(rows=PART1_ROWS))
    ingest(config)
    before = _snapshot(paths.lake)
    restated = "sales_2013-04_fixed.csv"  # part 1 again with one price corrected: a restatement, not a part
    (paths.raw / restated).write_bytes(_sales(rows=[*PART1_ROWS[:2], "12.04.2013,3,2,2,1.0,1.0"]))
    with pytest.raises(DataValidationError) as refused:
        ingest(config)
    message = str(refused.value)
    assert PART1 in message and restated in message and "month 3 (2013-04)" in message, message
    assert "2 identical rows" in message and "nothing was written" in message, message
    assert _snapshot(paths.lake) == before


def test_new_reference_files_revalidate_the_sales(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    ingest(config)
    _write_raw(tmp_path, items=ITEMS.replace("Poster,4,2\n", ""))  # the item of line 8 disappears
    summary = ingest(config)
    _check_invariant(summary)
    assert not summary.file("items.csv").skipped and not summary.file("sales_train.csv").skipped
    assert summary.file("shops.csv").skipped and summary.file("item_categories.csv").skipped
    assert _quarantined(config) == {8: "item_id_known"}
    assert 4 not in read_sales(LakePaths(tmp_path)).column("item_id").to_pylist()


def test_changed_rules_revalidate(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    ingest(config)
    stricter = config.model_copy(update={"ingest": config.ingest.model_copy(update={"max_item_price": 500.0})})
    summary = ingest(stricter)
    _check_invariant(summary)
    assert _quarantined(config) == {2: "item_price_below_max", 6: "item_price_below_max"}


def _fail_on(predicate: Callable[[str, str, int], bool]) -> Callable[..., None]:
    """An os.replace that raises instead of renaming when ``predicate(src, dst, call number)``."""
    real = os.replace
    calls = {"n": 0}

    def replace(src: str | Path, dst: str | Path) -> None:
        calls["n"] += 1
        if predicate(str(src), str(dst), calls["n"]):
            raise OSError("injected crash")
        return real(src, dst)

    return replace


def test_crash_between_write_and_rename_leaves_the_lake_as_it_was(tmp_path: Path, monkeypatch) -> None:
    config = _write_raw(tmp_path)
    ingest(config)
    lake = LakePaths(tmp_path).lake
    before = _snapshot(lake)
    (LakePaths(tmp_path).raw / "sales_2013-04.csv").write_bytes(_sales(rows=["10.04.2013,3,0,0,5.0,1.0"]))
    for crash_at in (1, 3, 6):  # a temp file is written, its rename (into staging) fails
        monkeypatch.setattr(os, "replace", _fail_on(lambda src, dst, n, k=crash_at: ".tmp-" in src and n == k))
        with pytest.raises(OSError, match="injected"):
            ingest(config)
        monkeypatch.undo()
        assert _snapshot(lake) == before
        assert _debris(lake) == []
    summary = ingest(config)
    assert summary.months == [0, 1, 2, 3]


def test_crash_during_the_commit_is_rolled_forward_by_the_next_run(tmp_path: Path, monkeypatch) -> None:
    config = _write_raw(tmp_path, sales_train=_sales("05.01.2013,0,0,0,-1,1.0"))

    moves = {"n": 0}

    def second_move(src: str, dst: str, n: int) -> bool:
        if ".staging-" in src and ".staging-" not in dst:  # staging -> lake: the commit
            moves["n"] += 1
            return moves["n"] == 2
        return False

    monkeypatch.setattr(os, "replace", _fail_on(second_move))
    with pytest.raises(OSError, match="injected"):
        ingest(config)
    monkeypatch.undo()
    lake = LakePaths(tmp_path).lake
    assert (lake / ".journal.json").exists() and not (lake / "manifest.json").exists()

    summary = ingest(config)  # rolls the interrupted commit forward, then finds nothing to do
    assert not summary.changed and all(r.skipped for r in summary.files)
    assert _debris(lake) == []
    clean = _write_raw(tmp_path / "clean", sales_train=_sales("05.01.2013,0,0,0,-1,1.0"))
    ingest(clean)
    assert read_sales(LakePaths(tmp_path)).equals(read_sales(LakePaths(tmp_path / "clean")))
    assert _quarantined(config) == _quarantined(clean) == {FIRST_BAD: "item_price_positive"}
    got = {k: v[0] for k, v in _snapshot(lake).items() if k.startswith(("sales", "reference", "quarantine"))}
    want = {k: v[0] for k, v in _snapshot(LakePaths(tmp_path / "clean").lake).items()
            if k.startswith(("sales", "reference", "quarantine"))}
    assert got == want


# --- GE is the source of truth ----------------------------------------------------------------------


def test_ge_results_are_written_and_agree_with_the_quarantine(tmp_path: Path) -> None:
    extra = ["05.01.2013,0,0,0,-1,1.0", "06.01.2013,0,0,0,-1,1.0", "05.01.2013,0,99,0,5.0,1.0",
             "05.01.2013,0,0,0,5.0,5000", SALES[1]]
    config = _write_raw(tmp_path, sales_train=_sales(*extra))
    ingest(config)
    paths = LakePaths(tmp_path)
    payload = json.loads((paths.validation / "sales_train.json").read_text())
    failed = {r["expectation_config"]["meta"]["rule"]: r["result"]["unexpected_count"]
              for r in payload["results"] if not r["success"]}
    # Value tables count distinct bad values: -1 appears on two rows but is one value.
    assert failed == {"item_price_positive": 1, "shop_id_known": 1, "item_cnt_day_in_range": 1,
                      "no_duplicate_rows": 1}
    assert payload["meta"]["failed_rules"] == {"shop_id_known": 1, "item_price_positive": 2,
                                               "item_cnt_day_in_range": 1, "no_duplicate_rows": 1}
    frame = read_quarantine(paths, "sales_train.csv")
    assert sorted(set(frame["rule"])) == sorted(failed)
    html = (paths.validation / "sales_train.html").read_text()
    assert "item_price" in html and "sales_train.csv" in html


# --- the validation page works offline and counts rows of the file ---------------------------------

# Lines 9-13: a negative price twice (one distinct value), an unknown shop, a count out of range, a duplicate.
PAGE_BAD_ROWS = ["05.01.2013,0,0,0,-1,1.0", "06.01.2013,0,0,0,-1,1.0", "05.01.2013,0,99,0,5.0,1.0",
                 "05.01.2013,0,0,0,5.0,5000", SALES[1]]
REMOTE_ASSET = re.compile(r"""<(?:link|script|img)\b[^>]*\b(?:href|src)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)
GLYPHS = {"✔": "passed", "✘": "failed", "⚠": "error"}


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> tuple[IngestSummary, LakePaths]:
    root = tmp_path_factory.mktemp("pages")
    return ingest(_write_raw(root, sales_train=_sales(*PAGE_BAD_ROWS))), LakePaths(root)


class _StatusCells(HTMLParser):
    """The text of the first cell of every body row of the tables headed "Status" (GE's expectation rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.cells: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append({"status": False, "column": -1, "cell": None, "texts": []})
        elif self.tables and tag == "tr":
            self.tables[-1]["column"] = -1
        elif self.tables and tag in ("td", "th"):
            table = self.tables[-1]
            table["column"] += 1
            table["cell"] = tag
            if tag == "td" and table["status"] and table["column"] == 0:
                table["texts"].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.tables:
            table = self.tables.pop()
            self.cells += table["texts"] if table["status"] else []

    def handle_data(self, data: str) -> None:
        if not self.tables:
            return
        table = self.tables[-1]
        if table["cell"] == "th" and table["column"] == 0 and data.strip() == "Status":
            table["status"] = True
        elif table["cell"] == "td" and table["column"] == 0 and table["status"]:
            table["texts"][-1] += data


def _status_cells(page: str) -> list[str]:
    parser = _StatusCells()
    parser.feed(page)
    return [text.strip() for text in parser.cells]


def _summary_text(page: str) -> str:
    section = re.search(r"<section class='nc-summary'>(.*?)</section>", page, re.DOTALL)
    assert section is not None, "no summary on top of the page"
    return " ".join(re.sub(r"<[^>]+>", " ", html.unescape(section.group(1))).split())


def test_every_validation_page_loads_nothing_from_the_internet_and_carries_its_styles_inline(pages) -> None:
    summary, paths = pages
    for report in summary.files:
        page = validation_page(paths, report.file).read_text(encoding="utf-8")
        assert REMOTE_ASSET.findall(page) == [], report.file
        assert "url(http" not in page.replace("'", "").replace('"', ""), report.file
        styles = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
        assert any(".ge-section" in s for s in styles), f"{report.file}: GE's own stylesheet is not inline"
        assert any("border-collapse" in s for s in styles), f"{report.file}: no table styles without bootstrap"
        assert 'class="fa' not in page and "fa-" not in page, f"{report.file}: a font-awesome icon is left"


def test_every_expectation_row_of_the_page_shows_a_visible_status_glyph(pages) -> None:
    _, paths = pages
    payload = json.loads((paths.validation / "sales_train.json").read_text())
    cells = _status_cells(validation_page(paths, "sales_train.csv").read_text(encoding="utf-8"))
    assert len(cells) == len(payload["results"]) > 0
    assert set(cells) <= set(GLYPHS), cells
    assert cells.count("✘") == sum(not r["success"] for r in payload["results"]) == 4


def test_the_page_summary_counts_rows_of_the_file_and_names_each_failed_rule_with_its_first_line(pages) -> None:
    summary, paths = pages
    report = summary.file("sales_train.csv")
    text = _summary_text(validation_page(paths, "sales_train.csv").read_text(encoding="utf-8"))
    assert (report.rows_in, report.rows_accepted, report.rows_quarantined) == (12, 7, 5)
    assert (f"{report.rows_in} rows in the file" in text and f"{report.rows_accepted} accepted" in text
            and f"{report.rows_quarantined} quarantined" in text), text
    for rule, count in report.failed_rules.items():
        assert rule in text and f"{rule} {count} " in text, (rule, text)
    assert f"item_price_positive 2 {FIRST_BAD}" in text and f"no_duplicate_rows 1 {FIRST_BAD + 4}" in text
    assert "count distinct values of a column, not rows of the file" in text
    shops = _summary_text(validation_page(paths, "shops.csv").read_text(encoding="utf-8"))
    assert "No row was quarantined" in shops and "distinct values" not in shops


def test_a_page_ge_cannot_render_falls_back_to_the_summary_and_the_error(tmp_path: Path, monkeypatch) -> None:
    import core.expectations

    def broken(result: object) -> str:
        raise ValueError("renderer broke")

    monkeypatch.setattr(core.expectations, "render_data_docs", broken)
    summary = ingest(_write_raw(tmp_path, sales_train=_sales(PAGE_BAD_ROWS[0])))
    page = validation_page(LakePaths(tmp_path), "sales_train.csv").read_text(encoding="utf-8")
    assert "Data Docs rendering failed: renderer broke" in page
    assert f"{summary.file('sales_train.csv').rows_quarantined} quarantined" in _summary_text(page)


def test_summary_rows_match_the_lake_on_synthetic_data(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("core.synthetic")
    synthetic.write_competition_files(tmp_path / "raw", scale="tiny", seed=0)
    summary = ingest(NestcastConfig(data_dir=tmp_path))
    _check_invariant(summary)
    report = summary.file("sales_train.csv")
    paths = LakePaths(tmp_path)
    assert read_sales(paths).num_rows == report.rows_accepted
    assert len(read_quarantine(paths, "sales_train.csv")) == report.rows_quarantined
    table = read_sales(paths)
    assert np.all(np.diff(table.column("date_block_num").to_numpy()) >= 0)
    assert set(np.unique(table.column("date_block_num").to_numpy())) == set(report.months)
