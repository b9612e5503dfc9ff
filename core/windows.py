"""Step 3: the feature cube, the sample index, the time split, and the batches the model reads.

Storage. The logical cube is ``float32 [series, month, channel]``. Series are every (shop, item) pair
the model is asked about: pairs with sales, ``test.csv`` pairs, and every pair of the Kaggle-style
monthly grids (shops active in a month x items sold in it) used for training and the holdout. Most
grid pairs never sold; storing their rows densely would repeat item/shop-level values millions of
times (about 1.5 GB at full scale). So the cube is stored by level, each a small dense array:

- ``pair_count.npy`` [pairs with sales + 1, month]  raw monthly counts; the all-zero last row serves
  every pair without sales. With ``pair_first.npy`` (month of the pair's first sale) it yields the three
  pair channels at draw time (clip, log, age are cheap on a batch; storing them would triple the
  largest file)
- ``item.npy``     [items, month, 4]
- ``shop.npy``     [shops, month, 1]
- ``shopcat.npy``  [shops * categories, month, 1]
- ``calendar.npy`` [month, 2]

``series.parquet`` maps each series to its row in each level. ``core.window_store.WindowStore.gather`` composes
windows from the levels with fancy indexing; ``WindowStore.cube`` is a read-only view with the
contract's ``[series, month, channel]`` indexing on top of the same arrays.

Semantics. Channel values at month ``t`` use only data of months ``<= t``; a window for target month
``T`` covers months ``T - lookback .. T - 1``. Positions before month 0 are zero in every channel
(zero also means "no sales yet" in every count and age channel, because covariates are scaled by a
factor only, never shifted). The two calendar channels at position ``t`` describe month ``t + 1``, so
the window's last step carries the calendar of the month being predicted. Covariate scale factors
come from months before the holdout month only.

Samples are ``(series_idx, target_month)`` int32 pairs. Training targets run from
``windows.min_train_month`` to ``holdout - 1``; the holdout is the Kaggle-style grid of the holdout
month (default: the last month in the lake); the forecast is ``test.csv``'s pairs with target
``last_month + 1`` -- or, with no ``test.csv``, the universe of pairs (``universe_pairs``, stable ``pair_id`` IDs).

Training sample policy (``windows.sample_policy``): ``grid`` (each training month's grid, zeros for
pairs without sales), ``active`` (pairs with a sale in the window or the target month), ``all``
(every series x month). ``grid`` is the default: with a small LSTM at about equal compute
(``benchmarks/prepare.py --compare-policies``), holdout RMSE / previous-period RMSE on the real
slice (origins 26, 27, 28) averaged 0.785 for grid, 0.839 for active (0.72-1.03: it never sees the
zero-history grid pairs the holdout is full of) and 0.868 for all; on demo data (origin 33) 0.773,
0.839 and 0.811.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core import cube
from core.config import NestcastConfig, WindowsConfig
from core.cube import CHANNEL_SPECS, CHANNELS, Grid, Levels, PairLevel, Series, Timeline, Vocabularies
from core.errors import DataValidationError
from core.files import atomic_path, file_sha256, read_json, recorded_file_problems
from core.lake import WINDOWS_META_FILE, LakePaths

STORE_FILES = "files"  # in meta.json: file name -> sha256 of every array and table of the store
#: 2: grid masks, validation month; 3: target-encoded means; 4: item name families; 5: universe; 6: validation months;
#: 7: item name vectors
WINDOWS_VERSION = "7"

@dataclass
class WindowsSummary:
    """What ``build_windows`` produced; small and JSON-friendly."""

    windows_dir: str
    skipped: bool
    n_series: int
    n_pairs_with_sales: int
    n_channels: int
    lookback: int
    last_month: int
    holdout_month: int
    forecast_month: int
    sample_policy: str
    validation_months: list[int] = field(default_factory=list)
    sample_counts: dict[str, int] = field(default_factory=dict)
    bytes_on_disk: int = 0
    seconds: float = 0.0
    build_hash: str = ""  # identifies the content (inputs + windows settings), not the moment of the build

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- inputs --------------------------------------------------------------------------------------


def _monthly_files(paths: LakePaths) -> list[Path]:
    return [f for f in map(paths.monthly_file, paths.monthly_months()) if f.exists()]


def _input_hashes(paths: LakePaths) -> dict[str, str]:
    hashes = {f"monthly/{f.parent.name}": file_sha256(f) for f in _monthly_files(paths)}
    for name in ("items.parquet", "item_categories.parquet", "shops.parquet", "test.parquet"):
        path = paths.reference_table(name)
        hashes[f"reference/{name}"] = file_sha256(path) if path.exists() else "absent"
    return hashes


def _build_hash(config: NestcastConfig, holdout: int | None, hashes: dict[str, str]) -> str:
    settings = {
        "version": WINDOWS_VERSION,
        "windows": config.windows.model_dump(mode="json"),
        "holdout_override": holdout,
        "shop_merge_map": {str(k): v for k, v in sorted(config.aggregate.shop_merge_map.items())},
        "first_month": config.ingest.first_month,
        "inputs": hashes,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# --- build ---------------------------------------------------------------------------------------


def build_windows(
    config: NestcastConfig,
    holdout_month: int | None = None,
    force: bool = False,
    windows_dir: str | Path | None = None,
) -> WindowsSummary:
    """Build ``lake/windows`` from ``lake/monthly`` (skipped when inputs and settings are unchanged).

    ``holdout_month`` overrides ``config.windows.holdout_month`` (default: the last month in the lake).
    ``holdout_month = last_month + 1`` means "no holdout": every month with data trains, which is
    what a final model for the forecast wants; give it its own ``windows_dir`` (default
    ``lake/windows``) to keep the evaluation build beside it.
    """
    start = time.perf_counter()
    paths = LakePaths.of(config)
    hashes = _input_hashes(paths)
    if not any(k.startswith("monthly/") for k in hashes):
        raise DataValidationError(f"{paths.monthly}: no monthly partitions; run aggregate first")
    build_hash = _build_hash(config, holdout_month, hashes)
    target = Path(windows_dir) if windows_dir is not None else paths.windows
    meta_path = target / WINDOWS_META_FILE
    meta = read_json(meta_path)
    if not force and meta is not None and meta.get("build_hash") == build_hash and not store_problems(target):
        return _summary(target, meta, skipped=True, seconds=time.perf_counter() - start)

    build = _build(paths, config, holdout_month, provenance={"build_hash": build_hash, "input_hashes": hashes})
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        _write_build(build, tmp)
    return _summary(target, build.meta, skipped=False, seconds=time.perf_counter() - start)


def _summary(windows_dir: Path, meta: dict[str, Any], skipped: bool, seconds: float) -> WindowsSummary:
    size = sum(p.stat().st_size for p in windows_dir.iterdir() if p.is_file())
    return WindowsSummary(
        windows_dir=str(windows_dir),
        skipped=skipped,
        n_series=meta["n_series"],
        n_pairs_with_sales=meta["n_pairs_with_sales"],
        n_channels=meta["n_channels"],
        lookback=meta["lookback"],
        last_month=meta["last_month"],
        holdout_month=meta["holdout_month"],
        validation_months=list(meta.get("validation_months") or []),
        forecast_month=meta["forecast_month"],
        sample_policy=meta["sample_policy"],
        sample_counts=meta["sample_counts"],
        bytes_on_disk=size,
        seconds=seconds,
        build_hash=str(meta.get("build_hash", "")),
    )


def _samples(series_idx: np.ndarray, target_month: int) -> np.ndarray:
    """``[n, 2]`` int32 ``(series_idx, target_month)`` rows."""
    return np.stack([series_idx.astype(np.int32), np.full(series_idx.size, target_month, dtype=np.int32)], axis=1)


def _train_index(
    policy: str, lookback: int, timeline: Timeline, grid: Grid, series: Series, pairs: PairLevel
) -> np.ndarray:
    months = timeline.train_months
    if policy == "grid":
        parts = [series.of_grid(grid, m) for m in months]
    elif policy == "active":
        parts = _active_series(pairs, months, lookback)
    else:
        parts = [np.arange(series.n, dtype=np.int32)] * len(months)
    return np.concatenate([_samples(part, m) for part, m in zip(parts, months, strict=True)])


def _active_series(pairs: PairLevel, months: tuple[int, ...], lookback: int) -> list[np.ndarray]:
    """Per target month ``T``, the series with a sale in months ``T - lookback .. T``."""
    n_pairs, n_months = pairs.observed.shape
    # A running count of months with sales makes each month's test one subtraction.
    running = np.zeros((n_pairs, n_months + 1), dtype=np.int32)
    np.cumsum(pairs.observed, axis=1, out=running[:, 1:])
    return [
        pairs.sold_series[running[:, m + 1] - running[:, max(m - lookback, 0)] > 0].astype(np.int32) for m in months
    ]


@dataclass(frozen=True)
class _Split:
    """The samples of one evaluation target month and their frame, row for row."""

    frame: pa.Table
    index: np.ndarray  # [n, 2] (series_idx, target_month)


def _grid_split(m: int, timeline: Timeline, grid: Grid, series: Series, pairs: PairLevel) -> _Split:
    """Month ``m``'s grid with actuals, baselines and new-item / new-pair segments (empty for a month without
    training data, such as the holdout of a build without one)."""
    has_data = timeline.train_months[0] <= m <= timeline.last_month
    samples = series.of_grid(grid, m) if has_data else np.zeros(0, dtype=np.int32)
    frame = pa.table(
        {
            "date_block_num": np.full(samples.size, m, dtype=np.int16),
            "series_idx": samples.astype(np.int32),
            **series.ids(samples),
            "actual": pairs.clipped(samples, m),
            "prev": pairs.clipped(samples, m - 1),
            "mean3": pairs.mean3(samples, m),
            "new_item": grid.item_first[series.item[samples]] >= m,
            "new_pair": pairs.first[pairs.row[samples]] >= m,
        }
    )
    return _Split(frame, _samples(samples, m))


def _grid_splits(months: tuple[int, ...], timeline: Timeline, grid: Grid, series: Series,
                 pairs: PairLevel) -> _Split:
    """The grids of several months, one after the other (the validation months)."""
    splits = [_grid_split(m, timeline, grid, series, pairs) for m in months]
    if not splits:
        return _grid_split(-1, timeline, grid, series, pairs)
    return _Split(pa.concat_tables([s.frame for s in splits]), np.concatenate([s.index for s in splits]))


#: Without test.csv a forecast row's ID is its pair's: ``shop_id * UNIVERSE_ID_STRIDE + item_id``. Derived from the
#: pair alone, it is the same in every run and every month, with no registry to keep (and it fits int32).
UNIVERSE_ID_STRIDE = 1_000_000


def pair_id(shop_id: np.ndarray, item_id: np.ndarray) -> np.ndarray:
    """The stable ID of each (shop, item) pair in a forecast without test.csv."""
    shop, item = np.asarray(shop_id, np.int64), np.asarray(item_id, np.int64)
    max_shop = np.iinfo(np.int32).max // UNIVERSE_ID_STRIDE  # the IDs stay int32, as test.csv's
    if item.size and (item.max() >= UNIVERSE_ID_STRIDE or shop.max() > max_shop):
        raise DataValidationError(f"item ids must be below {UNIVERSE_ID_STRIDE:,} and shop ids at most {max_shop} "
                                  "for the stable pair IDs of a forecast without test.csv")
    return (shop * UNIVERSE_ID_STRIDE + item).astype(np.int32)


def universe_pairs(
    wcfg: WindowsConfig, timeline: Timeline, grid: Grid, series: Series, pairs: PairLevel
) -> np.ndarray:
    """Series of the forecast universe without test.csv, sorted by their stable ID: every pair that sold in the
    last ``universe_months`` months, plus (``universe_grid``) every cell of the last month's grid."""
    first = max(0, timeline.last_month - wcfg.universe_months + 1)
    sold = pairs.count[: pairs.sold_series.size, first : timeline.last_month + 1] > 0
    chosen = [pairs.sold_series[sold.any(axis=1)]] if wcfg.universe_months else []
    if wcfg.universe_grid:
        chosen.append(series.of_grid(grid, timeline.last_month))
    samples = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    ids = pair_id(series.shop_id[samples], series.item_id[samples])
    return samples[np.argsort(ids, kind="stable")]


