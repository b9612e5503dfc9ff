"""The ``nestcast`` command: demo data, a local run of the forecast flow, serving the deployments.

It sits at the top of the import graph (core <- tasks <- flows <- deployments <- this module, which nothing
imports): it starts flows and serves deployments. The options of ``run`` and ``backtest`` are rendered from
the run knobs (``core.config.RUN_KNOBS``), as the flows' parameters are.

Everything the user can get wrong (options, ``--set`` values, ``NESTCAST_*`` variables, the data directory)
is checked before a flow starts and reported as one line, ``error: ...``, with exit code 2.
"""

from __future__ import annotations

# Before anything can import TensorFlow: its C++ loggers read their levels once, at import.
from deployments import console

if not console.wants_verbose():
    console.quiet_native_logs()

import inspect
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, Union, get_args, get_origin

import typer
from pydantic import ValidationError

from core.config import (
    BACKTEST_KNOBS,
    FLAT_FIELDS,
    RUN_KNOBS,
    ConfigEnvironmentError,
    NestcastConfig,
    config_from_environment,
    environment_warnings,
    knob_default,
    knob_field,
)
from core.errors import NestcastError
from core.store import data_dir_identity
from deployments.server import prefect_api

#: The flow run every command starts carries these tags (deployment runs carry the deployments' ``nestcast``).
CLI_TAGS = ("nestcast", "cli")
VERBOSE_HELP = "Show every library's console output (TensorFlow, each task run's state), as before."
Verbose = Annotated[bool, typer.Option("--verbose", help=VERBOSE_HELP)]

# Batch runs are often offline: the temporary server's telemetry would log an ERROR every 10 minutes.
# An explicit PREFECT_SERVER_ANALYTICS_ENABLED still wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# core/ logs with the standard library (it never imports prefect): its warnings (a model file rebuilt from its
# checkpoints) also go to the run's log in the UI. Read when prefect is first imported, which is after this line.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "core")

