"""Every forecaster a run trains, blends or scores, declared once: its name, label, colour, role and export status.

Training (``core.protocol``), scoring and the report (``core.evaluate``), the gate (``core.gate``) and export read
this table, so a forecaster is added (or removed) here alone, plus its training code. The name is its column in
every predictions file, in ``forecast.parquet`` and in ``metrics.json``.

Roles:
- ``network``: the Nested LSTM (``core.model``, trained by ``core.training``; its encoder comes from ``core.encoders``);
- ``booster``: LightGBM on the named features of ``core.features`` (``core.reference``);
- ``blend``: the network and the booster mixed with weights chosen on the validation months (``core.gate``);
- ``baseline``: computed from the data alone (last month's sales, the mean of the last three, zeros).

``candidate``: the gate may export it. A run's forecast of pairs it cannot score with a model falls back to
the ``baseline`` (the previous month), which the gate exports when no candidate beats it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from core import features
from core.lake import BOOSTER_FILE, NETWORK_FILE

Role = Literal["network", "booster", "blend", "baseline"]


@dataclasses.dataclass(frozen=True)
class Forecaster:
    """One forecaster of the table (see the module docstring)."""

    name: str
    label: str  # the report's name
    short: str  # a table header or a legend entry
    colour: str  # its colour in every plot
    role: Role
    candidate: bool = False
    features: tuple[str, ...] = ()  # a booster's features (core.features names)
    artifact: str | None = None  # the stage file its trained model is saved to


FORECASTERS: tuple[Forecaster, ...] = (
    Forecaster("model", "model (Nested LSTM)", "model", "#d62728", "network", candidate=True,
               artifact=NETWORK_FILE),
    Forecaster("reference", "LightGBM (recipe and launch features)", "LightGBM", "#8c564b", "booster",
               candidate=True, features=features.BOOSTER, artifact=BOOSTER_FILE),
    Forecaster("ensemble", "ensemble (model + LightGBM)", "ensemble", "#ff7f0e", "blend", candidate=True),
    Forecaster("baseline", "previous month (baseline)", "previous month", "#1f77b4", "baseline"),
    Forecaster("mean3", "mean of last 3 months", "mean of last 3", "#2ca02c", "baseline"),
    Forecaster("zeros", "zeros", "zeros", "#7f7f7f", "baseline"),
)
BY_NAME: dict[str, Forecaster] = {f.name: f for f in FORECASTERS}
#: Every name, in report order.
NAMES: tuple[str, ...] = tuple(BY_NAME)
#: What the gate may export, in the order it prefers on a tie.
CANDIDATES: tuple[str, ...] = tuple(f.name for f in FORECASTERS if f.candidate)
NETWORK: Forecaster = next(f for f in FORECASTERS if f.role == "network")
BOOSTERS: tuple[Forecaster, ...] = tuple(f for f in FORECASTERS if f.role == "booster")
#: The blend's members: the network and the first booster.
BLEND: Forecaster = next(f for f in FORECASTERS if f.role == "blend")
BLEND_PARTNER: Forecaster = BOOSTERS[0]
#: Forecasters trained on data (a model file per stage), not computed from it.
TRAINED: tuple[str, ...] = tuple(f.name for f in FORECASTERS if f.role in ("network", "booster"))
#: Forecasters a model makes (scored from predictions files), as opposed to the baselines of the frame.
PREDICTED: tuple[str, ...] = tuple(f.name for f in FORECASTERS if f.role != "baseline")
ARTIFACTS: tuple[str, ...] = tuple(f.artifact for f in FORECASTERS if f.artifact)


def label(name: str) -> str:
    """The report's name of forecaster ``name`` (the name itself when it is not in the table)."""
    return BY_NAME[name].label if name in BY_NAME else name


def short(name: str) -> str:
    return BY_NAME[name].short if name in BY_NAME else name


def colour(name: str) -> str:
    return BY_NAME[name].colour if name in BY_NAME else "#17becf"
