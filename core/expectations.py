"""Great Expectations suites for the five raw files, built in code, and the one place GE is run.

Every rule of step 1 is one GE expectation whose ``meta`` carries the rule name (what the quarantine
and the summaries show), the rule's level (``file``: the step fails; ``row``: the row is quarantined)
and the validation table it runs on.

GE is run on small *validation tables*, never on the 3 M-row sales frame itself: GE 1.x costs about
0.2-0.5 s per expectation on a frame that size (it copies the frame to drop nulls, hashes it, builds
value lists), which alone would blow the 5 s budget of the step. Every sales rule but one is a
function of one column's value (or of the (date, date_block_num) pair), so GE validates the
*distinct raw values* of each column (some thousands of rows) and the ingest step maps GE's
``unexpected_index_list`` back onto the rows through the dictionary codes. The one row-wise rule
(exact duplicate rows) is validated on the table of rows that occur more than once. Items,
categories and shops are validated row by row; test.csv by distinct values plus its parsed rows.

The ingest step computes derived columns vectorised (parsed numbers, the month a date falls in,
occurrence counts, membership in the reference ids); every accept/reject decision is GE's, and a row
is quarantined exactly where GE's unexpected_index_list points, so there is no second
implementation of a rule to disagree with it.

Table names and their columns (built by ``core.ingest.sales`` and ``core.ingest.reference``):

- ``structure`` (every file): the header and up to five records as strings.
- sales: ``date_block`` (distinct (date, date_block_num) pairs: ``date``, ``date_block_num`` raw,
  ``date_block_num__number``, ``date__month_block``), one table per id/number column
  (``<col>`` raw, ``<col>__number``, ``<col>__known`` for ids) and ``duplicates`` (raw columns + ``row_occurrence``,
  indexed by row position).
- items / item_categories / shops: ``rows`` (raw columns, ``<col>__number`` for numeric
  columns, ``<id>__occurrence`` for the id that must be unique, ``<col>__known`` for foreign keys).
- test: one distinct-value table per column and ``rows`` (the parsed numbers) for uniqueness.

``<col>__known`` is True/False whether the parsed id is among the ids accepted from the reference
file, None where there is no number (so it never overlaps the not-null / is-integer rules).

``<col>__number`` is the raw text parsed with :data:`INTEGER_PATTERN` / :data:`NUMBER_PATTERN`
as the gate (NaN where the text is missing or not a number), so GE's regex expectation and the
parser agree by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from core.config import IngestConfig

if TYPE_CHECKING:  # GE takes seconds to import; only the ingest step pays for it, lazily.
    import pandas as pd
    from great_expectations.core import ExpectationSuite
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult

FileKind = Literal["sales", "items", "item_categories", "shops", "test"]
Level = Literal["file", "row"]

COLUMNS: dict[str, tuple[str, ...]] = {
    "sales": ("date", "date_block_num", "shop_id", "item_id", "item_price", "item_cnt_day"),
    "test": ("ID", "shop_id", "item_id"),
    "items": ("item_name", "item_id", "item_category_id"),
    "item_categories": ("item_category_name", "item_category_id"),
    "shops": ("shop_name", "shop_id"),
}
REFERENCE_FILES: dict[str, str] = {
    "item_categories": "item_categories.csv",
    "shops": "shops.csv",
    "items": "items.csv",
}
TEST_FILE = "test.csv"

# Descriptions avoid "<" and ">": GE's Data Docs render them as markdown/HTML.
# Anchored, ASCII-only: the same pattern gates the parser (pyarrow RE2) and GE's regex rule (Python re).
INTEGER_PATTERN = r"^[+-]?[0-9]+$"
NUMBER_PATTERN = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
DATE_PATTERN = r"^[0-9]{2}\.[0-9]{2}\.[0-9]{4}$"
# The same shape with named parts, for the vectorised parser (GE's regex rule must not see groups).
DATE_PARTS_PATTERN = r"^(?P<day>[0-9]{2})\.(?P<month>[0-9]{2})\.(?P<year>[0-9]{4})$"
DATE_FORMAT = "%d.%m.%Y"
INT16_MAX = 32_767
INT32_MAX = 2_147_483_647

# Bump when a rule changes meaning: every file is then revalidated on the next run.
RULES_VERSION = "2"  # 2: unbalanced_quote lines, "NaN" kept as written in the quarantine

logging.getLogger("great_expectations").setLevel(logging.WARNING)


def kind_of(file_name: str) -> FileKind | None:
    """The kind of a raw file by its name (``sales_*.csv`` are sales drops), None when not ours."""
    if file_name.startswith("sales_") and file_name.endswith(".csv"):
        return "sales"
    if file_name == TEST_FILE:
        return "test"
    for kind, name in REFERENCE_FILES.items():
        if name == file_name:
            return kind  # type: ignore[return-value]
    return None


def _gxe() -> Any:
    import great_expectations.expectations as gxe

    return gxe


def _rule(kind: str, rule: str, table: str, level: Level, description: str, **kwargs: Any) -> Any:
    expectation_type = getattr(_gxe(), kind)
    return expectation_type(
        **kwargs, description=description, meta={"rule": rule, "level": level, "table": table}
    )


def _suite(name: str, expectations: Iterable[Any]) -> ExpectationSuite:
    import great_expectations as gx

    return gx.ExpectationSuite(name=name, expectations=list(expectations))


def _numeric_rules(
    table: str, column: str, *, integer: bool, level: Level, what: str
) -> list[Any]:
    """Present and a number: null and non-numeric text are separate rules so they never overlap."""
    rules = [
        _rule("ExpectColumnValuesToNotBeNull", f"{column}_not_null", table, level,
              f"{what} is present", column=column),
    ]
    if integer:
        rules.append(_rule("ExpectColumnValuesToMatchRegex", f"{column}_is_integer", table, level,
                           f"{what} is an integer", column=column, regex=INTEGER_PATTERN))
    else:
        rules.append(_rule("ExpectColumnValuesToMatchRegex", f"{column}_is_number", table, level,
                           f"{what} is a decimal number", column=column, regex=NUMBER_PATTERN))
    return rules


def _known(table: str, column: str, n_ids: int, level: Level, source: str) -> Any:
    # The membership test itself is an isin done by the ingest step into ``<col>__known``
    # (True/False, None where there is no number): a 22k-id value_set inside the expectation
    # makes GE 1.x re-serialise the list thousands of times per validation (minutes, not ms).
    return _rule("ExpectColumnValuesToBeInSet", f"{column}_known", table, level,
                 f"{column} is one of the {n_ids} ids accepted from {source}",
                 column=f"{column}__known", value_set=[True])


def _id_rules(table: str, column: str, maximum: int, level: Level, unique: bool) -> list[Any]:
    rules = _numeric_rules(table, column, integer=True, level=level, what=column)
    rules.append(_rule("ExpectColumnValuesToBeBetween", f"{column}_in_range", table, level,
                       f"{column} fits its integer type", column=f"{column}__number",
                       min_value=0, max_value=maximum))
    if unique:
        rules.append(_rule("ExpectColumnValuesToBeBetween", f"{column}_unique", table, level,
                           f"{column} appears once (later copies are rejected)",
                           column=f"{column}__occurrence", max_value=1))
    return rules


def structure_suite(kind: FileKind) -> ExpectationSuite:
    """File-level: exact column set (no missing, extra or repeated columns) and at least one data row."""
    columns = list(COLUMNS[kind])
    return _suite(f"{kind}.structure", [
        _rule("ExpectTableColumnsToMatchSet", "columns_match", "structure", "file",
              f"the header holds exactly the columns {', '.join(columns)}",
              column_set=columns, exact_match=True),
        _rule("ExpectTableColumnCountToEqual", "column_count", "structure", "file",
              f"the header holds {len(columns)} columns (no repeats)", value=len(columns)),
        _rule("ExpectTableRowCountToBeBetween", "has_data_rows", "structure", "file",
              "the file holds at least one data row", min_value=1),
    ])


def sales_suites(
    config: IngestConfig, shop_ids: Sequence[int], item_ids: Sequence[int]
) -> dict[str, ExpectationSuite]:
    """Row-level rules of a ``sales_*.csv`` file, keyed by the validation table they run on."""
    row: Level = "row"
    date_block = [
        _rule("ExpectColumnValuesToNotBeNull", "date_not_null", "date_block", row, "date is present",
              column="date"),
        _rule("ExpectColumnValuesToMatchRegex", "date_format", "date_block", row,
              "date is written dd.mm.yyyy", column="date", regex=DATE_PATTERN),
        _rule("ExpectColumnValuesToMatchStrftimeFormat", "date_is_calendar_date", "date_block", row,
              "date is a real calendar day", column="date", strftime_format=DATE_FORMAT),
        *_numeric_rules("date_block", "date_block_num", integer=True, level=row, what="date_block_num"),
        _rule("ExpectColumnValuesToBeBetween", "date_block_num_in_range", "date_block", row,
              "date_block_num is a month index, 0 or more", column="date_block_num__number",
              min_value=0, max_value=INT16_MAX),
        _rule("ExpectColumnPairValuesToBeEqual", "date_matches_block", "date_block", row,
              f"the date falls in month date_block_num (0 = {config.first_month})",
              column_A="date__month_block", column_B="date_block_num__number",
              ignore_row_if="either_value_is_missing"),
    ]
    shop = [*_numeric_rules("shop_id", "shop_id", integer=True, level=row, what="shop_id"),
            _known("shop_id", "shop_id", len(shop_ids), row, "shops.csv")]
    item = [*_numeric_rules("item_id", "item_id", integer=True, level=row, what="item_id"),
            _known("item_id", "item_id", len(item_ids), row, "items.csv")]
    price = [
        *_numeric_rules("item_price", "item_price", integer=False, level=row, what="item_price"),
        _rule("ExpectColumnValuesToBeBetween", "item_price_positive", "item_price", row,
              "item_price is above 0", column="item_price__number", min_value=0, strict_min=True),
        _rule("ExpectColumnValuesToBeBetween", "item_price_below_max", "item_price", row,
              f"item_price is below {config.max_item_price:g}", column="item_price__number",
              max_value=config.max_item_price, strict_max=True),
    ]
    count = [
        *_numeric_rules("item_cnt_day", "item_cnt_day", integer=False, level=row, what="item_cnt_day"),
        _rule("ExpectColumnValuesToBeBetween", "item_cnt_day_in_range", "item_cnt_day", row,
              f"item_cnt_day is between {config.min_item_cnt_day:g} and {config.max_item_cnt_day:g}",
              column="item_cnt_day__number", min_value=config.min_item_cnt_day,
              max_value=config.max_item_cnt_day),
    ]
    duplicates = [
        _rule("ExpectColumnValuesToBeBetween", "no_duplicate_rows", "duplicates", row,
              "a row is not an exact copy of an earlier row (the first copy is kept)",
              column="row_occurrence", max_value=1),
    ]
    tables = {"date_block": date_block, "shop_id": shop, "item_id": item, "item_price": price,
              "item_cnt_day": count, "duplicates": duplicates}
    return {table: _suite(f"sales.{table}", rules) for table, rules in tables.items()}


def item_categories_suites() -> dict[str, ExpectationSuite]:
    rules = [
        _rule("ExpectColumnValuesToNotBeNull", "item_category_name_not_null", "rows", "row",
              "item_category_name is present", column="item_category_name"),
        *_id_rules("rows", "item_category_id", INT16_MAX, "row", unique=True),
    ]
    return {"rows": _suite("item_categories.rows", rules)}


def shops_suites() -> dict[str, ExpectationSuite]:
    rules = [
        _rule("ExpectColumnValuesToNotBeNull", "shop_name_not_null", "rows", "row",
              "shop_name is present", column="shop_name"),
        *_id_rules("rows", "shop_id", INT16_MAX, "row", unique=True),
    ]
    return {"rows": _suite("shops.rows", rules)}


def items_suites(category_ids: Sequence[int]) -> dict[str, ExpectationSuite]:
    rules = [
        _rule("ExpectColumnValuesToNotBeNull", "item_name_not_null", "rows", "row",
              "item_name is present", column="item_name"),
        *_id_rules("rows", "item_id", INT32_MAX, "row", unique=True),
        *_numeric_rules("rows", "item_category_id", integer=True, level="row", what="item_category_id"),
        _known("rows", "item_category_id", len(category_ids), "row", "item_categories.csv"),
    ]
    return {"rows": _suite("items.rows", rules)}


def test_suites(n_rows: int, shop_ids: Sequence[int], item_ids: Sequence[int]) -> dict[str, ExpectationSuite]:
    """``test.csv`` is the forecast's contract: every problem is file-level.

    Column rules run on each column's distinct values (tables ``ID``, ``shop_id``, ``item_id``),
    the row-wise ones on ``rows`` (the three ``__number`` columns).
    """
    file: Level = "file"
    tables = {
        "ID": _numeric_rules("ID", "ID", integer=True, level=file, what="ID"),
        "shop_id": [*_numeric_rules("shop_id", "shop_id", integer=True, level=file, what="shop_id"),
                    _known("shop_id", "shop_id", len(shop_ids), file, "shops.csv")],
        "item_id": [*_numeric_rules("item_id", "item_id", integer=True, level=file, what="item_id"),
                    _known("item_id", "item_id", len(item_ids), file, "items.csv")],
        "rows": [
            _rule("ExpectColumnValuesToBeUnique", "ID_unique", "rows", file, "IDs are unique",
                  column="ID__number"),
            _rule("ExpectColumnMinToBeBetween", "ID_starts_at_0", "rows", file, "the smallest ID is 0",
                  column="ID__number", min_value=0, max_value=0),
            _rule("ExpectColumnMaxToBeBetween", "ID_contiguous", "rows", file,
                  "the largest ID is rows - 1 (with unique IDs from 0: contiguous)",
                  column="ID__number", min_value=n_rows - 1, max_value=n_rows - 1),
            _rule("ExpectCompoundColumnsToBeUnique", "pairs_unique", "rows", file,
                  "each (shop_id, item_id) pair appears once",
                  column_list=["shop_id__number", "item_id__number"]),
        ],
    }
    return {table: _suite(f"test.{table}", rules) for table, rules in tables.items()}


# --- running GE ------------------------------------------------------------------------------------


class GEValidator:
    """An ephemeral GE context with one pandas dataframe asset; validates any frame against a suite."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.context = gx.get_context(mode="ephemeral")
        # Progress bars would print one line per expectation per table to stderr.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = self.context.data_sources.add_pandas("nestcast").add_dataframe_asset("frame")
        self._whole_frame = asset.add_batch_definition_whole_dataframe("whole")

    def validate(self, frame: pd.DataFrame, suite: ExpectationSuite) -> ExpectationSuiteValidationResult:
        """COMPLETE results: ``unexpected_index_list`` says which frame rows broke each expectation."""
        batch = self._whole_frame.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
        for expectation_result in result.results:
            info = expectation_result.exception_info or {}
            if info.get("raised_exception"):
                rule = expectation_result.expectation_config.meta.get("rule")
                raise RuntimeError(f"GE could not evaluate rule {rule!r}: {info.get('exception_message')}")
        return result


