"""Step 4: build, train and run the forecaster (a recurrent encoder of the window -> a small head).

One harness for four encoders (``nlstm`` | ``lstm`` | ``gru`` | ``rnn``) so they compare on equal
terms: the window ``sequence`` [b, lookback, channels] goes through the encoder; optional shop and
category embeddings are concatenated to its last state; a head (Dense relu -> Dense(1), float32)
outputs next month's count. Training minimises MSE (or Huber) on the clipped target with Adam,
early-stops on the validation months (best weights restored), writes a checkpoint after every epoch
and resumes from the last one, and records what it ran on in ``metadata.json``.

Device: ``select_device("auto")`` takes every visible GPU (one: the default strategy; several:
``tf.distribute.MirroredStrategy`` on TensorFlow, ``keras.distribution.DataParallel`` on JAX), with
mixed precision and XLA; the CPU otherwise. ``train.replicas`` limits the GPUs, or on a host without one
splits the CPU into that many logical devices, so the multi-device path runs (and is tested) anywhere.
TensorFlow is imported only when it is the Keras backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import keras
import numpy as np

from core.encoders import build_encoder, import_all
from core.errors import DeviceUnavailableError
from core.files import read_json, write_json_atomic
from core.initializers import seeded_initializer
from core.lake import METADATA_FILE, NETWORK_FILE
from core.sampling import EpochShuffled

if TYPE_CHECKING:  # the config pulls in pydantic-settings; the GPU benchmark runs without it
    from core.config import ModelConfig, NestcastConfig, TrainConfig

INPUT_NAMES = ("sequence", "shop", "category")
CHECKPOINT_STATE = "state.json"
EpochCallback = Callable[[int, dict[str, float]], None]
#: The loss as a sample-weighted metric; its epoch mean replaces keras' ``loss`` log (see ``_loss_and_objective``).
OBJECTIVE = "objective"


class FreshModelTracing(logging.Filter):
    """Drops TensorFlow's "N out of the last N calls to ...make_predict_function... triggered tf.function
    retracing" warning, which is about new models, not retracing.

    Every training stage builds a new model, and a new model's predict step is a new ``tf.function`` that traces
    once (``predict`` pads each set's last batch, so one model never sees two shapes). TensorFlow's detector counts
    traces by the function's *code*, shared by every Keras model in the process, so a process that trains many
    models and predicts a set or two with each (``nestcast replay``: three stages a month) reads as "5 out of the
    last 5 calls retraced". Any other retracing warning (a train or evaluate step, a user's function) stays.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and "make_predict_function" in message)


def _quiet_fresh_model_tracing() -> None:
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, FreshModelTracing) for f in logger.filters):
        logger.addFilter(FreshModelTracing())


_quiet_fresh_model_tracing()


# --- device ------------------------------------------------------------------------------------
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


