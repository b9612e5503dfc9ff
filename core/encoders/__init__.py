"""The recurrent encoders the network can read its window with, by name: one module each, registered here in one line.

A module under ``core/encoders/`` defines ``build(config, seed, dtype) -> keras.layers.Layer`` (``config`` is the
``ModelConfig``): the layer that turns the window ``[batch, lookback, channels]`` into one state vector. This
registry imports no keras, so the configuration can check ``model.kind`` against it.

Example, a new encoder: write ``core/encoders/tcn.py`` with ``build``, then add ``"tcn": "core.encoders.tcn"``
below; ``nestcast run --kind tcn`` trains with it, and its source is part of every run directory's identity
(``core.protocol.forecast_run_dir``), so checkpoints of other code are never resumed.
"""

from __future__ import annotations

import importlib
from typing import Any

#: kind -> the module that builds it.
ENCODERS: dict[str, str] = {
    "nlstm": "core.encoders.nested_lstm",
    "lstm": "core.encoders.keras_rnn",
    "gru": "core.encoders.keras_rnn",
    "rnn": "core.encoders.keras_rnn",
}


def build_encoder(config: Any, seed: int, dtype: Any) -> Any:
    """The encoder layer of ``config.kind`` (named ``encoder``)."""
    if config.kind not in ENCODERS:
        raise ValueError(f"unknown model kind {config.kind!r}; registered: {', '.join(ENCODERS)}")
    return importlib.import_module(ENCODERS[config.kind]).build(config, seed, dtype)


def import_all() -> None:
    """Import every registered encoder module, so that keras can deserialise the layers they define."""
    for module in sorted(set(ENCODERS.values())):
        importlib.import_module(module)
