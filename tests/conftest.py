"""Shared fixtures: quiet TensorFlow, small synthetic lakes made by core.synthetic, a temporary Prefect backend."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TinyData = Callable[..., Path]


def write_tiny_data(root: Path, seed: int = 0) -> Path:
    """``nestcast demo-data ROOT --scale tiny --seed SEED``: the five competition files in ``ROOT/raw``."""
    from core.synthetic import write_competition_files

    write_competition_files(root / "raw", scale="tiny", seed=seed)
    return root


@pytest.fixture(scope="session")
def tiny_data() -> TinyData:
    """``tiny_data(root, seed=0)`` writes tiny synthetic competition files under ``root/raw`` and returns root."""
    return write_tiny_data


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """A temporary Prefect backend for one test module (``pytestmark = pytest.mark.usefixtures("harness")``)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
