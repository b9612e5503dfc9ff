"""Replay: a full sales history fed to the monthly cycle one month at a time, as the schedule would have.

The replay has its own data directory (default ``<history>/replay-K-E``), so the history is never touched. For
forecast month m (K <= m <= E) its ``raw/`` holds ``sales_train.csv`` with the months before K and one drop file
``sales_<YYYY-MM>.csv`` per month K..m-1 -- exactly what a user adding each month's export would have; the
forecast flow then forecasts m. A last step adds the drop of E, so E's forecast is scored too. ``test.csv`` is
not copied (the competition's is for month 34): each month's forecast covers the universe of pairs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.errors import DataValidationError
from core.files import write_bytes_atomic
from core.lake import forecast_month_label

REFERENCE_FILES = ("items.csv", "item_categories.csv", "shops.csv")
#: The forecast flow needs a holdout, a validation and a training month before the forecast month.
MIN_FROM_MONTH = 4


@dataclass(frozen=True)
class ReplayPlan:
    """Where the history is, where the replay runs, and which months it forecasts."""

    history_raw: Path
    workspace: Path
    months: list[int]

    @property
    def first(self) -> int:
        return self.months[0]


def history_raw(history: str | Path) -> Path:
    """The folder with the history's CSVs: ``DIR/raw`` as a data directory has it, or ``DIR`` itself."""
    root = Path(history)
    for candidate in (root / "raw", root):
        if (candidate / "sales_train.csv").is_file():
            return candidate
    raise DataValidationError(f"{root}: no sales_train.csv in it or in its raw/ folder: not a sales history")


def _history_months(raw: Path) -> pd.Series:
    return pd.read_csv(raw / "sales_train.csv", usecols=["date_block_num"])["date_block_num"]


def plan(history: str | Path, from_month: int, to_month: int | None = None, workspace: str | Path | None = None
         ) -> ReplayPlan:
    """Check the months against the history (K >= 4, E <= its last month) and name the workspace."""
    raw = history_raw(history)
    last = int(_history_months(raw).max())
    end = last if to_month is None else int(to_month)
    if not MIN_FROM_MONTH <= from_month <= end <= last:
        raise ValueError(f"replay months must satisfy {MIN_FROM_MONTH} <= from_month <= to_month <= {last} (the "
                         f"history's last month); got from_month={from_month}, to_month={end}")
    target = Path(workspace) if workspace is not None else Path(history) / f"replay-{from_month}-{end}"
    return ReplayPlan(raw, target.expanduser().resolve(), list(range(from_month, end + 1)))


def _write_if_changed(target: Path, data: bytes) -> None:
    # Unchanged bytes stay untouched, so a rerun of the replay finds every step in the cache.
    if not (target.is_file() and target.read_bytes() == data):
        write_bytes_atomic(target, data)


def stage_month(replay: ReplayPlan, month: int, first_month: str = "2013-01") -> Path:
    """Make the workspace's ``raw/`` hold the history before ``month`` (sales_train before K, drops K..month-1).

    Returns the workspace (the data directory of that month's run). ``month = E + 1`` stages the last drop.
    """
    raw = replay.workspace / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in REFERENCE_FILES:
        if not (raw / name).is_file() or (raw / name).read_bytes() != (replay.history_raw / name).read_bytes():
            shutil.copyfile(replay.history_raw / name, raw / name)
    sales = pd.read_csv(replay.history_raw / "sales_train.csv")
    by_month = sales["date_block_num"]
    _write_if_changed(raw / "sales_train.csv", sales[by_month < replay.first].to_csv(index=False).encode())
    drops = {f"sales_{forecast_month_label(drop, first_month)}.csv": drop for drop in range(replay.first, month)}
    for name, drop in drops.items():
        _write_if_changed(raw / name, sales[by_month == drop].to_csv(index=False).encode())
    # Drops of later months (an earlier, longer replay left them) go: the lake mirrors raw/ and forgets them.
    for stale in set(path.name for path in raw.glob("sales_*.csv")) - set(drops) - {"sales_train.csv"}:
        (raw / stale).unlink()
    return replay.workspace


def stage(history: str | Path, from_month: int, to_month: int, workspace: str | Path, month: int,
          first_month: str = "2013-01") -> Path:
    """:func:`stage_month` of the replay :func:`plan` names (what one Prefect task does, from plain values)."""
    return stage_month(plan(history, from_month, to_month, workspace), month, first_month)
