"""Where training runs: ``select_device`` resolves ``train.device``/``jit_compile``/``replicas`` into a ``DeviceInfo``.

``select_device("auto")`` takes every visible GPU (one: the default strategy; several:
``tf.distribute.MirroredStrategy`` on TensorFlow, ``keras.distribution.DataParallel`` on JAX), with
mixed precision and XLA; the CPU otherwise. ``train.replicas`` limits the GPUs, or on a host without one
splits the CPU into that many logical devices, so the multi-device path runs (and is tested) anywhere.
TensorFlow is imported only when it is the Keras backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from collections.abc import Iterator
from typing import Any

import keras

from core.errors import DeviceUnavailableError


@dataclasses.dataclass
class DeviceInfo:
    """What training runs on; ``to_dict()`` goes into ``metadata.json``."""

    requested: str
    kind: str  # "cpu" | "gpu"
    backend: str
    devices: list[str]
    strategy: str  # "default" | "mirrored" | "data_parallel"
    precision: str  # "float32" | "mixed_float16"
    jit_compile: bool
    _strategy: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def n_gpus(self) -> int:
        return len(self.devices) if self.kind == "gpu" else 0

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Build, compile and fit inside this scope (strategy / device placement)."""
        if self._strategy is not None:  # a tf.distribute strategy or a keras.distribution.Distribution
            with self._strategy.scope():
                yield
        elif self.backend == "tensorflow" and self.kind == "cpu":
            import tensorflow as tf

            with tf.device("/CPU:0"):
                yield
        else:
            yield

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "kind": self.kind,
            "backend": self.backend,
            "devices": self.devices,
            "n_gpus": self.n_gpus,
            "strategy": self.strategy,
            "precision": self.precision,
            "jit_compile": self.jit_compile,
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
        }


def default_cpu_device() -> DeviceInfo:
    """The CPU in float32 with XLA on: what building and training use when no device is given."""
    return DeviceInfo("cpu", "cpu", keras.backend.backend(), ["cpu"], "default", "float32", True)


def visible_gpus() -> list[str]:
    """Names of the GPUs the current Keras backend can use (no TensorFlow import on other backends)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        try:
            return [str(d) for d in jax.devices("gpu")]
        except RuntimeError:  # no GPU platform
            return []
    if backend == "torch":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return []


def select_device(device: str = "auto", jit_compile: str = "auto", replicas: int | None = None) -> DeviceInfo:
    """Resolve ``device`` ("auto" | "cpu" | "gpu"), ``jit_compile`` ("auto" | "on" | "off") and ``replicas``.

    ``auto``: every visible GPU with mixed precision and XLA, else the CPU (XLA on: the NLSTM's fused
    loops need it to be fast under TensorFlow). ``gpu`` with no GPU raises ``DeviceUnavailableError``.
    ``replicas`` (None: every visible GPU, or one CPU): train data-parallel on that many devices -- the first
    ``replicas`` GPUs, or as many logical CPU devices on a host without one (the multi-device path run
    without accelerators). Several devices use ``tf.distribute.MirroredStrategy`` on TensorFlow and
    ``keras.distribution.DataParallel`` on JAX, scoped to :meth:`DeviceInfo.scope`.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if replicas is not None and replicas < 1:
        raise ValueError(f"replicas must be at least 1 (or None for every visible GPU), got {replicas!r}")
    backend = keras.backend.backend()
    gpus = [] if device == "cpu" else visible_gpus()
    if device == "gpu" and not gpus:
        raise DeviceUnavailableError(
            f"device='gpu' was requested but the Keras backend {backend!r} sees no GPU "
            "(check the driver and CUDA libraries, or set train.device to 'auto' or 'cpu')"
        )
    jit = jit_compile != "off"
    if gpus:
        kind, names, precision = "gpu", _first(gpus, replicas, "GPU", backend), "mixed_float16"
    elif replicas is not None and replicas > 1:
        kind, names, precision = "cpu", _first(logical_cpus(replicas), replicas, "CPU", backend), "float32"
    else:
        return DeviceInfo(device, "cpu", backend, ["cpu"], "default", "float32", jit)
    if len(names) == 1:
        return DeviceInfo(device, kind, backend, names, "default", precision, jit)
    if backend == "tensorflow":
        import tensorflow as tf

        # XLA over the whole train step cannot reach the other replicas' variables (TF's "tf.Variable on a
        # different device" limitation); each replica's step then runs as a graph, the NLSTM's loops still fused.
        strategy = tf.distribute.MirroredStrategy(names)
        return DeviceInfo(device, kind, backend, names, "mirrored", precision, False, strategy)
    if backend == "jax":
        distribution = keras.distribution.DataParallel(devices=names)
        return DeviceInfo(device, kind, backend, names, "data_parallel", precision, jit, distribution)
    raise DeviceUnavailableError(f"data-parallel training on {len(names)} devices is not supported on {backend!r}")


def _first(names: list[str], replicas: int | None, kind: str, backend: str) -> list[str]:
    if replicas is None:
        return names
    if len(names) < replicas:
        hint = (
            "on TensorFlow nestcast creates logical CPU devices itself unless TensorFlow is already initialised"
            if backend == "tensorflow"
            else "on JAX start Python with XLA_FLAGS=--xla_force_host_platform_device_count=N"
        )
        raise DeviceUnavailableError(
            f"replicas={replicas} was requested but the Keras backend {backend!r} has {len(names)} {kind} "
            f"device(s): {names}" + (f" ({hint})" if kind == "CPU" else "")
        )
    return names[:replicas]


def logical_cpus(n: int) -> list[str]:
    """The current backend's CPU devices, split into ``n`` logical ones on TensorFlow when it can still be."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        physical = tf.config.list_physical_devices("CPU")
        if len(physical) == 1 and tf.config.get_logical_device_configuration(physical[0]) is None:
            with contextlib.suppress(RuntimeError):  # TensorFlow already initialised: use what exists
                tf.config.set_logical_device_configuration(
                    physical[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
                )
        return [d.name for d in tf.config.list_logical_devices("CPU")]
    if backend == "jax":
        return keras.distribution.list_devices("cpu")
    return ["cpu"]
