"""One typed configuration object for every step of nestcast.

Defaults work out of the box; every field can be overridden by
- environment variables ``NESTCAST_<SECTION>__<FIELD>`` (e.g. ``NESTCAST_TRAIN__EPOCHS=3``)
  or ``NESTCAST_DATA_DIR`` for the top-level path,
- flat overrides (``NestcastConfig.with_overrides(epochs=3, lookback=6)``), which is what the
  CLI options and the Prefect flow parameters map onto.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Shops that the competition lists twice under different ids (same address, renamed);
# the duplicate is folded into the id that carries on into test.csv.
DEFAULT_SHOP_MERGE_MAP: dict[int, int] = {0: 57, 1: 58, 10: 11, 39: 40}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(_Section):
    """Validation rules of step 1 (ingest)."""

    max_item_price: float = Field(100_000.0, gt=0, description="Prices at or above this are quarantined.")
    min_item_cnt_day: float = Field(-100.0, description="Daily counts below this are quarantined.")
    max_item_cnt_day: float = Field(1000.0, description="Daily counts above this are quarantined.")
    first_month: str = Field("2013-01", description="Calendar month of date_block_num 0 (YYYY-MM).")


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
    target_clip_min: float = 0.0
    target_clip_max: float = 20.0
    sample_policy: SamplePolicy = Field(
        "grid",
        description="Training samples: 'grid' = all shops x items sold that month (Kaggle-style), "
        "'active' = pairs with any sale in the window or target, 'all' = every series x month.",
    )
    holdout_month: int | None = Field(None, description="Evaluation month (default: last month in the lake).")
    min_train_month: int = Field(1, ge=1, description="Earliest target month used for training.")


ModelKind = Literal["nlstm", "lstm", "gru", "rnn"]


class ModelConfig(_Section):
    """Network shape (step 4)."""

    kind: ModelKind = "nlstm"
    units: int = Field(40, ge=1)
    depth: int = Field(2, ge=1, le=6, description="Nesting depth of the NLSTM (ignored by other kinds).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    recurrent_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embeddings: bool = Field(True, description="Learn shop and category embeddings beside the sequence.")
    embedding_dim: int = Field(4, ge=1)
    head_units: int = Field(32, ge=0, description="Hidden Dense units of the head (0: linear head).")


Device = Literal["auto", "cpu", "gpu"]


class TrainConfig(_Section):
    """Optimisation (step 4)."""

    epochs: int = Field(
        3,
        ge=1,
        description="Training epochs. 3 won the backtest on the real slice (origins 26-28): 0.774x the "
        "previous-month RMSE vs 0.787x at 8 epochs, whose extra epochs overfit the older months.",
    )
    batch_size: int = Field(512, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    loss: Literal["mse", "huber"] = "mse"
    patience: int = Field(2, ge=0, description="Early-stopping patience on the holdout loss (0: off).")
    seed: int = 42
    device: Device = "auto"
    jit_compile: Literal["auto", "on", "off"] = "auto"
    max_train_samples: int | None = Field(
        None, ge=1, description="Subsample training windows to at most this many (None: all)."
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


class OrchestrationConfig(_Section):
    """Prefect behaviour."""

    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = Field(None, description="Address of an existing Dask cluster.")
    retries: int = Field(2, ge=0)
    retry_delay_seconds: float = Field(2.0, ge=0)
    task_timeout_seconds: float = Field(3600.0, gt=0)


class NestcastConfig(BaseSettings):
    """Every tunable of every step. Sections mirror the steps."""

    model_config = SettingsConfigDict(
        env_prefix="NESTCAST_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path = Field(Path("data"), description="Root of the lake (raw/, lake/, runs/, submissions/).")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    windows: WindowsConfig = Field(default_factory=WindowsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return Path(value).expanduser() if isinstance(value, str) and "://" not in value else value

    @model_validator(mode="after")
    def _clip_range(self) -> NestcastConfig:
        if self.windows.target_clip_max <= self.windows.target_clip_min:
            raise ValueError("windows.target_clip_max must be greater than target_clip_min")
        return self

    # --- lake layout -------------------------------------------------------------------------
    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def submissions_dir(self) -> Path:
        return self.data_dir / "submissions"

    # --- flat overrides (CLI options, flow parameters) -----------------------------------------
    def with_overrides(self, **flat: Any) -> NestcastConfig:
        """A copy with flat overrides applied; ``None`` values are ignored.

        Flat names are the field names of the sections (``epochs``, ``lookback``, ``kind``…),
        unique across sections, plus ``data_dir``.
        """
        data = self.model_dump()
        for name, value in flat.items():
            if value is None:
                continue
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
