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

#: The modules with the most work (seconds of a full run, docs/tests.md), longest first. ``make test`` hands whole
#: modules to two workers (``--dist loadfile``), each taking the next one as it runs out; longest first, the
#: workers end together instead of one of them finishing the suite alone with a long module that came last.
#: pytest-xdist would order modules by their number of tests, which sends the long system tests (two to four
#: tests each) last. Modules not listed follow in collection order.
LONGEST_FIRST = (
    "test_backtest.py", "test_lake_integrity.py", "test_console.py", "test_flow.py", "test_object_store.py",
    "test_system_server.py", "test_model.py", "test_accountability.py", "test_ingest.py", "test_replay.py",
    "test_nlstm.py", "test_multi_device.py", "test_champion.py", "test_loopback.py", "test_cli.py",
    "test_ingest_reliability.py", "test_quantiles.py", "test_progress.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Keep the module order of ``pytest_collection_modifyitems`` under pytest-xdist (``--no-loadscope-reorder``)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of ``LONGEST_FIRST`` first, in its order; each module's tests stay together and in order."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
