"""Weight initializers seeded per weight, so a seeded model starts from the same weights whatever else the process
draws from python's ``random`` (used by the Nested LSTM, the keras encoders and the forecaster's head)."""

from __future__ import annotations

import zlib
from typing import Any

from keras import initializers


def seeded_initializer(initializer: Any, seed: int | None, name: str) -> Any:
    """``initializer`` with its own seed drawn from ``(seed, name)``; unchanged when ``seed`` is None or it takes
    no seed (``zeros``) or already has one.

    keras gives an unseeded initializer a seed from python's process-wide ``random`` the moment it is built;
    ``keras.utils.set_random_seed`` seeds that, but every other thread of the process (Prefect's client, a Dask
    worker's event loop) draws from it too, so a seeded model built under load started from other weights. A
    seed of its own per weight makes the start a function of ``seed`` alone.
    """
    initializer = initializers.get(initializer)
    config = initializer.get_config() if hasattr(initializer, "get_config") else {}
    if seed is None or "seed" not in config or config["seed"] is not None:
        return initializer
    derived = zlib.crc32(f"{seed}/{name}".encode()) % (2**31 - 1)
    return initializer.__class__.from_config({**config, "seed": derived})