# --- model -------------------------------------------------------------------------------------
def build_model(
    model_cfg: ModelConfig,
    *,
    lookback: int,
    n_channels: int,
    n_shops: int,
    n_categories: int,
    seed: int,
    train_cfg: TrainConfig | None = None,
    device: DeviceInfo | None = None,
    n_static: int = 0,
) -> keras.Model:
    """The compiled forecaster: inputs ``sequence`` / ``shop`` / ``category``, output [b, 1] float32.

    ``n_static > 0`` adds the inputs ``static`` ([b, n_static] floats, the target month's lag features of
    ``core.reference.static_features``) and ``month`` (the target's month of year, embedded), which join the
    encoder's last state in the head: the seasonal and long-lag signal a 12-step recurrence learns poorly
    from two years of data.

    ``train_cfg`` gives the optimiser (Adam, ``learning_rate``) and loss (``mse`` | ``huber``);
    ``device`` the precision and XLA setting (default: float32 on the CPU, XLA on).
    """
    learning_rate = train_cfg.learning_rate if train_cfg is not None else 2e-3
    loss = train_cfg.loss if train_cfg is not None else "mse"
    keras.utils.set_random_seed(seed)
    device = device or DeviceInfo("cpu", "cpu", keras.backend.backend(), ["cpu"], "default", "float32", True)
    dtype = device.precision
    with device.scope():
        sequence = keras.Input((lookback, n_channels), name="sequence", dtype="float32")
        shop = keras.Input((), name="shop", dtype="int32")
        category = keras.Input((), name="category", dtype="int32")
        inputs = {"sequence": sequence, "shop": shop, "category": category}
        features = [build_encoder(model_cfg, seed, dtype)(sequence)]
        if n_static > 0:
            inputs["static"] = keras.Input((n_static,), name="static", dtype="float32")
            inputs["month"] = keras.Input((), name="month", dtype="int32")
            features.append(inputs["static"])
            month = keras.layers.Embedding(
                12, 3, name="month_embedding", dtype=dtype,
                embeddings_initializer=seeded_initializer("uniform", seed, "month"),
            )  # fmt: skip
            features.append(month(inputs["month"]))
        if model_cfg.embeddings:
            for name, inp, size in (("shop", shop, n_shops), ("category", category, n_categories)):
                embedded = keras.layers.Embedding(
                    max(int(size), 1),
                    model_cfg.embedding_dim,
                    name=f"{name}_embedding",
                    dtype=dtype,
                    embeddings_initializer=seeded_initializer("uniform", seed, f"{name}_embedding"),
                )(inp)
                features.append(embedded)
        hidden = features[0] if len(features) == 1 else keras.layers.Concatenate(name="features")(features)
        if model_cfg.head_units > 0:
            hidden = keras.layers.Dense(
                model_cfg.head_units,
                activation="relu",
                name="head",
                dtype=dtype,
                kernel_initializer=seeded_initializer("glorot_uniform", seed, "head"),
            )(hidden)
        # The output stays float32 under mixed precision: the loss is computed on it.
        output = keras.layers.Dense(
            1, name="count", dtype="float32", kernel_initializer=seeded_initializer("glorot_uniform", seed, "count")
        )(hidden)
        model = keras.Model(inputs, output, name=model_cfg.kind)
        optimizer: Any = keras.optimizers.Adam(learning_rate)
        if dtype == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        jit: Any = device.jit_compile
        if jit and model_cfg.kind != "nlstm":
            jit = "auto"  # keras turns XLA off by itself where a layer (cuDNN LSTM/GRU) cannot use it
        loss_fn, objective = _loss_and_objective(loss)
        model.compile(
            optimizer=optimizer,
            loss=loss_fn,
            weighted_metrics=[keras.metrics.RootMeanSquaredError("rmse"), objective],
            jit_compile=jit,
        )
    return model


def _loss_and_objective(loss: str) -> tuple[keras.losses.Loss, keras.metrics.Metric]:
    """The training loss and the same loss as a sample-weighted metric (``OBJECTIVE``).

    Both divide by the weight of the real rows, so a last batch padded with zero weights
    (``EpochShuffled(pad_last=True)``) trains and scores exactly as the short batch would. keras' own
    ``loss`` log weighs every batch by its row count, padding included; ``train_model`` reports
    ``OBJECTIVE`` under that name instead.
    """
    reduction = "mean_with_sample_weight"
    if loss == "huber":
        return keras.losses.Huber(reduction=reduction), keras.metrics.MeanMetricWrapper(keras.losses.huber, OBJECTIVE)
    return (
        keras.losses.MeanSquaredError(reduction=reduction),
        keras.metrics.MeanMetricWrapper(keras.losses.mean_squared_error, OBJECTIVE),
    )


# --- data --------------------------------------------------------------------------------------
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


def _as_dataset(data: Any, batch_size: int, *, shuffle: bool, seed: int) -> Any:
    """Tuples of arrays become ``ArrayBatches`` (last batch padded); datasets (PyDataset, tf.data) pass through."""
    if isinstance(data, tuple) and len(data) in (1, 2) and isinstance(data[0], dict):
        y = data[1] if len(data) == 2 else None
        return ArrayBatches(data[0], y, batch_size, shuffle=shuffle, seed=seed, pad_last=y is not None,
                            endless=shuffle)  # fmt: skip
    return data


def _set_epoch(data: Any, epoch: int) -> None:
    """Position an epoch-seeded dataset (ours or core.window_store's) at ``epoch``; other datasets keep their order."""
    if isinstance(data, EpochShuffled):
        data.set_epoch(epoch)


# --- training ----------------------------------------------------------------------------------
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


def _weights_file(directory: Path, stem: str) -> Path:
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


