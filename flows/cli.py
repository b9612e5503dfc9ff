"""The ``nestcast`` command: demo data, a local run of the forecast flow, serving the deployments."""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from core.config import FLAT_FIELDS, NestcastConfig
from core.errors import NestcastError

# Batch runs are often offline: the temporary server's telemetry would log an ERROR every 10 minutes.
# An explicit PREFECT_SERVER_ANALYTICS_ENABLED still wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    help="nestcast: next month's unit sales for every (shop, item) pair with a Nested LSTM, orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULTS = NestcastConfig()


class Scale(StrEnum):
    tiny = "tiny"
    demo = "demo"
    full = "full"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``--set name=value`` pairs; values are read as JSON when they parse, else as strings."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            _fail(f"--set expects NAME=VALUE, got {pair!r}")
        if name not in FLAT_FIELDS:
            _fail(f"--set: unknown field {name!r}; known: {', '.join(sorted(FLAT_FIELDS))}")
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw
    return overrides


@app.command("demo-data")
def demo_data(
    data_dir: Annotated[Path, typer.Argument(help="Data directory; the five CSVs are written to DATA_DIR/raw/.")],
    scale: Annotated[
        Scale, typer.Option(help="tiny: tests (<1 s); demo: `make run` (~3 min flow); full: competition size.")
    ] = Scale.demo,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes byte-identical files.")] = 0,
) -> None:
    """Write synthetic competition files (sales_train, test, items, item_categories, shops)."""
    from core.synthetic import write_competition_files

    summary = write_competition_files(data_dir / "raw", scale=scale.value, seed=seed)
    typer.echo(f"wrote {scale.value} demo data to {data_dir / 'raw'}: {summary}")


@app.command()
def run(
    data_dir: Annotated[Path, typer.Option(help="Lake root holding raw/ (input) and lake/, runs/, submissions/.")] = (
        DEFAULTS.data_dir
    ),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (early stopping may end sooner).")] = (
        DEFAULTS.train.epochs
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Training batch size.")] = DEFAULTS.train.batch_size,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate.")] = DEFAULTS.train.learning_rate,
    lookback: Annotated[int, typer.Option(min=1, help="Months of history in each window.")] = (
        DEFAULTS.windows.lookback
    ),
    sample_policy: Annotated[
        str, typer.Option(help="Training samples: grid (Kaggle-style), active, or all.")
    ] = DEFAULTS.windows.sample_policy,
    kind: Annotated[str, typer.Option(help="Recurrent encoder: nlstm, lstm, gru or rnn.")] = DEFAULTS.model.kind,
    units: Annotated[int, typer.Option(min=1, help="Recurrent units.")] = DEFAULTS.model.units,
    depth: Annotated[int, typer.Option(min=1, help="NLSTM nesting depth.")] = DEFAULTS.model.depth,
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and dropout.")] = DEFAULTS.train.seed,
    device: Annotated[str, typer.Option(help="auto (every visible GPU, else CPU), cpu or gpu.")] = (
        DEFAULTS.train.device
    ),
    fallback: Annotated[
        str, typer.Option(help="If the model loses to last month's sales: export 'baseline' or 'model'.")
    ] = DEFAULTS.export.fallback,
    task_runner: Annotated[str, typer.Option(help="Per-month fan-out on 'thread' or 'dask'.")] = (
        DEFAULTS.orchestration.task_runner
    ),
    dask_address: Annotated[str | None, typer.Option(help="Existing Dask scheduler (default: local cluster).")] = None,
    submission: Annotated[Path | None, typer.Option(help="Also write the submission CSV to this path.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any other config field by name, e.g. --set max_item_price=50000 (repeatable)."),
    ] = None,
) -> None:
    """Run the whole forecast flow locally (ingest -> aggregate -> windows -> train -> evaluate -> export)."""
    if not (data_dir / "raw").is_dir():
        _fail(
            f"{data_dir / 'raw'} does not exist: put the competition CSVs there "
            f"or run `nestcast demo-data {data_dir}`"
        )
    parameters: dict[str, Any] = {
        "data_dir": str(data_dir), "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "lookback": lookback, "sample_policy": sample_policy, "kind": kind, "units": units, "depth": depth,
        "seed": seed, "device": device, "fallback": fallback, "task_runner": task_runner,
        "dask_address": dask_address, "submission_path": str(submission) if submission else None,
        "overrides": _parse_sets(set_ or []),
    }  # fmt: skip
    try:
        NestcastConfig().with_overrides(**{k: v for k, v in parameters.items() if k != "overrides"})
    except (ValidationError, ValueError) as error:
        _fail(_one_line(error))

    from flows.sales_forecast import sales_forecast

    try:
        summary = sales_forecast(**parameters)
    except NestcastError as error:
        _fail(_one_line(error), code=1)
    typer.echo("")
    typer.echo(f"submission: {summary['submission']}  (exported: {summary['exported']})")
    typer.echo(f"report:     {summary['report']}")
    typer.echo(f"run:        {summary['run_dir']}")
    typer.echo(
        f"holdout RMSE model {summary['model_rmse']:.4f} vs previous month {summary['baseline_rmse']:.4f}"
        f" -> {'beats' if summary['beats_baseline'] else 'does not beat'} the baseline"
    )


