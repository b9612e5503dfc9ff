"""Hyperparameter search over a small space with Optuna (TPE): the space, the study, the report.

The objective of a trial is the backtest's mean ratio of model RMSE to previous-month RMSE over the
origins (:attr:`core.backtest.BacktestResult.mean_ratio`), lower is better. The orchestration asks the
study for a batch of trials, runs their backtests as concurrent tasks and tells the study the results
(ask-and-tell), so each trial is one task (``flows/search.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from core.backtest import BacktestResult, markdown_table
from core.files import write_text_atomic

REPORT_FILE = "search.md"

#: name -> ("int", low, high) | ("log", low, high) | ("choice", [values]); names are flat config fields.
SPACE: dict[str, tuple[Any, ...]] = {
    "units": ("choice", [16, 32, 48, 64]),
    "depth": ("int", 1, 3),
    "lookback": ("choice", [6, 9, 12, 18]),
    "learning_rate": ("log", 5e-4, 1e-2),
    "batch_size": ("choice", [128, 256, 512, 1024]),
    "epochs": ("int", 2, 10),
}


def make_study(seed: int = 0) -> optuna.Study:
    """An in-memory study minimising the ratio, with a seeded TPE sampler (same seed, same trials).

    Trials are asked in batches (``flows/search.py``); the constant liar makes TPE treat the batch's trials
    still running as bad results, so one batch does not ask the same point twice. With nothing running (a
    batch of one) it changes nothing.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # constant_liar is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.create_study(direction="minimize", sampler=sampler)


def suggest(trial: optuna.Trial, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Values for every :data:`SPACE` parameter not pinned in ``fixed``."""
    fixed = fixed or {}
    params: dict[str, Any] = {}
    for name, spec in SPACE.items():
        if name in fixed:
            continue
        kind = spec[0]
        if kind == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2])
        elif kind == "log":
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=True)
        elif kind == "choice":
            params[name] = trial.suggest_categorical(name, spec[1])
        else:
            raise ValueError(f"unknown search space kind {kind!r} for {name}")
    return params


def trial_row(number: int, params: dict[str, Any], outcome: BacktestResult | None) -> dict[str, Any]:
    """One table row: the trial's parameters, its objective and cost (``outcome``: None when it failed)."""
    row: dict[str, Any] = {"trial": number}
    row.update({name: round(v, 6) if isinstance(v, float) else v for name, v in params.items()})
    if outcome is None:
        return row | {"model_vs_previous": None, "params": None, "train_s": None, "state": "failed"}
    return row | {
        "model_vs_previous": round(outcome.mean_ratio, 4),
        "params": outcome.params,
        "train_s": round(outcome.train_seconds, 1),
        "state": "complete",
    }


def sorted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best (lowest ratio) first; failed trials last."""
    return sorted(rows, key=lambda r: (r["model_vs_previous"] is None, r["model_vs_previous"] or 0.0, r["trial"]))


def render_search_report(rows: Sequence[dict[str, Any]], best: dict[str, Any]) -> str:
    ranked = sorted_rows(rows)
    headers = {key: key for key in ranked[0]} if ranked else {"trial": "trial"}
    lines = [
        "# Hyperparameter search",
        "",
        f"{len(rows)} trials; objective: mean over origins of model RMSE / previous-month RMSE (lower is better).",
        "",
        "## Best configuration",
        "",
        markdown_table([{"field": k, "value": v} for k, v in best.items()]) if best else "(no trial completed)",
        "",
        "## Trials (best first)",
        "",
        markdown_table(ranked, headers) if ranked else "(none)",
    ]
    return "\n".join(lines) + "\n"


def write_search_report(rows: Sequence[dict[str, Any]], best: dict[str, Any], path: str | Path) -> Path:
    return write_text_atomic(Path(path), render_search_report(rows, best))


def best_params(study: optuna.Study, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The best trial's parameters plus the pinned ones, and its objective (empty if none completed)."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return {}
    best = min(done, key=lambda t: t.value if t.value is not None else math.inf)
    return {**(fixed or {}), **best.params, "model_vs_previous": best.value, "trial": best.number}