def _forecast_split(
    test: pd.DataFrame | None,
    vocab: Vocabularies,
    timeline: Timeline,
    grid: Grid,
    series: Series,
    pairs: PairLevel,
    wcfg: WindowsConfig,
) -> _Split:
    """test.csv's rows in ID order -- or, with no test.csv, the universe of pairs by their stable IDs."""
    if test is not None:
        samples = series.table[vocab.test_shop, vocab.test_item]
        ids = test["ID"].to_numpy(np.int32)
    else:
        samples = universe_pairs(wcfg, timeline, grid, series, pairs)
        ids = pair_id(series.shop_id[samples], series.item_id[samples])
        if not samples.size:
            raise DataValidationError("no test.csv and an empty universe of pairs: nothing to forecast "
                                      "(raise windows.universe_months or set windows.universe_grid)")
    frame = pa.table(
        {
            "ID": ids,
            "series_idx": samples.astype(np.int32),
            **series.ids(samples),
            "prev": pairs.clipped(samples, timeline.last_month),
            "mean3": pairs.mean3(samples, timeline.forecast_month),
        }
    )
    return _Split(frame, _samples(samples, timeline.forecast_month))


def _series_table(series: Series, pairs: PairLevel, n_categories: int) -> pa.Table:
    return pa.table(
        {
            "series_idx": np.arange(series.n, dtype=np.int32),
            "shop_id": series.shop_id,
            "item_id": series.item_id,
            "item_category_id": series.category_id,
            "shop_index": series.shop.astype(np.int32),
            "category_index": series.category.astype(np.int32),
            "pair_row": pairs.row,
            "item_row": series.item.astype(np.int32),
            "shopcat_row": (series.shop * n_categories + series.category).astype(np.int32),
        }
    )


