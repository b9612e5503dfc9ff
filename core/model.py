"""Step 4: build and run the forecaster (a recurrent encoder of the window -> a small head).

One harness for four encoders (``nlstm`` | ``lstm`` | ``gru`` | ``rnn``) so they compare on equal
terms: the window ``sequence`` [b, lookback, channels] goes through the encoder; optional shop and
category embeddings are concatenated to its last state; a head (Dense relu -> Dense(1), float32)
outputs next month's count. ``build_model`` compiles it (Adam; MSE or Huber on the clipped target),
``predict`` runs it, ``load_model`` reads a saved one.

Around it: ``core.device`` (where it runs), ``core.training`` (fit, early stopping, resume, ``metadata.json``),
``core.checkpoint`` (the files a run writes as it goes), ``core.schedule`` (the learning rate),
``core.batches`` (in-memory arrays as batches).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from core.batches import ArrayBatches
from core.device import DeviceInfo, default_cpu_device
from core.encoders import build_encoder, import_all
from core.features import HEAD, ITEM_IS_NEW
from core.initializers import seeded_initializer
from core.sampling import EpochShuffled

if TYPE_CHECKING:  # the config pulls in pydantic-settings; the GPU benchmark runs without it
    from core.config import ModelConfig, TrainConfig

INPUT_NAMES = ("sequence", "shop", "category")
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
    keras.utils.set_random_seed(seed)
    device = device or default_cpu_device()
    dtype = device.precision
    with device.scope():
        inputs = {
            "sequence": keras.Input((lookback, n_channels), name="sequence", dtype="float32"),
            "shop": keras.Input((), name="shop", dtype="int32"),
            "category": keras.Input((), name="category", dtype="int32"),
        }
        features = [build_encoder(model_cfg, seed, dtype)(inputs["sequence"])]
        if n_static > 0:
            features += _static_features(inputs, n_static, seed, dtype)
        if model_cfg.embeddings:
            features += _id_embeddings(model_cfg, inputs, {"shop": n_shops, "category": n_categories}, seed, dtype)
        count = _head(model_cfg, features, seed, dtype)
        if model_cfg.launch_head and n_static > 0:
            if n_static != len(HEAD):
                raise ValueError(f"launch_head reads item_is_new from the static input of core.features.HEAD "
                                 f"({len(HEAD)} columns), got n_static={n_static}; set launch_head=False for "
                                 f"another static input")
            launch = _head(model_cfg, features, seed, dtype, prefix="launch_")
            count = LaunchGate(HEAD.index(ITEM_IS_NEW), name="launch_gate")([count, launch, inputs["static"]])
        model = keras.Model(inputs, count, name=model_cfg.kind)
        _compile(model, model_cfg, train_cfg, device)
    return model


def _static_features(inputs: dict[str, Any], n_static: int, seed: int, dtype: str) -> list[Any]:
    """Adds the inputs ``static`` and ``month`` to ``inputs``; returns the static features and the embedded month."""
    inputs["static"] = keras.Input((n_static,), name="static", dtype="float32")
    inputs["month"] = keras.Input((), name="month", dtype="int32")
    month = keras.layers.Embedding(
        12, 3, name="month_embedding", dtype=dtype,
        embeddings_initializer=seeded_initializer("uniform", seed, "month"),
    )
    return [inputs["static"], month(inputs["month"])]


def _id_embeddings(
    model_cfg: ModelConfig, inputs: dict[str, Any], sizes: dict[str, int], seed: int, dtype: str
) -> list[Any]:
    """The shop and category ids embedded (``sizes``: how many of each; at least one row per table)."""
    return [
        keras.layers.Embedding(
            max(int(size), 1),
            model_cfg.embedding_dim,
            name=f"{name}_embedding",
            dtype=dtype,
            embeddings_initializer=seeded_initializer("uniform", seed, f"{name}_embedding"),
        )(inputs[name])
        for name, size in sizes.items()
    ]


def _head(model_cfg: ModelConfig, features: list[Any], seed: int, dtype: str, prefix: str = "") -> Any:
    """The features concatenated, through the optional relu layer, to the float32 count (layers named with
    ``prefix``: a second head has its own)."""
    hidden = features[0] if len(features) == 1 else keras.layers.Concatenate(name=f"{prefix}features")(features)
    if model_cfg.head_units > 0:
        hidden = keras.layers.Dense(
            model_cfg.head_units,
            activation="relu",
            name=f"{prefix}head",
            dtype=dtype,
            kernel_initializer=seeded_initializer("glorot_uniform", seed, f"{prefix}head"),
        )(hidden)
    # The output stays float32 under mixed precision: the loss is computed on it.
    return keras.layers.Dense(
        1, name=f"{prefix}count", dtype="float32",
        kernel_initializer=seeded_initializer("glorot_uniform", seed, f"{prefix}count"),
    )(hidden)


@keras.saving.register_keras_serializable(package="nestcast")
class LaunchGate(keras.layers.Layer):
    """The launch head's count where the sample's item is in its launch month, the main head's elsewhere.

    Items new on the forecast day have no sales to encode; a shared head fits them as a compromise with the pairs
    that have a history (a few percent of the rows, a third of the network's squared error on the real slice).

    Args:
        column: the index, in the ``static`` input, of the 0/1 flag ``item_is_new``.

    Call arguments: ``[established, launch, static]``: the two heads' ``[b, 1]`` counts and the static input.
    """

    def __init__(self, column: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(column, int) or column < 0:
            raise ValueError(f"column must be an int >= 0, got {column!r}")
        self.column = column

    def call(self, inputs: list[Any]) -> Any:
        established, launch, static = inputs
        new = keras.ops.cast(static[:, self.column : self.column + 1] > 0.5, established.dtype)
        return established + new * (launch - established)

    def compute_output_shape(self, input_shape: list[Any]) -> Any:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"column": self.column}


def _compile(model: keras.Model, model_cfg: ModelConfig, train_cfg: TrainConfig | None, device: DeviceInfo) -> None:
    """Adam at ``train.learning_rate`` (loss-scaled under mixed precision) on ``train.loss``, XLA per ``device``."""
    learning_rate = train_cfg.learning_rate if train_cfg is not None else 2e-3
    loss = train_cfg.loss if train_cfg is not None else "mse"
    optimizer: Any = keras.optimizers.Adam(learning_rate)
    if device.precision == "mixed_float16":
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
