"""The planning decision of a run, as a pure function of what is on disk and what was ingested before.

Inputs: the raw files present with their sha256, the previous manifest, the hash of the rules, and the
names of files whose recorded outputs are missing from the lake. Output: an :class:`IngestPlan` that
says which files to validate (and in which order), which to skip, which sales file owns each month
once the validated files are applied, what that replaces and what it deletes. No I/O, no GE.

The lake mirrors raw/: a file ingested before and gone from raw/ now is ``removed`` -- its outputs are
deleted; a removed sales file's months go too, unless a sales file still present covers them (then every
sales file is re-applied, so the months are restored from it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.expectations import REFERENCE_FILES, TEST_FILE, kind_of

DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "item_categories": (),
    "shops": (),
    "items": ("item_categories.csv",),
    "sales": ("items.csv", "item_categories.csv", "shops.csv"),
    "test": ("items.csv", "item_categories.csv", "shops.csv"),
}


@dataclass(frozen=True)
class IngestPlan:
    """What a run does; the month decisions that depend on validation results are methods."""

    order: tuple[str, ...]  # every file, in processing order: reference files, sales by arrival, test
    validate: tuple[str, ...]  # the files to validate, in that order
    skip: tuple[str, ...]
    sales_order: tuple[str, ...]  # every sales file present, in arrival order
    rebuild_sales: bool  # a known sales file changed: every sales file is re-applied
    kept_months: Mapping[int, str]  # owners that stand before the validated sales files are applied
    previous_months: Mapping[int, str]
    depends_on: Mapping[str, Mapping[str, str | None]]  # the dependency hashes to record per file
    seq: Mapping[str, int]  # arrival sequence to record per validated file
    removed: tuple[str, ...] = ()  # ingested before, gone from raw/ now: their outputs are deleted

    def removed_months(self, owners: Mapping[int, str]) -> dict[str, dict[str, list[int]]]:
        """Per removed sales file: the months it owned that are ``deleted`` (no present file has them) and
        those ``restored`` (a present sales file owns them now)."""
        result: dict[str, dict[str, list[int]]] = {}
        for month, before in sorted(self.previous_months.items()):
            if before in self.removed:
                entry = result.setdefault(before, {"deleted": [], "restored": []})
                entry["restored" if month in owners else "deleted"].append(month)
        return result

    def is_skipped(self, name: str) -> bool:
        return name in self.skip

    def month_owners(self, months_by_file: Mapping[str, Sequence[int]]) -> dict[int, str]:
        """Owners after applying the validated sales files' months in arrival order (later files win)."""
        owners = dict(self.kept_months)
        for name in self.sales_order:
            if name in self.validate:
                for month in months_by_file.get(name, ()):
                    owners[int(month)] = name
        return dict(sorted(owners.items()))

    def deleted_months(self, owners: Mapping[int, str]) -> list[int]:
        return sorted(m for m in self.previous_months if m not in owners)

    def replaced_months(self, owners: Mapping[int, str]) -> dict[str, dict[int, str]]:
        """Per sales file: the months it took over from another file, with their previous owner."""
        replaced: dict[str, dict[int, str]] = {}
        for month, owner in owners.items():
            before = self.previous_months.get(month)
            if before is not None and before != owner and owner in self.validate:
                replaced.setdefault(owner, {})[month] = before
        return replaced


def plan_ingest(files: Mapping[str, str], manifest: Mapping[str, Any], rules_sha: str,
                missing_outputs: frozenset[str] = frozenset()) -> IngestPlan:
    """Decide a run from ``files`` (name -> sha256 of the raw files present), the previous ``manifest``,
    ``rules_sha`` and the files whose outputs are gone from the lake."""
    known = manifest.get("files", {})
    depends_on = {name: _dependencies(name, files) for name in files}

    def unchanged(name: str) -> bool:
        entry = known.get(name)
        return bool(entry and entry["sha256"] == files[name] and entry.get("depends_on") == depends_on[name]
                    and entry.get("rules_sha256") == rules_sha and name not in missing_outputs)

    previous = {int(m): f for m, f in manifest.get("months", {}).items()}
    removed = tuple(sorted(n for n in known if n not in files))
    sales = sales_order([n for n in files if kind_of(n) == "sales"], known)
    stale = [n for n in sales if not unchanged(n)]
    # A changed known sales file, or a removed one that owned months: every present sales file is re-applied
    # and ownership recomputed from them, so a removed file's months are restored or (uncovered) deleted.
    rebuild = any(n in known for n in stale) or any(f in removed for f in previous.values())
    kept = {} if rebuild else dict(previous)
    sales_todo = sales if rebuild else stale
    ordered = [n for n in REFERENCE_FILES.values() if n in files] + sales + ([TEST_FILE] if TEST_FILE in files else [])
    validate = tuple(n for n in ordered if (n in sales_todo if kind_of(n) == "sales" else not unchanged(n)))
    return IngestPlan(
        order=tuple(ordered), validate=validate, skip=tuple(n for n in ordered if n not in validate),
        sales_order=tuple(sales), rebuild_sales=rebuild, kept_months=kept, previous_months=previous,
        depends_on=depends_on,
        seq=_sequence_numbers(validate, known), removed=removed,
    )


def _dependencies(name: str, files: Mapping[str, str]) -> dict[str, str | None]:
    kind = kind_of(name)
    return {dep: files.get(dep) for dep in DEPENDS_ON[kind]} if kind else {}


def sales_order(names: Sequence[str], known: Mapping[str, Any]) -> list[str]:
    """Arrival order: files already ingested by their sequence, then new ones (sales_train.csv first)."""
    return sorted(names, key=lambda n: (known[n].get("seq", 0) if n in known else float("inf"),
                                        n != "sales_train.csv", n))


def _sequence_numbers(validate: Sequence[str], known: Mapping[str, Any]) -> dict[str, int]:
    next_seq = max((entry.get("seq", 0) for entry in known.values()), default=-1) + 1
    seq = {}
    for name in validate:
        if "seq" in known.get(name, {}):
            seq[name] = known[name]["seq"]
        else:
            seq[name], next_seq = next_seq, next_seq + 1
    return seq
