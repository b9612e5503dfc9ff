"""The object-store lake: a data directory at any fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``).

The steps keep working on local files. Each process works in a local *working copy* of the store (under
``$NESTCAST_STORE_CACHE``, default ``~/.cache/nestcast/store``): ``pull`` brings it up to the store's newest
state before a step, ``commit`` sends what the step wrote after it succeeded (``tasks.common.nestcast_task``
does both), so a step on another machine (a Dask worker) starts from what the last step committed.

Object stores have no rename, so a commit cannot move files into place. Instead, under ``<url>/_nestcast/``:

1. every file the step added or changed is uploaded under the transaction's staging prefix ``tx/<txid>/<path>``;
2. the manifest object ``commits/<version>.json`` is *created* (an exclusive create, S3's ``If-None-Match: *``):
   the commit point. It lists every file of the new state (sha256, size, the object holding it);
3. the changed files are then copied to their own paths (``<url>/lake/...``, ``<url>/submissions/<month>.csv``)
   for readers outside nestcast (a query engine, a person).

nestcast itself reads only through the newest manifest. A crash before 2 leaves the previous manifest the
newest, whole and readable; the staged objects are unreferenced and a later commit removes them. A crash during 3
leaves some published copies behind, which the next commit of those files replaces. Two writers cannot both
create the same version: the loser re-reads the newest manifest, puts its changes on top and takes the next one.

``raw/`` is the input, written by users or ``nestcast demo-data`` straight to ``<url>/raw/``: ``pull`` mirrors it
(new, changed and removed files alike) and nothing commits it.

Keys and manifest entries come from whoever can write to the bucket: each is checked to stay inside the working
copy (``..``, absolute, percent-encoded, a link out: ``core.lake.path_inside``) before a pull writes or deletes
anything, and a manifest entry must name a staged object outside ``raw/``; anything else fails the pull naming it.

Credentials and endpoints come from the filesystem's usual configuration: for S3 the AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for an S3-compatible server, ...) or fsspec's ``FSSPEC_S3_*``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import StoreError, UnsafePathError
from core.files import atomic_path, file_sha256, path_inside, path_problem, read_json, write_json_atomic

#: Where the store keeps its own objects, under the data directory's URL.
STORE_DIR = "_nestcast"
COMMITS_DIR = "commits"
STAGING_DIR = "tx"
RAW_DIR = "raw"
#: Staged objects of a transaction no manifest names (a writer crashed before its commit) are removed by a later
#: commit once they are this old: a younger one may belong to a writer that is about to commit.
ORPHAN_AGE = dt.timedelta(hours=1)
#: Commits kept: the newest, and the ones a reader that started a moment ago may still be reading from.
KEEP_COMMITS = 5
MAX_COMMIT_ATTEMPTS = 50
#: Garbage is looked for at every GC_EVERY-th version (it lists every staged object).
GC_EVERY = 10
_TXID = re.compile(r"^(\d{8}T\d{6})-[0-9a-f]{8}$")
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def is_remote(data_dir: str | os.PathLike[str]) -> bool:
    """True for a URL with a scheme other than ``file://`` (``s3://bucket/prefix``)."""
    text = str(data_dir)
    return "://" in text and not text.startswith("file://")


def normalise_url(url: str) -> str:
    """``url`` without trailing slashes (one store, one spelling: it names the working copy)."""
    return url.rstrip("/")


def data_dir_identity(data_dir: str | os.PathLike[str]) -> str:
    """One spelling per data directory: a store's URL, or a local folder's absolute path."""
    if is_remote(data_dir):
        return normalise_url(str(data_dir))
    return str(local_root(data_dir).expanduser().resolve())


def cache_root() -> Path:
    """Where working copies live: ``$NESTCAST_STORE_CACHE``, else ``~/.cache/nestcast/store``."""
    configured = os.environ.get("NESTCAST_STORE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "nestcast" / "store"


def working_copy_dir(url: str) -> Path:
    """The working copy's folder of one store URL: a readable slug plus a hash of the URL."""
    url = normalise_url(url)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", url.split("://", 1)[1])[-40:].strip("-")
    return cache_root() / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def local_root(data_dir: str | os.PathLike[str]) -> Path:
    """The local directory the steps read and write: ``data_dir`` itself, or a store's working copy."""
    if is_remote(data_dir):
        return working_copy_dir(str(data_dir)) / "data"
    text = str(data_dir)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


@dataclass
class Manifest:
    """One commit: every file of the store's state (path -> sha256, size, object key under ``_nestcast/``)."""

    version: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: bytes | str) -> Manifest:
        payload = json.loads(text)
        return cls(version=int(payload["version"]), files=dict(payload["files"]))


