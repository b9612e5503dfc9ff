"""Great Expectations verdicts -> row decisions.

GE runs on small validation tables (distinct values, or the rows themselves for small files); each
failed expectation's ``unexpected_index_list`` is mapped back onto the file's rows through the
tables' codes, so every accept/reject decision is GE's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.ingest.context import IngestContext


@dataclass(frozen=True)
class Table:
    """A frame GE validates; ``codes[row]`` is the frame position a row maps to (None: index = row)."""

    name: str
    frame: pd.DataFrame
    codes: np.ndarray | None = None

    def rows_of(self, positions: np.ndarray, n_rows: int) -> np.ndarray:
        """A row mask from frame positions."""
        bad = np.zeros(len(self.frame) if self.codes is not None else n_rows, dtype=bool)
        bad[positions] = True
        return bad[self.codes] if self.codes is not None else bad


@dataclass(frozen=True)
class FileProblem:
    """A failed file-level expectation, and the rows it points at where it points at rows."""

    text: str
    rows: np.ndarray | None


@dataclass
class Verdict:
    results: list[Any]
    rules: list[str]
    masks: dict[str, np.ndarray]  # only the row-level rules that failed some row
    file_problems: list[FileProblem] = field(default_factory=list)

    def first_rule(self, n_rows: int) -> np.ndarray:
        """Index (into ``rules``) of the first rule each row broke; -1 for accepted rows."""
        primary = np.full(n_rows, -1, dtype=np.int16)
        for index, rule in enumerate(self.rules):
            mask = self.masks.get(rule)
            if mask is not None:
                primary[(primary < 0) & mask] = index
        return primary


def evaluate(ctx: IngestContext, tables: Sequence[Table], suites: dict[str, Any], n_rows: int) -> Verdict:
    """Run GE on each table; row-level failures become row masks, file-level ones problems."""
    from core.expectations import expectation_rule, rule_names

    verdict = Verdict(results=[], rules=rule_names(suites), masks={})
    for table in tables:
        result = ctx.ge.validate(table.frame, suites[table.name])
        verdict.results.append(result)
        failed = [r for r in result.results if not r.success]
        texts = file_problems(result, table.frame) if failed else []
        for expectation_result, text in zip(failed, texts, strict=True):
            rule, level, _ = expectation_rule(expectation_result)
            rows = _failed_rows(expectation_result, table, n_rows)
            if level == "file":
                verdict.file_problems.append(FileProblem(text, rows))
            elif rows is not None:
                verdict.masks[rule] = verdict.masks[rule] | rows if rule in verdict.masks else rows
    return verdict


def _failed_rows(expectation_result: Any, table: Table, n_rows: int) -> np.ndarray | None:
    """The rows a failed expectation points at: its unexpected rows, or for an aggregate (a column's
    min or max) the rows holding the observed value; None when it points at no row."""
    values = expectation_result.result or {}
    if "unexpected_index_list" in values:
        return table.rows_of(np.asarray(values["unexpected_index_list"] or [], dtype=np.int64), n_rows)
    column = expectation_result.expectation_config.kwargs.get("column")
    if "observed_value" in values and column in table.frame.columns and table.codes is None:
        return (table.frame[column] == values["observed_value"]).to_numpy()
    return None


def file_problems(result: Any, frame: pd.DataFrame | None = None) -> list[str]:
    """One line per failed expectation: rule, GE type, and a few offending raw values."""
    from core.expectations import expectation_rule

    problems = []
    for expectation_result in result.results:
        if expectation_result.success:
            continue
        rule, _, _ = expectation_rule(expectation_result)
        problems.append(f"{rule} ({expectation_result.expectation_config.type}): "
                        f"{_detail(expectation_result, frame)}")
    return problems


def _detail(expectation_result: Any, frame: pd.DataFrame | None) -> str:
    values = expectation_result.result or {}
    config = expectation_result.expectation_config
    if "details" in values and "mismatched" in (values["details"] or {}):
        mismatch = values["details"]["mismatched"]
        return ", ".join(f"{key} {sorted(map(str, value))}" for key, value in mismatch.items() if value)
    if "observed_value" in values:
        return f"observed {plain(values['observed_value'])!r}"
    examples = [plain(v) for v in values.get("partial_unexpected_list", [])[:5]]
    index = values.get("unexpected_index_list") or []
    # Show the raw texts behind derived columns (``item_id__known`` is just True/False).
    columns = [config.kwargs["column"]] if "column" in config.kwargs else config.kwargs.get("column_list", [])
    raw = [c.split("__")[0] for c in columns]
    if frame is not None and index and raw and all(c in frame.columns for c in raw):
        picked = frame.loc[index[:5], raw]
        examples = picked.iloc[:, 0].tolist() if len(raw) == 1 else list(map(tuple, picked.values.tolist()))
    return f"{values.get('unexpected_count')} unexpected, e.g. {examples}"


def plain(value: Any) -> Any:
    """GE's numpy scalars as plain Python, whole floats as ints, ``x__number`` keys as ``x``."""
    if isinstance(value, dict):
        return {str(k).split("__")[0]: plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
