"""Ingest never loses a line silently: stray quotes, mostly-rejected files, lines in every message.

Each case asserts the exact outcome: the file, the line numbers, the rules, the counts, and that
rows in (counted here from the file's bytes) = rows accepted + rows quarantined.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from test_ingest import SALES, _check_invariant, _quarantined, _sales, _write_raw

from core.config import NestcastConfig
from core.errors import DataValidationError
from core.ingest import UNBALANCED_QUOTE_RULE, IngestSummary, ingest, read_quarantine, read_reference, read_sales
from core.lake import LakePaths


def _data_lines(path: Path) -> int:
    """Non-empty lines after the header, from the bytes (none of these files quotes a newline)."""
    return sum(1 for line in path.read_bytes().split(b"\n")[1:] if line.strip(b"\r"))


def _conserved(summary: IngestSummary, root: Path, name: str) -> None:
    _check_invariant(summary)
    report = summary.file(name)
    assert report.rows_in == _data_lines(root / "raw" / name) == report.rows_accepted + report.rows_quarantined


def _stray_quote(path: Path, line: int) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = b'"' + lines[line - 1]
    path.write_bytes(b"\n".join(lines))


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory, tiny_data) -> Path:
    """``nestcast demo-data DIR --scale tiny``: the data of the reported cases."""
    return tiny_data(tmp_path_factory.mktemp("tiny"), seed=0) / "raw"


def _copy(raw: Path, root: Path) -> NestcastConfig:
    (root / "raw").mkdir(parents=True)
    for path in raw.iterdir():
        (root / "raw" / path.name).write_bytes(path.read_bytes())
    return NestcastConfig(data_dir=root)


# --- one stray quote -----------------------------------------------------------------------------------


def test_a_stray_quote_in_items_quarantines_its_line_and_reads_the_lines_after_it(tiny_raw: Path,
                                                                                tmp_path: Path) -> None:
    config = _copy(tiny_raw, tmp_path)
    items = tmp_path / "raw" / "items.csv"
    assert _data_lines(items) == 60
    _stray_quote(items, 19)  # sed -i '19s/^/"/' raw/items.csv
    summary = ingest(config)
    _conserved(summary, tmp_path, "items.csv")
    report = summary.file("items.csv")
    assert (report.rows_in, report.rows_accepted, report.rows_quarantined) == (60, 59, 1)
    assert report.failed_rules == {UNBALANCED_QUOTE_RULE: 1}
    frame = read_quarantine(LakePaths(tmp_path), "items.csv")
    assert frame[["line_number", "rule"]].values.tolist() == [[19, UNBALANCED_QUOTE_RULE]]
    assert frame.loc[0, "raw_line"].startswith('"') and frame.loc[0, "raw_line"].endswith(",17,4")
    ids = read_reference(LakePaths(tmp_path), "items")["item_id"].tolist()
    assert 17 not in ids and {18, 19, 20, 21, 22} <= set(ids) and len(ids) == 59


def test_a_stray_quote_in_a_large_sales_file_is_one_quarantined_line_not_a_crash(tiny_raw: Path,
                                                                                 tmp_path: Path) -> None:
    # The file is larger than the csv module's field limit (131072): the old line mapping crashed.
    config = _copy(tiny_raw, tmp_path)
    sales = tmp_path / "raw" / "sales_train.csv"
    assert sales.stat().st_size > 131072
    clean = ingest(_copy(tiny_raw, tmp_path / "clean")).file("sales_train.csv")
    _stray_quote(sales, 19)
    summary = ingest(config)
    _conserved(summary, tmp_path, "sales_train.csv")
    report = summary.file("sales_train.csv")
    assert report.rows_in == clean.rows_in
    assert report.rows_accepted == clean.rows_accepted - 1
    assert report.failed_rules == {**clean.failed_rules, UNBALANCED_QUOTE_RULE: 1}
    assert _quarantined(config)[19] == UNBALANCED_QUOTE_RULE


def test_stray_quotes_in_sales_each_cost_only_their_own_line(tmp_path: Path) -> None:
    rows = [SALES[0], '"' + SALES[1], SALES[2], SALES[3], '"' + SALES[4], SALES[5]]
    config = _write_raw(tmp_path, sales_train=_sales('"05.01.2013,0,0,0,5.0,1.0', rows=rows, final_newline=False))
    summary = ingest(config)
    _conserved(summary, tmp_path, "sales_train.csv")
    assert _quarantined(config) == {3: UNBALANCED_QUOTE_RULE, 6: UNBALANCED_QUOTE_RULE, 8: UNBALANCED_QUOTE_RULE}
    assert read_sales(LakePaths(tmp_path)).column("item_id").to_pylist() == [0, 2, 3, 1]


def test_a_quote_closing_on_a_later_line_never_swallows_the_lines_between(tmp_path: Path) -> None:
    # Line 6's quote would close on line 8: three records read as one. Names may hold newlines, but
    # this "record" has the wrong field count, so line 6 is quarantined and lines 7 and 8 are read.
    items = ('item_name,item_id,item_category_id\nA,0,0\nB,1,1\nC,2,2\nD,3,1\n"P,4,2\nQ,5,1\n'
             '"E, the second",6,2\n')
    config = _write_raw(tmp_path, items=items)
    summary = ingest(config)
    _conserved(summary, tmp_path, "items.csv")
    assert _quarantined(config, "items.csv") == {6: UNBALANCED_QUOTE_RULE}
    names = read_reference(LakePaths(tmp_path), "items")["item_name"].tolist()
    assert names == ["A", "B", "C", "D", "Q", "E, the second"]


def test_a_quoted_newline_in_a_name_is_still_one_record(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    report = ingest(config).file("items.csv")
    assert (report.rows_in, report.rows_accepted) == (5, 5)  # six lines, one name on two of them
    assert read_reference(LakePaths(tmp_path), "items").loc[2, "item_name"] == "Film\ntwo lines"


def test_a_stray_quote_in_test_csv_fails_naming_the_line(tmp_path: Path) -> None:
    config = _write_raw(tmp_path, test='ID,shop_id,item_id\n0,0,0\n"1,0,1\n2,1,2\n')
    with pytest.raises(DataValidationError) as caught:
        ingest(config)
    message = str(caught.value)
    assert "test.csv" in message and UNBALANCED_QUOTE_RULE in message and "lines [3]" in message


def test_reader_errors_are_data_errors_and_never_retried(tmp_path: Path) -> None:
    from core.errors import NON_RETRYABLE

    config = _write_raw(tmp_path, sales_train=_sales('"05.01.2013,0,0,0,5.0,1.0', rows=[]))
    with pytest.raises(DataValidationError) as caught:  # the only row is unreadable: 100 % quarantined
        ingest(config)
    assert isinstance(caught.value, NON_RETRYABLE)
    assert "sales_train.csv" in str(caught.value) and UNBALANCED_QUOTE_RULE in str(caught.value)


# --- mostly-rejected files -----------------------------------------------------------------------------


def test_a_sales_file_with_every_row_rejected_fails_ingest_naming_file_and_rule(tmp_path: Path) -> None:
    rows = ["02.01.2013,0,77,0,999.0,1.0", "03.01.2013,0,78,1,199.0,2.0", "05.01.2013,0,0,0,-1,1.0"]
    config = _write_raw(tmp_path, sales_train=_sales(rows=rows))
    with pytest.raises(DataValidationError) as caught:
        ingest(config)
    message = str(caught.value)
    assert message.startswith("sales_train.csv: 3 of 3 rows quarantined (100.0%)")
    assert "top rules: shop_id_known 2, item_price_positive 1" in message
    assert "max_quarantined_share = 0.5" in message
    assert not (LakePaths(tmp_path).lake / "manifest.json").exists()


def test_a_file_of_iso_dates_is_rejected_saying_the_format_expected_and_pointing_to_nothing_unwritten(
    tmp_path: Path,
) -> None:
    rows = ["2013-01-02,0,0,0,999.0,1.0", "2013-01-03,0,1,1,199.0,2.0", "2013-02-15,1,2,2,349.0,1.0"]
    config = _write_raw(tmp_path, sales_train=_sales(rows=rows))
    with pytest.raises(DataValidationError) as caught:
        ingest(config)
    message = str(caught.value)
    assert message.startswith("sales_train.csv: 3 of 3 rows quarantined (100.0%); top rules: date_format 3")
    assert "date_format (date is written dd.mm.yyyy): line 2 reads '2013-01-02,0,0,0,999.0,1.0'" in message
    assert message.endswith("Nothing was written to the lake"), message
    assert "lake/quarantine" not in message and "lake/validation" not in message
    assert not LakePaths(tmp_path).lake.exists()


def test_the_share_threshold_is_configurable_and_a_share_above_the_warning_level_warns(tmp_path: Path) -> None:
    extra = ["05.01.2013,0,0,0,-1,1.0", "05.01.2013,0,99,0,5.0,1.0"]  # 2 of 9 rows: 22 %
    config = _write_raw(tmp_path, sales_train=_sales(*extra))
    summary = ingest(config)
    _conserved(summary, tmp_path, "sales_train.csv")
    warning = ("sales_train.csv: 2 of 9 rows quarantined (22.2%); top rules: shop_id_known 1, "
               "item_price_positive 1; above the warning level ingest.warn_quarantined_share = 0.05")
    assert summary.file("sales_train.csv").warnings == [warning]
    assert summary.warnings == [warning]
    strict = config.model_copy(update={"ingest": config.ingest.model_copy(update={"max_quarantined_share": 0.2})})
    with pytest.raises(DataValidationError, match=r"sales_train.csv: 2 of 9 rows quarantined \(22.2%\)"):
        ingest(strict)  # a tighter threshold also applies to a file already ingested
    relaxed = config.model_copy(update={"ingest": config.ingest.model_copy(update={"warn_quarantined_share": 0.3})})
    assert ingest(relaxed).warnings == []


def test_clean_files_have_no_warnings(tmp_path: Path) -> None:
    summary = ingest(_write_raw(tmp_path))
    assert summary.warnings == [] and all(r.warnings == [] for r in summary.files)


# --- the minor items -----------------------------------------------------------------------------------


def test_the_quarantine_keeps_nan_as_written(tmp_path: Path) -> None:
    config = _write_raw(tmp_path, sales_train=_sales("05.01.2013,0,0,0,NaN,1.0", "06.01.2013,0,0,0,999.0,null"))
    ingest(config)
    frame = read_quarantine(LakePaths(tmp_path), "sales_train.csv")
    assert frame["rule"].tolist() == ["item_price_not_null", "item_cnt_day_not_null"]
    assert frame["item_price"].tolist() == ["NaN", "999.0"] and frame["item_cnt_day"].tolist() == ["1.0", "null"]


TEST_CASES = {
    "duplicate_id": ("ID,shop_id,item_id\n0,0,0\n1,0,1\n1,1,2\n", "ID_unique", "on lines [3, 4]"),
    "unknown_item": ("ID,shop_id,item_id\n0,0,0\n1,0,777\n", "item_id_known", "on line 3"),
    "ids_not_contiguous": ("ID,shop_id,item_id\n0,0,0\n1,0,1\n5,1,2\n", "ID_contiguous", "on line 4"),
    "duplicate_pair": ("ID,shop_id,item_id\n0,0,0\n1,0,1\n2,0,1\n", "pairs_unique", "on lines [3, 4]"),
    "text_id": ("ID,shop_id,item_id\n0,0,0\nx,0,1\n", "ID_is_integer", "on line 3"),
}


@pytest.mark.parametrize("case", sorted(TEST_CASES))
def test_test_csv_problems_name_their_lines(tmp_path: Path, case: str) -> None:
    text, rule, lines = TEST_CASES[case]
    with pytest.raises(DataValidationError) as caught:
        ingest(_write_raw(tmp_path, test=text))
    message = str(caught.value)
    assert message.startswith("test.csv: ") and f"{rule} (" in message, message
    problem = message.split(f"{rule} (", 1)[1].split("; ")[0]
    assert problem.endswith(lines), message


def test_the_rows_a_drop_replaces_are_counted_and_logged(tmp_path: Path, monkeypatch) -> None:
    config = _write_raw(tmp_path)
    ingest(config)
    paths = LakePaths(tmp_path)
    (paths.raw / "sales_2013-04.csv").write_bytes(_sales("10.04.2013,3,0,0,5.0,1.0", rows=["20.03.2013,2,0,1,7.0,4.0"]))

    import tasks.ingest as task_module

    logger = logging.getLogger("test-ingest-task")
    monkeypatch.setattr(task_module, "get_run_logger", lambda: logger)
    monkeypatch.setattr(task_module, "create_table_artifact", lambda **kwargs: None)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        summary = task_module.ingest_raw_files.fn(config)
    finally:
        logger.removeHandler(handler)
    drop = summary.file("sales_2013-04.csv")
    assert (drop.rows_replaced, drop.months_replaced) == (3, [2])  # lines 6-8 of sales_train.csv
    assert summary.rows_replaced == 3
    messages = [r.getMessage() for r in records]
    assert "sales_2013-04.csv replaced 3 rows of months [2] that earlier files had written" in messages


def test_the_task_logs_each_warning(tmp_path: Path, monkeypatch) -> None:
    config = _write_raw(tmp_path, sales_train=_sales("05.01.2013,0,0,0,-1,1.0"))
    import tasks.ingest as task_module

    warned: list[str] = []

    class _Logger:
        def info(self, *args: object) -> None:
            pass

        def warning(self, message: str, *args: object) -> None:
            warned.append(message % args)

    monkeypatch.setattr(task_module, "get_run_logger", lambda: _Logger())
    monkeypatch.setattr(task_module, "create_table_artifact", lambda **kwargs: None)
    task_module.ingest_raw_files.fn(config)
    assert warned == ["sales_train.csv: 1 of 8 rows quarantined (12.5%); top rules: item_price_positive 1; "
                      "above the warning level ingest.warn_quarantined_share = 0.05"]


def test_a_manifest_entry_that_is_not_a_raw_file_name_is_refused_and_nothing_is_deleted(tmp_path: Path) -> None:
    """On an object store anyone who can write to the bucket can write lake/manifest.json: a name in it is where
    ingest deletes a removed file's outputs (``sales_/../items.csv`` has items.csv's stem)."""
    config = _write_raw(tmp_path)
    ingest(config)
    paths = LakePaths(tmp_path)
    manifest = json.loads(paths.manifest.read_text())
    manifest["files"]["sales_/../items.csv"] = manifest["files"]["sales_train.csv"]
    paths.manifest.write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in paths.lake.rglob("*") if p.is_file()}
    with pytest.raises(DataValidationError, match="refused") as refused:
        ingest(config)
    assert "'sales_/../items.csv'" in str(refused.value) and "manifest.json" in str(refused.value)
    assert {p: p.read_bytes() for p in paths.lake.rglob("*") if p.is_file()} == before


def test_cli_demo_data_with_a_stray_quote_runs_ingest_to_the_end(tiny_raw: Path, tmp_path: Path) -> None:
    """The reported command line, end to end through ingest (not the whole flow)."""
    config = _copy(tiny_raw, tmp_path)
    _stray_quote(tmp_path / "raw" / "items.csv", 19)
    _stray_quote(tmp_path / "raw" / "sales_train.csv", 19)
    code = ("import sys; from core.config import NestcastConfig; from core.ingest import ingest; "
            "s = ingest(NestcastConfig(data_dir=sys.argv[1])); "
            "print(s.file('items.csv').rows_in, s.file('items.csv').rows_quarantined)")
    done = subprocess.run([sys.executable, "-c", code, str(config.data_dir)], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["60", "1"]
