"""Which windows train, in which order and with which weights: epoch-seeded batch order with a padded last
batch (``EpochShuffled``, shared by ``core.batches.ArrayBatches`` and the window batches of ``core.window_store``),
and the sample budget (``budget_draw``, ``BudgetDraws``).

Nothing here imports keras: the windows are built without TensorFlow, and the keras datasets are defined on first
use, so the base is a plain mixin placed before ``keras.utils.PyDataset``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class EpochShuffled:
    """Batches in an order drawn from ``(seed, epoch)`` alone, whatever keras does around them.

    ``endless`` (training): one stream of batches across epochs, batch ``i`` of the stream being batch
    ``i % len(self)`` of epoch ``first_epoch + i // len(self)``. So what a batch holds depends on its position
    alone. keras creates the next epoch's iterator -- and tf.data starts prefetching from it -- before any
    epoch callback runs; a dataset told its epoch by a callback served the first batches of each epoch in the
    previous epoch's order, as many as the prefetcher happened to fetch in time, so a seeded training gave other
    weights whenever another process slowed it (issue 29). ``fit`` then needs ``steps_per_epoch=len(dataset)``.
    A run resumed at epoch k starts its stream there (``set_epoch(k)`` before ``fit``).

    Finite (validation, prediction): batch ``i`` of the epoch ``set_epoch`` set.

    ``pad_last``: the last batch of an epoch is filled up to ``batch_size`` with repeats of its own rows, weighted
    0 (``batch_weights``), so that a compiled train step sees one batch shape only: a short last batch would
    otherwise cost a fresh XLA compile inside the first epoch (and again in validation).

    ``sample_weights``: one weight per sample (a weighted draw's ``1 / rate``), given with every batch;
    a subclass whose samples change with the epoch overrides :meth:`epoch_weights`.
    """

    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        pad_last: bool = False,
        sample_weights: np.ndarray | None = None,
        endless: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # keras.utils.PyDataset's workers / queue settings
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if sample_weights is not None and len(sample_weights) != n_samples:
            raise ValueError(f"sample_weights has {len(sample_weights)} entries for {n_samples} samples")
        self.sample_weights = None if sample_weights is None else np.asarray(sample_weights, dtype=np.float32)
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.pad_last = pad_last
        self.endless = endless
        self.epoch = 0
        self._streaming = False  # an endless stream has served a batch: its start is fixed
        self._order: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Finite: serve ``epoch`` from now on. Endless: start the stream at ``epoch`` (before ``fit``); keras'
        and the callbacks' later calls cannot move a stream that is already being read."""
        if not (self.endless and self._streaming):
            self.epoch = int(epoch)

    def on_epoch_end(self) -> None:
        if not self.endless:
            self.set_epoch(self.epoch + 1)

    def __len__(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    @property
    def num_batches(self) -> int | None:
        """keras' length of an epoch; None for an endless stream (``fit`` is given ``steps_per_epoch``)."""
        return None if self.endless else len(self)

    def locate(self, i: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of batch ``i``."""
        if self.endless:
            if i < 0:
                raise IndexError(i)
            self._streaming = True
            epoch, batch = divmod(i, len(self))
            return self.epoch + epoch, batch
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.epoch, i

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (the last one asked for is kept)."""
        if self._order is None or self._order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_samples) if self.shuffle
                     else np.arange(self.n_samples))
            self._order = (epoch, order)
        return self._order[1]

    def batch_positions(self, i: int) -> np.ndarray:
        """Positions in the sample list of batch ``i`` (padded when ``pad_last``)."""
        epoch, batch = self.locate(i)
        positions = self.order(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size]
        if self.pad_last and len(positions) < self.batch_size:
            positions = np.resize(positions, self.batch_size)  # repeats the batch's own rows
        return positions

    def epoch_weights(self, epoch: int) -> np.ndarray | None:
        """Each sample's weight in ``epoch`` (None: all 1)."""
        return self.sample_weights

    @property
    def weighted(self) -> bool:
        """Whether batches carry weights: padding to mask, or per-sample weights."""
        return self.pad_last or self.sample_weights is not None

    def batch_weights(self, i: int) -> np.ndarray:
        """Sample weights of batch ``i``: each real row's weight (1 without sample weights), 0 for the padding
        ``pad_last`` added."""
        epoch, batch = self.locate(i)
        real = min(self.batch_size, self.n_samples - batch * self.batch_size)
        weights = np.zeros(self.batch_size if self.pad_last else real, dtype=np.float32)
        sample = self.epoch_weights(epoch)
        weights[:real] = 1.0 if sample is None else sample[self.batch_positions(i)[:real]]
        return weights


#: Share of a sample budget that windows with a non-zero target get before any zero-target window does.
NONZERO_SHARE = 0.75


def budget_draw(nonzero: np.ndarray, budget: int, seed: int = 0, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of at most ``budget`` windows drawn from ``nonzero`` (True where a window's target is not
    zero), and each kept window's weight.

    The grid is mostly zero targets (a pair that sold nothing that month), which teach the model little each.
    Non-zero windows are kept first, up to ``NONZERO_SHARE`` of the budget (all of them when they fit); the
    zero-target ones fill the rest, each group drawn uniformly without replacement. A kept window weighs
    ``group size / kept of the group`` (1 / its inclusion rate), so a weighted loss over the draw is an unbiased
    estimate of the loss over every window (Horvitz-Thompson). When every window fits, all are kept with weight 1.

    ``epoch`` selects one of independent draws from the same ``seed`` (``BudgetDraws`` takes a fresh one each epoch).

    Example: 100 windows, 10 non-zero, budget 28 -> the 10 non-zero (weight 1) and 18 of the 90 zeros (weight 5).
    """
    nonzero = np.asarray(nonzero, dtype=bool).ravel()
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if nonzero.size <= budget:
        return np.arange(nonzero.size), np.ones(nonzero.size, dtype=np.float32)
    positive, zero = np.flatnonzero(nonzero), np.flatnonzero(~nonzero)
    kept_positive = min(positive.size, budget if zero.size == 0 else round(NONZERO_SHARE * budget))
    kept_zero = min(zero.size, budget - kept_positive)
    rng = np.random.default_rng([seed, 7, epoch])
    keep = np.sort(np.concatenate([
        rng.choice(positive, kept_positive, replace=False) if kept_positive < positive.size else positive,
        rng.choice(zero, kept_zero, replace=False) if kept_zero < zero.size else zero,
    ]))
    weights = np.where(nonzero[keep], positive.size / max(kept_positive, 1), zero.size / max(kept_zero, 1))
    return keep, weights.astype(np.float32)


class BudgetDraws:
    """One ``budget_draw`` of a training pool per epoch, each a function of ``(seed, epoch)`` alone.

    A fixed draw shows the network the same few zero-target windows every epoch; a fresh draw per epoch spreads
    the same number of steps over more of the grid, and each epoch's weighted loss stays an unbiased estimate of
    the loss over every window. A run resumed at epoch k redraws exactly the sample it would have trained on.

    Args:
        index: the pool, ``[n, 2]`` (series, target month) rows.
        nonzero: ``[n]``, True where a row's target is not zero.
        budget: rows per draw (the pool must be larger).
        seed: the draws' seed.
    """

    def __init__(self, index: np.ndarray, nonzero: np.ndarray, budget: int, seed: int = 0) -> None:
        if len(nonzero) != len(index):
            raise ValueError(f"nonzero has {len(nonzero)} entries for a pool of {len(index)} rows")
        if not 1 <= budget < len(index):
            raise ValueError(f"budget must lie in 1..{len(index) - 1} (the pool has {len(index)} rows), got {budget}")
        self.index, self.nonzero, self.budget, self.seed = index, np.asarray(nonzero, dtype=bool), int(budget), seed
        self._last: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s rows (sorted pool order) and their weights."""
        if self._last is None or self._last[0] != epoch:
            keep, weights = budget_draw(self.nonzero, self.budget, self.seed, epoch)
            self._last = (epoch, (self.index[keep], weights))
        return self._last[1]

    @property
    def size(self) -> int:
        """Rows in every draw (the budget, or fewer when a group is smaller than its share)."""
        return len(self.draw(0)[0]) if self._last is None else len(self._last[1][0])
