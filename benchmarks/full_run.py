"""The forecast flow stage by stage (issue 17: ``make run SCALE=full`` in a working day).

Runs ``sales_forecast`` in this process under a temporary Prefect backend on ``--data-dir`` (writing full-scale
demo data into it when its raw/ is empty), then prints each step's wall time from its Prefect task run, each
training stage's windows, epochs and seconds per epoch, and the holdout scores. ``--set NAME=VALUE`` overrides
any config field, as on the command line.

    .venv/bin/python benchmarks/full_run.py --data-dir /tmp/full
    .venv/bin/python benchmarks/full_run.py --data-dir /tmp/full --set sample_budget=null --tag every-window
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

#: Table rows: a step and the task names (before their run suffix) whose runs it spans.
STEPS: dict[str, tuple[str, ...]] = {
    "ingest": ("ingest",),
    "aggregate": ("plan-months", "aggregate-month", "finish-aggregation"),
    "score earlier forecasts": ("score-forecasts",),
    "windows (evaluation + final)": ("build-windows-evaluation", "build-windows-final"),
    "train: select": ("select",),
    "train: refit holdout": ("refit-holdout",),
    "train: refit final": ("refit-final",),
    "evaluate": ("evaluate",),
    "champion, export, history": ("challenge-champion", "export", "publish-history"),
}


def _task_name(name: str) -> str:
    for prefix in ("build-windows-", "refit-"):
        if name.startswith(prefix):
            return name
    return name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isalnum() and "-" in name else name


def _task_runs() -> list[Any]:
    """Every task run of the temporary backend: the flow's and its aggregation sub-flow's (nothing else ran there)."""
    from prefect.client.orchestration import get_client

    runs: list[Any] = []
    with get_client(sync_client=True) as client:
        while page := client.read_task_runs(limit=200, offset=len(runs)):  # the API's largest page
            runs += page
    return runs


def _step_seconds(runs: list[Any]) -> dict[str, float]:
    spans: dict[str, list[Any]] = {}
    for run in runs:
        spans.setdefault(_task_name(run.name), []).append(run)
    seconds = {}
    for step, names in STEPS.items():
        chosen = [run for name in names for run in spans.get(name, []) if run.start_time and run.end_time]
        if chosen:
            start = min(run.start_time for run in chosen)
            seconds[step] = (max(run.end_time for run in chosen) - start).total_seconds()
    return seconds


def _training_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for stage in ("select", "holdout", "final"):
        metadata = json.loads((run_dir / stage / "metadata.json").read_text())
        timings = metadata.get("timings", {})
        rows.append({
            "stage": stage,
            "epochs": metadata.get("epochs_run"),
            "s/epoch": timings.get("seconds_per_epoch", []),
            "NLSTM s": timings.get("seconds_total"),
            "on": f"{metadata.get('backend')} {metadata.get('device')} {metadata.get('precision')}",
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--scale", default="full", help="demo-data scale written when raw/ is empty")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="NAME=VALUE (JSON or text)")
    parser.add_argument("--tag", default="", help="a label printed with the table")
    args = parser.parse_args()
    overrides = {}
    for pair in args.sets:
        name, _, raw = pair.partition("=")
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw

    raw_dir = args.data_dir / "raw"
    if not raw_dir.is_dir() or not any(raw_dir.iterdir()):
        from core.synthetic import write_competition_files

        started = time.perf_counter()
        write_competition_files(raw_dir, scale=args.scale, seed=0)
        print(f"wrote {args.scale} demo data in {time.perf_counter() - started:.0f} s")

    from prefect.testing.utilities import prefect_test_harness

    from core.config import RUN_KNOBS
    from flows.sales_forecast import sales_forecast

    knobs = {name: overrides.pop(name) for name in list(overrides) if name in RUN_KNOBS}  # the flow's parameters
    with prefect_test_harness(server_startup_timeout=120):
        started = time.perf_counter()
        state = sales_forecast(data_dir=str(args.data_dir.resolve()), **knobs, overrides=overrides, return_state=True)
        total = time.perf_counter() - started
        summary = state.result()
        seconds = _step_seconds(_task_runs())

    settings = knobs | overrides or "defaults"
    print(f"\n{args.tag or 'run'}: settings {settings}; flow {total:.0f} s ({total / 60:.1f} min)")
    print("| step | seconds |\n|---|---:|")
    for step, value in seconds.items():
        print(f"| {step} | {value:.0f} |")
    print("\n| training stage | epochs | s/epoch | NLSTM s | trained on |\n|---|---:|---|---:|---|")
    for row in _training_rows(Path(summary["run_dir"])):
        per_epoch = ", ".join(f"{s:.0f}" for s in row["s/epoch"])
        print(f"| {row['stage']} | {row['epochs']} | {per_epoch} | {row['NLSTM s']:.0f} | {row['on']} |")
    scores = {k: round(v, 4) for k, v in summary.items() if k.endswith("_rmse") and isinstance(v, (int, float))}
    print(f"\nholdout month {summary['holdout_month']} (validation {summary['validation_months']}, "
          f"{summary['train_samples']:,} training windows, {summary['epochs']} epoch(s) selected): {scores}")


if __name__ == "__main__":
    main()
