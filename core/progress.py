"""Signs of life while a model trains: one start line, a terminal progress bar, a per-epoch table.

``TrainingProgress`` is a Keras callback that ``core.training.train_model`` accepts through ``callbacks=``. Before
the first epoch's second batch it logs what is being trained on (device, samples, batches, the first batch's
time, which is mostly graph building and the XLA compile); while an epoch runs it draws a tqdm bar with the
batch count and ETA, only when the terminal is a TTY (never in CI logs or a worker's captured output).
``epoch_table`` reads the per-epoch rows from a stage's ``metadata.json``, so a cached stage can republish them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

import keras

Log = Callable[[str], None]


def describe_device(device: Mapping[str, Any]) -> str:
    """``CPU, no GPU found`` / ``CPU, as requested`` / ``2 logical CPU devices (mirrored)`` /
    ``1 GPU (…), mixed_float16, XLA``."""
    devices = list(device.get("devices") or [])
    if device.get("kind") != "gpu" and len(devices) > 1:  # train.replicas on a host without a GPU
        return f"{len(devices)} logical CPU devices ({device.get('strategy')})"
    if device.get("kind") != "gpu":
        return "CPU, as requested" if device.get("requested") == "cpu" else "CPU, no GPU found"
    xla = ", XLA" if device.get("jit_compile") else ""
    plural = "s" if len(devices) != 1 else ""
    return f"{len(devices)} GPU{plural} ({', '.join(devices)}), {device.get('precision')}{xla}"


def _terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty() and sys.stdout.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class TrainingProgress(keras.callbacks.Callback):
    """Start line through ``log``, a per-epoch bar on ``stream`` (default stderr) when ``bar`` (default: the
    terminal is a TTY)."""

    def __init__(self, label: str, log: Log | None = None, *, bar: bool | None = None,
                 stream: IO[str] | None = None) -> None:
        super().__init__()
        self.label = label
        self.log = log
        self.stream = stream if stream is not None else sys.stderr
        self.bar_enabled = _terminal(self.stream) if bar is None else bar
        self.samples: int | None = None
        self.batch_size: int | None = None
        self.device: dict[str, Any] = {}
        self.start_line: str | None = None
        self._bar: Any = None
        self._batch_started = 0.0
        self._first_batch = True

    def describe(self, data: Any, device: Mapping[str, Any]) -> None:
        """What ``train_model`` knows and Keras does not tell callbacks: the dataset's size and the device."""
        self.samples = getattr(data, "n_samples", None)
        self.batch_size = getattr(data, "batch_size", None)
        self.device = dict(device)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._first_batch = True

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.bar_enabled:
            from tqdm import tqdm

            epochs = self.params.get("epochs")
            self._bar = tqdm(total=self.params.get("steps"), desc=f"{self.label} epoch {epoch + 1}/{epochs}",
                             unit="batch", leave=False, file=self.stream, dynamic_ncols=True)

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._first_batch:
            self._batch_started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._first_batch:
            self._first_batch = False
            self._announce(time.perf_counter() - self._batch_started)
        if self._bar is not None:
            self._bar.update(1)
            if logs and "loss" in logs:
                self._bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._close()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.refresh()  # tqdm redraws at most every 0.1 s: show the finished epoch before it is cleared
            self._bar.close()
            self._bar = None

    def _announce(self, first_batch_seconds: float) -> None:
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        samples = f"{self.samples:,} samples" if self.samples is not None else "samples"
        size = f" of {self.batch_size}" if self.batch_size else ""
        self.start_line = (
            f"{self.label}: training on {describe_device(self.device) if self.device else 'an unknown device'}; "
            f"{samples} in {steps} batches{size} per epoch, up to {epochs} epochs; first batch (graph build and "
            f"compile) {first_batch_seconds:.1f} s"
        )
        if self.log is not None:
            self.log(self.start_line)


def epoch_table(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per epoch of a stage's ``metadata.json``: epoch, loss, validation RMSE (``None`` for a refit,
    which has no validation month), seconds (``None`` for epochs run before a resume)."""
    history = metadata.get("history") or {}
    losses = list(history.get("loss") or [])
    val_rmse = list(history.get("val_rmse") or [])
    seconds = list((metadata.get("timings") or {}).get("seconds_per_epoch") or [])
    offset = len(losses) - len(seconds)  # the timings cover this call's epochs only, the last ones
    return [
        {
            "epoch": i + 1,
            "loss": round(float(loss), 4),
            "validation RMSE": round(float(val_rmse[i]), 4) if i < len(val_rmse) else None,
            "seconds": round(float(seconds[i - offset]), 1) if i >= offset else None,
        }
        for i, loss in enumerate(losses)
    ]