def _meta(
    config: NestcastConfig,
    timeline: Timeline,
    vocab: Vocabularies,
    n_series: int,
    levels: Levels,
    sample_counts: dict[str, int],
    has_test: bool,
) -> dict[str, Any]:
    wcfg = config.windows
    return {
        "version": WINDOWS_VERSION,
        "channels": list(CHANNELS),
        "channel_levels": {name: level for name, level, _ in CHANNEL_SPECS},
        "n_channels": len(CHANNELS),
        "lookback": wcfg.lookback,
        "first_month": 0,
        "first_calendar_month": config.ingest.first_month,
        "last_month": timeline.last_month,
        "n_months": timeline.n_months,
        "holdout_month": timeline.holdout,
        "has_holdout": timeline.has_holdout,
        "forecast_month": timeline.forecast_month,
        "train_months": list(timeline.train_months),
        "target_clip": list(wcfg.clip),
        "scaling": _scaling_meta(timeline, levels),
        "n_series": int(n_series),
        "n_pairs_with_sales": int(levels.pair.sold_series.size),
        "n_items": int(vocab.item_ids.size),
        "n_shops": int(vocab.shop_ids.size),
        "n_categories": int(vocab.category_ids.size),
        "shop_ids": vocab.shop_ids.tolist(),
        "category_ids": vocab.category_ids.tolist(),
        "sample_policy": wcfg.sample_policy,
        "validation_months": [m for m in timeline.validation if m <= timeline.last_month] if sample_counts[
            "validation"] else [],
        "sample_counts": sample_counts,
        "forecast_source": "test.parquet" if has_test else _universe_label(wcfg, timeline),
        "static_features": wcfg.static_features,
    }


