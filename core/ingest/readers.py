"""Reading what ingest wrote: sales partitions, reference tables, quarantine, manifest."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UnsafePathError
from core.expectations import COLUMNS, kind_of
from core.files import path_problem, read_json
from core.ingest.columns import REFERENCE_SCHEMAS, SALES_SCHEMA
from core.ingest.docs import stem
from core.ingest.plan import owners_of
from core.ingest.quarantine import empty_quarantine
from core.lake import LakePaths

MANIFEST_VERSION = 1
PathLike = LakePaths | str | os.PathLike[str]


def lake_paths(paths: PathLike) -> LakePaths:
    return paths if isinstance(paths, LakePaths) else LakePaths(paths)


def partition(paths: LakePaths, month: int) -> Path:
    """``lake/sales/date_block_num=<month>/data.parquet`` (the catalog's ``sales_file``)."""
    return paths.sales_file(month)


def read_sales(paths: PathLike, months: Sequence[int] | None = None) -> pa.Table:
    """Validated daily sales, months ascending (file order within a month), with date_block_num int16."""
    paths = lake_paths(paths)
    parts = _partitions(paths)
    if months is not None:
        wanted = {int(m) for m in months}
        parts = [part for part in parts if part[0] in wanted]
    schema = SALES_SCHEMA.insert(1, pa.field("date_block_num", pa.int16()))
    if not parts:
        return schema.empty_table()
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        tables = list(pool.map(lambda part: pq.read_table(part[1], schema=SALES_SCHEMA), parts))
    tables = [t.add_column(1, "date_block_num", pa.array(np.full(t.num_rows, m, dtype=np.int16)))
              for (m, _), t in zip(parts, tables, strict=True)]
    return pa.concat_tables(tables).cast(schema)


def _partitions(paths: LakePaths) -> list[tuple[int, Path]]:
    return [(month, paths.sales_file(month)) for month in paths.sales_months() if paths.sales_file(month).exists()]


def read_reference(paths: PathLike, name: str) -> pd.DataFrame:
    """``items``, ``item_categories``, ``shops`` or ``test`` from lake/reference, typed as in the contract."""
    paths = lake_paths(paths)
    table = Path(name).stem
    if table not in REFERENCE_SCHEMAS:
        raise ValueError(f"unknown reference table {name!r}; known: {', '.join(REFERENCE_SCHEMAS)}")
    target = paths.reference_table(table)
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist: run the ingest step first")
    return pq.read_table(target).to_pandas()


def read_quarantine(paths: PathLike, file_name: str) -> pd.DataFrame:
    """The rows of one raw file that ingest rejected (empty frame if none, or never ingested)."""
    target = quarantine_file(paths, file_name)
    if not target.exists():
        return empty_quarantine(COLUMNS.get(kind_of(file_name) or "sales", ())).to_pandas()
    return pq.read_table(target).to_pandas()


#: Quarantine columns that say where and why, not what the row held.
_PROVENANCE = ("source_file", "line_number", "rule", "rules", "raw_line")


def quarantine_preview(paths: PathLike, file_name: str, limit: int = 10) -> list[dict[str, Any]]:
    """The first ``limit`` quarantined lines of a file, by line: its number, the first rule it broke, and its
    values as written (the raw line when it could not be split into fields)."""
    frame = read_quarantine(paths, file_name).sort_values("line_number").head(limit)
    values = [c for c in frame.columns if c not in _PROVENANCE]
    rows = []
    for record in frame.to_dict("records"):
        raw = record.get("raw_line")
        written = raw if isinstance(raw, str) else ", ".join(f"{c}={record[c]}" for c in values
                                                             if record[c] is not None)
        rows.append({"line": int(record["line_number"]), "rule": str(record["rule"]), "values": written})
    return rows


def quarantine_file(paths: PathLike, file_name: str) -> Path:
    """``lake/quarantine/<stem>.parquet``: every line of one raw file that ingest rejected."""
    return lake_paths(paths).quarantine / f"{stem(file_name)}.parquet"


def validation_page(paths: PathLike, file_name: str) -> Path:
    """The Great Expectations page of one raw file's latest validation (``lake/validation/<stem>.html``)."""
    return lake_paths(paths).validation / f"{stem(file_name)}.html"


def read_manifest(paths: PathLike) -> dict[str, Any]:
    """``lake/manifest.json`` (empty when there is none), after checking that every file it names is a raw file's
    plain name: the lake's output paths are built from them, and on an object store anyone who can write to the
    bucket could have written the manifest."""
    target = lake_paths(paths).manifest
    manifest = read_json(target, None) or {"version": MANIFEST_VERSION, "files": {}, "months": {}}
    owners = [name for value in manifest.get("months", {}).values() for name in owners_of(value)]
    for name in [*manifest.get("files", {}), *owners]:
        if kind_of(name) is None or name != Path(name).name or path_problem(name) is not None:
            raise UnsafePathError(f"{target}: entry {name!r} refused (not the plain name of a raw file nestcast "
                                  f"ingests); nothing was written or deleted")
    return manifest
