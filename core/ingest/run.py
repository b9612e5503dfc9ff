"""The step: discover the raw files, plan, validate what the plan says, stage and commit the outputs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.config import NestcastConfig
from core.errors import DataValidationError
from core.expectations import REFERENCE_FILES, RULES_VERSION, kind_of
from core.files import file_sha256
from core.ingest.columns import ID_COLUMN, check_structure
from core.ingest.commit import Transaction, exclusive, recover, transaction
from core.ingest.context import IngestContext
from core.ingest.docs import first_lines, index_html, stem, validation_doc
from core.ingest.outcome import Outcome, quarantined_share_warnings
from core.ingest.plan import IngestPlan, Owners, owners_of, plan_ingest, recorded_owners
from core.ingest.read import read_records
from core.ingest.readers import MANIFEST_VERSION, partition, quarantine_file, read_manifest, validation_page
from core.ingest.reference import validate_reference, validate_test
from core.ingest.report import FileReport, IngestSummary, RemovedFile
from core.ingest.sales import validate_sales
from core.lake import LakePaths, forecast_month_label, partition_month

PARTITION_HASHES = "partition_sha256"  # in the manifest: month -> sha256 of lake/sales/date_block_num=<month>
# Thresholds decide whether a run may go on, not what a row is: changing them revalidates nothing.
_NOT_RULES = {"max_quarantined_share", "warn_quarantined_share"}


def ingest(config: NestcastConfig) -> IngestSummary:
    """Validate the raw files of ``config.data_dir`` and bring the lake up to date with them."""
    ctx = IngestContext.of(config)
    with exclusive(ctx.paths):
        return _run(ctx)


def _run(ctx: IngestContext) -> IngestSummary:
    start = time.perf_counter()
    recover(ctx.paths)
    raw_files = discover(ctx.paths)
    manifest = read_manifest(ctx.paths)
    with ctx.clock.phase("read"):
        shas = {name: file_sha(path) for name, path in raw_files.items()}
    plan = plan_ingest(shas, manifest, rules_sha(ctx.config), missing_outputs(ctx.paths, manifest, shas))
    reports, outcomes = _validate_planned(ctx, plan, raw_files, shas, manifest)
    owners = plan.month_owners({n: o.report.months for n, o in outcomes.items() if o.report.kind == "sales"})
    deleted = plan.deleted_months(owners)
    _count_replaced(ctx.paths, plan, owners, outcomes)
    _note_shared(plan, owners, outcomes)
    months = month_tables(ctx, outcomes, owners)  # refuses parts of a month that share rows, before any write
    removed = _removed_files(ctx.paths, plan, owners)
    with transaction(ctx.paths.lake) as tx:
        if outcomes or deleted or removed:
            with ctx.clock.phase("write"):
                _stage(ctx, tx, plan, outcomes, owners, months, deleted, manifest)
                tx.commit()
    ctx.clock.seconds["total"] = time.perf_counter() - start
    summary = _summary(ctx, reports, tx, sorted(int(m) for m in manifest["months"]))
    summary.removed = removed
    return summary


def discover(paths: LakePaths) -> dict[str, Path]:
    """The raw files this step knows by name; the step fails when a required one is missing."""
    if not paths.raw.is_dir():
        raise DataValidationError(f"raw directory {paths.raw} does not exist")
    found = {p.name: p for p in sorted(paths.raw.iterdir()) if p.is_file() and kind_of(p.name)}
    missing = [name for name in REFERENCE_FILES.values() if name not in found]
    if not any(kind_of(name) == "sales" for name in found):
        missing.append("sales_train.csv (or any sales_*.csv)")
    if missing:
        raise DataValidationError(f"{paths.raw}: required raw files missing: {', '.join(missing)}")
    return found


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def rules_sha(config: NestcastConfig) -> str:
    rules = config.ingest.model_dump(mode="json", exclude=_NOT_RULES)
    return hashlib.sha256(json.dumps({"rules": RULES_VERSION, "ingest": rules}, sort_keys=True).encode()).hexdigest()


def _outputs_by_file(paths: LakePaths, manifest: Mapping[str, Any]) -> dict[str, list[Path]]:
    """Each file the manifest records -> the lake files it wrote (a sales file's month partitions, or a table)."""
    owned: dict[str, list[int]] = {}
    for month, recorded in manifest.get("months", {}).items():
        for owner in owners_of(recorded):
            owned.setdefault(owner, []).append(int(month))
    return {name: [partition(paths, m) for m in sorted(owned.get(name, []))] if kind_of(name) == "sales"
            else [paths.reference_table(kind_of(name))] for name in manifest.get("files", {})}


def missing_outputs(paths: LakePaths, manifest: Mapping[str, Any], present: Mapping[str, str]) -> frozenset[str]:
    """Known files whose outputs are gone from the lake, or (sales partitions) differ from the sha256 the
    manifest recorded when they were written: they are validated and written again."""
    outputs, hashes = _outputs_by_file(paths, manifest), manifest.get(PARTITION_HASHES, {})

    def intact(path: Path) -> bool:
        if not path.exists():
            return False
        try:
            recorded = hashes.get(str(partition_month(path)))
        except ValueError:  # a reference table: its existence is what the manifest vouches for
            return True
        return recorded is None or file_sha256(path) == recorded

    return frozenset(name for name in set(outputs) & set(present) if not all(map(intact, outputs[name])))


def lake_outputs(paths: LakePaths) -> list[Path]:
    """The manifest and every lake file it says ingest wrote: what a cached ingest must find as it left them
    (a partition deleted or damaged behind the manifest's back makes the step run, and its plan rewrite it)."""
    outputs = _outputs_by_file(paths, read_manifest(paths))
    return [paths.manifest, *sorted({path for files in outputs.values() for path in files})]


def _validate_planned(ctx: IngestContext, plan: IngestPlan, raw_files: Mapping[str, Path],
                      shas: Mapping[str, str], manifest: Mapping[str, Any]
                      ) -> tuple[list[FileReport], dict[str, Outcome]]:
    """Files in order; each one's accepted ids are what the files after it are validated against."""
    ids: dict[str, list[int]] = {}
    reports, outcomes = [], {}
    for name in plan.order:
        kind = kind_of(name)
        if plan.is_skipped(name):
            report = _skipped_report(name, manifest["files"][name])
            if kind != "sales" and kind != "test":
                ids[kind] = _accepted_ids(ctx.paths, kind)
        else:
            outcome = _validate_file(ctx.for_file(), name, raw_files[name], shas[name], ids)
            report, outcomes[name] = outcome.report, outcome
            if kind != "sales" and kind != "test":
                ids[kind] = outcome.accepted.column(ID_COLUMN[kind]).to_pylist()
        report.warnings = quarantined_share_warnings(report, ctx.config.ingest, outcomes.get(name))
        reports.append(report)
    return reports, outcomes


def _skipped_report(name: str, entry: Mapping[str, Any]) -> FileReport:
    return FileReport(
        file=name, kind=entry["kind"], sha256=entry["sha256"], skipped=True, rows_in=entry["rows_in"],
        rows_accepted=entry["rows_accepted"], rows_quarantined=entry["rows_quarantined"],
        failed_rules=entry.get("failed_rules", {}), months=entry.get("months", []),
    )


def _accepted_ids(paths: LakePaths, kind: str) -> list[int]:
    return pq.read_table(paths.reference_table(kind), columns=[ID_COLUMN[kind]]).column(0).to_pylist()


def _validate_file(ctx: IngestContext, name: str, path: Path, sha: str, ids: Mapping[str, list[int]]) -> Outcome:
    from core.expectations import item_categories_suites, items_suites, shops_suites, test_suites

    kind = kind_of(name)
    with ctx.phase("read"):
        raw = path.read_bytes()
    with ctx.phase("validate"):
        structure = check_structure(ctx, name, raw, kind)
    with ctx.phase("read"):
        csv_file = read_records(name, raw, kind)
    if kind == "sales":
        outcome = validate_sales(ctx, csv_file, sha, ids["shops"], ids["items"])
    elif kind == "test":
        suites = test_suites(csv_file.table.num_rows, ids["shops"], ids["items"])
        outcome = validate_test(ctx, csv_file, sha, suites, {"shop_id": ids["shops"], "item_id": ids["items"]})
    elif kind == "items":
        categories = ids["item_categories"]
        outcome = validate_reference(ctx, csv_file, sha, items_suites(categories), {"item_category_id": categories})
    else:
        suites = item_categories_suites() if kind == "item_categories" else shops_suites()
        outcome = validate_reference(ctx, csv_file, sha, suites, {})
    outcome.validation.insert(0, structure)
    return outcome


def _count_replaced(paths: LakePaths, plan: IngestPlan, owners: Mapping[int, Owners],
                    outcomes: Mapping[str, Outcome]) -> None:
    """How many lake rows each sales file's months replace (rows another file had put there)."""
    for name, months in plan.replaced_months(owners).items():
        report = outcomes[name].report
        report.months_replaced = sorted(months)
        report.rows_replaced = sum(pq.read_metadata(partition(paths, m)).num_rows for m in months
                                   if partition(paths, m).exists())


def _file_outputs(paths: LakePaths, name: str) -> list[Path]:
    """What ingest wrote for one raw file besides its sales partitions (its reference table, if any)."""
    kind = kind_of(name)
    docs = [quarantine_file(paths, name), paths.validation / f"{stem(name)}.json", validation_page(paths, name)]
    return ([] if kind == "sales" else [paths.reference_table(kind)]) + docs


def _note_shared(plan: IngestPlan, owners: Mapping[int, Owners], outcomes: Mapping[str, Outcome]) -> None:
    """Each validated drop's months that it holds together with other drops, and those drops (for the log)."""
    for name, months in plan.shared_months(owners).items():
        report = outcomes[name].report
        report.months_shared = sorted(months)
        report.shares_months_with = sorted({other for others in months.values() for other in others})


def month_tables(ctx: IngestContext, outcomes: Mapping[str, Outcome], owners: Mapping[int, Owners]
                 ) -> dict[int, pa.Table]:
    """The new partition of every month a validated sales file owns: its owners' rows in arrival order (the rows
    of owners not validated now, joined by a new part, are the month's partition as it stands). Parts that share
    identical rows are refused: one restates the other, and ingest cannot tell which is out of date."""
    slices: dict[int, dict[str, pa.Table]] = {}
    for name, outcome in outcomes.items():
        if outcome.report.kind == "sales":
            for month, table in _month_slices(outcome):
                if name in owners.get(month, ()):
                    slices.setdefault(month, {})[name] = table
    tables = {}
    for month, fresh in sorted(slices.items()):
        standing = [name for name in owners[month] if name not in fresh]
        parts = ({", ".join(standing): pq.read_table(partition(ctx.paths, month))} if standing else {}) | fresh
        _refuse_shared_rows(ctx, month, parts)
        tables[month] = pa.concat_tables(parts.values())
    return tables


def _month_slices(outcome: Outcome) -> list[tuple[int, pa.Table]]:
    """A sales file's accepted rows (sorted by month) cut per month, without the month column."""
    table, months = outcome.accepted, outcome.report.months
    bounds = np.append(np.searchsorted(table.column("date_block_num").to_numpy(), months), table.num_rows)
    return [(month, table.slice(bounds[i], bounds[i + 1] - bounds[i]).drop_columns(["date_block_num"]))
            for i, month in enumerate(months)]


def _refuse_shared_rows(ctx: IngestContext, month: int, parts: Mapping[str, pa.Table]) -> None:
    if len(parts) < 2:
        return
    frames = [table.to_pandas().drop_duplicates().assign(_file=name) for name, table in parts.items()]
    rows = pd.concat(frames, ignore_index=True)
    shared = rows[rows.duplicated(subset=[c for c in rows.columns if c != "_file"], keep=False)]
    if shared.empty:
        return
    files = sorted(set(shared["_file"]))
    values = shared.drop(columns="_file").drop_duplicates()
    example = ", ".join(f"{column}={value}" for column, value in values.iloc[0].items())
    label = forecast_month_label(month, ctx.config.ingest.first_month)
    raise DataValidationError(
        f"month {month} ({label}) is in {' and '.join(files)}, and they share {len(values):,} identical rows "
        f"(e.g. {example}): one looks like a restatement of the other, not another part of the month. Remove the "
        f"file that is out of date (or the repeated rows) and run again; nothing was written")


def _removed_files(paths: LakePaths, plan: IngestPlan, owners: Mapping[int, Owners]) -> list[RemovedFile]:
    """The files gone from raw/ since they were ingested: what of theirs leaves the lake."""
    months = plan.removed_months(owners)
    removed = []
    for name in plan.removed:
        entry = months.get(name, {"deleted": [], "restored": []})
        rows = sum(pq.read_metadata(partition(paths, m)).num_rows for m in entry["deleted"]
                   if partition(paths, m).exists())
        restored_from = sorted({owner for m in entry["restored"] for owner in owners[m]})
        removed.append(RemovedFile(
            file=name, outputs=[p.relative_to(paths.lake).as_posix() for p in _file_outputs(paths, name)
                                if p.exists()],
            months_deleted=entry["deleted"], rows_deleted=rows, months_restored=entry["restored"],
            restored_from=restored_from))
    return removed


def _stage(ctx: IngestContext, tx: Transaction, plan: IngestPlan, outcomes: Mapping[str, Outcome],
           owners: Mapping[int, Owners], months: Mapping[int, pa.Table], deleted: list[int],
           manifest: dict[str, Any]) -> None:
    """Write every output of the run to staging, and the new manifest last."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    sales_jobs = [(partition(ctx.paths, month), table) for month, table in months.items()]
    for name, outcome in outcomes.items():
        if outcome.report.kind != "sales":
            tx.parquet(ctx.paths.reference_table(outcome.report.kind), outcome.accepted)
        tx.parquet(quarantine_file(ctx.paths, name), outcome.quarantine)
        payload, page = validation_doc(name, outcome.validation, outcome.report, first_lines(outcome.quarantine))
        tx.json(ctx.paths.validation / f"{stem(name)}.json", payload)
        tx.text(validation_page(ctx.paths, name), page)
        manifest["files"][name] = _manifest_entry(outcome.report, plan, rules_sha(ctx.config), now)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        staged = list(pool.map(lambda job: tx.parquet(*job), sales_jobs))
    written = {partition_month(path): file_sha256(path) for path in staged}
    for month in deleted:
        tx.delete(partition(ctx.paths, month))
    for name in plan.removed:  # the lake mirrors raw/: a file gone from it takes its outputs along
        manifest["files"].pop(name, None)
        for path in _file_outputs(ctx.paths, name):
            if path.exists():
                tx.delete(path)
    manifest["months"] = {str(m): recorded_owners(names) for m, names in sorted(owners.items())}
    manifest[PARTITION_HASHES] = _partition_hashes(manifest, owners, written)
    manifest["version"] = MANIFEST_VERSION
    tx.text(ctx.paths.validation / "index.html", index_html(manifest))
    tx.json(ctx.paths.manifest, manifest)


def _partition_hashes(manifest: Mapping[str, Any], owners: Mapping[int, Owners], written: Mapping[int, str]
                      ) -> dict[str, str]:
    """Month -> sha256 of its partition: this run's for the months it wrote, the manifest's for the rest."""
    before = manifest.get(PARTITION_HASHES, {})
    hashes = {str(m): written.get(m, before.get(str(m))) for m in sorted(owners)}
    return {month: sha for month, sha in hashes.items() if sha is not None}


def _manifest_entry(report: FileReport, plan: IngestPlan, rules: str, now: str) -> dict[str, Any]:
    return {
        "sha256": report.sha256, "kind": report.kind, "rows_in": report.rows_in,
        "rows_accepted": report.rows_accepted, "rows_quarantined": report.rows_quarantined,
        "months": report.months, "ingested_at": now, "failed_rules": report.failed_rules,
        "depends_on": dict(plan.depends_on[report.file]), "rules_sha256": rules, "seq": plan.seq[report.file],
    }


def _summary(ctx: IngestContext, reports: list[FileReport], tx: Transaction, months: list[int]) -> IngestSummary:
    return IngestSummary(
        data_dir=str(ctx.config.data_dir), files=reports,
        rows_in=sum(r.rows_in for r in reports), rows_accepted=sum(r.rows_accepted for r in reports),
        rows_quarantined=sum(r.rows_quarantined for r in reports),
        rows_replaced=sum(r.rows_replaced for r in reports), months=months,
        changed=not tx.empty, written=list(tx.moves), deleted=list(tx.deletes), manifest=str(ctx.paths.manifest),
        warnings=[w for r in reports for w in r.warnings],
        timings={k: round(v, 4) for k, v in ctx.clock.seconds.items()},
    )