app = typer.Typer(
    help="nestcast: next month's unit sales for every (shop, item) pair with a Nested LSTM, orchestrated by Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _defaults() -> tuple[NestcastConfig, ConfigEnvironmentError | None]:
    """The option defaults: the config with ``NESTCAST_*`` applied, or (if one is bad) the plain defaults and
    the error, which ``main`` and every command report before doing anything else."""
    try:
        return config_from_environment(), None
    except ConfigEnvironmentError as error:
        return NestcastConfig.model_construct(), error


DEFAULTS, _ENVIRONMENT_ERROR = _defaults()


class Scale(StrEnum):
    tiny = "tiny"
    demo = "demo"
    full = "full"


# flow parameter -> CLI option, where the names differ
_OPTION_OF = {"submission_path": "submission"}
_KNOB_OF = {option: name for name, option in _OPTION_OF.items()}


def _choices(name: str) -> type[StrEnum] | None:
    """An enum of a config field's Literal values, so that ``--help`` lists them and typer checks them."""
    values = get_args(knob_field(name).annotation)
    if not values or not all(isinstance(v, str) for v in values):
        return None
    return StrEnum("".join(part.title() for part in name.split("_")), {v: v for v in values})  # type: ignore[return-value]


def _knob_option(name: str) -> inspect.Parameter:
    """``--<knob>``: the config field's type (Literal -> choices), bounds, default (``NESTCAST_*`` applied), help."""
    field = knob_field(name)
    annotation, default = field.annotation, knob_default(name, DEFAULTS)
    choices = _choices(name)
    optional = get_origin(annotation) in (Union, type(int | None)) and type(None) in get_args(annotation)
    if annotation == Path | str:  # data_dir: a folder or an object store's URL (a Path would fold s3:// to s3:/)
        annotation = str
    if choices is not None:
        annotation, default = choices, choices(default)
    elif optional:
        (inner,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = inner | None
    lower = [meta.ge for meta in field.metadata if hasattr(meta, "ge")]
    upper = [meta.le for meta in field.metadata if hasattr(meta, "le")]
    bounds = ({"min": lower[0]} if lower else {}) | ({"max": upper[0]} if upper else {})  # as the flow's schema
    option = typer.Option(help=RUN_KNOBS[name], **bounds)
    return inspect.Parameter(_OPTION_OF.get(name, name), inspect.Parameter.KEYWORD_ONLY,
                             default=default, annotation=Annotated[annotation, option])


def _with_knob_options(knobs: tuple[str, ...]) -> Any:
    """Add one option per knob to a command written as ``command(ctx, <own options>, **knobs)``."""

    def decorate(command: Any) -> Any:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        ctx, rest = own[0], [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[1:]]
        parameters = [ctx, *(_knob_option(name) for name in knobs), *rest]
        command.__signature__ = inspect.Signature(parameters, return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}
        return command

    return decorate


def _knob_values(options: dict[str, Any]) -> dict[str, Any]:
    """The commands' knob options under their config names (``submission`` -> ``submission_path``)."""
    return {_KNOB_OF.get(option, option): value for option, value in options.items()}


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {console.printable(message)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _check_environment() -> None:
    """A bad ``NESTCAST_*`` value is an error (naming the variable); an unknown one a warning."""
    if _ENVIRONMENT_ERROR is not None:
        _fail(str(_ENVIRONMENT_ERROR))
    for line in environment_warnings():
        typer.secho(f"warning: {console.printable(line)}", err=True, fg=typer.colors.YELLOW)


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


def _plain(value: Any) -> Any:
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def _same_setting(name: str, first: Any, second: Any) -> bool:
    """Whether two values mean the same for config field ``name`` (``2`` and ``"2"``, ``1e-3`` and ``0.001``)."""
    try:
        return (
            DEFAULTS.with_overrides({name: first}).flat()[name]
            == DEFAULTS.with_overrides({name: second}).flat()[name]
        )
    except (ValidationError, ValueError):
        return bool(first == second)


def _merge_sets(ctx: typer.Context, parameters: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """Fold ``--set`` values for fields that also have their own option into ``parameters``.

    ``--set`` wins over an option left at its default; an option given explicitly with a different value
    is an error naming both. Returns the remaining ``--set`` values (fields without an option).
    """
    rest: dict[str, Any] = {}
    for name, value in sets.items():
        if name not in parameters:
            rest[name] = value
            continue
        option = _OPTION_OF.get(name, name)
        source = ctx.get_parameter_source(option)
        given = source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")
        if given and not _same_setting(name, _plain(parameters[name]), value):
            flag = "--" + option.replace("_", "-")
            _fail(f"{flag} {_plain(parameters[name])} and --set {name}={json.dumps(value)} disagree; give only one")
        parameters[name] = value
    return rest


def _build_config(parameters: dict[str, Any], sets: dict[str, Any]) -> NestcastConfig:
    """The run's whole configuration: the options given, and every ``--set`` (``null`` included); a bad value is a
    one-line error."""
    try:
        return DEFAULTS.with_overrides({name: _plain(value) for name, value in sets.items()},
                                       **{name: _plain(value) for name, value in parameters.items()})
    except (ValidationError, ValueError) as error:
        _fail(_one_line(error))


# --- paths: checked before the flow, so a file in the way is one line, not a traceback after retries ---
def _check_directory(path: Path, what: str) -> None:
    """``path`` is a directory, or can be made one: nothing on its way is a file."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            if candidate != path and not os.access(candidate, os.W_OK | os.X_OK):
                _fail(f"{what} {path} cannot be created: {candidate} is not writable")
            return
        if candidate.exists() or candidate.is_symlink():
            if candidate == path:
                _fail(f"{what} {path} is a file, not a directory")
            _fail(f"{what} {path} cannot be created: {candidate} is a file, not a directory")


def _check_store(url: str) -> None:
    """An object-store data directory answers, holds raw/ files, and has a working copy that can be made."""
    from core.store import store_of

    try:
        store = store_of(url)
        problem = store.raw_problem()
    except NestcastError as error:
        _fail(_one_line(error))
    if problem is not None:
        _fail(problem)
    _check_directory(store.root, "working copy of " + url)


def _store_urls(summary: dict[str, Any], config: NestcastConfig) -> dict[str, Any]:
    """A flow's summary with its paths as the store's URLs when the data directory is an object store (the paths
    are the working copy's; the store is where the files are kept)."""
    from core.store import store_of

    store = store_of(config.data_dir)
    if store is None:
        return summary
    return {key: store.url_of(value) if isinstance(value, str) else value for key, value in summary.items()}


def _check_data_dir(config: NestcastConfig) -> None:
    from core.lake import LakePaths
    from core.store import is_remote

    data_dir = config.data_dir
    if is_remote(data_dir):
        _check_store(str(data_dir))
        return
    _check_directory(data_dir, "data directory")
    if not (data_dir / "raw").is_dir():
        if (data_dir / "raw").exists():
            _fail(f"{data_dir / 'raw'} is a file, not a directory: it must hold the competition CSVs")
        _fail(
            f"{data_dir / 'raw'} does not exist: put the competition CSVs there or run `nestcast demo-data {data_dir}`"
        )
    for name, path in LakePaths(data_dir).directories().items():  # lake/, runs/, submissions/, the lake's folders
        _check_directory(path, f"{name} directory")


def _check_submission(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        _fail(f"--submission {path} is a directory; give a file path")
    _check_directory(path.parent, f"--submission {path}: directory")


# --- what every command's flow runs inside ---------------------------------------------------------
@contextmanager
def cli_run(verbose: bool) -> Iterator[str | None]:
    """What every flow the CLI starts runs inside: the Prefect API and (unless ``verbose``) the console filters,
    added again here because importing the flows may set Prefect's logging up anew."""
    if not verbose:
        console.quiet_prefect_console()
    with prefect_api() as api_url:
        yield api_url


def cli_tagged(flow: Any) -> Any:
    """``flow`` with ``CLI_TAGS`` put on its flow run once it runs. Not ``prefect.tags``: that tags every task run
    too, and Prefect asks the server for a concurrency slot of each task tag before every task run."""

    def tag_flow_run(_flow: Any, flow_run: Any, _state: Any) -> None:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *CLI_TAGS}))

    return flow.with_options(on_running=[*flow.on_running_hooks, tag_flow_run])


# --- commands ---------------------------------------------------------------------------------------
@app.command("demo-data")
def demo_data(
    data_dir: Annotated[
        str, typer.Argument(help="Data directory or object-store URL; the five CSVs are written to DATA_DIR/raw/.")
    ],
    scale: Annotated[
        Scale, typer.Option(help="tiny: tests (<1 s); demo: `make run` (~3 min flow); full: competition size.")
    ] = Scale.demo,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes byte-identical files.")] = 0,
) -> None:
    """Write synthetic competition files (sales_train, test, items, item_categories, shops)."""
    _check_environment()
    from core.store import is_remote
    from core.synthetic import write_competition_files

    if is_remote(data_dir):
        _demo_data_to_store(data_dir, scale, seed)
        return
    local = Path(data_dir).expanduser()
    _check_directory(local, "data directory")
    _check_directory(local / "raw", "raw directory")
    summary = write_competition_files(local / "raw", scale=scale.value, seed=seed)
    typer.echo(f"wrote {scale.value} demo data to {local / 'raw'}: {summary}")


def _demo_data_to_store(url: str, scale: Scale, seed: int) -> None:
    """Write the files locally, then put them under ``<url>/raw/`` (a store has nowhere to write them in place)."""
    import tempfile

    from core.store import store_of
    from core.synthetic import write_competition_files

    try:
        store = store_of(url)
        with tempfile.TemporaryDirectory(prefix="nestcast-demo-") as folder:
            summary = write_competition_files(Path(folder), scale=scale.value, seed=seed)
            names = store.upload_raw(Path(folder))
    except NestcastError as error:
        _fail(_one_line(error))
    except OSError as error:
        _fail(f"{url}/raw: {error}")
    typer.echo(f"wrote {scale.value} demo data to {store.url}/raw: {', '.join(names)} ({summary.rows:,} sales rows)")


@app.command()
@_with_knob_options(tuple(RUN_KNOBS))
def run(
    ctx: typer.Context,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any other config field by name, e.g. --set max_item_price=50000 (repeatable)."),
    ] = None,
    verbose: Verbose = False,
    **knobs: Any,
) -> None:
    """Run the whole forecast flow locally (ingest -> aggregate -> windows -> train -> evaluate -> export)."""
    _check_environment()
    parameters = _knob_values(knobs)
    overrides = _merge_sets(ctx, parameters, _parse_sets(set_ or []))
    config = _build_config(parameters, overrides)
    _check_data_dir(config)
    _check_submission(config.export.submission_path)
    parameters = {name: _plain(value) for name, value in parameters.items()}
    parameters["data_dir"] = data_dir_identity(config.data_dir)  # the flow, its log and the UI say where

    from core.display import forecast_summary_lines
    console.quiet_console(verbose)  # before the flow's imports pull in TensorFlow
    from flows.sales_forecast import sales_forecast

    try:
        with cli_run(verbose):
            summary = cli_tagged(sales_forecast)(**parameters, overrides=overrides)
    except NestcastError as error:
        _fail(_one_line(error), code=1)
    typer.echo("")
    for line in forecast_summary_lines(_store_urls(summary, config), config.ingest.first_month):
        typer.echo(line)


@app.command()
def serve(
    data_dir: Annotated[
        str, typer.Option(help="The deployments' default data directory (the form's data_dir; a run may change it).")
    ] = str(DEFAULTS.data_dir),
    verbose: Verbose = False,
) -> None:
    """Serve the 'monthly' (cron) and 'manual' deployments from this process, no worker needed."""
    _check_environment()
    config = _build_config({"data_dir": data_dir}, {})
    _check_data_dir(config)
    default = data_dir_identity(config.data_dir)
    console.quiet_console(verbose)
    from deployments.serve import serve_deployments

    typer.echo(f"data directory: {default} (the deployments' default data_dir)")
    serve_deployments({"data_dir": default})


# --- backtest and search (issue 8) -----------------------------------------------------------------
def _origins(text: str | None) -> list[int] | None:
    from core.backtest import parse_origins

    try:
        return parse_origins(text) if text else None
    except ValueError as error:
        _fail(f"--origins: {_one_line(error)}")
        return None


@app.command()
@_with_knob_options(BACKTEST_KNOBS)
def backtest(
    ctx: typer.Context,
    origins: Annotated[
        str | None, typer.Option(help="Comma-separated origin months to score, e.g. 26,27,28 (default: last 3).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other config field, NAME=VALUE.")] = None,
    verbose: Verbose = False,
    **knobs: Any,
) -> None:
    """Rolling backtest: for each origin month, train on the months before it and score it vs the baselines."""
    _check_environment()
    parameters = _knob_values(knobs)
    overrides = _merge_sets(ctx, parameters, _parse_sets(set_ or []))
    months = _origins(origins)
    config = _build_config(parameters, overrides)
    _check_data_dir(config)
    parameters = {name: _plain(value) for name, value in parameters.items()}

    console.quiet_console(verbose)  # before the flow's imports pull in TensorFlow
    from flows.backtest import backtest as backtest_flow

    try:
        with cli_run(verbose):
            summary = cli_tagged(backtest_flow)(**parameters, origins=months, overrides=overrides)
    except NestcastError as error:
        _fail(_one_line(error), code=1)
    typer.echo("")
    typer.echo(Path(summary["report"]).read_text(encoding="utf-8"))
    typer.echo(f"report: {_store_urls(summary, config)['report']}")


@app.command()
def search(
    ctx: typer.Context,
    data_dir: Annotated[str, typer.Option(help="Lake root holding raw/ (a folder or a store URL).")] = str(
        DEFAULTS.data_dir
    ),
    trials: Annotated[int, typer.Option(min=1, help="Number of Optuna trials (each one a backtest).")] = 10,
    origins: Annotated[str | None, typer.Option(help="Comma-separated origin months (default: last 3).")] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Pin a config field, NAME=VALUE (pinned search parameters leave the space)."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Hyperparameter search (units, depth, lookback, learning rate, batch size, epochs) by backtest."""
    _check_environment()
    parameters: dict[str, Any] = {"data_dir": data_dir}
    overrides = _merge_sets(ctx, parameters, _parse_sets(set_ or []))  # --seed is the sampler's, not a field
    months = _origins(origins)
    config = _build_config(parameters, overrides)
    _check_data_dir(config)

    console.quiet_console(verbose)  # before the flow's imports pull in TensorFlow
    from flows.search import search as search_flow

    try:
        with cli_run(verbose):
            summary = cli_tagged(search_flow)(
                data_dir=_plain(parameters["data_dir"]), trials=trials, origins=months, seed=seed, overrides=overrides
            )
    except NestcastError as error:
        _fail(_one_line(error), code=1)
    typer.echo("")
    typer.echo(Path(summary["report"]).read_text(encoding="utf-8"))
    typer.echo(f"report: {_store_urls(summary, config)['report']}")


# --- replay (issue 13) --------------------------------------------------------------------------------
@app.command()
@_with_knob_options(tuple(RUN_KNOBS))
def replay(
    ctx: typer.Context,
    from_month: Annotated[int, typer.Option("--from-month", help="First forecast month to replay (date_block_num).")],
    to_month: Annotated[
        int | None, typer.Option("--to-month", help="Last forecast month (default: the history's last month).")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="The replay's data directory (default: DATA_DIR/replay-K-E).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other config field, NAME=VALUE.")] = None,
    verbose: Verbose = False,
    **knobs: Any,
) -> None:
    """Replay months K..E of the history in --data-dir as the monthly schedule would have run them, one forecast
    flow run per month under one parent flow run; ends with the accountability table (one record per month)."""
    _check_environment()
    parameters = _knob_values(knobs)
    overrides = _merge_sets(ctx, parameters, _parse_sets(set_ or []))
    config = _build_config(parameters, overrides)
    from core.replay import plan
    from core.store import is_remote

    if is_remote(config.data_dir):  # the replay stages a month's drop into local folders: its history must be one
        _fail(f"replay reads its history from a folder; {config.data_dir} is an object store (copy it locally first)")
    try:  # the history (DATA_DIR/raw/ or DATA_DIR itself) and the months, checked before a flow starts
        replay_plan = plan(config.data_dir, from_month, to_month, work_dir)
    except (ValueError, NestcastError) as error:
        _fail(_one_line(error))
    _check_directory(replay_plan.workspace, "replay data directory")
    parameters = {name: _plain(value) for name, value in parameters.items()}
    parameters["data_dir"] = data_dir_identity(config.data_dir)

    console.quiet_console(verbose)  # before the flow's imports pull in TensorFlow
    from flows.replay import replay as replay_flow

    try:
        with cli_run(verbose):
            summary = cli_tagged(replay_flow)(
                **parameters, from_month=from_month, to_month=to_month,
                workspace=None if work_dir is None else str(work_dir.resolve()), overrides=overrides,
            )
    except NestcastError as error:
        _fail(_one_line(error), code=1)
    typer.echo("")
    typer.echo(summary["markdown"])
    typer.echo(f"replay data directory: {summary['workspace']}")
    typer.echo(f"accountability records: {summary['records']}")


def _one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors():
            field = ".".join(map(str, item["loc"]))
            given = item.get("input")
            shown = "" if not field or isinstance(given, dict) else f" (got {given!r})"
            parts.append(f"{field or 'config'}: {item['msg']}{shown}")
        return "; ".join(parts)
    return " ".join(str(error).split()) or type(error).__name__


def main() -> None:
    if _ENVIRONMENT_ERROR is not None:  # before typer: `NESTCAST_TRAIN__EPOCHS=abc nestcast --help` too
        typer.secho(f"error: {console.printable(str(_ENVIRONMENT_ERROR))}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    try:
        app()
    except (ValidationError, ValueError, NestcastError) as error:
        typer.secho(f"error: {console.printable(_one_line(error))}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
