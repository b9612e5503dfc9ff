"""The lake's catalog (every dataset's location and partitioning, named once) and the two primitives
every step writes with: atomic writes and content hashes.

Every write goes to a temporary sibling first and is renamed into place, so a crash leaves the
previous state intact and readers never see half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

HASH_CHUNK = 1 << 20


#: The lake's one partition column: ``lake/sales`` and ``lake/monthly`` hold one ``date_block_num=N/`` per month.
PARTITION_KEY = "date_block_num"
PARTITION_FILE = "data.parquet"
#: Names of the files and folders the catalog hands out (for the steps that write them).
MANIFEST_FILE = "manifest.json"
WINDOWS_META_FILE = "meta.json"
BACKTEST_DIR = "backtest"  # under lake/: the per-origin windows of backtests
FORECAST_RUN_PREFIX = "forecast-"
#: A forecast run directory: one folder per stage of ``core.protocol``, then the run's own files.
RUN_STAGES: tuple[str, ...] = ("select", "holdout", "final")
SELECTION_FILE = "selection.json"  # select/: what the validation month chose
FORECAST_FILE = "forecast.parquet"  # the run's export candidates (``core.evaluate``), and a stage's forecast set
METRICS_FILE = "metrics.json"  # a run's scores, the gate's decision and the plots' names
REPORT_FILE = "report.md"  # a run's evaluation report
ACCOUNTABILITY_FILE = "records.parquet"  # lake/accountability/: one row per scored forecast month
PAIRS_SUFFIX = ".pairs.parquet"  # submissions/<month>.pairs.parquet: the (shop, item) pair of each exported ID


def partition_name(month: int) -> str:
    """``date_block_num=<month>``: the folder name of one month's partition."""
    return f"{PARTITION_KEY}={int(month)}"


def partition_month(path: str | os.PathLike[str]) -> int:
    """The month of a partition folder (or of a file inside one): ``.../date_block_num=7[/data.parquet]`` -> 7.

    Raises ``ValueError`` for a path that is not a partition.
    """
    path = Path(path)
    for part in (path.name, path.parent.name):
        key, sep, value = part.partition("=")
        if sep and key == PARTITION_KEY:
            return int(value)
    raise ValueError(f"{path} is not a {PARTITION_KEY}=N partition")


def partition_months(root: str | os.PathLike[str]) -> list[int]:
    """Sorted months of the ``date_block_num=N`` folders directly under ``root`` (empty if it is missing)."""
    root = Path(root)
    if not root.is_dir():
        return []
    months = []
    for child in root.glob(f"{PARTITION_KEY}=*"):
        if child.is_dir():
            with contextlib.suppress(ValueError):
                months.append(partition_month(child))
    return sorted(months)


def forecast_month_label(month: int, first_month: str = "2013-01") -> str:
    """Calendar month ``YYYY-MM`` of ``date_block_num`` ``month`` (34 -> ``2015-11`` with the default start).

    It names a forecast month's submission (``submissions/<label>.csv``) and labels months in reports.
    """
    match = re.fullmatch(r"(\d{4})-(\d{2})", first_month)
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise ValueError(f"first_month must look like YYYY-MM, got {first_month!r}")
    if isinstance(month, bool) or int(month) != month or month < 0:
        raise ValueError(f"month must be a non-negative integer date_block_num, got {month!r}")
    index = int(match.group(1)) * 12 + int(match.group(2)) - 1 + int(month)
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