class ObjectStoreLake:
    """A data directory at an fsspec URL, and the local working copy the steps use.

    Example::

        store = ObjectStoreLake("s3://forecasts/nestcast")
        store.pull()        # the working copy now holds raw/ and the newest committed state
        ...                 # a step writes under store.root
        store.commit("ingest")
    """

    def __init__(self, url: str) -> None:
        if not is_remote(url):
            raise ValueError(f"ObjectStoreLake needs a URL like s3://bucket/prefix, got {url!r}")
        import fsspec  # only a remote data directory needs it

        self.url = normalise_url(url)
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as error:
            raise StoreError(f"data directory {self.url}: {error}") from error
        self.base = self.base.rstrip("/")
        self.home = working_copy_dir(self.url)
        self.root = self.home / "data"
        self.state_file = self.home / "state.json"

    # --- keys --------------------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _commit_key(self, version: int) -> str:
        return self.key(STORE_DIR, COMMITS_DIR, f"{version:010d}.json")

    # --- reading the store ---------------------------------------------------------------------------------
    def head(self) -> Manifest:
        """The newest commit (version 0, no files, for a store nothing has committed to)."""
        versions = self.versions()
        if not versions:
            return Manifest()
        return Manifest.parse(self.fs.cat_file(self._commit_key(versions[-1])))

    def versions(self) -> list[int]:
        try:
            names = self.fs.ls(self.key(STORE_DIR, COMMITS_DIR), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(int(Path(name).stem) for name in names if Path(name).stem.isdigit())

    def raw_objects(self) -> dict[str, dict[str, Any]]:
        """``raw/`` in the store: relative path -> its size and version tag (ETag, else modification time)."""
        try:
            found = self.fs.find(self.key(RAW_DIR), detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        prefix = self.key(RAW_DIR) + "/"
        return {name[len(prefix):]: {"size": int(info.get("size") or 0), "tag": _version_tag(info)}
                for name, info in found.items() if name.startswith(prefix)}

    def url_of(self, path: str | os.PathLike[str]) -> str:
        """The store URL of a working-copy path (``.../data/submissions/x.csv`` -> ``s3://b/p/submissions/x.csv``);
        any other text unchanged."""
        text, root = str(path), str(self.root) + "/"
        return f"{self.url}/{text[len(root):]}" if text.startswith(root) else text

    def raw_problem(self) -> str | None:
        """Why this store cannot be read from (it does not answer, or ``raw/`` holds no file), or None."""
        try:
            raw = self.raw_objects()
        except PermissionError as error:
            return f"{self.url}: access denied ({error})"
        except OSError as error:
            return f"{self.url}: cannot list {RAW_DIR}/ ({type(error).__name__}: {error})"
        if not raw:
            return (f"{self.url}/{RAW_DIR}/ holds no files (or the bucket does not exist): put the competition CSVs "
                    f"there or run `nestcast demo-data {self.url}`")
        for rel in sorted(raw):
            try:
                self._raw_target(rel)
            except UnsafePathError as error:
                return str(error)
        return None

    # --- the working copy ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One pull or commit at a time per working copy: threads of one process and processes of one machine."""
        self.home.mkdir(parents=True, exist_ok=True)
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(str(self.home), threading.Lock())
        with lock, open(self.home / "lock", "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _state(self) -> dict[str, Any]:
        state = read_json(self.state_file) or {}
        if state.get("url") != self.url:
            state = {"url": self.url, "version": 0, "files": {}, "raw": {}}
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_file, state)

    def pull(self) -> int:
        """Bring the working copy to the store's newest state (``raw/`` mirrored, the rest as the newest manifest
        lists it); files already there with the right content are kept. Returns the version pulled."""
        with self.locked():
            state = self._state()
            self.root.mkdir(parents=True, exist_ok=True)
            self._pull_raw(state)
            versions = self.versions()
            newest = versions[-1] if versions else 0
            if newest != state["version"]:  # only then read the manifest: most pulls find nothing new
                head = self.head()
                self._pull_files(head, state)
                state["version"] = head.version
            self._save_state(state)
            return int(state["version"])

    def _pull_raw(self, state: dict[str, Any]) -> None:
        remote = self.raw_objects()
        targets = {rel: self._raw_target(rel) for rel in remote}  # every key checked before the first write
        known: dict[str, Any] = state["raw"]
        for rel, info in remote.items():
            if known.get(rel) == info and targets[rel].exists():
                continue
            self._download(self.key(RAW_DIR, rel), targets[rel])
            known[rel] = info
        for rel in sorted(set(known) - set(remote)):  # removed from the store: removed here (test.csv taken away)
            _unlink_inside(self.root / RAW_DIR, rel)
            del known[rel]

    def _raw_target(self, rel: str) -> Path:
        return path_inside(self.root / RAW_DIR, rel, f"object {self.url + '/' + RAW_DIR + '/' + rel!r}")

    def _pull_files(self, head: Manifest, state: dict[str, Any]) -> None:
        targets = {rel: self._manifest_target(rel, entry) for rel, entry in head.files.items()}  # checked first
        known: dict[str, Any] = state["files"]
        for rel, entry in head.files.items():
            target = targets[rel]
            if not (target.exists() and self._matches(target, known.get(rel), entry["sha256"])):
                self._download(self.key(STORE_DIR, entry["object"]), target, entry["sha256"])
            known[rel] = {"sha256": entry["sha256"], **_stat(target)}
        for rel in sorted(set(known) - set(head.files)):  # deleted by a commit
            _unlink_inside(self.root, rel)
            del known[rel]

    def _manifest_target(self, rel: str, entry: dict[str, Any]) -> Path:
        """Where a manifest entry goes in the working copy: inside it, never into ``raw/`` (the input, which no
        commit writes); and its object must be a staged one (under ``tx/``)."""
        what = f"manifest entry {rel!r} of {self.url}"
        target = path_inside(self.root, rel, what)
        if rel.split("/", 1)[0] == RAW_DIR:
            raise UnsafePathError(f"{what}: refused ({RAW_DIR}/ is the input, which no commit writes); nothing was "
                                  f"written or deleted")
        obj = str(entry.get("object", ""))
        if obj.split("/", 1)[0] != STAGING_DIR or path_problem(obj) is not None:
            raise UnsafePathError(f"{what}: refused (its object {obj!r} is not a staged object under "
                                  f"{STORE_DIR}/{STAGING_DIR}/); nothing was written or deleted")
        return target

    @staticmethod
    def _matches(path: Path, known: dict[str, Any] | None, sha256: str) -> bool:
        if known is not None and known["sha256"] == sha256 and _stat(path) == {k: known[k] for k in ("size", "mtime")}:
            return True
        return file_sha256(path) == sha256

    def _download(self, key: str, target: Path, sha256: str | None = None) -> None:
        with atomic_path(target) as tmp:
            self.fs.get_file(key, str(tmp))
            if sha256 is not None and (actual := file_sha256(tmp)) != sha256:
                raise OSError(f"{self.url}: object {key} has sha256 {actual[:12]}..., "
                              f"its manifest says {sha256[:12]}...")

    def local_changes(self, state: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Files of the working copy (outside ``raw/`` and dot-folders) added or changed since the last pull or
        commit, with their sha256 and size, and the files removed."""
        known: dict[str, Any] = state["files"]
        changed: dict[str, dict[str, Any]] = {}
        present: set[str] = set()
        for path in self._tracked_files():
            rel = path.relative_to(self.root).as_posix()
            present.add(rel)
            stat = _stat(path)
            entry = known.get(rel)
            if entry is not None and {k: entry[k] for k in ("size", "mtime")} == stat:
                continue
            sha = file_sha256(path)
            if entry is None or entry["sha256"] != sha:
                changed[rel] = {"sha256": sha, **stat}
        return changed, sorted(set(known) - present)

    def _tracked_files(self) -> Iterator[Path]:
        # dot-names are a step's temporaries, journals, locks
        for directory, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".") and not (directory == str(self.root) and d == RAW_DIR)]
            yield from (Path(directory) / name for name in files if not name.startswith("."))

    # --- committing -----------------------------------------------------------------------------------------
    def commit(self, note: str = "") -> int | None:
        """Send the working copy's changes to the store as one commit; the version created, or None when nothing
        changed. Raises ``OSError`` when the store cannot be written (the step's retry policy retries it)."""
        with self.locked():
            state = self._state()
            changed, deleted = self.local_changes(state)
            if not changed and not deleted:
                return None
            txid = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
            for rel in changed:
                self.fs.put_file(str(self.root / rel), self.key(STORE_DIR, STAGING_DIR, txid, rel))
            manifest = self._create_commit(txid, note, changed, deleted)
            if manifest.version == state["version"] + 1:  # nobody committed in between: the copy is that state
                state["version"] = manifest.version
            for rel, entry in changed.items():
                state["files"][rel] = {k: entry[k] for k in ("sha256", "size", "mtime")}
            for rel in deleted:
                state["files"].pop(rel, None)
            self._save_state(state)
            self._publish(changed, deleted, txid)
            if manifest.version % GC_EVERY == 0:
                self.collect_garbage()
            return manifest.version

    def _create_commit(self, txid: str, note: str, changed: dict[str, dict[str, Any]], deleted: list[str]) -> Manifest:
        for _ in range(MAX_COMMIT_ATTEMPTS):
            head = self.head()
            files = dict(head.files)
            for rel, entry in changed.items():
                files[rel] = {"sha256": entry["sha256"], "size": entry["size"], "object": f"{STAGING_DIR}/{txid}/{rel}"}
            for rel in deleted:
                files.pop(rel, None)
            payload = {
                "version": head.version + 1, "parent": head.version, "txid": txid, "note": note,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "changed": sorted(changed), "deleted": deleted, "files": files,
            }
            try:
                self.create_exclusive(self._commit_key(head.version + 1), json.dumps(payload, indent=1).encode())
            except FileExistsError:
                continue  # another writer took this version: put the changes on top of theirs
            return Manifest(version=head.version + 1, files=files)
        raise OSError(f"{self.url}: could not commit after {MAX_COMMIT_ATTEMPTS} attempts (other writers kept winning)")

    def create_exclusive(self, key: str, data: bytes) -> None:
        """Create ``key`` only if it does not exist (FileExistsError otherwise): the commit point."""
        self.fs.pipe_file(key, data, mode="create")

    def _publish(self, changed: dict[str, dict[str, Any]], deleted: list[str], txid: str) -> None:
        for rel in changed:
            self.fs.copy(self.key(STORE_DIR, STAGING_DIR, txid, rel), self.key(rel))
        for rel in deleted:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.key(rel))

    def collect_garbage(self, now: dt.datetime | None = None) -> list[str]:
        """Remove the staged objects no kept commit names and old enough (``ORPHAN_AGE``) to be no writer's work in
        progress, and the commits before the newest ``KEEP_COMMITS``. Returns the keys removed."""
        now = now or dt.datetime.now(dt.UTC)
        versions = self.versions()
        kept, dropped = versions[-KEEP_COMMITS:], versions[:-KEEP_COMMITS]
        referenced = {entry["object"] for version in kept for entry in self._files_of(version)}
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for name in self.fs.find(self.key(STORE_DIR, STAGING_DIR)):
                rel = name[len(self.key(STORE_DIR)) + 1:]
                if rel not in referenced and _txid_time(rel.split("/", 2)[1]) < now - ORPHAN_AGE:
                    self.fs.rm_file(name)
                    removed.append(name)
        for version in dropped:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._commit_key(version))
                removed.append(self._commit_key(version))
        return removed

    def _files_of(self, version: int) -> list[dict[str, Any]]:
        try:
            return list(Manifest.parse(self.fs.cat_file(self._commit_key(version))).files.values())
        except FileNotFoundError:
            return []

    # --- raw input --------------------------------------------------------------------------------------------
    def upload_raw(self, local_raw: Path) -> list[str]:
        """Put the files of a local ``raw/`` folder into the store's ``raw/`` (``nestcast demo-data s3://...``)."""
        names = sorted(p.relative_to(local_raw).as_posix() for p in local_raw.rglob("*") if p.is_file())
        for rel in names:
            self.fs.put_file(str(local_raw / rel), self.key(RAW_DIR, rel))
        return names


def _unlink_inside(root: Path, rel: str) -> None:
    """Remove a file the working copy's state lists, unless its path leads out of ``root`` (a state written before
    keys were checked): that one is only forgotten, never deleted."""
    with contextlib.suppress(UnsafePathError):
        path_inside(root, rel, rel).unlink(missing_ok=True)


def _stat(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime": stat.st_mtime_ns}


def _version_tag(info: dict[str, Any]) -> str:
    for name in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        if info.get(name) is not None:
            return str(info[name])
    return ""


def _txid_time(txid: str) -> dt.datetime:
    match = _TXID.match(txid)
    if match is None:  # not ours: never collect it
        return dt.datetime.max.replace(tzinfo=dt.UTC)
    return dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)


_STORES: dict[str, ObjectStoreLake] = {}


def store_of(data_dir: str | os.PathLike[str]) -> ObjectStoreLake | None:
    """The ``ObjectStoreLake`` of a remote data directory (one per URL and process), None for a local one."""
    if not is_remote(data_dir):
        return None
    url = normalise_url(str(data_dir))
    with _LOCKS_GUARD:
        if url not in _STORES:
            _STORES[url] = ObjectStoreLake(url)
        return _STORES[url]
