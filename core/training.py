"""Step 4's training: ``train_model`` fits a built forecaster (early-stopped on the validation months, best weights
restored, resumed from the last epoch's checkpoint after a crash) and records what it ran on in ``metadata.json``;
``train_forecaster`` is one stage of the training protocol (``select`` or ``refit``) as the orchestration calls it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import keras
import numpy as np

from core.batches import as_dataset
from core.checkpoint import EpochCallback, EpochCheckpoint, resume_state, save_model_atomic, weights_file
from core.device import DeviceInfo, default_cpu_device, select_device
from core.files import write_json_atomic
from core.lake import METADATA_FILE, NETWORK_FILE
from core.model import build_model, load_model
from core.schedule import learning_rate_callbacks

if TYPE_CHECKING:  # the config pulls in pydantic-settings; the GPU benchmark runs without it
    from core.config import NestcastConfig, TrainConfig
    from core.window_store import WindowStore


@dataclasses.dataclass
class TrainResult:
    """Summary of one ``train_model`` call (JSON-ready through ``dataclasses.asdict``)."""

    history: dict[str, list[float]]
    best_epoch: int  # 1-based epoch whose weights were kept (0: none)
    best_val_loss: float | None
    epochs_run: int  # epochs completed in total, including those before a resume
    resumed_from: int  # epochs already done when this call started (0: fresh)
    stopped_early: bool
    seconds_per_epoch: float | None  # mean over the epochs run by this call
    seconds_total: float
    params: int
    device: dict[str, Any]
    model_path: str
    metadata_path: str


def _fit(
    model: keras.Model,
    train: Any,
    val: Any,
    train_cfg: TrainConfig,
    device: DeviceInfo,
    checkpoint: EpochCheckpoint,
    initial_epoch: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> None:
    with device.scope():
        model.fit(
            train,
            validation_data=val,
            epochs=train_cfg.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=len(train) if getattr(train, "endless", False) else None,
            # Datasets reshuffle themselves from (seed, epoch); keras' own batch shuffling draws
            # from a global RNG that a resumed run cannot replay.
            shuffle=False,
            callbacks=[checkpoint, *callbacks],
            verbose=0,
        )


def _train_result(
    model: keras.Model,
    state: dict[str, Any],
    resumed_from: int,
    epoch_seconds: list[float],
    started: float,
    device: DeviceInfo,
    model_path: Path,
    run_dir: Path,
) -> TrainResult:
    return TrainResult(
        history=state["history"],
        best_epoch=int(state["best_epoch"]),
        best_val_loss=state["best_val_loss"],
        epochs_run=int(state["epoch"]),
        resumed_from=resumed_from,
        stopped_early=bool(state["stopped_early"]),
        seconds_per_epoch=float(np.mean(epoch_seconds)) if epoch_seconds else None,
        seconds_total=time.perf_counter() - started,
        params=int(model.count_params()),
        device=device.to_dict(),
        model_path=str(model_path),
        metadata_path=str(run_dir / METADATA_FILE),
    )


def _write_metadata(
    path: Path,
    model: keras.Model,
    device: DeviceInfo,
    train_cfg: TrainConfig,
    result: TrainResult,
    epoch_seconds: list[float],
    extra_metadata: dict[str, Any] | None,
) -> None:
    metadata = {
        "device": device.kind,
        "devices": device.devices,
        "precision": device.precision,
        "strategy": device.strategy,
        "jit_compile": device.jit_compile,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "params": result.params,
        "model": model.name,
        "train_config": train_cfg.model_dump(mode="json") if hasattr(train_cfg, "model_dump") else dict(train_cfg),
        "epochs_run": result.epochs_run,
        "resumed_from": result.resumed_from,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "stopped_early": result.stopped_early,
        "timings": {
            "seconds_per_epoch": epoch_seconds,
            "mean_seconds_per_epoch": result.seconds_per_epoch,
            "seconds_total": result.seconds_total,
        },
        "history": result.history,
        **(extra_metadata or {}),
    }
    write_json_atomic(path, metadata)


def _rebuilt_line(model_path: Path, epoch: int, epochs: int) -> str:
    there = f"replacing the {model_path.stat().st_size:,}-byte file there" if model_path.exists() else "it was missing"
    return (
        f"{model_path}: rebuilt from the checkpoints of its finished training (epoch {epoch} of {epochs}), "
        f"{there}; no epoch retrained"
    )


def train_model(
    model: keras.Model,
    train_data: Any,
    val_data: Any,
    train_cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    on_epoch: EpochCallback | None = None,
    *,
    device: DeviceInfo | None = None,
    extra_metadata: dict[str, Any] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    schedule_epochs: int | None = None,
    schedule_offset: int = 0,
) -> TrainResult:
    """Fit ``model``; resume from ``run_dir/checkpoints`` if a previous call was interrupted.

    ``train_data``/``val_data``: a ``keras.utils.PyDataset`` / ``tf.data.Dataset`` of
    ``(inputs, y)`` batches, or a tuple ``(inputs dict, y)`` of arrays (batched and reshuffled per
    epoch from ``train_cfg.seed``). ``on_epoch(epoch, logs)`` is called after each epoch with the
    0-based epoch index and float logs (``loss``, ``rmse``, ``val_loss``, ``val_rmse``).
    Writes ``model.keras`` (best weights) and ``metadata.json`` atomically into ``run_dir``.
    ``callbacks`` (e.g. ``core.progress.TrainingProgress``) run after the checkpoint; one with a
    ``describe(data, device)`` method is first told the training data and the device.
    ``schedule_epochs``: the epochs ``train_cfg.learning_rate_schedule`` spans (default ``train_cfg.epochs``; a
    refit passes the selection's maximum so that it follows the selection's curve); ``schedule_offset``: the epochs
    of that curve already run before this fit's first (a refit from the selection's network runs the last ones).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    device = device or default_cpu_device()
    keras.utils.set_random_seed(train_cfg.seed)
    train = as_dataset(train_data, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed)
    val = (
        as_dataset(val_data, train_cfg.batch_size, shuffle=False, seed=train_cfg.seed)
        if val_data is not None
        else None
    )

    state = resume_state(model, ckpt_dir, train)
    resumed_from = int(state["epoch"])
    monitor = "val_loss" if val is not None else None
    patience = train_cfg.patience if val is not None else 0
    checkpoint = EpochCheckpoint(ckpt_dir, state, patience, monitor, on_epoch, train)
    for callback in callbacks:
        if hasattr(callback, "describe"):
            callback.describe(train, device.to_dict())
    schedule = learning_rate_callbacks(train_cfg, schedule_epochs or train_cfg.epochs, train, schedule_offset)
    if not (state["stopped_early"] or resumed_from >= train_cfg.epochs):
        _fit(model, train, val, train_cfg, device, checkpoint, resumed_from, [*schedule, *callbacks])
    else:  # a finished stage run again: its model file was missing or damaged (or the cache forgot it)
        logging.getLogger(__name__).warning(_rebuilt_line(run_dir / NETWORK_FILE, resumed_from, train_cfg.epochs))
    best = weights_file(ckpt_dir, "best")
    if best.exists():
        model.load_weights(best)

    model_path = save_model_atomic(model, run_dir / NETWORK_FILE)
    seconds = checkpoint.epoch_seconds
    result = _train_result(model, state, resumed_from, seconds, started, device, model_path, run_dir)
    _write_metadata(run_dir / METADATA_FILE, model, device, train_cfg, result, seconds, extra_metadata)
    return result


