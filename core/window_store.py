"""Reading a windows store (``lake/windows``, built by ``core.windows``): windows cut from the level arrays by index
arithmetic, the samples and frames of each split, the arrays the features are computed from, and the keras
datasets the model trains on.

``WindowStore.gather`` composes windows from the levels with fancy indexing; ``WindowStore.cube`` is a read-only
view with the contract's ``[series, month, channel]`` indexing on top of the same arrays.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from core.cube import CHANNELS, GRID_ARRAYS, LEVEL_SLICES, LEVELS, ROW_COLUMNS, STORED_LEVELS, pair_channels
from core.features import HEAD, FeatureTables, StoreArrays, head_inputs
from core.lake import FORECAST_FILE, WINDOWS_META_FILE
from core.sampling import BudgetDraws, EpochShuffled


class CubeView:
    """The logical ``[series, month, channel]`` cube over the level arrays.

    Indexing follows numpy on the dense cube (``cube[s]``, ``cube[s, m]``, ``cube[s_array, m_array]``,
    ``cube[:, 5, 0]``...); only the series that are asked for are composed, so a row costs
    ``months * channels`` floats however large the cube is.
    """

    def __init__(self, store: WindowStore) -> None:
        self._store = store
        self.shape = (store.n_series, store.n_months, store.n_channels)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        rows = np.arange(self.shape[0])[key[0]]
        unique, inverse = np.unique(rows, return_inverse=True)
        dense = self._store.rows(unique)
        return dense[(inverse.reshape(np.shape(rows)),) + tuple(key[1:])]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = self._store.rows(np.arange(self.shape[0]))
        return dense if dtype is None else dense.astype(dtype)


class WindowStore:
    """Read access to ``lake/windows``: metadata, series, windows by index, datasets, frames."""

    def __init__(self, windows_dir: Path) -> None:
        self.dir = Path(windows_dir)
        self.meta: dict[str, Any] = json.loads((self.dir / WINDOWS_META_FILE).read_text(encoding="utf-8"))
        self.series: pd.DataFrame = pq.read_table(self.dir / "series.parquet").to_pandas()
        self.lookback: int = int(self.meta["lookback"])
        self.n_months: int = int(self.meta["n_months"])
        self.n_channels: int = int(self.meta["n_channels"])
        self.n_series: int = int(self.meta["n_series"])
        self.channels: list[str] = list(self.meta["channels"])
        self.holdout_month: int = int(self.meta["holdout_month"])
        self.forecast_month: int = int(self.meta["forecast_month"])
        # The pair counts are the only large array: memory-map them; the rest is small enough to load.
        self.levels: dict[str, np.ndarray] = {
            name: np.load(self.dir / f"{name}.npy", mmap_mode="r" if name == "pair_count" else None)
            for name in STORED_LEVELS
        }
        scale = self.meta["scaling"]["scale"]
        self._pair_scales = (float(scale["pair_log_count"]), float(scale["pair_age"]))
        self._clip = (float(self.meta["target_clip"][0]), float(self.meta["target_clip"][1]))
        self.rows_of: dict[str, np.ndarray] = {
            level: self.series[column].to_numpy(np.int64) for level, column in ROW_COLUMNS.items()
        }
        self.shop_index: np.ndarray = self.series["shop_index"].to_numpy(np.int32)
        self.category_index: np.ndarray = self.series["category_index"].to_numpy(np.int32)
        self.train_index: np.ndarray = np.load(self.dir / "train_index.npy")
        self.holdout_index: np.ndarray = np.load(self.dir / "holdout_index.npy")
        self.validation_index: np.ndarray = np.load(self.dir / "validation_index.npy")
        #: The months that choose (core.protocol.select), oldest first; the selection trains on the months before.
        self.validation_months: list[int] = [int(m) for m in self.meta.get("validation_months") or []]
        self.forecast_index: np.ndarray = np.load(self.dir / "forecast_index.npy")
        self.grid: dict[str, np.ndarray] = {name: np.load(self.dir / f"{name}.npy") for name in GRID_ARRAYS}
        self.item_family: np.ndarray = np.load(self.dir / "item_family.npy")
        self.item_names: np.ndarray = np.load(self.dir / "item_names.npy")
        # Read now, not on demand: a rebuild swaps the directory, and a store must stay one snapshot.
        self._holdout_frame = pq.read_table(self.dir / "holdout.parquet").to_pandas()
        self._validation_frame = pq.read_table(self.dir / "validation.parquet").to_pandas()
        self._forecast_frame = pq.read_table(self.dir / FORECAST_FILE).to_pandas()
        self.cube = CubeView(self)
        self.n_static = len(HEAD) if self.meta.get("static_features") else 0
        self._tables: FeatureTables | None = None

    def arrays(self) -> StoreArrays:
        """The arrays ``core.features`` computes every feature from."""
        return StoreArrays(
            pair_count=self.levels["pair_count"],
            pair_first=self.levels["pair_first"],
            item_price=self.levels["item"][..., CHANNELS.index("item_price") - LEVEL_SLICES["item"][0]],
            grid_shops=self.grid["grid_shops"],
            grid_items=self.grid["grid_items"],
            item_family=self.item_family,
            item_names=self.item_names,
            rows={**self.rows_of, "shop": self.shop_index, "category": self.category_index},
            n_categories=int(self.meta["n_categories"]),
            clip=self._clip,
            first_calendar_month=str(self.meta["first_calendar_month"]),
        )

    def feature_tables(self) -> FeatureTables:
        """``core.features.FeatureTables`` of this store, built on first use."""
        if self._tables is None:
            self._tables = FeatureTables.of(self.arrays())
        return self._tables

    @classmethod
    def open(cls, windows_dir: str | Path) -> WindowStore:
        return cls(Path(windows_dir))

    # Windows -------------------------------------------------------------------------------------
    def _compose(self, series_idx: np.ndarray, months: np.ndarray) -> np.ndarray:
        """Values at ``months`` ([n, k], each in 0..n_months-1) for ``series_idx`` ([n]) -> [n, k, C]."""
        out = np.empty(months.shape + (self.n_channels,), dtype=np.float32)
        for level in LEVELS:
            lo, hi = LEVEL_SLICES[level]
            if level == "calendar":
                out[..., lo:hi] = self.levels["calendar"][months]
            elif level == "pair":
                rows = self.rows_of["pair"][series_idx]
                counts = self.levels["pair_count"][rows[:, None], months]
                first = self.levels["pair_first"][rows]
                out[..., lo:hi] = pair_channels(counts, first, months, self._clip, self._pair_scales)
            else:
                out[..., lo:hi] = self.levels[level][self.rows_of[level][series_idx][:, None], months]
        return out

    def rows(self, series_idx: np.ndarray) -> np.ndarray:
        """Whole cube rows ``[n, n_months, C]`` for the given series."""
        series_idx = np.asarray(series_idx, dtype=np.int64).ravel()
        months = np.broadcast_to(np.arange(self.n_months), (series_idx.size, self.n_months))
        return self._compose(series_idx, months)

    def gather(self, series_idx: np.ndarray, target_month: np.ndarray) -> np.ndarray:
        """Windows ``[n, lookback, C]`` over months ``T - lookback .. T - 1`` for each (series, T).

        Positions before month 0 are zeros. ``T`` may be at most ``n_months`` (the forecast month).
        """
        series_idx = np.asarray(series_idx, dtype=np.int64).ravel()
        target = np.asarray(target_month, dtype=np.int64).ravel()
        if target.size and (target.max() > self.n_months or target.min() < 0):
            raise ValueError(f"target months must lie in 0..{self.n_months}")
        months = target[:, None] + np.arange(-self.lookback, 0)[None, :]
        before = months < 0
        out = self._compose(series_idx, np.maximum(months, 0))
        if before.any():
            out[before] = 0.0
        return out

    def targets(self, series_idx: np.ndarray, target_month: np.ndarray) -> np.ndarray:
        """Clipped counts ``[n]`` of each series in its target month (must hold data)."""
        series_idx = np.asarray(series_idx, dtype=np.int64).ravel()
        target = np.asarray(target_month, dtype=np.int64).ravel()
        if target.size and target.max() >= self.n_months:
            raise ValueError("targets exist only for months with data")
        counts = self.levels["pair_count"][self.rows_of["pair"][series_idx], target]
        return np.clip(counts, *self._clip).astype(np.float32)

    def inputs(self, series_idx: np.ndarray, target_month: np.ndarray) -> dict[str, np.ndarray]:
        """The model's input dict for a batch of samples."""
        series_idx = np.asarray(series_idx, dtype=np.int64).ravel()
        inputs = {
            "sequence": self.gather(series_idx, target_month),
            "shop": self.shop_index[series_idx],
            "category": self.category_index[series_idx],
        }
        if self.n_static:
            samples = np.stack([series_idx, np.asarray(target_month, dtype=np.int64).ravel()], axis=1)
            inputs |= head_inputs(self.feature_tables(), samples)
        return inputs

    # Datasets ------------------------------------------------------------------------------------
    def training_samples(self, before_month: int | None = None) -> np.ndarray:
        """``train_index`` rows whose target month is before ``before_month`` (None: every training month)."""
        return self.train_index if before_month is None else self.train_index[self.train_index[:, 1] < before_month]

    def weighted_training_samples(
        self, before_month: int | None = None, seed: int = 0, budget: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``training_samples``, then at most ``budget`` of them by ``budget_draw`` (non-zero targets first, the
        zero-target windows drawn to fill it), with each kept window's weight; weights are None when every
        window is kept. The network and the boosters of one run, given the same seed, train on the same draw."""
        index, draws = self._budget_draws(before_month, seed, budget)
        return (index, None) if draws is None else draws.draw(0)

    def _budget_draws(
        self, before_month: int | None, seed: int, budget: int | None
    ) -> tuple[np.ndarray, BudgetDraws | None]:
        """``training_samples`` and, when they outnumber ``budget``, the draws from them (None: keep them all)."""
        index = self.training_samples(before_month)
        if budget is None or index.shape[0] <= budget:
            return index, None
        return index, BudgetDraws(index, self.targets(index[:, 0], index[:, 1]) > 0, budget, seed)

    def train_dataset(
        self,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        before_month: int | None = None,
        budget: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Training batches (``keras.utils.PyDataset``), reshuffled every epoch from ``seed``.

        ``before_month`` keeps the targets before that month (the protocol's selection stage trains below the
        validation months). ``budget``: a weighted draw of at most that many windows, drawn afresh every epoch
        (``BudgetDraws``): epoch k trains on ``budget_draw``'s sample for ``(seed, k)``, so three epochs see up to
        three times as many distinct windows as one fixed draw for the same compute. ``kwargs`` go to
        ``EpochShuffled`` (``pad_last``; ``endless=True``, which training uses: one stream across epochs, so
        ``fit`` needs ``steps_per_epoch=len(dataset)``) and ``PyDataset``.
        """
        index, draws = self._budget_draws(before_month, seed, budget)
        return _dataset_class()(self, index, batch_size, with_y=True, shuffle=shuffle, seed=seed, draws=draws,
                                **kwargs)

    def holdout_dataset(self, batch_size: int, **kwargs: Any) -> Any:
        """Holdout batches with targets, in ``holdout_frame()`` order."""
        return _dataset_class()(self, self.holdout_index, batch_size, with_y=True, shuffle=False, **kwargs)

    def validation_dataset(self, batch_size: int, **kwargs: Any) -> Any:
        """Validation batches with targets (every validation month), in ``validation_frame()`` order."""
        return _dataset_class()(self, self.validation_index, batch_size, with_y=True, shuffle=False, **kwargs)

    def forecast_dataset(self, batch_size: int, **kwargs: Any) -> Any:
        """Forecast batches (inputs only), in ``forecast_frame()`` order."""
        return _dataset_class()(self, self.forecast_index, batch_size, with_y=False, shuffle=False, **kwargs)

    # Frames --------------------------------------------------------------------------------------
    def holdout_frame(self) -> pd.DataFrame:
        """One row per holdout-grid pair: ids, ``actual``, baselines ``prev`` and ``mean3``, segments."""
        return self._holdout_frame.copy()

    @property
    def validation_start(self) -> int | None:
        """The first validation month (the selection stage trains on the targets before it); None: none."""
        return self.validation_months[0] if self.validation_months else None

    def validation_frame(self) -> pd.DataFrame:
        """The validation months' grids one after the other (``date_block_num`` says which), with the same
        columns as :meth:`holdout_frame`."""
        return self._validation_frame.copy()

    def forecast_frame(self) -> pd.DataFrame:
        """One row per test.csv row (ID order): ids, ``series_idx``, baselines ``prev`` and ``mean3``."""
        return self._forecast_frame.copy()


@functools.cache
def _dataset_class() -> type:
    """Defined on first use so that building the cube does not import TensorFlow."""
    import keras

    class WindowDataset(EpochShuffled, keras.utils.PyDataset):
        """Batches of windows cut from a ``WindowStore`` at draw time (nothing is pre-materialised); with ``draws``,
        each epoch's samples are that epoch's budget draw."""

        def __init__(
            self,
            store: WindowStore,
            index: np.ndarray,
            batch_size: int,
            with_y: bool,
            shuffle: bool,
            seed: int = 0,
            draws: BudgetDraws | None = None,
            **kwargs: Any,
        ) -> None:
            self.store = store
            self.draws = draws
            self.index = np.asarray(index, dtype=np.int32).reshape(-1, 2)
            self.with_y = with_y
            n_samples = self.index.shape[0] if draws is None else draws.size
            weights = None if draws is None else np.ones(n_samples, dtype=np.float32)  # epoch_weights draws them
            super().__init__(n_samples, batch_size, shuffle=shuffle, seed=seed, sample_weights=weights, **kwargs)

        def epoch_samples(self, epoch: int) -> np.ndarray:
            """The ``[n, 2]`` samples of ``epoch`` (its budget draw, or every sample)."""
            return self.index if self.draws is None else self.draws.draw(epoch)[0].astype(np.int32, copy=False)

        def epoch_weights(self, epoch: int) -> np.ndarray | None:
            return self.sample_weights if self.draws is None else self.draws.draw(epoch)[1]

        def __getitem__(self, i: int) -> Any:
            epoch, _ = self.locate(i)
            rows = self.epoch_samples(epoch)[self.batch_positions(i)]
            inputs = self.store.inputs(rows[:, 0], rows[:, 1])
            if not self.with_y:
                return (inputs,)
            targets = self.store.targets(rows[:, 0], rows[:, 1])
            return (inputs, targets, self.batch_weights(i)) if self.weighted else (inputs, targets)

    return WindowDataset
