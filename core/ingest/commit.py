"""The staging/journal transaction that makes a run all-or-nothing, and the lock that serialises runs.

Every output is written to ``lake/.staging-*`` (each file temp + rename), then a journal listing the
renames is written atomically, then the files are renamed into place with the manifest last. A crash
before the journal leaves the lake exactly as it was (staging is removed); a crash after it is rolled
forward at the start of the next run (:func:`recover`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.files import read_json, write_json_atomic, write_parquet_atomic, write_text_atomic
from core.lake import PARTITION_KEY, LakePaths

JOURNAL = ".journal.json"
_MANIFEST = "manifest.json"
_TMP_NAME = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


class Transaction:
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

    def parquet(self, target: Path, table: pa.Table) -> Path:
        """Stage ``table`` for ``target``; returns the staged file (hashed before the commit)."""
        staged = self._stage(target)
        write_parquet_atomic(staged, table)
        return staged

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
        moves = [m for m in self.moves if m != _MANIFEST] + [m for m in self.moves if m == _MANIFEST]
        self.committing = True
        write_json_atomic(self.lake / JOURNAL, {"staging": self.staging.name, "moves": moves,
                                                "deletes": self.deletes})
        _apply_journal(self.lake)

    def abort(self) -> None:
        if not self.committing:  # after the journal, the staging area is needed to roll forward
            shutil.rmtree(self.staging, ignore_errors=True)


@contextlib.contextmanager
def transaction(lake: Path) -> Iterator[Transaction]:
    """A transaction aborted on any exception (the caller commits)."""
    tx = Transaction(lake)
    try:
        yield tx
    except BaseException:
        tx.abort()
        raise


def _apply_journal(lake: Path) -> None:
    journal = read_json(lake / JOURNAL)
    staging = lake / journal["staging"]
    moves = list(journal["moves"])
    for rel in [m for m in moves if m != _MANIFEST]:
        _move(staging / rel, lake / rel)
    for rel in journal["deletes"]:
        _delete(lake / rel)
    for rel in [m for m in moves if m == _MANIFEST]:
        _move(staging / rel, lake / rel)
    (lake / JOURNAL).unlink()
    shutil.rmtree(staging, ignore_errors=True)


def _delete(target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
        with contextlib.suppress(OSError):
            target.parent.rmdir()  # the empty month directory


def _move(source: Path, target: Path) -> None:
    if source.exists():  # already moved by an interrupted attempt
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def recover(paths: LakePaths) -> None:
    """Finish a commit that was interrupted after its journal; drop debris of runs that died before it."""
    if (paths.lake / JOURNAL).exists():
        _apply_journal(paths.lake)
    if not paths.lake.exists():
        return
    for stale in paths.lake.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for area in (paths.lake, paths.sales, paths.reference, paths.quarantine, paths.validation):
        if area.exists():
            for entry in [area, *area.glob(f"{PARTITION_KEY}=*")]:
                for path in entry.iterdir() if entry.is_dir() else []:
                    if _TMP_NAME.match(path.name):
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


def recover_lake(paths: LakePaths) -> bool:
    """Complete (or clear) an interrupted ingest commit before anything reads the lake; True if there was one.

    Every reader of the lake calls it first (the ingest task before its cache key, aggregation, windows), so
    a crash between a commit's journal and its last rename is never read half-applied, even when ingest
    itself is served from cache. Cheap when there is nothing to do; otherwise it waits for the ingest lock.
    """
    if not paths.lake.is_dir():
        return False
    if not (paths.lake / JOURNAL).exists() and not any(paths.lake.glob(".staging-*")):
        return False
    with exclusive(paths):
        pending = (paths.lake / JOURNAL).exists()
        recover(paths)
    return pending


@contextlib.contextmanager
def exclusive(paths: LakePaths) -> Iterator[None]:
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
