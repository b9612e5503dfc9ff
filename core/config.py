"""One typed configuration object for every step of nestcast.

Defaults work out of the box; every field can be overridden by
- environment variables ``NESTCAST_<SECTION>__<FIELD>`` (e.g. ``NESTCAST_TRAIN__EPOCHS=3``)
  or ``NESTCAST_DATA_DIR`` for the top-level path,
- flat overrides (``NestcastConfig.with_overrides(epochs=3, lookback=6)``), which is what the
  CLI options and the Prefect flow parameters map onto.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.encoders import ENCODERS

# Shops that the competition lists twice under different ids (same address, renamed);
# the duplicate is folded into the id that carries on into test.csv.
DEFAULT_SHOP_MERGE_MAP: dict[int, int] = {0: 57, 1: 58, 10: 11, 39: 40}
#: The competition's clip range of monthly counts, [0, 20]: the one default every module uses.
DEFAULT_CLIP: tuple[float, float] = (0.0, 20.0)


def check_levels(levels: Any) -> tuple[float, ...]:
    """Quantile levels strictly increasing inside (0, 1); a ValueError naming the first bad value otherwise."""
    values = tuple(float(v) for v in levels)
    if not values:
        raise ValueError("quantile_levels needs at least one level")
    for before, value in zip((None, *values), values, strict=False):
        if not 0.0 < value < 1.0:
            raise ValueError(f"quantile level {value:g} is not inside (0, 1)")
        if before is not None and value <= before:
            raise ValueError(f"quantile levels must be strictly increasing: {value:g} follows {before:g}")
    return values


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(_Section):
    """Validation rules of step 1 (ingest)."""

    max_item_price: float = Field(100_000.0, gt=0, description="Prices at or above this are quarantined.")
    min_item_cnt_day: float = Field(-100.0, description="Daily counts below this are quarantined.")
    max_item_cnt_day: float = Field(1000.0, description="Daily counts above this are quarantined.")
    first_month: str = Field("2013-01", description="Calendar month of date_block_num 0 (YYYY-MM).")
    max_quarantined_share: float = Field(
        0.5, ge=0, le=1,
        description="A file with a larger share of its rows quarantined fails the step (a broken export, "
        "not bad rows).",
    )
    warn_quarantined_share: float = Field(
        0.05, ge=0, le=1, description="Above this share of quarantined rows a file gets a warning."
    )


class AggregateConfig(_Section):
    """Daily -> monthly aggregation (step 2)."""

    shop_merge_map: dict[int, int] = Field(
        default_factory=lambda: dict(DEFAULT_SHOP_MERGE_MAP),
        description="Duplicate shop id -> canonical shop id.",
    )
    daily_count_cap: float | None = Field(
        None, description="Clip each daily count to this before summing (None: keep as ingested)."
    )
    drop_returns: bool = Field(False, description="Drop negative daily counts (returns) before summing.")


SamplePolicy = Literal["grid", "active", "all"]


class WindowsConfig(_Section):
    """Feature cube and sample windows (step 3)."""

    lookback: int = Field(12, ge=1, le=60, description="Months of history in each window.")
    target_clip_min: float = DEFAULT_CLIP[0]
    target_clip_max: float = DEFAULT_CLIP[1]
    sample_policy: SamplePolicy = Field(
        "grid",
        description="Training samples: 'grid' = all shops x items sold that month (Kaggle-style), "
        "'active' = pairs with any sale in the window or target, 'all' = every series x month.",
    )
    holdout_month: int | None = Field(None, description="Evaluation month (default: last month in the lake).")
    validation_months: int = Field(
        2, ge=1, le=12,
        description="Months before the holdout month that choose epochs, boosting rounds, blend weights and the "
        "export (the selection stage trains on the months before them); each choice weighs every month alike, so "
        "one odd month cannot swing it.",
    )
    min_train_month: int = Field(1, ge=1, description="Earliest target month used for training.")
    universe_months: int = Field(
        3, ge=0, le=60,
        description="Without test.csv the forecast covers every pair that sold in the last N months (0: none) ...",
    )
    universe_grid: bool = Field(
        True, description="... plus every pair of the last month's grid (its shops with sales x its items with sales)."
    )
    static_features: bool = Field(
        True,
        description="Also give the model's head the target month's lag features (core.reference.STATIC_FEATURES) "
        "and its month of year, beside the window.",
    )

    @property
    def clip(self) -> tuple[float, float]:
        """``(target_clip_min, target_clip_max)``: the range targets, predictions and the submission are clipped to."""
        return (self.target_clip_min, self.target_clip_max)




#: The registered encoders' names (``core.encoders``), as a type: the CLI and the deployment form offer exactly these.
EncoderKind = Literal[tuple(ENCODERS)]  # type: ignore[valid-type]


class ModelConfig(_Section):
    """Network shape (step 4)."""

    kind: EncoderKind = Field("nlstm", description="The recurrent encoder (registered in core.encoders).")
    units: int = Field(40, ge=1)
    depth: int = Field(2, ge=1, le=6, description="Nesting depth of the NLSTM (ignored by other kinds).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    recurrent_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embeddings: bool = Field(True, description="Learn shop and category embeddings beside the sequence.")
    embedding_dim: int = Field(4, ge=1)
    head_units: int = Field(32, ge=0, description="Hidden Dense units of the head (0: linear head).")
    launch_head: bool = Field(
        True,
        description="A head of its own for items in their launch month (selected by the static input item_is_new), "
        "so a launch's forecast is not a compromise with the pairs that have a history (core.model.LaunchGate). "
        "On the real slice's 12 origins it made the network 1.3 % and 1.1 % better in the two halves "
        "(docs/accuracy.md).",
    )


Device = Literal["auto", "cpu", "gpu"]


class TrainConfig(_Section):
    """Optimisation (step 4)."""

    epochs: int = Field(
        3,
        ge=1,
        description="Training epochs. 3 won the backtest on the real slice (origins 26-28): 0.774x the "
        "previous-month RMSE vs 0.787x at 8 epochs, whose extra epochs overfit the older months.",
    )
    batch_size: int = Field(
        2048,
        ge=1,
        description="Training batch size. 2048 trains 1.4x as many windows a second as 512 on 2 CPU cores, and with "
        "the learning rate doubled and the cosine it scored the same on the full-size validation month and the real "
        "slice.",
    )
    learning_rate: float = Field(4e-3, gt=0, description="Adam's peak learning rate.")
    learning_rate_schedule: Literal["cosine", "constant"] = Field(
        "cosine",
        description="'cosine': the rate falls from learning_rate to learning_rate_floor x it along half a cosine over "
        "`epochs` epochs, in both training stages (a refit of k epochs ends where the selected epoch k did); "
        "'constant': learning_rate throughout.",
    )
    learning_rate_floor: float = Field(0.05, ge=0, le=1, description="The cosine's last rate, as a share of the peak.")
    loss: Literal["mse", "huber"] = "mse"
    patience: int = Field(2, ge=0, description="Early-stopping patience on the validation months' loss (0: off).")
    refit_from: Literal["selection", "scratch"] = Field(
        "selection",
        description="'selection': each refit starts from the selection stage's network (weights and optimiser) and "
        "trains refit_epochs epochs on every training target, along the last of the selection's learning-rate curve; "
        "'scratch': each refit trains the selected epoch count from fresh weights. On the 12-origin backtest the "
        "holdout RMSE of 'selection' was within 0.1 % of 'scratch' in both halves at a third of the epochs "
        "(docs/training-speed.md).",
    )
    refit_epochs: int = Field(1, ge=1, description="Epochs a refit from the selection trains.")
    seed: int = 42
    device: Device = "auto"
    jit_compile: Literal["auto", "on", "off"] = "auto"
    replicas: int | None = Field(
        None,
        ge=1,
        description="Data-parallel replicas: None = every visible GPU (one CPU device without a GPU); N = the "
        "first N GPUs, or N logical CPU devices on a host without one (MirroredStrategy / keras DataParallel).",
    )
    sample_budget: int | None = Field(
        600_000,
        ge=1,
        description="Training windows per epoch at most, for the network and the boosters alike (None: every "
        "window): the non-zero targets first, then zero-target windows drawn to fill it, each kept window "
        "weighted by 1 / its draw rate (core.sampling.budget_draw); the network draws afresh every epoch. The "
        "default keeps a full-size run (10.3 M grid windows) under 10 minutes on 2 cores and leaves the real slice "
        "and the demo data (fewer windows) whole.",
    )
    launch_calibration: bool = Field(
        False,
        description="Scale the trained forecasters' forecasts of items in their launch month by a factor chosen on the "
        "validation months (core.calibration: each month's best scale, geometric mean). Off: with the launch features "
        "every forecaster reads (core.features) it lost on the real slice's 12 origins (docs/accuracy.md).",
    )


class ReferenceConfig(_Section):
    """The gradient-boosted forecaster (``core.reference``): LightGBM on the features of ``core.features``.

    Trained on the NLSTM's samples with the same protocol: early stopping on the validation months, then a
    refit with the selected number of rounds. It is scored beside the model, may be exported, and is the
    model's partner in the ensemble.
    """

    reference_enabled: bool = Field(True, description="Train the LightGBM forecaster (and with it the ensemble).")
    boost_learning_rate: float = Field(0.03, gt=0, le=1)
    num_leaves: int = Field(63, ge=2)
    min_data_in_leaf: int = Field(100, ge=1)
    feature_fraction: float = Field(0.8, gt=0, le=1)
    bagging_fraction: float = Field(0.8, gt=0, le=1)
    lambda_l2: float = Field(1.0, ge=0)
    max_rounds: int = Field(5000, ge=1, description="Boosting rounds at most in the selection stage.")
    early_stopping_rounds: int = Field(
        200, ge=1, description="Stop when the validation months' RMSE has not improved for this many rounds."
    )
    boost_threads: int | None = Field(None, ge=1, description="LightGBM threads (None: every core).")
    ensemble_segments: Literal["launch", "none"] = Field(
        "none",
        description="'none': one model weight for all rows, chosen on the validation months; 'launch': one weight for "
        "items in their launch month (no sale before the target month) and one for the rest. One weight won in both "
        "halves of the 12-origin backtest (docs/accuracy.md): a launch weight fitted on a few hundred rows swings.",
    )


FallbackPolicy = Literal["baseline", "model"]


class ExportConfig(_Section):
    """Evaluation gate and submission export (steps 5 and 6)."""

    fallback: FallbackPolicy = Field(
        "baseline",
        description="When the model does not beat the previous-period baseline: export the "
        "'baseline' forecast or the 'model' forecast anyway.",
    )
    submission_path: Path | None = Field(None, description="Also copy the submission here.")
    champion_gate: bool = Field(
        True, description="Compare each run (the challenger) with the champion in runs/index.json on the holdout "
        "month and export the champion's forecast when the challenger is worse.",
    )
    champion_tolerance: float = Field(
        0.0, ge=0, description="The challenger wins if its holdout RMSE is at most (1 + tolerance) x the champion's.",
    )
    quantile_levels: tuple[float, ...] = Field(
        (0.1, 0.5, 0.9), description="Levels of the quantiles written beside the submission "
        "(submissions/<month>.quantiles.parquet), strictly increasing inside (0, 1); the outer two make the interval "
        "whose coverage is scored.",
    )

    @field_validator("quantile_levels")
    @classmethod
    def _levels(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        return check_levels(value)


class OrchestrationConfig(_Section):
    """Prefect behaviour."""

    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = Field(None, description="Address of an existing Dask cluster.")
    dask_dashboard: str | None = Field(
        "127.0.0.1:8787",
        description="HOST:PORT of the local Dask cluster's HTTP dashboard ('' or None: no dashboard). Scheduler and "
        "workers listen on 127.0.0.1 only; '0.0.0.0:8787' opens the dashboard to the network on purpose.",
    )
    retries: int = Field(2, ge=0)
    retry_delay_seconds: float = Field(2.0, ge=0)
    task_timeout_seconds: float = Field(3600.0, gt=0)


class NestcastConfig(BaseSettings):
    """Every tunable of every step. Sections mirror the steps."""

    model_config = SettingsConfigDict(
        env_prefix="NESTCAST_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path | str = Field(
        Path("data"),
        description="Root of the lake (raw/, lake/, runs/, submissions/): a folder, or an object-store URL "
        "(s3://bucket/prefix or any fsspec URL; core.store).",
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    windows: WindowsConfig = Field(default_factory=WindowsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        if isinstance(value, str) and "://" in value and not value.startswith("file://"):
            return value.rstrip("/")  # an object store's URL stays a string (a Path would fold its "//")
        if isinstance(value, str) and value.startswith("file://"):
            value = value[len("file://"):]
        return Path(value).expanduser() if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _clip_range(self) -> NestcastConfig:
        if self.windows.target_clip_max <= self.windows.target_clip_min:
            raise ValueError("windows.target_clip_max must be greater than target_clip_min")
        return self

    # --- flat overrides (CLI options, flow parameters) -----------------------------------------
    def with_overrides(self, explicit: Mapping[str, Any] | None = None, /, **flat: Any) -> NestcastConfig:
        """A copy with flat overrides applied: first ``explicit``, then ``flat``.

        Flat names are the field names of the sections (``epochs``, ``lookback``, ``kind``…),
        unique across sections, plus ``data_dir``. A ``None`` in ``flat`` is a knob left unset (a CLI option or
        flow parameter not given) and is ignored; every ``explicit`` value is applied, ``None`` included, so
        ``--set sample_budget=null`` (``overrides={"sample_budget": None}``) means "no budget".
        """
        data = self.model_dump()
        given = [(name, value) for name, value in flat.items() if value is not None]
        for name, value in [*(explicit or {}).items(), *given]:
            path = FLAT_FIELDS.get(name)
            if path is None:
                raise ValueError(f"unknown configuration field {name!r}; known: {', '.join(sorted(FLAT_FIELDS))}")
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        return NestcastConfig.model_validate(data)

    def flat(self) -> dict[str, Any]:
        """Every field under its flat name (the inverse of ``with_overrides``)."""
        data = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for name, path in FLAT_FIELDS.items():
            value: Any = data
            for key in path:
                value = value[key]
            out[name] = value
        return out


def _flat_fields() -> dict[str, tuple[str, ...]]:
    fields: dict[str, tuple[str, ...]] = {"data_dir": ("data_dir",)}
    for section_name, section_field in NestcastConfig.model_fields.items():
        annotation = section_field.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            for name in annotation.model_fields:
                if name in fields:
                    raise RuntimeError(f"flat config name {name!r} is ambiguous")
                fields[name] = (section_name, name)
    return fields


FLAT_FIELDS: dict[str, tuple[str, ...]] = _flat_fields()


# --- the run knobs: declared once, rendered as flow parameters and as CLI options ------------------
#: Flat config names a run takes as its own parameters (``sales_forecast``'s flow parameters and ``nestcast run``'s
#: options, in this order), each with the one-line help the CLI and the Prefect UI show. Every other field is
#: still reachable through ``overrides`` / ``--set``.
RUN_KNOBS: dict[str, str] = {
    "data_dir": "Lake root holding raw/ (input) and lake/, runs/, submissions/.",
    "epochs": "Training epochs at most; the validation months pick the count the refits use.",
    "batch_size": "Training batch size.",
    "learning_rate": "Adam learning rate.",
    "lookback": "Months of history in each window.",
    "sample_policy": "Training samples: grid (Kaggle-style), active, or all.",
    "kind": "Recurrent encoder.",
    "units": "Recurrent units.",
    "depth": "NLSTM nesting depth.",
    "seed": "Seed for weights, shuffling and dropout.",
    "device": "auto (every visible GPU, else CPU), cpu or gpu.",
    "fallback": "If the model loses to last month's sales: export 'baseline' or 'model'.",
    "task_runner": "Parallel work (months, backtest origins, search trials) on threads or on Dask worker processes.",
    "dask_address": "Existing Dask scheduler (default: local cluster).",
    "submission_path": "Also write the submission CSV to this path.",
}
#: The knobs of a backtest (and of ``nestcast backtest``): the model, data and task-runner ones, no export.
BACKTEST_KNOBS: tuple[str, ...] = tuple(name for name in RUN_KNOBS if name not in (
    "fallback", "submission_path"))


def knob_field(name: str) -> Any:
    """The pydantic ``FieldInfo`` of flat config field ``name`` (its type, default, bounds, description)."""
    path = FLAT_FIELDS[name]
    if len(path) == 1:
        return NestcastConfig.model_fields[path[0]]
    return NestcastConfig.model_fields[path[0]].annotation.model_fields[path[1]]  # type: ignore[union-attr]


def knob_default(name: str, config: NestcastConfig | None = None) -> Any:
    """The value of knob ``name`` in ``config`` (default: the plain defaults)."""
    value: Any = config if config is not None else NestcastConfig.model_construct()
    for key in FLAT_FIELDS[name]:
        value = getattr(value, key)
    return value


# --- environment variables (NESTCAST_*) ---------------------------------------------------------
ENV_PREFIX = "NESTCAST_"
ENV_DELIMITER = "__"


class ConfigEnvironmentError(ValueError):
    """A ``NESTCAST_*`` environment variable holds a value the config rejects; the message names it."""


def _env_name(*loc: Any) -> str:
    return (ENV_PREFIX + ENV_DELIMITER.join(str(part) for part in loc)).upper()


#: ``NESTCAST_*`` variables read outside the config: where object-store working copies live (``core.store``).
OTHER_VARIABLES: frozenset[str] = frozenset({"NESTCAST_STORE_CACHE"})


def _known_environment() -> tuple[set[str], set[str]]:
    """Every variable ``NestcastConfig`` reads, and the ones that also take deeper ``__KEY`` parts (dicts)."""
    from typing import get_origin

    names: set[str] = set(OTHER_VARIABLES)
    open_ended: set[str] = set()
    for name, field in NestcastConfig.model_fields.items():
        names.add(_env_name(name))
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub_name, sub_field in annotation.model_fields.items():
                names.add(_env_name(name, sub_name))
                if get_origin(sub_field.annotation) is dict:
                    open_ended.add(_env_name(name, sub_name))
        elif get_origin(annotation) is dict:
            open_ended.add(_env_name(name))
    return names, open_ended


def known_environment_variables() -> set[str]:
    """The names of the ``NESTCAST_*`` variables that set a config field (derived from the models)."""
    return _known_environment()[0]


def unknown_environment_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``NESTCAST_*`` variables that no config field reads, each with the likely intended name (or None).

    pydantic-settings ignores them silently, so a typo (``NESTCAST_TRAIN__EPOCH``) would change nothing.
    """
    import difflib
    import os

    environ = os.environ if environ is None else environ
    known, open_ended = _known_environment()
    by_leaf: dict[str, list[str]] = {}
    for name in known:
        by_leaf.setdefault(name.rsplit(ENV_DELIMITER, 1)[-1].removeprefix(ENV_PREFIX), []).append(name)
    unknown: list[tuple[str, str | None]] = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        if any(upper.startswith(prefix + ENV_DELIMITER) for prefix in open_ended):
            continue
        leaf = upper.rsplit(ENV_DELIMITER, 1)[-1].removeprefix(ENV_PREFIX)
        same_leaf = by_leaf.get(leaf, [])
        if len(same_leaf) == 1:  # right field, wrong or missing section: NESTCAST_EPOCHS
            unknown.append((variable, same_leaf[0]))
            continue
        suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), list(suffixes), n=1, cutoff=0.6)
        unknown.append((variable, suffixes[close[0]] if close else None))
    return unknown


