"""The hyperparameter search flow: Optuna (TPE, ask-and-tell) over a small space, one task per trial.

Each trial is a backtest (``search-trial`` task) over the origins; its objective is the mean ratio of
model RMSE to previous-month RMSE. Parameters pinned in ``overrides`` are left out of the space.
Trials go in batches of ``concurrent_trials``: ask that many of the study, submit them together to the
configured task runner (on Dask, side by side on worker processes; on threads, in turn), tell the study
their results in trial order. The batches, not the task runner, decide what the sampler sees, so a search
picks the same trials and finds the same results on either runner.
Results: a table artifact (trials, best first), ``runs/search-<id>/search.md`` and ``best.json``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from prefect import flow, get_run_logger

from core import search as search_step
from core.backtest import PLACEMENT_FIELDS, parse_origins
from core.config import NestcastConfig
from core.files import write_json_atomic
from core.lake import LakePaths
from flows.aggregate_months import aggregate_months
from flows.backtest import training_task_runner
from flows.sales_forecast import build_config
from tasks.backtest import search_report, search_trial
from tasks.common import step_options
from tasks.ingest import ingest_raw_files

DEFAULTS = NestcastConfig()


def _run_batch(
    study: optuna.Study, config: NestcastConfig, size: int, pinned: dict[str, Any], work: dict[str, Any]
) -> list[dict[str, Any]]:
    """Ask ``size`` trials, run them as concurrent tasks, tell the study each result; one row per trial."""
    asked = []
    for _ in range(size):  # suggest right after each ask: the sampler then knows the trials still running
        trial = study.ask()
        asked.append((trial, search_step.suggest(trial, pinned)))
    options = step_options(config, timeout=False)  # submitted: a timeout could not interrupt a worker thread
    futures = [search_trial.with_options(**options).submit(config.with_overrides(**params), trial.number, **work)
               for trial, params in asked]
    rows = []
    for (trial, params), future in zip(asked, futures, strict=True):
        future.wait()
        state = future.state
        if state.is_completed():
            outcome = state.result()
            study.tell(trial, outcome.mean_ratio)
        else:  # a diverged or crashed trial is recorded as failed; the search goes on
            outcome = None
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            get_run_logger().warning("trial %d failed: %s", trial.number, state.message)
        rows.append(search_step.trial_row(trial.number, params, outcome))
    return rows


@flow(name="search-trials", flow_run_name="search-trials")
def _search_trials(
    config: NestcastConfig, trials: int, concurrent_trials: int, seed: int, pinned: dict[str, Any],
    work: dict[str, Any],
) -> dict[str, Any]:
    study = search_step.make_study(seed)
    rows: list[dict[str, Any]] = []
    for done in range(0, trials, concurrent_trials):
        rows += _run_batch(study, config, min(concurrent_trials, trials - done), pinned, work)
    return {"rows": rows, "best": search_step.best_params(study, pinned)}


@flow(name="search", log_prints=True, validate_parameters=True)
def search(
    data_dir: str = str(DEFAULTS.data_dir),
    trials: int = 10,
    origins: list[int] | None = None,
    seed: int = 0,
    concurrent_trials: int = 2,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Search units, depth, lookback, learning rate, batch size and epochs; report the best configuration.

    ``origins`` default to the last three months in the lake; ``seed`` seeds the sampler; ``concurrent_trials``
    trials are asked together and run at once (on ``task_runner=dask``, side by side).
    """
    if concurrent_trials < 1:
        raise ValueError(f"concurrent_trials must be at least 1, got {concurrent_trials}")
    fixed = dict(overrides or {})
    config = build_config(data_dir=data_dir, overrides=fixed)
    options = step_options(config)
    ingested = ingest_raw_files.with_options(**options)(config)
    monthly = aggregate_months(config, ingested)
    months = parse_origins(origins if origins else monthly.months[-3:], last_month=monthly.last_month)
    identity = {k: v for k, v in fixed.items() if k not in PLACEMENT_FIELDS}  # same search, same id, any runner
    key = json.dumps({"fixed": identity, "origins": months, "seed": seed, "trials": trials,
                      "concurrent_trials": concurrent_trials}, sort_keys=True, default=str)
    root = LakePaths.of(config).run_dir(f"search-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    pinned = {k: v for k, v in fixed.items() if k in search_step.SPACE}

    work = {"origins": months, "root": str(root), "monthly": monthly}
    found = _search_trials.with_options(task_runner=training_task_runner(config))(
        config, trials, concurrent_trials, seed, pinned, work
    )
    rows, best = found["rows"], found["best"]
    write_json_atomic(root / "best.json", {"best": best, "origins": months, "overrides": fixed})
    report = search_report.with_options(**options)(config, rows, str(root), best)
    get_run_logger().info("search report: %s; best: %s", report["report"], best)
    return {"run_dir": str(root), "origins": months, "best": best, "rows": search_step.sorted_rows(rows), **report}
