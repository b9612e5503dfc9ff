"""The lake's catalog: every dataset's location and partitioning, named once. Steps ask it for paths instead of
joining names themselves; the writes themselves go through ``core.files`` (atomic, hashed)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from core.store import local_root  # a store URL (s3://...) maps to its local working copy

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
SELECTION_FILE = "selection.json"  # select/: what the validation months chose
METADATA_FILE = "metadata.json"  # each stage: what it trained on, how long, its model files' sha256
NETWORK_FILE = "model.keras"  # each stage: the trained network
BOOSTER_FILE = "reference.txt"  # each stage: the trained LightGBM booster
INDEX_FILE = "index.json"  # runs/: the champion and its history
FORECAST_FILE = "forecast.parquet"  # the run's export candidates (``core.evaluate``), and a stage's forecast set
METRICS_FILE = "metrics.json"  # a run's scores, the gate's decision and the plots' names
REPORT_FILE = "report.md"  # a run's evaluation report
ACCOUNTABILITY_FILE = "records.parquet"  # lake/accountability/: one row per scored forecast month
PAIRS_SUFFIX = ".pairs.parquet"  # submissions/<month>.pairs.parquet: the (shop, item) pair of each exported ID
QUANTILES_SUFFIX = ".quantiles.parquet"  # submissions/<month>.quantiles.parquet: each exported ID's range


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
                if isinstance(path, Path) and not path.suffix and name not in ("root", "raw")}

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

    def run_name(self, run_dir: str | os.PathLike[str]) -> str:
        """A run directory as records name it: its path inside the data directory (``runs/forecast-…``), so another
        working copy of the lake (an object store's, or the lake moved) finds it through :meth:`run_path`."""
        path = Path(run_dir)
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)  # outside the data directory: kept as given

    def run_path(self, name: str) -> Path:
        """The run directory a record names, in this working copy (older records name an absolute path)."""
        path = Path(name)
        return path if path.is_absolute() else self.root / path

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

    def submission_quantiles(self, month_label: str) -> Path:
        """``submissions/<YYYY-MM>.quantiles.parquet``: ``ID, shop_id, item_id`` and one column a quantile level
        (``q0.1``...) of that submission's rows (``core.quantiles``)."""
        return self.submissions / f"{month_label}{QUANTILES_SUFFIX}"

    @property
    def accountability_records(self) -> Path:
        """``lake/accountability/records.parquet``."""
        return self.accountability / ACCOUNTABILITY_FILE