def _universe_label(wcfg: WindowsConfig, timeline: Timeline) -> str:
    parts = [f"pairs sold in the last {wcfg.universe_months} month(s)"] if wcfg.universe_months else []
    parts += [f"grid of month {timeline.last_month}"] if wcfg.universe_grid else []
    return "universe: " + " + ".join(parts)


def _scaling_meta(timeline: Timeline, levels: Levels) -> dict[str, Any]:
    return {
        "method": "log1p(x) / rms of non-zero log1p values over months < holdout_month",
        "stats_months": [0, timeline.holdout - 1],
        "scale": levels.scales(),
    }


# --- the build object and its writer -------------------------------------------------------------


@dataclass(frozen=True)
class _WindowsBuild:
    """Everything a windows directory holds, computed and not yet written."""

    levels: Levels
    item_family: np.ndarray
    item_names: np.ndarray
    grid: Grid
    series: pa.Table
    train_index: np.ndarray
    splits: dict[str, _Split]  # holdout, validation, forecast
    meta: dict[str, Any]

    def arrays(self) -> dict[str, np.ndarray]:
        """``<name>.npy`` contents by name."""
        return (
            self.levels.arrays()
            | {"item_family": self.item_family, "item_names": self.item_names, "train_index": self.train_index}
            | {f"{name}_index": split.index for name, split in self.splits.items()}
            | {"grid_shops": self.grid.shops, "grid_items": self.grid.items}
        )

    def tables(self) -> dict[str, pa.Table]:
        """``<name>.parquet`` contents by name."""
        return {"series": self.series} | {name: split.frame for name, split in self.splits.items()}


