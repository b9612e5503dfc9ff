"""Keras's own recurrent layers as encoders (``lstm``, ``gru``, ``rnn``): the yardsticks the Nested LSTM is compared
with on equal terms (same window, head and training)."""

from __future__ import annotations

from typing import Any

import keras

from core.initializers import seeded_initializer

LAYERS: dict[str, Any] = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN}


def build(config: Any, seed: int, dtype: Any) -> keras.layers.Layer:
    if config.kind in ("lstm", "gru") and dtype == "mixed_float16" and keras.backend.backend() == "jax":
        dtype = "float32"  # JAX's cuDNN RNN kernels reject float16 (seen on an H100)
    initial = {"kernel_initializer": seeded_initializer("glorot_uniform", seed, "kernel"),
               "recurrent_initializer": seeded_initializer("orthogonal", seed, "recurrent_kernel")}
    return LAYERS[config.kind](config.units, dropout=config.dropout, recurrent_dropout=config.recurrent_dropout,
                               seed=seed, name="encoder", dtype=dtype, **initial)
