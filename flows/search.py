"""The hyperparameter search flow: Optuna (TPE, ask-and-tell) over a small space, one task per trial.

Each trial is a backtest (``search-trial`` task) over the origins; its objective is the mean ratio of
model RMSE to previous-month RMSE. Parameters pinned in ``overrides`` are left out of the space.
Results: a table artifact (trials, best first), ``runs/search-<id>/search.md`` and ``best.json``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from prefect import flow, get_run_logger

from core import search as search_step
from core.backtest import parse_origins
from core.config import NestcastConfig
from core.lake import LakePaths, write_json_atomic
from flows.aggregate_months import aggregate_months
from flows.sales_forecast import build_config
from tasks.backtest import search_report, search_trial
from tasks.common import step_options
from tasks.ingest import ingest_raw_files

DEFAULTS = NestcastConfig()


@flow(name="search", log_prints=True, validate_parameters=True)
def search(
    data_dir: str = str(DEFAULTS.data_dir),
    trials: int = 10,
    origins: list[int] | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Search units, depth, lookback, learning rate, batch size and epochs; report the best configuration.

    ``origins`` default to the last three months in the lake; ``seed`` seeds the sampler.
    """
    fixed = dict(overrides or {})
    config = build_config(data_dir=data_dir, overrides=fixed)
    options = step_options(config)
    ingested = ingest_raw_files.with_options(**options)(config)
    monthly = aggregate_months(config, ingested)
    months = parse_origins(origins if origins else monthly["months"][-3:], last_month=max(monthly["months"]))
    key = json.dumps({"fixed": fixed, "origins": months, "seed": seed, "trials": trials}, sort_keys=True, default=str)
    root = LakePaths.of(config).run_dir(f"search-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    pinned = {k: v for k, v in fixed.items() if k in search_step.SPACE}

    study = search_step.make_study(seed)
    rows = []
    logger = get_run_logger()
    for _ in range(trials):
        trial = study.ask()
        params = search_step.suggest(trial, pinned)
        state = search_trial.with_options(**options)(
            config.with_overrides(**params), trial.number, months, str(root), monthly, return_state=True
        )
        if state.is_completed():
            outcome = state.result()
            study.tell(trial, float(outcome["mean_ratio"]))
        else:  # a diverged or crashed trial is recorded as failed; the search goes on
            outcome = None
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            logger.warning("trial %d failed: %s", trial.number, state.message)
        rows.append(search_step.trial_row(trial.number, params, outcome))

    best = search_step.best_params(study, pinned)
    write_json_atomic(root / "best.json", {"best": best, "origins": months, "overrides": fixed})
    report = search_report.with_options(**options)(rows, str(root), best)
    logger.info("search report: %s; best: %s", report["report"], best)
    return {"run_dir": str(root), "origins": months, "best": best, "rows": search_step.sorted_rows(rows), **report}
