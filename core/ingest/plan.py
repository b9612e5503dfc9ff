"""The planning decision of a run, as a pure function of what is on disk and what was ingested before.

Inputs: the raw files present with their sha256, the previous manifest, the hash of the rules, and the
names of files whose recorded outputs are missing from the lake. Output: an :class:`IngestPlan` that
says which files to validate (and in which order), which to skip, which sales file owns each month
once the validated files are applied, what that replaces and what it deletes. No I/O, no GE.

The lake mirrors raw/: a file ingested before and gone from raw/ now is ``removed`` -- its outputs are
deleted; a removed sales file's months go too, unless a sales file still present covers them (then every
sales file is re-applied, so the months are restored from it).

A month may be owned by several drop files (``sales_2014-05_part1.csv`` and ``_part2.csv``): a drop that arrives
holding a month that only drops hold joins them as one more part, and the month's partition holds the rows of
every part (``core.ingest.run`` refuses parts that share identical rows: one restates the other). A drop still
replaces a month of ``sales_train.csv``, and a later ``sales_train.csv`` a month of the drops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.expectations import REFERENCE_FILES, TEST_FILE, kind_of

HISTORY_FILE = "sales_train.csv"  # the history; every other sales file is a drop
#: The files whose rows make up one month, in arrival order (several: the parts of a month split into drops).
Owners = tuple[str, ...]

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
    kept_months: Mapping[int, Owners]  # owners that stand before the validated sales files are applied
    previous_months: Mapping[int, Owners]
    depends_on: Mapping[str, Mapping[str, str | None]]  # the dependency hashes to record per file
    seq: Mapping[str, int]  # arrival sequence to record per validated file
    removed: tuple[str, ...] = ()  # ingested before, gone from raw/ now: their outputs are deleted

    def removed_months(self, owners: Mapping[int, Owners]) -> dict[str, dict[str, list[int]]]:
        """Per removed sales file: the months it owned that are ``deleted`` (no present file has them) and
        those ``restored`` (a present sales file owns them now)."""
        result: dict[str, dict[str, list[int]]] = {}
        for month, before in sorted(self.previous_months.items()):
            for name in before:
                if name in self.removed:
                    entry = result.setdefault(name, {"deleted": [], "restored": []})
                    entry["restored" if month in owners else "deleted"].append(month)
        return result

    def is_skipped(self, name: str) -> bool:
        return name in self.skip

    def month_owners(self, months_by_file: Mapping[str, Sequence[int]]) -> dict[int, Owners]:
        """Owners after applying the validated sales files' months in arrival order: a later file replaces a
        month's owners, except that a drop joins a month only drops hold (one more part of it)."""
        owners = dict(self.kept_months)
        for name in self.sales_order:
            if name in self.validate:
                for month in months_by_file.get(name, ()):
                    owners[int(month)] = _applied(owners.get(int(month), ()), name)
        return dict(sorted(owners.items()))

    def deleted_months(self, owners: Mapping[int, Owners]) -> list[int]:
        return sorted(m for m in self.previous_months if m not in owners)

    def replaced_months(self, owners: Mapping[int, Owners]) -> dict[str, dict[int, str]]:
        """Per sales file: the months it took over from other files (their names), counted once per month: for
        the first of the month's new owners validated now."""
        replaced: dict[str, dict[int, str]] = {}
        for month, now in owners.items():
            gone = [name for name in self.previous_months.get(month, ()) if name not in now]
            taker = next((name for name in now if name in self.validate and name not in gone), None)
            if gone and taker is not None:
                replaced.setdefault(taker, {})[month] = ", ".join(gone)
        return replaced

    def shared_months(self, owners: Mapping[int, Owners]) -> dict[str, dict[int, Owners]]:
        """Per validated sales file: the months it holds together with other drop files, and those files."""
        shared: dict[str, dict[int, Owners]] = {}
        for month, now in owners.items():
            for name in now if len(now) > 1 else ():
                if name in self.validate:
                    shared.setdefault(name, {})[month] = tuple(other for other in now if other != name)
        return shared


def is_drop(name: str) -> bool:
    """A sales file other than the history (``sales_2014-05.csv``, ``sales_2014-05_part2.csv``)."""
    return kind_of(name) == "sales" and name != HISTORY_FILE


def _applied(current: Owners, name: str) -> Owners:
    if current and is_drop(name) and all(map(is_drop, current)):
        return current if name in current else (*current, name)
    return (name,)


def owners_of(value: str | Sequence[str]) -> Owners:
    """A month's owners as the manifest records them: one name, or a list of the parts (issue 29)."""
    return (value,) if isinstance(value, str) else tuple(value)


def recorded_owners(owners: Owners) -> str | list[str]:
    """How the manifest records a month's owners: the one name, else the list (a single owner reads as before)."""
    return owners[0] if len(owners) == 1 else list(owners)


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

    previous = {int(m): owners_of(f) for m, f in manifest.get("months", {}).items()}
    removed = tuple(sorted(n for n in known if n not in files))
    sales = sales_order([n for n in files if kind_of(n) == "sales"], known)
    stale = [n for n in sales if not unchanged(n)]
    # A changed known sales file, or a removed one that owned months: every present sales file is re-applied
    # and ownership recomputed from them, so a removed file's months are restored or (uncovered) deleted.
    rebuild = any(n in known for n in stale) or any(f in removed for names in previous.values() for f in names)
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
                                        n != HISTORY_FILE, n))


def _sequence_numbers(validate: Sequence[str], known: Mapping[str, Any]) -> dict[str, int]:
    next_seq = max((entry.get("seq", 0) for entry in known.values()), default=-1) + 1
    seq = {}
    for name in validate:
        if "seq" in known.get(name, {}):
            seq[name] = known[name]["seq"]
        else:
            seq[name], next_seq = next_seq, next_seq + 1
    return seq
