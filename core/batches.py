"""Epoch-seeded batch order, shared by ``core.model.ArrayBatches`` and the window batches of ``core.windows``.

Nothing here imports keras: ``core.windows`` builds the feature store without TensorFlow and defines its
keras dataset only on first use, so the base is a plain mixin placed before ``keras.utils.PyDataset``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class EpochShuffled:
    """Batches in an order drawn from ``(seed, epoch)`` alone.

    Because the order depends on nothing but the epoch number, a run resumed at epoch k (``set_epoch(k)``)
    sees exactly the batches an uninterrupted run would have seen, however many times keras happened to
    call ``on_epoch_end`` before.

    ``pad_last``: the last batch is filled up to ``batch_size`` with repeats of its own rows, weighted 0
    (``batch_weights``), so that a compiled train step sees one batch shape only: a short last batch would
    otherwise cost a fresh XLA compile inside the first epoch (and again in validation).

    ``sample_weights``: one weight per sample (a weighted draw's ``1 / rate``), given with every batch.
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
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s sample order from now on."""
        self.epoch = epoch
        if self.shuffle:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)
        else:
            self._order = np.arange(self.n_samples)

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)

    def __len__(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    def batch_positions(self, i: int) -> np.ndarray:
        """Positions in the sample list of batch ``i`` of the current epoch (padded when ``pad_last``)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        positions = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        if self.pad_last and len(positions) < self.batch_size:
            positions = np.resize(positions, self.batch_size)  # repeats the batch's own rows
        return positions

    @property
    def weighted(self) -> bool:
        """Whether batches carry weights: padding to mask, or per-sample weights."""
        return self.pad_last or self.sample_weights is not None

    def batch_weights(self, i: int) -> np.ndarray:
        """Sample weights of batch ``i``: each real row's weight (1 without ``sample_weights``), 0 for the padding
        ``pad_last`` added."""
        real = min(self.batch_size, self.n_samples - i * self.batch_size)
        weights = np.zeros(self.batch_size if self.pad_last else real, dtype=np.float32)
        if self.sample_weights is None:
            weights[:real] = 1.0
        else:
            weights[:real] = self.sample_weights[self.batch_positions(i)[:real]]
        return weights