@app.command()
def serve() -> None:
    """Serve the 'monthly' (cron) and 'manual' deployments from this process, no worker needed."""
    from deployments.serve import serve_deployments

    serve_deployments()


# --- backtest and search (issue 8) -----------------------------------------------------------------
def _origins(text: str | None) -> list[int] | None:
    from core.backtest import parse_origins

    try:
        return parse_origins(text) if text else None
    except ValueError as error:
        _fail(f"--origins: {_one_line(error)}")
        return None


def _need_raw(data_dir: Path) -> None:
    if not (data_dir / "raw").is_dir():
        _fail(f"{data_dir / 'raw'} does not exist: put the competition CSVs there "
              f"or run `nestcast demo-data {data_dir}`")


@app.command()
def backtest(
    data_dir: Annotated[Path, typer.Option(help="Lake root holding raw/.")] = DEFAULTS.data_dir,
    origins: Annotated[
        str | None, typer.Option(help="Comma-separated origin months to score, e.g. 26,27,28 (default: last 3).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = DEFAULTS.train.epochs,
    batch_size: Annotated[int, typer.Option(min=1, help="Training batch size.")] = DEFAULTS.train.batch_size,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate.")] = DEFAULTS.train.learning_rate,
    lookback: Annotated[int, typer.Option(min=1, help="Months of history in each window.")] = (
        DEFAULTS.windows.lookback
    ),
    sample_policy: Annotated[str, typer.Option(help="Training samples: grid, active, or all.")] = (
        DEFAULTS.windows.sample_policy
    ),
    kind: Annotated[str, typer.Option(help="Recurrent encoder: nlstm, lstm, gru or rnn.")] = DEFAULTS.model.kind,
    units: Annotated[int, typer.Option(min=1, help="Recurrent units.")] = DEFAULTS.model.units,
    depth: Annotated[int, typer.Option(min=1, help="NLSTM nesting depth.")] = DEFAULTS.model.depth,
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and dropout.")] = DEFAULTS.train.seed,
    device: Annotated[str, typer.Option(help="auto, cpu or gpu.")] = DEFAULTS.train.device,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other config field, NAME=VALUE.")] = None,
) -> None:
    """Rolling backtest: for each origin month, train on the months before it and score it vs the baselines."""
    _need_raw(data_dir)
    parameters: dict[str, Any] = {
        "data_dir": str(data_dir), "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "lookback": lookback, "sample_policy": sample_policy, "kind": kind, "units": units, "depth": depth,
        "seed": seed, "device": device,
    }  # fmt: skip
    overrides = _parse_sets(set_ or [])
    months = _origins(origins)
    try:
        NestcastConfig().with_overrides(**parameters, **overrides)
    except (ValidationError, ValueError) as error:
        _fail(_one_line(error))

    from flows.backtest import backtest as backtest_flow

    try:
        summary = backtest_flow(**parameters, origins=months, overrides=overrides)
    except NestcastError as error:
        _fail(_one_line(error), code=1)
    typer.echo("")
    typer.echo(Path(summary["report"]).read_text(encoding="utf-8"))
    typer.echo(f"report: {summary['report']}")


@app.command()
def search(
    data_dir: Annotated[Path, typer.Option(help="Lake root holding raw/.")] = DEFAULTS.data_dir,
    trials: Annotated[int, typer.Option(min=1, help="Number of Optuna trials (each one a backtest).")] = 10,
    origins: Annotated[str | None, typer.Option(help="Comma-separated origin months (default: last 3).")] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Pin a config field, NAME=VALUE (pinned search parameters leave the space)."),
    ] = None,
) -> None:
    """Hyperparameter search (units, depth, lookback, learning rate, batch size, epochs) by backtest."""
    _need_raw(data_dir)
    overrides = _parse_sets(set_ or [])
    months = _origins(origins)
    try:
        NestcastConfig().with_overrides(data_dir=str(data_dir), **overrides)
    except (ValidationError, ValueError) as error:
        _fail(_one_line(error))

    from flows.search import search as search_flow

    try:
        summary = search_flow(data_dir=str(data_dir), trials=trials, origins=months, seed=seed, overrides=overrides)
    except NestcastError as error:
        _fail(_one_line(error), code=1)
    typer.echo("")
    typer.echo(Path(summary["report"]).read_text(encoding="utf-8"))
    typer.echo(f"report: {summary['report']}")


def _one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return " ".join(str(error).split()) or type(error).__name__


def main() -> None:
    try:
        app()
    except (ValidationError, ValueError, NestcastError) as error:
        typer.secho(f"error: {_one_line(error)}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
