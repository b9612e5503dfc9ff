"""Flow run names that tell runs apart in the UI's list: the forecast month, the encoder, and every run knob that
differs from the defaults (``forecast-2014-05-nlstm-epochs=1-units=16``); replays by their months."""

from __future__ import annotations

from typing import Any

from core.config import RUN_KNOBS, NestcastConfig, knob_default

#: Knobs that say where or how a run ran, not what it forecast with: never in a name (the run's parameters keep
#: them). ``kind`` is always in the name, right after the month.
UNNAMED_KNOBS: tuple[str, ...] = ("data_dir", "kind", "submission_path", "task_runner", "dask_address")


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def changed_knobs(config: NestcastConfig, defaults: NestcastConfig) -> list[str]:
    """``name=value`` of each run knob ``config`` sets apart from ``defaults``, in ``RUN_KNOBS`` order (stable)."""
    return [f"{name}={_shown(knob_default(name, config))}" for name in RUN_KNOBS
            if name not in UNNAMED_KNOBS and knob_default(name, config) != knob_default(name, defaults)]


def forecast_run_name(config: NestcastConfig, defaults: NestcastConfig, month_label: str | None = None,
                      *, failed: bool = False) -> str:
    """``forecast[-failed][-<YYYY-MM>]-<kind>[-<knob>=<value>...]``: the month once the lake says which is forecast,
    ``failed`` for a run that ended in failure."""
    parts = ["forecast", *(["failed"] if failed else []), *([month_label] if month_label else []), config.model.kind]
    return "-".join([*parts, *changed_knobs(config, defaults)])


def replay_run_name(first_label: str, last_label: str) -> str:
    """``replay-<first month>-to-<last month>``, e.g. ``replay-2014-03-to-2014-05``."""
    return f"replay-{first_label}-to-{last_label}"