def environment_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per unknown ``NESTCAST_*`` variable, naming it and, when close, the intended one."""
    lines = []
    for variable, intended in unknown_environment_variables(environ):
        hint = f"; did you mean {intended}?" if intended else "; no config field reads it (e.g. NESTCAST_TRAIN__EPOCHS)"
        lines.append(f"unknown environment variable {variable} is ignored{hint}")
    return lines


def _find_variable(loc: tuple[Any, ...], environ: Mapping[str, str]) -> tuple[str, str, int] | None:
    """The set variable that fed ``loc`` (the field's own, else its section's JSON): name, value, depth."""
    upper = {name.upper(): name for name in environ}
    for depth in range(len(loc), 0, -1):
        name = upper.get(_env_name(*loc[:depth]))
        if name is not None:
            return name, environ[name], depth
    return None


def config_from_environment() -> NestcastConfig:
    """``NestcastConfig()`` (defaults + ``NESTCAST_*``), with a one-line error naming the variable if one is bad."""
    import os

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return NestcastConfig()
    except ValidationError as error:
        parts = []
        for item in error.errors():
            loc = tuple(item["loc"])
            field = ".".join(map(str, loc))
            found = _find_variable(loc, os.environ)
            if found is None:
                names = sorted(name for name in os.environ if name.upper().startswith(ENV_PREFIX))
                parts.append(
                    f"environment {' '.join(names) or '(no NESTCAST_* set)'}: {field or 'config'}: {item['msg']}"
                )
            elif item["type"] == "extra_forbidden":  # a typo inside a known section: NESTCAST_TRAIN__EPOCH
                intended = dict(unknown_environment_variables({found[0]: found[1]})).get(found[0])
                hint = f"; did you mean {intended}?" if intended else ""
                parts.append(f"environment variable {found[0]}={found[1]!r}: no config field {field}{hint}")
            elif found[2] == len(loc):
                parts.append(f"environment variable {found[0]}={found[1]!r}: {item['msg']}")
            else:
                parts.append(f"environment variable {found[0]}={found[1]!r}: {field}: {item['msg']}")
        raise ConfigEnvironmentError("; ".join(parts)) from None
    except SettingsError as error:  # a complex field whose variable is not valid JSON
        import re

        match = re.search(r'field "([^"]+)"', str(error))
        prefix = _env_name(match.group(1)) if match else ENV_PREFIX
        names = [n for n in sorted(os.environ) if n.upper() == prefix or n.upper().startswith(prefix + ENV_DELIMITER)]
        shown = ", ".join(f"{n}={os.environ[n]!r}" for n in names) or prefix + "*"
        raise ConfigEnvironmentError(f"environment variable {shown}: not valid JSON for this field ({error})") from None