class _EpochCheckpoint(keras.callbacks.Callback):
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
        _set_epoch(self.data, epoch)
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
            _save_weights_atomic(self.model, _weights_file(self.directory, "best"))
        else:
            state["wait"] += 1
        if self.patience > 0 and state["wait"] >= self.patience:
            self.model.stop_training = True
            state["stopped_early"] = True
        previous = state.get("weights")
        name = f"epoch-{epoch + 1:04d}"
        _save_weights_atomic(self.model, _weights_file(self.directory, name))
        state["epoch"], state["weights"] = epoch + 1, name
        write_json_atomic(self.directory / CHECKPOINT_STATE, state)
        if previous and previous != name:
            _weights_file(self.directory, previous).unlink(missing_ok=True)
        if self.on_epoch is not None:
            self.on_epoch(epoch, logs)


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

    Example: ``CosineLearningRate(4e-3, epochs=3, steps=len(train), floor=0.05).rate(1, 0)`` is 3.05e-3.
    """

    def __init__(self, peak: float, epochs: int, steps: int, floor: float = 0.05) -> None:
        super().__init__()
        if peak <= 0:
            raise ValueError(f"peak must be positive, got {peak}")
        if epochs < 1 or steps < 1:
            raise ValueError(f"epochs and steps must be at least 1, got {epochs} and {steps}")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must lie in [0, 1], got {floor}")
        self.peak, self.epochs, self.steps, self.floor = float(peak), int(epochs), int(steps), float(floor)
        self._epoch = 0

    def rate(self, epoch: int, batch: int) -> float:
        """The rate of batch ``batch`` of epoch ``epoch`` (0-based); past the span, the floor."""
        progress = min((epoch + batch / self.steps) / self.epochs, 1.0)
        return self.peak * (self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.model.optimizer.learning_rate.assign(self.rate(self._epoch, batch))


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


def _resume_state(model: keras.Model, ckpt_dir: Path, train: Any) -> dict[str, Any]:
    """The checkpoint state in ``ckpt_dir`` (a fresh one if none), with its weights loaded into ``model``."""
    state: dict[str, Any] = read_json(ckpt_dir / CHECKPOINT_STATE) or _new_state()
    resumed_from = int(state["epoch"])
    if resumed_from and state.get("weights"):
        # The checkpoint holds optimizer slots too; loading them needs the optimizer's variables to exist.
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(_weights_file(ckpt_dir, state["weights"]))
        _set_epoch(train, resumed_from)
    return state


def _fit(
    model: keras.Model,
    train: Any,
    val: Any,
    train_cfg: TrainConfig,
    device: DeviceInfo,
    checkpoint: _EpochCheckpoint,
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


def _schedule(train_cfg: TrainConfig, epochs: int, train: Any) -> list[keras.callbacks.Callback]:
    if train_cfg.learning_rate_schedule == "constant":
        return []
    try:
        steps = len(train)
    except TypeError as error:  # a tf.data pipeline of unknown cardinality
        raise ValueError("learning_rate_schedule 'cosine' needs training data of known length (batches per epoch); "
                         "give a sized dataset or set learning_rate_schedule='constant'") from error  # fmt: skip
    return [CosineLearningRate(train_cfg.learning_rate, epochs, steps, train_cfg.learning_rate_floor)]


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
    refit passes the selection's maximum so that it follows the selection's curve).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    device = device or DeviceInfo("cpu", "cpu", keras.backend.backend(), ["cpu"], "default", "float32", True)
    keras.utils.set_random_seed(train_cfg.seed)
    train = _as_dataset(train_data, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed)
    val = (
        _as_dataset(val_data, train_cfg.batch_size, shuffle=False, seed=train_cfg.seed)
        if val_data is not None
        else None
    )

    state = _resume_state(model, ckpt_dir, train)
    resumed_from = int(state["epoch"])
    monitor = "val_loss" if val is not None else None
    patience = train_cfg.patience if val is not None else 0
    checkpoint = _EpochCheckpoint(ckpt_dir, state, patience, monitor, on_epoch, train)
    for callback in callbacks:
        if hasattr(callback, "describe"):
            callback.describe(train, device.to_dict())
    schedule = _schedule(train_cfg, schedule_epochs or train_cfg.epochs, train)
    if not (state["stopped_early"] or resumed_from >= train_cfg.epochs):
        _fit(model, train, val, train_cfg, device, checkpoint, resumed_from, [*schedule, *callbacks])
    else:  # a finished stage run again: its model file was missing or damaged (or the cache forgot it)
        logging.getLogger(__name__).warning(_rebuilt_line(run_dir / NETWORK_FILE, resumed_from, train_cfg.epochs))
    best = _weights_file(ckpt_dir, "best")
    if best.exists():
        model.load_weights(best)

    model_path = save_model_atomic(model, run_dir / NETWORK_FILE)
    seconds = checkpoint.epoch_seconds
    result = _train_result(model, state, resumed_from, seconds, started, device, model_path, run_dir)
    _write_metadata(run_dir / METADATA_FILE, model, device, train_cfg, result, seconds, extra_metadata)
    return result


def predict(
    model: keras.Model, data: Any, *, clip_min: float = 0.0, clip_max: float = 20.0, batch_size: int = 4096
) -> np.ndarray:
    """Predictions as a flat float32 array clipped to ``[clip_min, clip_max]`` (the caller's config).

    Every batch keras sees has the full batch shape (the last one padded, the padding's predictions dropped):
    each set's short last batch would otherwise retrace (and on XLA recompile) the predict step, once per set.
    """
    if isinstance(data, dict):
        data = ArrayBatches(data, None, batch_size, shuffle=False)
    elif isinstance(data, tuple) and data and isinstance(data[0], dict):
        data = ArrayBatches(data[0], None, batch_size, shuffle=False)
    with _padded(data) as n_samples:
        values = np.asarray(model.predict(data, verbose=0), dtype=np.float32).reshape(-1)[:n_samples]
    return np.clip(values, clip_min, clip_max)


@contextlib.contextmanager
def _padded(data: Any) -> Iterator[int | None]:
    """``data`` with its last batch padded while predicting (our datasets only; others pass as they are)."""
    if not isinstance(data, EpochShuffled):
        yield None
        return
    before, data.pad_last = data.pad_last, True
    try:
        yield data.n_samples
    finally:
        data.pad_last = before


def load_model(path: str | os.PathLike[str]) -> keras.Model:
    """Load a saved forecaster (``safe_mode`` on: only registered classes are deserialised)."""
    import_all()
    return keras.models.load_model(path, safe_mode=True)


# --- the whole step, as the orchestration calls it ----------------------------------------------
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
) -> TrainResult:
    """One stage of the training protocol on the windows in ``windows_dir``, into ``run_dir``.

    ``select``: train on the targets before the validation months (the months before the holdout) for at most
    ``train.epochs`` epochs, early-stopped on the validation months' grids (best weights kept); its
    ``best_epoch`` is the epoch count the refit uses. ``refit``: train on every training target (through
    the month before the holdout; with a store built without a holdout, through the last month) for exactly
    ``epochs`` epochs with no validation data, keeping the last epoch's weights.
    """
    from core.window_store import WindowStore

    store = WindowStore.open(windows_dir)
    device = select_device(config.train.device, config.train.jit_compile, config.train.replicas)
    train_cfg = config.train
    if stage == "select":
        if store.validation_start is None:
            raise ValueError(f"{windows_dir}: no validation month to select the epoch count on")
        before, val = store.validation_start, store.validation_dataset(train_cfg.batch_size, pad_last=True)
    elif stage == "refit":
        if epochs is None or epochs < 1:
            raise ValueError(f"a refit needs the selected epoch count (>= 1), got {epochs!r}")
        train_cfg = train_cfg.model_copy(update={"epochs": int(epochs)})
        before, val = None, None
    else:
        raise ValueError(f"stage must be 'select' or 'refit', got {stage!r}")
    model = build_model(
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
    train = store.train_dataset(
        train_cfg.batch_size,
        seed=train_cfg.seed,
        budget=train_cfg.sample_budget,
        before_month=before,
        pad_last=True,
        endless=True,  # the batches of every epoch fixed in advance: core.sampling.EpochShuffled
    )
    metadata = {
        "model_config": config.model.model_dump(mode="json"),
        "windows_dir": str(windows_dir),
        "stage": stage,
        "trained_below_month": before if before is not None else store.holdout_month,
        "validation_months": store.validation_months if stage == "select" else None,
    }
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
    )
