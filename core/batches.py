"""Keras batches of in-memory arrays (``ArrayBatches``), and positioning an epoch-seeded dataset on an epoch."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from core.sampling import EpochShuffled


class ArrayBatches(EpochShuffled, keras.utils.PyDataset):
    """Batches of in-memory arrays ``(inputs dict, y)``, reshuffled each epoch from ``(seed, epoch)``."""

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        y: np.ndarray | None,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.inputs = {name: np.asarray(value) for name, value in inputs.items()}
        self.y = None if y is None else np.asarray(y, dtype=np.float32).reshape(-1)
        n_samples = len(next(iter(self.inputs.values())))
        super().__init__(n_samples, batch_size, shuffle=shuffle, seed=seed, **kwargs)

    def __getitem__(self, i: int) -> Any:
        rows = self.batch_positions(i)
        batch = {name: value[rows] for name, value in self.inputs.items()}
        if self.y is None:
            return (batch,)
        return (batch, self.y[rows], self.batch_weights(i)) if self.weighted else (batch, self.y[rows])


def as_dataset(data: Any, batch_size: int, *, shuffle: bool, seed: int) -> Any:
    """Tuples of arrays become ``ArrayBatches`` (last batch padded); datasets (PyDataset, tf.data) pass through."""
    if isinstance(data, tuple) and len(data) in (1, 2) and isinstance(data[0], dict):
        y = data[1] if len(data) == 2 else None
        return ArrayBatches(data[0], y, batch_size, shuffle=shuffle, seed=seed, pad_last=y is not None,
                            endless=shuffle)
    return data


def set_epoch(data: Any, epoch: int) -> None:
    """Position an epoch-seeded dataset (ours or core.window_store's) at ``epoch``; other datasets keep their order."""
    if isinstance(data, EpochShuffled):
        data.set_epoch(epoch)