def combine_results(name: str, results: Sequence[ExpectationSuiteValidationResult], meta: dict[str, Any]
                    ) -> ExpectationSuiteValidationResult:
    """One suite result per file (for the JSON and the Data Docs page) from its per-table results."""
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult

    merged = [r for result in results for r in result.results]
    successful = sum(1 for r in merged if r.success)
    statistics = {
        "evaluated_expectations": len(merged),
        "successful_expectations": successful,
        "unsuccessful_expectations": len(merged) - successful,
        "success_percent": 100.0 * successful / len(merged) if merged else 100.0,
    }
    return ExpectationSuiteValidationResult(
        success=all(r.success for r in merged), results=merged, suite_name=name,
        statistics=statistics, meta=meta,
    )


def _python(value: Any) -> Any:
    """numpy scalars -> Python (GE's HTML renderer rejects numpy floats as observed values)."""
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_python(v) for v in value)
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    return value


def trim_for_docs(result: ExpectationSuiteValidationResult, keep: int = 20) -> ExpectationSuiteValidationResult:
    """Shorten long lists (value sets of 22k ids, complete unexpected lists) before writing docs."""
    for expectation_result in result.results:
        expectation_result.result = _python(expectation_result.result or {})
        values = expectation_result.result
        for key in ("unexpected_list", "unexpected_index_list", "partial_unexpected_list",
                    "partial_unexpected_index_list", "partial_unexpected_counts"):
            if isinstance(values.get(key), list) and len(values[key]) > keep:
                values[key] = values[key][:keep]
        if "unexpected_index_query" in values:
            values.pop("unexpected_index_query")
        kwargs = expectation_result.expectation_config.kwargs
        value_set = kwargs.get("value_set")
        if isinstance(value_set, list) and len(value_set) > keep:
            expectation_result.expectation_config.meta["value_set_size"] = len(value_set)
            kwargs["value_set"] = value_set[:keep]
    return result


_RENDERERS: list[Any] = []


def render_data_docs(result: ExpectationSuiteValidationResult) -> str:
    """GE's own Data Docs page for one validation result (the renderer a Data Docs site uses)."""
    if not _RENDERERS:  # one view keeps its Jinja environment, so templates compile once per process
        from great_expectations.render.renderer import ValidationResultsPageRenderer
        from great_expectations.render.view import DefaultJinjaPageView

        _RENDERERS.extend([ValidationResultsPageRenderer(), DefaultJinjaPageView()])
    renderer, view = _RENDERERS
    return view.render(renderer.render(result))


def expectation_rule(expectation_result: Any) -> tuple[str, Level, str]:
    meta = expectation_result.expectation_config.meta
    return meta["rule"], meta["level"], meta["table"]


def rule_names(suites: dict[str, ExpectationSuite]) -> list[str]:
    """Rules in suite order: the first failed rule of a row is the one its quarantine record names."""
    return [e.meta["rule"] for suite in suites.values() for e in suite.expectations]
