"""The learning-rate schedule (``train.learning_rate_schedule``): a cosine set before every batch from
``(epoch, batch)`` alone, so a resumed run continues the same curve."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:  # the config pulls in pydantic-settings; the GPU benchmark runs without it
    from core.config import TrainConfig


class CosineLearningRate(keras.callbacks.Callback):
    """Sets the optimizer's rate before every batch: ``peak`` falling to ``floor * peak`` along half a cosine over
    ``epochs`` epochs of ``steps`` batches.

    The rate is a function of ``(epoch, batch)`` alone, so a run resumed at epoch k continues the same curve, and a
    refit told to stop after k of the ``epochs`` ends at the rate the selected epoch k ended at. Decaying the rate
    is what lets the last steps settle: at a constant rate the validation RMSE of successive epochs of a
    full-size run swung by 1.5 %, more than a fourfold sample budget moved it.

    Args:
        peak: the first batch's rate (``train.learning_rate``).
        epochs: epochs the cosine spans (the configured maximum, in both stages).
        steps: batches per epoch.
        floor: the last batch's rate as a share of ``peak``, in [0, 1].
        offset: epochs of the curve run before this fit's epoch 0 (a refit from the selection's weights runs
            the curve's last epochs, not its first).

    Example: ``CosineLearningRate(4e-3, epochs=3, steps=len(train), floor=0.05).rate(1, 0)`` is 3.05e-3.
    """

    def __init__(self, peak: float, epochs: int, steps: int, floor: float = 0.05, offset: int = 0) -> None:
        super().__init__()
        if peak <= 0:
            raise ValueError(f"peak must be positive, got {peak}")
        if epochs < 1 or steps < 1:
            raise ValueError(f"epochs and steps must be at least 1, got {epochs} and {steps}")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must lie in [0, 1], got {floor}")
        if offset < 0:
            raise ValueError(f"offset must be at least 0, got {offset}")
        self.peak, self.epochs, self.steps, self.floor = float(peak), int(epochs), int(steps), float(floor)
        self.offset = int(offset)
        self._epoch = self.offset

    def rate(self, epoch: int, batch: int) -> float:
        """The rate of batch ``batch`` of epoch ``epoch`` (0-based); past the span, the floor."""
        progress = min((epoch + batch / self.steps) / self.epochs, 1.0)
        return self.peak * (self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch + self.offset

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.model.optimizer.learning_rate.assign(self.rate(self._epoch, batch))


def learning_rate_callbacks(
    train_cfg: TrainConfig, epochs: int, train: Any, offset: int = 0
) -> list[keras.callbacks.Callback]:
    """The callbacks that set the rate of ``train_cfg.learning_rate_schedule`` over ``epochs`` epochs of ``train``,
    this fit starting ``offset`` epochs into the curve."""
    if train_cfg.learning_rate_schedule == "constant":
        return []
    try:
        steps = len(train)
    except TypeError as error:  # a tf.data pipeline of unknown cardinality
        raise ValueError("learning_rate_schedule 'cosine' needs training data of known length (batches per epoch); "
                         "give a sized dataset or set learning_rate_schedule='constant'") from error
    return [CosineLearningRate(train_cfg.learning_rate, epochs, steps, train_cfg.learning_rate_floor, offset)]
