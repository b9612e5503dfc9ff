"""Rolling-origin backtest: the forecast flow's protocol at each origin month, scored on that month.

For each origin month ``m`` the windows step is built with ``holdout_month = m`` into its own directory
under ``lake/backtest/`` (so ``lake/windows`` of the forecast run stays as it is), and
:mod:`core.protocol` runs on it: the model and the LightGBM reference select their epoch count / rounds
and the blend weight on month ``m - 1`` (trained on the months before it), then refit on every month
before ``m`` and predict ``m``'s Kaggle-style grid, which :func:`core.evaluate.evaluate` scores beside the
previous-period, mean-of-3 and zeros baselines. Nothing that selects sees month ``m``; every channel and
feature is causal and the covariate scaling uses months ``< m`` only. The forecast flow's reported
holdout score is this backtest at origin ``M - 1``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core import forecasters
from core.config import FLAT_FIELDS, NestcastConfig
from core.display import four, month_label, month_range, versus
from core.evaluate import OPTIONAL_PREDICTORS, PREDICTORS, evaluate
from core.files import read_json, write_json_atomic, write_text_atomic
from core.lake import SELECTION_FILE, WINDOWS_META_FILE, LakePaths
from core.window_store import WindowStore
from core.windows import build_windows

REPORT_FILE = "backtest.md"
RESULT_FILE = "backtest.json"
#: Forecaster -> its column stem in the backtest tables (``<stem>_rmse``).
PREDICTOR_COLUMNS: dict[str, str] = {name: "previous" if name == "baseline" else name for name in PREDICTORS}

EpochCallback = Callable[[int, dict[str, float]], None]
#: ``start_origin(origin, root)`` starts one origin's work and returns what waits for its result: a submitted
#: task's future's result, or (the default) the work itself, run when asked for.
StartOrigin = Callable[[int, Path], Callable[[], "OriginResult"]]
#: Flat config fields that say where and how the work runs, not what it computes: left out of run ids, so the
#: same backtest on threads or on a Dask cluster finds (and resumes) the same run directory.
PLACEMENT_FIELDS: frozenset[str] = frozenset(
    {"data_dir"} | {name for name, path in FLAT_FIELDS.items() if path[0] == "orchestration"}
)


@dataclass
class OriginResult:
    """One origin month: RMSE of the model and each baseline on its grid, and what training cost."""

    origin: int
    rows: int
    rmse: dict[str, float]  # predictor (core.evaluate.PREDICTORS) -> RMSE on the origin's grid
    mae: dict[str, float]
    train_samples: int
    epochs_run: int
    seconds_per_epoch: float | None
    train_seconds: float
    params: int
    windows_dir: str
    run_dir: str
    selection: dict[str, Any] = field(default_factory=dict)  # core.protocol.Selection, as a dict
    reference_seconds: float | None = None
    ranges: dict[str, Any] = field(default_factory=dict)  # core.quantiles.origin_ranges: the export's range scores

    @property
    def ratio(self) -> float:
        """Model RMSE / previous-period RMSE (below 1: the model wins)."""
        base = self.rmse["baseline"]
        return self.rmse["model"] / base if base > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OriginResult:
        return cls(**{k: v for k, v in data.items() if k != "ratio"})


@dataclass
class BacktestResult:
    """Per-origin results plus the flat configuration they were produced with."""

    config: dict[str, Any]
    origins: list[OriginResult] = field(default_factory=list)

    def mean_rmse(self, predictor: str) -> float:
        return sum(o.rmse[predictor] for o in self.origins) / len(self.origins)

    @property
    def predictors(self) -> list[str]:
        """Predictors scored at every origin, in :data:`core.evaluate.PREDICTORS` order."""
        return [p for p in PREDICTORS if self.origins and all(p in o.rmse for o in self.origins)]

    @property
    def mean_ratio(self) -> float:
        """Mean over origins of model RMSE / previous-period RMSE (the issue's acceptance measure)."""
        return sum(o.ratio for o in self.origins) / len(self.origins)

    @property
    def train_seconds(self) -> float:
        return sum(o.train_seconds for o in self.origins)

    @property
    def params(self) -> int:
        return self.origins[0].params if self.origins else 0

    def rows(self) -> list[dict[str, Any]]:
        """One row per origin and a ``mean`` row: RMSE per predictor, ratio, training cost."""
        rows = [_row(str(o.origin), o.rows, o.rmse, o.ratio, o.train_seconds, o.seconds_per_epoch, o.epochs_run)
                | _range_cells(o.ranges) for o in self.origins]
        shown = self.predictors
        if self.origins:
            per_epoch = [o.seconds_per_epoch for o in self.origins if o.seconds_per_epoch is not None]
            rows.append(
                _row(
                    "mean",
                    round(sum(o.rows for o in self.origins) / len(self.origins)),
                    {p: self.mean_rmse(p) for p in shown},
                    self.mean_ratio,
                    self.train_seconds / len(self.origins),
                    sum(per_epoch) / len(per_epoch) if per_epoch else None,
                    _mean_epochs([o.epochs_run for o in self.origins]),
                )
                | _range_cells(self.mean_ranges())
            )
        return rows

    def mean_ranges(self) -> dict[str, float]:
        """Each range score's mean over the origins that have it (none: an empty dict)."""
        keys = [key for key in RANGE_COLUMNS if self.origins and all(o.ranges.get(key) is not None
                                                                     for o in self.origins)]
        return {key: sum(o.ranges[key] for o in self.origins) / len(self.origins) for key in keys}

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "origins": [o.to_dict() for o in self.origins],
            "mean_ratio": self.mean_ratio if self.origins else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BacktestResult:
        return cls(config=dict(data["config"]), origins=[OriginResult.from_dict(o) for o in data["origins"]])


#: The range scores a backtest row shows (``core.quantiles.holdout_summary``), with their headers.
RANGE_COLUMNS: dict[str, str] = {"range_coverage": "range coverage", "range_width": "range width",
                                 "range_pinball": "pinball", "naive_coverage": "naive coverage",
                                 "naive_width": "naive width", "naive_pinball": "naive pinball",
                                 "new_item_coverage": "new-item coverage"}


def _range_cells(ranges: dict[str, Any]) -> dict[str, Any]:
    return {key: None if ranges.get(key) is None else round(float(ranges[key]), 4) for key in RANGE_COLUMNS}


def _mean_epochs(epochs: list[int]) -> float | int:
    mean = sum(epochs) / len(epochs)
    return int(mean) if mean.is_integer() else round(mean, 1)


def _row(
    origin: str,
    rows: int,
    rmse: dict[str, float],
    ratio: float,
    seconds: float,
    per_epoch: float | None,
    epochs: float,
) -> dict[str, Any]:
    return {
        "origin": origin,
        "rows": rows,
        **{f"{PREDICTOR_COLUMNS[p]}_rmse": round(rmse[p], 4) for p in PREDICTORS if p in rmse},
        "model_vs_previous": round(ratio, 4),
        "epochs": epochs,
        "s_per_epoch": None if per_epoch is None else round(per_epoch, 1),
        "train_s": round(seconds, 1),
    }


# --- where things go -----------------------------------------------------------------------------


def windows_dir_for(config: NestcastConfig, origin: int) -> Path:
    """``lake/backtest/windows-<origin>-<hash>``: one directory per origin and windows setting.

    Keying on the windows section lets trials with different lookbacks (the search) keep their builds
    side by side instead of rebuilding one directory back and forth.
    """
    settings = json.dumps(config.windows.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    return LakePaths.of(config).backtest_windows(origin, digest)


def parse_origins(text: str | Sequence[int], last_month: int | None = None) -> list[int]:
    """``"26,27,28"`` (or a list) -> sorted distinct months; at least one, each scoreable.

    An origin needs a month to train on and a previous month (>= 2) and data of its own (<= ``last_month``).
    """
    values = [int(v) for v in text.split(",") if v.strip()] if isinstance(text, str) else [int(v) for v in text]
    if not values:
        raise ValueError("give at least one origin month")
    if min(values) < 2:
        raise ValueError(f"origin months must be >= 2 (a month to train on and a previous month), got {values}")
    if last_month is not None and max(values) > last_month:
        raise ValueError(f"origin months must have data (the lake ends at month {last_month}), got {values}")
    return sorted(set(values))


# --- the work ------------------------------------------------------------------------------------


def prepare_lake(config: NestcastConfig) -> None:
    """Ingest and aggregate (each skips inputs it has already seen), so ``lake/monthly`` is current."""
    from core.aggregate import aggregate
    from core.ingest import ingest

    ingest(config)
    aggregate(config)


def backtest_origin(
    config: NestcastConfig, origin: int, root: str | Path, on_epoch: EpochCallback | None = None
) -> OriginResult:
    """Build the origin's windows, run the protocol's select and refit stages on them, score the origin.

    ``lake/monthly`` must exist (see :func:`prepare_lake`). Each stage trains into
    ``root/origin-<m>-<windows build hash>/{select,refit}``: a rerun on the same data resumes (or reuses)
    its checkpoints, and changed data or windows settings get a fresh directory, never stale weights.
    """
    from core import protocol, quantiles

    built = build_windows(config, holdout_month=origin, windows_dir=windows_dir_for(config, origin))
    if built.holdout_month != origin or built.sample_counts["holdout"] == 0:
        raise ValueError(f"origin {origin} has no data to score (last month in the lake: {built.last_month})")
    store = WindowStore.open(built.windows_dir)
    run_dir = origin_run_dir(root, origin, store.meta["build_hash"])
    selection = protocol.select(config, built.windows_dir, run_dir / "select", on_epoch)
    refitted = protocol.refit(config, built.windows_dir, run_dir / "refit", selection, on_epoch)
    predictions = protocol.read_predictions(run_dir / "refit", "holdout")
    clip = config.windows.clip
    others = {name: predictions[name].to_numpy() for name in OPTIONAL_PREDICTORS if name in predictions}
    scored = evaluate(store.holdout_frame(), predictions["model"].to_numpy(), clip, month=origin,
                      first_month=config.ingest.first_month, others=others)
    reference_seconds = (selection.reference_seconds or 0.0) + (refitted.reference_seconds or 0.0)
    ranges = quantiles.origin_ranges(config, store, run_dir, exported_name(selection.validation_rmse,
                                                                           config.export.fallback))
    return OriginResult(
        origin=origin,
        rows=scored.rows,
        rmse={p: scored.overall[p].rmse for p in scored.predictors},
        mae={p: scored.overall[p].mae for p in scored.predictors},
        train_samples=min(store.train_index.shape[0], config.train.sample_budget or store.train_index.shape[0]),
        epochs_run=int(selection.epochs_run) + int(refitted.epochs),
        seconds_per_epoch=refitted.seconds_per_epoch,
        train_seconds=selection.model_seconds + refitted.model_seconds,
        params=int(refitted.params),
        windows_dir=built.windows_dir,
        run_dir=str(run_dir),
        selection=selection.to_dict(),
        reference_seconds=reference_seconds if selection.rounds else None,
        ranges=ranges,
    )


def exported_name(validation_rmse: dict[str, float], fallback: str) -> str:
    """What the gate would export from a selection's validation scores (the origin's exported column)."""
    from core.gate import CANDIDATES, decide

    scores = {name: validation_rmse[name] for name in (*CANDIDATES, "baseline") if name in validation_rmse}
    return decide(scores, fallback=fallback).exported  # type: ignore[arg-type]


def origin_run_dir(root: str | Path, origin: int, build_hash: str) -> Path:
    """``root/origin-<m>-<windows build hash>``: where one origin's stages train."""
    return Path(root) / f"origin-{origin}-{build_hash[:10]}"


def origin_outputs(config: NestcastConfig, origin: int, root: str | Path) -> list[Path]:
    """What a finished origin leaves behind: its windows' meta, the selection and model files of its stages and its
    holdout predictions (a cached origin is served only while they are as it left them; with its windows gone,
    the run directory is not even known, and the meta alone, missing, says so)."""
    from core import protocol

    meta_file = windows_dir_for(config, origin) / WINDOWS_META_FILE
    build_hash = (read_json(meta_file) or {}).get("build_hash")
    if build_hash is None:
        return [meta_file]
    run_dir = origin_run_dir(root, origin, build_hash)
    return [meta_file, run_dir / "select" / SELECTION_FILE, *protocol.artifact_paths(run_dir / "select"),
            run_dir / "refit" / "holdout.parquet", *protocol.artifact_paths(run_dir / "refit")]


def backtest(
    config: NestcastConfig,
    origins: Sequence[int],
    run_dir: str | Path | None = None,
    *,
    prepare: bool = True,
    on_origin: Callable[[OriginResult], None] | None = None,
    start_origin: StartOrigin | None = None,
    finish: Callable[[BacktestResult, Path], Any] | None = None,
) -> BacktestResult:
    """Backtest the configured pipeline at each origin month; writes ``backtest.md`` and ``backtest.json``.

    The one backtest loop: the Prefect flow runs it too, handing in ``start_origin`` (default: run
    :func:`backtest_origin` when its result is asked for) and ``finish`` (default :func:`write_backtest_files`)
    as its tasks. Every origin is started before any result is awaited, so a ``start_origin`` that submits
    to a task runner runs the origins concurrently; results are collected in origin order, so the result
    and the report do not depend on which origin finished first.
    ``run_dir`` defaults to ``runs/backtest-<hash of config and origins>`` (so a rerun of the same
    backtest resumes its checkpoints); each origin trains in ``run_dir/origin-<m>-<hash>``. With ``prepare``
    the raw files are ingested and aggregated first (a no-op when the lake is current).
    """
    if prepare:
        prepare_lake(config)
    months = parse_origins(list(origins))
    root = Path(run_dir) if run_dir is not None else default_run_dir(config, months)
    start = start_origin or (lambda origin, root: functools.partial(backtest_origin, config, origin, root))
    pending = [start(origin, root) for origin in months]
    result = BacktestResult(config=config.flat())
    for wait in pending:
        outcome = wait()
        result.origins.append(outcome)
        if on_origin is not None:
            on_origin(outcome)
    (finish or write_backtest_files)(result, root)
    return result


def write_backtest_files(result: BacktestResult, root: str | Path) -> Path:
    """``backtest.md`` and ``backtest.json`` under ``root``; returns the report's path."""
    report = write_backtest_report(result, Path(root) / REPORT_FILE)
    write_json_atomic(Path(root) / RESULT_FILE, result.to_dict())
    return report


def backtest_id(config: NestcastConfig, origins: Sequence[int]) -> str:
    """A short id that changes with the configuration (less :data:`PLACEMENT_FIELDS`) and the origins."""
    flat = {k: v for k, v in config.flat().items() if k not in PLACEMENT_FIELDS}
    text = json.dumps({"config": flat, "origins": list(origins)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def default_run_dir(config: NestcastConfig, origins: Sequence[int]) -> Path:
    return LakePaths.of(config).run_dir(f"backtest-{backtest_id(config, origins)}")


# --- report --------------------------------------------------------------------------------------

_HEADERS = {
    "origin": "origin",
    "rows": "grid rows",
    **{f"{PREDICTOR_COLUMNS[name]}_rmse": forecasters.short(name) for name in PREDICTORS},
    "model_vs_previous": "model / previous",
    "epochs": "epochs",
    "s_per_epoch": "s/epoch",
    "train_s": "train s",
    **RANGE_COLUMNS,
}
_SHOWN_CONFIG = ("kind", "units", "depth", "lookback", "sample_policy", "epochs", "batch_size", "learning_rate",
                 "learning_rate_schedule", "loss", "sample_budget", "embeddings", "head_units",
                 "seed")


def _cell(value: Any, decimals: int | None = None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if decimals is None:  # RMSEs and ratios need 4 decimals; large values do not
            decimals = 4 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
        return f"{value:,.{decimals}f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


#: Columns shown with one decimal whatever their size (seconds).
ONE_DECIMAL = frozenset({"s_per_epoch", "train_s"})


def markdown_table(rows: Sequence[dict[str, Any]], headers: dict[str, str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (columns: ``headers`` keys, or the first row's keys)."""
    headers = headers or {k: k for k in rows[0]}
    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    lines += [
        "| " + " | ".join(_cell(row.get(key), 1 if key in ONE_DECIMAL else None) for key in headers) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def render_backtest_report(result: BacktestResult) -> str:
    """``backtest.md``: RMSE per origin for the model and the baselines, and the configuration."""
    months = ", ".join(str(o.origin) for o in result.origins)
    cfg = result.config
    lines = [
        f"# Backtest — origins {months}",
        "",
        *verdict_lines(result),
        "",
        f"Model **{cfg.get('kind')}** ({result.params:,} parameters), trained on the months before each origin "
        "and scored on the origin's Kaggle-style grid (shops × items with sales that month), "
        f"RMSE on counts clipped to [{cfg.get('target_clip_min')}, {cfg.get('target_clip_max')}]. "
        f"Mean model / previous-month RMSE: **{result.mean_ratio:.3f}**.",
        "",
        markdown_table(result.rows(), _HEADERS),
        "",
        "## Configuration",
        "",
        markdown_table([{"field": k, "value": str(cfg.get(k))} for k in _SHOWN_CONFIG if k in cfg]),
    ]
    return "\n".join(lines) + "\n"


def verdict_lines(result: BacktestResult) -> list[str]:
    """The backtest's verdict first: each forecaster's mean RMSE against the previous month and the reference."""
    first_month = str(result.config.get("first_month", "2013-01"))
    origins = [o.origin for o in result.origins]
    baseline = result.mean_rmse("baseline")
    shown = [p for p in forecasters.PREDICTED if p in result.predictors]
    reference = result.mean_rmse("reference") if "reference" in shown else None
    lines = [f"Mean RMSE over the origins {month_range(origins, first_month)} "
             f"({', '.join(month_label(o, first_month) for o in origins)}):", ""]
    for predictor in shown:
        value = result.mean_rmse(predictor)
        against = [versus(value, baseline, f"the previous month ({four(baseline)})")]
        if reference is not None and predictor != "reference":
            against.append(versus(value, reference, f"the LightGBM ({four(reference)})"))
        lines.append(f"- **{forecasters.short(predictor)} {four(value)}**: {', '.join(against)}")
    return lines


def write_backtest_report(result: BacktestResult, path: str | Path) -> Path:
    """Write :func:`render_backtest_report` atomically to ``path`` (a file, or a directory for backtest.md)."""
    target = Path(path)
    if target.is_dir():
        target = target / REPORT_FILE
    return write_text_atomic(target, render_backtest_report(result))
