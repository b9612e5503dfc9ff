"""The Nested LSTM encoder (Moniz & Krueger 2018; the layer is ``core.nlstm.NestedLSTM``)."""

from __future__ import annotations

from typing import Any

from core.nlstm import NestedLSTM


def build(config: Any, seed: int, dtype: Any) -> NestedLSTM:
    return NestedLSTM(config.units, depth=config.depth, dropout=config.dropout,
                      recurrent_dropout=config.recurrent_dropout, seed=seed, name="encoder", dtype=dtype)
