"""What a training run writes as it goes, atomically: a checkpoint after every epoch (weights, optimizer state and
early-stopping state, committed by ``state.json``), the best weights, and the finished model file; and the resume
from them after a crash."""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from core.batches import set_epoch
from core.files import read_json, write_json_atomic
from core.model import OBJECTIVE

CHECKPOINT_STATE = "state.json"
EpochCallback = Callable[[int, dict[str, float]], None]


def weights_file(directory: Path, stem: str) -> Path:
    """A checkpoint's weights file in ``directory`` (keras wants the ``.weights.h5`` suffix)."""
    return directory / f"{stem}.weights.h5"


def _save_weights_atomic(model: keras.Model, target: Path) -> None:
    # keras needs the ".weights.h5" suffix, so the temporary keeps it.
    tmp = target.parent / f".tmp-{uuid.uuid4().hex[:8]}.weights.h5"
    try:
        model.save_weights(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_model_atomic(model: keras.Model, target: str | os.PathLike[str]) -> Path:
    """``model.save`` to a ``.keras`` file through a temporary sibling and a rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex[:8]}.keras"
    try:
        model.save(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class EpochCheckpoint(keras.callbacks.Callback):
    """Checkpoint + early stopping whose state survives a restart.

    After every epoch: the weights *and optimizer state* go to ``epoch-NNNN.weights.h5``, then
    ``state.json`` (epoch count, history, early-stopping state) is replaced atomically to point at
    it — the state file is the commit, so a crash between the two leaves the previous checkpoint.
    Improvements on the monitored loss also copy the weights to ``best.weights.h5``.
    """

    def __init__(
        self,
        directory: Path,
        state: dict[str, Any],
        patience: int,
        monitor: str | None,
        on_epoch: EpochCallback | None,
        data: Any,
    ) -> None:
        super().__init__()
        self.directory = directory
        self.state = state
        self.patience = patience
        self.monitor = monitor
        self.on_epoch = on_epoch
        self.data = data
        self.epoch_seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # keras calls the dataset's on_epoch_end a varying number of times; pin the order to the epoch.
        set_epoch(self.data, epoch)
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._started)
        logs = _exact_loss_logs({name: float(value) for name, value in (logs or {}).items()})
        state = self.state
        for name, value in logs.items():
            state["history"].setdefault(name, []).append(value)
        current = logs.get(self.monitor) if self.monitor else None
        best = state["best_val_loss"]
        if self.monitor is None:  # a refit: the last epoch is the model, there is nothing to select on
            state["best_epoch"] = epoch + 1
        elif current is not None and math.isfinite(current) and (best is None or current < best):
            state["best_val_loss"], state["best_epoch"], state["wait"] = current, epoch + 1, 0
            _save_weights_atomic(self.model, weights_file(self.directory, "best"))
        else:
            state["wait"] += 1
        if self.patience > 0 and state["wait"] >= self.patience:
            self.model.stop_training = True
            state["stopped_early"] = True
        previous = state.get("weights")
        name = f"epoch-{epoch + 1:04d}"
        _save_weights_atomic(self.model, weights_file(self.directory, name))
        state["epoch"], state["weights"] = epoch + 1, name
        write_json_atomic(self.directory / CHECKPOINT_STATE, state)
        if previous and previous != name:
            weights_file(self.directory, previous).unlink(missing_ok=True)
        if self.on_epoch is not None:
            self.on_epoch(epoch, logs)


def _exact_loss_logs(logs: dict[str, float]) -> dict[str, float]:
    """``loss``/``val_loss`` from the sample-weighted ``OBJECTIVE`` metric where the model has it."""
    for prefix in ("", "val_"):
        if prefix + OBJECTIVE in logs:
            logs[prefix + "loss"] = logs.pop(prefix + OBJECTIVE)
    return logs


def _new_state() -> dict[str, Any]:
    return {
        "epoch": 0,
        "weights": None,
        "history": {},
        "best_val_loss": None,
        "best_epoch": 0,
        "wait": 0,
        "stopped_early": False,
    }


def resume_state(model: keras.Model, ckpt_dir: Path, train: Any) -> dict[str, Any]:
    """The checkpoint state in ``ckpt_dir`` (a fresh one if none), with its weights loaded into ``model``."""
    state: dict[str, Any] = read_json(ckpt_dir / CHECKPOINT_STATE) or _new_state()
    resumed_from = int(state["epoch"])
    if resumed_from and state.get("weights"):
        # The checkpoint holds optimizer slots too; loading them needs the optimizer's variables to exist.
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(weights_file(ckpt_dir, state["weights"]))
        set_epoch(train, resumed_from)
    return state