Stage = Literal["select", "refit"]


def train_forecaster(
    config: NestcastConfig,
    windows_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    on_epoch: EpochCallback | None = None,
    *,
    stage: Stage = "select",
    epochs: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    start_from: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """One stage of the training protocol on the windows in ``windows_dir``, into ``run_dir``.

    ``select``: train on the targets before the validation months (the months before the holdout) for at most
    ``train.epochs`` epochs, early-stopped on the validation months' grids (best weights kept); its
    ``best_epoch`` is the epoch count the refit uses. ``refit``: train on every training target (through
    the month before the holdout; with a store built without a holdout, through the last month) for exactly
    ``epochs`` epochs with no validation data, keeping the last epoch's weights. ``start_from`` (a refit): the
    saved network (weights and optimiser state) it continues from, along the last ``epochs`` epochs of the
    selection's learning-rate curve, instead of fresh weights along its first.
    """
    from core.window_store import WindowStore

    store = WindowStore.open(windows_dir)
    device = select_device(config.train.device, config.train.jit_compile, config.train.replicas)
    train_cfg, before, val = _stage_data(store, config.train, stage, epochs, windows_dir)
    if start_from is not None and stage != "refit":
        raise ValueError(f"only a refit starts from a trained network, not stage {stage!r}")
    model = _starting_model(config, store, train_cfg, device, start_from)
    train = store.train_dataset(
        train_cfg.batch_size,
        seed=train_cfg.seed,
        budget=train_cfg.sample_budget,
        before_month=before,
        pad_last=True,
        endless=True,  # the batches of every epoch fixed in advance: core.sampling.EpochShuffled
    )
    metadata = _stage_metadata(config, store, windows_dir, stage, before)
    metadata["started_from"] = None if start_from is None else str(start_from)
    metadata.update(extra_metadata or {})
    return train_model(
        model,
        train,
        val,
        train_cfg,
        run_dir,
        on_epoch,
        device=device,
        extra_metadata=metadata,
        callbacks=callbacks,
        schedule_epochs=config.train.epochs,
        schedule_offset=0 if start_from is None else max(config.train.epochs - train_cfg.epochs, 0),
    )


def _starting_model(
    config: NestcastConfig, store: WindowStore, train_cfg: TrainConfig, device: DeviceInfo, start_from: Any
) -> keras.Model:
    """The network a stage trains: the saved one at ``start_from``, else fresh weights from the seed."""
    if start_from is not None:
        keras.utils.set_random_seed(train_cfg.seed)
        with device.scope():
            return load_model(start_from)
    return build_model(
        config.model,
        lookback=store.lookback,
        n_channels=store.n_channels,
        n_shops=int(store.meta["n_shops"]),
        n_categories=int(store.meta["n_categories"]),
        seed=train_cfg.seed,
        train_cfg=train_cfg,
        device=device,
        n_static=store.n_static,
    )


def _stage_data(
    store: WindowStore, train_cfg: TrainConfig, stage: Stage, epochs: int | None, windows_dir: Any
) -> tuple[TrainConfig, int | None, Any]:
    """``(train_cfg, before_month, validation data)`` of ``stage``: a refit trains exactly ``epochs`` epochs on every
    training target with no validation data; a selection trains before the validation months and validates on them."""
    if stage == "select":
        if store.validation_start is None:
            raise ValueError(f"{windows_dir}: no validation month to select the epoch count on")
        return train_cfg, store.validation_start, store.validation_dataset(train_cfg.batch_size, pad_last=True)
    if stage == "refit":
        if epochs is None or epochs < 1:
            raise ValueError(f"a refit needs the selected epoch count (>= 1), got {epochs!r}")
        return train_cfg.model_copy(update={"epochs": int(epochs)}), None, None
    raise ValueError(f"stage must be 'select' or 'refit', got {stage!r}")


def _stage_metadata(
    config: NestcastConfig, store: WindowStore, windows_dir: Any, stage: Stage, before: int | None
) -> dict[str, Any]:
    """What a stage trained on, for its ``metadata.json``."""
    return {
        "model_config": config.model.model_dump(mode="json"),
        "windows_dir": str(windows_dir),
        "stage": stage,
        "trained_below_month": before if before is not None else store.holdout_month,
        "validation_months": store.validation_months if stage == "select" else None,
    }
