"""Signs of life while training: the start line, the terminal bar, the per-epoch table."""

from __future__ import annotations

import io
import json

import keras
from test_model import build, make_data

from core.config import TrainConfig
from core.device import DeviceInfo
from core.progress import TrainingProgress, describe_device, epoch_table
from core.training import train_model

CPU = DeviceInfo("auto", "cpu", keras.backend.backend(), ["cpu"], "default", "float32", False)


def test_training_logs_device_samples_and_batches_before_epoch_one_and_draws_a_bar_on_a_terminal(tmp_path):
    lines: list[str] = []
    terminal = io.StringIO()
    progress = TrainingProgress("select", lines.append, bar=True, stream=terminal)
    train, val = make_data(300, 0), make_data(64, 1)
    train_model(build(), train, val, TrainConfig(epochs=2, batch_size=64), tmp_path, device=CPU,
                callbacks=[progress])
    (line,) = lines
    assert line.startswith("select: training on CPU, no GPU found; 300 samples in 5 batches of 64 per epoch, "
                           "up to 2 epochs; first batch (graph build and compile) ")
    drawn = terminal.getvalue()
    assert "select epoch 1/2" in drawn and "select epoch 2/2" in drawn and "5/5" in drawn and "batch" in drawn


def test_no_bar_is_drawn_when_the_output_is_not_a_terminal(tmp_path):
    captured = io.StringIO()  # not a TTY
    progress = TrainingProgress("refit-final", None, stream=captured)
    assert progress.bar_enabled is False
    train_model(build(), make_data(128, 0), None, TrainConfig(epochs=1, batch_size=64), tmp_path, device=CPU,
                callbacks=[progress])
    assert captured.getvalue() == "" and progress.start_line is not None


def test_the_epoch_table_has_one_row_per_epoch_with_loss_validation_rmse_and_seconds(tmp_path):
    train, val = make_data(256, 0), make_data(64, 1)
    train_model(build(), train, val, TrainConfig(epochs=2, batch_size=64, patience=5), tmp_path, device=CPU)
    rows = epoch_table(json.loads((tmp_path / "metadata.json").read_text()))
    assert [row["epoch"] for row in rows] == [1, 2]
    # seconds are rounded to 0.1: an epoch of 4 tiny batches can show 0.0, but never None
    assert all(row["loss"] > 0 and row["validation RMSE"] > 0 and row["seconds"] >= 0 for row in rows), rows
    # a resumed stage: the timings cover the last epochs only, the first rows say so with None
    resumed = epoch_table({"history": {"loss": [3.0, 2.0, 1.0]}, "timings": {"seconds_per_epoch": [0.5]}})
    assert [row["seconds"] for row in resumed] == [None, None, 0.5]
    assert [row["validation RMSE"] for row in resumed] == [None, None, None]


def test_the_device_reads_as_a_person_would_say_it():
    assert describe_device({"kind": "cpu", "requested": "auto"}) == "CPU, no GPU found"
    assert describe_device({"kind": "cpu", "requested": "cpu"}) == "CPU, as requested"
    replicas = {"kind": "cpu", "requested": "cpu", "devices": ["/device:CPU:0", "/device:CPU:1"],
                "strategy": "mirrored"}
    assert describe_device(replicas) == "2 logical CPU devices (mirrored)"
    gpu = {"kind": "gpu", "devices": ["/physical_device:GPU:0"], "precision": "mixed_float16", "jit_compile": True}
    assert describe_device(gpu) == "1 GPU (/physical_device:GPU:0), mixed_float16, XLA"
