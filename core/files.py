"""The ground floor every step writes and checks with: atomic writes (a temporary sibling renamed into place, so a
crash leaves the previous state intact and readers never see half a file), content hashes, and JSON files.

Nothing here knows the lake's layout (``core.lake``) or where it is stored (``core.store``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

HASH_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_file_problems(directory: str | os.PathLike[str], recorded: dict[str, str], record: str) -> list[str]:
    """Each file of ``recorded`` (name -> sha256, as ``record`` under ``directory`` keeps them) that is missing
    or whose sha256 differs; empty when every file is as it was written."""
    problems = []
    for name, sha in sorted(recorded.items()):
        path = Path(directory) / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif (actual := file_sha256(path)) != sha:
            problems.append(f"{path}: hash mismatch ({record} records sha256 {sha[:12]}…, the file has "
                            f"{actual[:12]}…)")
    return problems


def tree_sha256(path: str | os.PathLike[str]) -> str:
    """Hash of a file, or of every file below a directory (names and contents), order-independent of walk."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    Works for files and directories. On error the temporary is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def replace_dir(source: Path, target: Path) -> None:
    """Swap directory ``source`` into ``target``: the old one is renamed aside before removal."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(target)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    return write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | os.PathLike[str], payload: Any) -> Path:
    return write_text_atomic(target, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(target: str | os.PathLike[str], table: pa.Table) -> Path:
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(target)


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def _fully_unquoted(text: str) -> str:
    """``text`` percent-decoded until nothing changes (``%252e`` is ``%2e`` is ``.``): what any layer could make
    of it."""
    while (decoded := urllib.parse.unquote(text)) != text:
        text = decoded
    return text


def path_problem(rel: str) -> str | None:
    """Why the relative path ``rel`` (``/``-separated, taken from outside) could lead out of the folder it is
    joined to, or None."""
    decoded = _fully_unquoted(rel)
    if not rel or not decoded.strip("/"):
        return "it is empty"
    if decoded.startswith("/"):
        return "it is absolute" + ("" if rel.startswith("/") else " once percent-decoded")
    if ".." in decoded.split("/"):
        return "it climbs out with '..'" + ("" if ".." in rel.split("/") else " once percent-decoded")
    if "\\" in decoded or "\0" in decoded:
        return "it holds a backslash or a NUL byte"
    return None


def path_inside(root: str | os.PathLike[str], rel: str, what: str) -> Path:
    """``root / rel`` for a relative path taken from outside (an object key, a manifest entry), after checking that
    it stays inside ``root`` -- lexically, percent-decoded, and once links are resolved. Raises
    :class:`core.errors.UnsafePathError` naming ``what`` otherwise.

    Example: ``path_inside(copy, "lake/a.parquet", "manifest entry")`` is ``copy/lake/a.parquet``;
    ``path_inside(copy, "../../tmp/x", "object key 'b/raw/../../tmp/x'")`` raises.
    """
    from core.errors import UnsafePathError

    root = Path(root)
    problem = path_problem(rel)
    target = root / rel
    if problem is None and not Path(os.path.realpath(target)).is_relative_to(os.path.realpath(root)):
        problem = "it leads through a link out of the folder"
    if problem is not None:
        raise UnsafePathError(f"{what}: refused ({problem}); a path taken from outside must stay inside {root}; "
                              f"nothing was written or deleted")
    return target