def _build(
    paths: LakePaths, config: NestcastConfig, holdout_month: int | None, provenance: dict[str, Any]
) -> _WindowsBuild:
    """All stages, in dependency order; ``provenance`` (build hash, input hashes) goes into the meta as is."""
    monthly = cube.read_monthly_arrays(paths)
    timeline = cube.timeline(config, holdout_month, monthly["date_block_num"])
    refs = cube.read_references(paths)
    has_test = refs.test is not None
    vocab = cube.vocabularies(monthly, refs, config)
    sales = cube.sales(monthly, vocab)
    del monthly  # the sales hold the same rows in the types the stages use
    grid = cube.monthly_grid(sales, timeline.n_months, vocab)
    series = cube.series(sales, vocab, grid, timeline, has_test)
    levels = cube.levels(sales, vocab, grid, series, timeline, config)
    wcfg = config.windows
    train_index = _train_index(wcfg.sample_policy, wcfg.lookback, timeline, grid, series, levels.pair)
    splits = {
        "holdout": _grid_split(timeline.holdout, timeline, grid, series, levels.pair),
        "validation": _grid_splits(timeline.validation, timeline, grid, series, levels.pair),
        "forecast": _forecast_split(refs.test, vocab, timeline, grid, series, levels.pair, config.windows),
    }
    sample_counts = {"train": int(train_index.shape[0])} | {name: int(s.index.shape[0]) for name, s in splits.items()}
    meta = _meta(config, timeline, vocab, series.n, levels, sample_counts, has_test) | provenance
    return _WindowsBuild(
        levels=levels,
        item_family=vocab.item_family,
        item_names=vocab.item_names,
        grid=grid,
        series=_series_table(series, levels.pair, vocab.category_ids.size),
        train_index=train_index,
        splits=splits,
        meta=meta,
    )


def _write_build(build: _WindowsBuild, out_dir: Path) -> None:
    for name, array in build.arrays().items():
        np.save(out_dir / f"{name}.npy", np.ascontiguousarray(array))
    for name, table in build.tables().items():
        # lz4: these files are re-read at every training run; speed matters more than size here.
        pq.write_table(table, out_dir / f"{name}.parquet", compression="lz4")
    # The store's files and their sha256, so a file deleted or damaged since is rebuilt, not served.
    build.meta[STORE_FILES] = {path.name: file_sha256(path) for path in sorted(out_dir.iterdir())
                               if path.name != WINDOWS_META_FILE}
    (out_dir / WINDOWS_META_FILE).write_text(json.dumps(build.meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def store_files(windows_dir: str | Path) -> list[Path]:
    """``meta.json`` and every file it records: what a cached windows step must find as it left them."""
    windows_dir = Path(windows_dir)
    recorded = (read_json(windows_dir / WINDOWS_META_FILE) or {}).get(STORE_FILES) or {}
    return [windows_dir / WINDOWS_META_FILE, *(windows_dir / name for name in sorted(recorded))]


def store_problems(windows_dir: str | Path) -> list[str]:
    """Each file ``meta.json`` records that is missing or whose sha256 differs (empty: the store is intact)."""
    recorded = (read_json(Path(windows_dir) / WINDOWS_META_FILE) or {}).get(STORE_FILES) or {}
    return recorded_file_problems(windows_dir, recorded, WINDOWS_META_FILE)
