"""The multi-device training paths, executed on virtual CPU devices: TensorFlow's ``MirroredStrategy`` over two
logical CPUs and Keras ``DataParallel`` on JAX over two host devices each train like one device does.

Each backend runs in a child process: TensorFlow's logical devices and JAX's host device count are fixed when
the backend starts. The child trains the same seeded model on the same data and global batch twice, on one
device and on two, and prints both weight vectors; data parallelism splits each batch and averages the
replicas' gradients, so the two must agree to float32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys
import keras, numpy as np
from core.config import ModelConfig, TrainConfig
from core.device import select_device
from core.model import build_model
from core.training import train_model

rng = np.random.default_rng(0)
n, lookback, channels = 1024, 6, 2
seq = np.minimum(rng.negative_binomial(1.0, 0.35, size=(n, lookback, channels)), 20).astype("float32")
shop = rng.integers(0, 4, n).astype("int32")
category = rng.integers(0, 3, n).astype("int32")
y = np.clip(0.8 * seq[:, -1, 0] + 0.2 * seq[:, -2, 0] + shop, 0, 20).astype("float32")
train_cfg = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=128, patience=0)
out = {}
for replicas in (2, None):  # two first: TensorFlow splits the CPU only before it initialises
    device = select_device("cpu", "auto", replicas)
    model = build_model(ModelConfig(kind="nlstm", units=8, depth=2, head_units=8), lookback=lookback,
                        n_channels=channels, n_shops=4, n_categories=3, seed=1, train_cfg=train_cfg, device=device)
    train_model(model, ({"sequence": seq, "shop": shop, "category": category}, y), None, train_cfg,
                f"{sys.argv[1]}/replicas-{replicas}", device=device)
    out[str(replicas)] = {"strategy": device.strategy, "devices": device.devices,
                          "weights": np.concatenate([np.asarray(w).ravel() for w in model.get_weights()]).tolist()}
print("RESULT " + json.dumps(out))
"""


pytestmark = pytest.mark.slow  # one child process per backend and device layout


def train_on_one_and_two_devices(backend: str, tmp_path: Path, **env: str) -> dict:
    child_env = os.environ | {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                          env=child_env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def assert_same_training(result: dict, strategy: str) -> None:
    one, two = result["None"], result["2"]
    assert one["strategy"] == "default" and two["strategy"] == strategy
    assert len(two["devices"]) == 2
    single, parallel = np.asarray(one["weights"]), np.asarray(two["weights"])
    assert np.abs(single).max() > 0.1  # the comparison is about trained weights, not zeros
    np.testing.assert_allclose(parallel, single, rtol=0, atol=1e-5)


def test_mirrored_strategy_on_two_logical_cpus_trains_like_one_device(tmp_path):
    assert_same_training(train_on_one_and_two_devices("tensorflow", tmp_path), "mirrored")


def test_keras_data_parallel_on_two_jax_host_devices_trains_like_one_device(tmp_path):
    pytest.importorskip("jax")
    flags = "--xla_force_host_platform_device_count=2"
    result = train_on_one_and_two_devices("jax", tmp_path, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    assert_same_training(result, "data_parallel")