class LakePaths:
    """The catalog: where every dataset lives under one data directory, and how it is partitioned.

    Steps ask it for paths (``LakePaths.of(config)``) instead of joining names themselves.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        from core.store import local_root  # a store URL (s3://...) maps to its local working copy

        self.root = local_root(data_dir)
        self.raw = self.root / "raw"
        self.lake = self.root / "lake"
        self.sales = self.lake / "sales"
        self.quarantine = self.lake / "quarantine"
        self.reference = self.lake / "reference"
        self.validation = self.lake / "validation"
        self.monthly = self.lake / "monthly"
        self.windows = self.lake / "windows"  # holds out the last month: selection and the reported score
        self.windows_final = self.lake / "windows-final"  # no holdout: the exported forecast's models
        self.backtest = self.lake / BACKTEST_DIR
        self.manifest = self.lake / MANIFEST_FILE
        self.accountability = self.lake / "accountability"  # exported forecasts scored once their month arrived
        self.runs = self.root / "runs"
        self.submissions = self.root / "submissions"

    @classmethod
    def of(cls, config: Any) -> LakePaths:
        """The catalog of a ``NestcastConfig`` (anything with a ``data_dir``)."""
        return cls(config.data_dir)

    def directories(self) -> dict[str, Path]:
        """Every directory the steps write below the root (lake/, runs/, submissions/ and the lake's folders)."""
        return {name: path for name, path in vars(self).items()
                if isinstance(path, Path) and not path.suffix and name not in ("root", "raw")}  # fmt: skip

    # --- partitioned datasets: lake/sales and lake/monthly ---------------------------------------
    def sales_partition(self, month: int) -> Path:
        """``lake/sales/date_block_num=<month>``."""
        return self.sales / partition_name(month)

    def sales_file(self, month: int) -> Path:
        return self.sales_partition(month) / PARTITION_FILE

    def monthly_partition(self, month: int) -> Path:
        """``lake/monthly/date_block_num=<month>``."""
        return self.monthly / partition_name(month)

    def monthly_file(self, month: int) -> Path:
        return self.monthly_partition(month) / PARTITION_FILE

    def sales_months(self) -> list[int]:
        return partition_months(self.sales)

    def monthly_months(self) -> list[int]:
        return partition_months(self.monthly)

    # --- reference tables, windows ------------------------------------------------------------
    def reference_table(self, name: str) -> Path:
        """``lake/reference/<name>.parquet`` (``items``, ``item_categories``, ``shops``, ``test``)."""
        return self.reference / f"{Path(name).stem}.parquet"

    def windows_dir(self, purpose: str = "evaluation") -> Path:
        """``lake/windows`` (``evaluation``: the last month held out) or ``lake/windows-final`` (``final``)."""
        if purpose not in ("evaluation", "final"):
            raise ValueError(f"purpose must be 'evaluation' or 'final', got {purpose!r}")
        return self.windows if purpose == "evaluation" else self.windows_final

    def windows_meta(self, purpose: str = "evaluation") -> Path:
        return self.windows_dir(purpose) / WINDOWS_META_FILE

    def backtest_windows(self, origin: int, settings_hash: str) -> Path:
        """``lake/backtest/windows-<origin>-<hash of the windows settings>``."""
        return self.backtest / f"windows-{int(origin)}-{settings_hash}"

    # --- runs and submissions -----------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        """``runs/<run_id>`` (``forecast-<hash>``, ``backtest-<id>``, ``search-<id>``)."""
        return self.runs / run_id

    def forecast_run(self, content_hash: str) -> Path:
        """``runs/forecast-<hash>``: the forecast run named by what its models are trained from."""
        return self.run_dir(f"{FORECAST_RUN_PREFIX}{content_hash[:12]}")

    @staticmethod
    def stage_dir(run_dir: str | os.PathLike[str], stage: str) -> Path:
        """``runs/<id>/<stage>`` for a stage of ``RUN_STAGES``."""
        if stage not in RUN_STAGES:
            raise ValueError(f"stage must be one of {', '.join(RUN_STAGES)}, got {stage!r}")
        return Path(run_dir) / stage

    @classmethod
    def stage_predictions(cls, run_dir: str | os.PathLike[str], stage: str, name: str) -> Path:
        """``runs/<id>/<stage>/<name>.parquet``: a stage's predictions of ``validation``/``holdout``/``forecast``."""
        return cls.stage_dir(run_dir, stage) / f"{name}.parquet"

    def submission(self, month_label: str) -> Path:
        """``submissions/<YYYY-MM>.csv`` (its JSON sidecar: the same name with ``.json``)."""
        return self.submissions / f"{month_label}.csv"

    def submission_pairs(self, month_label: str) -> Path:
        """``submissions/<YYYY-MM>.pairs.parquet``: ``ID, shop_id, item_id`` of that submission's rows, kept so
        the forecast can be scored when its month arrives even after ``test.csv`` changed or went away."""
        return self.submissions / f"{month_label}{PAIRS_SUFFIX}"

    @property
    def accountability_records(self) -> Path:
        """``lake/accountability/records.parquet``."""
        return self.accountability / ACCOUNTABILITY_FILE


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

