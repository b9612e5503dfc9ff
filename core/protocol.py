"""The honest training protocol, shared by the forecast flow and the backtest so their numbers agree.

On a windows store whose holdout month is ``H`` and whose validation months are the ``k`` before it
(``windows.validation_months``, default 2: ``H - 2`` and ``H - 1``):

1. **select** -- every trained forecaster of ``core.forecasters`` (the Nested LSTM, the LightGBM booster) trains on
   the targets before the first validation month and early-stops on the validation months' grids. Then, from
   their validation predictions, each month counting alike: the launch scales (``core.calibration``, when
   ``train.launch_calibration`` is on), the ensemble's blend weights (``core.blend.BlendWeights``) and every
   candidate's mean validation RMSE, which the gate ranks (``core.gate.decide``).
2. **refit** -- every trained forecaster retrains from scratch on every training target (through ``H - 1``) with
   the selected epoch count / rounds and predicts the holdout month ``H`` (the reported score, which nothing
   above has seen) and the store's forecast pairs, combined with the selected scales and weights.

The forecast flow runs 1 and 2 on the store that holds out the lake's last month ``M - 1`` (so its reported
score is the backtest at origin ``M - 1``), then 2 again on the store built without a holdout, so the exported
forecast of ``M`` comes from models trained on every month through ``M - 1``. A backtest at origin ``o`` is 1 and
2 on the store that holds out ``o``.

Each stage writes into its own directory: each trained forecaster's file (``model.keras``, ``reference.txt``) and
``metadata.json`` (with checkpoints, so a crashed stage resumes), and its predictions as Parquet, a column per
forecaster. ``metadata.json`` records the sha256 of the model files (``artifacts``); a file is checked against it
before it is loaded, and a stage whose files no longer match is trained again rather than served. A stage's
forecasts are always made by :func:`apply_stage` from those files and the selection, so a champion re-applied
to a later month (``core.champion``) is the very forecaster its run exported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core import forecasters
from core.blend import BlendWeights, blend, rmse
from core.calibration import apply_launch_scale, launch_scale
from core.errors import ModelIntegrityError
from core.files import atomic_path, file_sha256, read_json, recorded_file_problems, write_json_atomic
from core.lake import METADATA_FILE, SELECTION_FILE

if TYPE_CHECKING:
    from core.config import NestcastConfig
    from core.window_store import WindowStore

EpochCallback = Callable[[int, dict[str, float]], None]
PREDICTION_SETS: tuple[str, ...] = ("validation", "holdout", "forecast")
ARTIFACTS_KEY = "artifacts"  # in metadata.json: file name -> sha256 of the stage's model files


def _clip(store: WindowStore) -> tuple[float, float]:
    low, high = store.meta["target_clip"]
    return float(low), float(high)


def _write_predictions(path: Path, columns: Mapping[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(dict(columns)).to_parquet(tmp, index=False)


def read_predictions(stage_dir: str | Path, name: str) -> pd.DataFrame:
    """Predictions of one set (:data:`PREDICTION_SETS`) written by a stage: a column per forecaster."""
    return pd.read_parquet(Path(stage_dir) / f"{name}.parquet")


# --- what a selection chose ----------------------------------------------------------------------


@dataclasses.dataclass
class Selection:
    """What the validation months chose, and how every forecaster scored there (``select/selection.json``)."""

    validation_months: list[int]
    epochs: int  # the network's epoch count for the refits
    epochs_run: int
    model_seconds: float
    seconds_per_epoch: float | None
    params: int
    rounds: dict[str, int]  # booster -> boosting rounds (empty: no booster)
    blend: BlendWeights | None  # the model's weights in the ensemble (None: no ensemble)
    launch_scales: dict[str, float]  # trained forecaster -> scale of its launch rows (empty: not calibrated)
    validation_rmse: dict[str, float]  # forecaster or "baseline" -> mean RMSE over the validation months
    validation_rmse_by_month: dict[str, dict[str, float]]  # forecaster -> month -> RMSE
    reference_seconds: float | None = None

    @property
    def validation_month(self) -> int:
        """The last validation month (the one right before the holdout)."""
        return self.validation_months[-1]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["blend"] = None if self.blend is None else dataclasses.asdict(self.blend)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        blend_record = values.get("blend")
        values["blend"] = None if blend_record is None else BlendWeights(**blend_record)
        return cls(**values)


def choose(
    actual: np.ndarray,
    raw: Mapping[str, np.ndarray],
    launch: np.ndarray | None,
    months: np.ndarray,
    config: NestcastConfig,
    clip: tuple[float, float],
) -> tuple[dict[str, float], BlendWeights | None]:
    """The launch scales and blend weights the validation months choose, each month counting alike."""
    scales = {name: launch_scale(actual, raw[name], launch, clip, months) for name in forecasters.TRAINED
              if name in raw and launch is not None and config.train.launch_calibration}
    calibrated = calibrate(raw, scales, launch, clip)
    partner = forecasters.BLEND_PARTNER.name
    if partner not in calibrated:
        return scales, None
    segments = launch if config.reference.ensemble_segments == "launch" else None
    return scales, BlendWeights.fit(actual, calibrated[forecasters.NETWORK.name], calibrated[partner], segments, months)


def calibrate(
    raw: Mapping[str, np.ndarray], scales: Mapping[str, float], launch: np.ndarray | None, clip: tuple[float, float]
) -> dict[str, np.ndarray]:
    """Each trained forecaster's column with its launch rows scaled (the others as they are)."""
    return {name: apply_launch_scale(values, launch, scales.get(name, 1.0), clip) for name, values in raw.items()}


def combine(
    raw: Mapping[str, np.ndarray],
    launch_scales: Mapping[str, float],
    weights: BlendWeights | None,
    launch: np.ndarray | None,
    clip: tuple[float, float],
) -> dict[str, np.ndarray]:
    """Every forecaster's column from the trained ones' raw predictions: calibrated, and the ensemble blended."""
    columns = calibrate(raw, launch_scales, launch, clip)
    partner = forecasters.BLEND_PARTNER.name
    if weights is not None and partner in columns:
        model = columns[forecasters.NETWORK.name]
        columns[forecasters.BLEND.name] = blend(model, columns[partner], weights.per_row(launch, model.size), clip)
    return columns


def scores_by_month(columns: Mapping[str, np.ndarray], actual: np.ndarray,
                    months: np.ndarray) -> dict[str, dict[str, float]]:
    """RMSE of each column in each month."""
    return {name: {str(int(m)): rmse(values[months == m], actual[months == m]) for m in np.unique(months)}
            for name, values in columns.items()}


# --- model files ---------------------------------------------------------------------------------


def record_artifacts(stage_dir: str | Path) -> dict[str, str]:
    """Record the sha256 of the stage's model files in its ``metadata.json`` (after they are written)."""
    stage_dir = Path(stage_dir)
    metadata = read_json(stage_dir / METADATA_FILE) or {}
    metadata[ARTIFACTS_KEY] = {name: file_sha256(stage_dir / name) for name in forecasters.ARTIFACTS
                               if (stage_dir / name).exists()}
    write_json_atomic(stage_dir / METADATA_FILE, metadata)
    return metadata[ARTIFACTS_KEY]


def artifact_paths(stage_dir: str | Path) -> list[Path]:
    """The model files ``metadata.json`` records (``metadata.json`` itself when it records none): a cached
    stage's outputs, so a model replaced or damaged since makes the stage run again."""
    stage_dir = Path(stage_dir)
    recorded = (read_json(stage_dir / METADATA_FILE) or {}).get(ARTIFACTS_KEY) or {}
    return [stage_dir / name for name in sorted(recorded)] or [stage_dir / METADATA_FILE]


def artifact_problems(stage_dir: str | Path) -> list[str]:
    """Every recorded model file that is missing or whose sha256 differs from ``metadata.json``'s."""
    recorded = (read_json(Path(stage_dir) / METADATA_FILE) or {}).get(ARTIFACTS_KEY) or {}
    return recorded_file_problems(stage_dir, recorded, METADATA_FILE)


def verify_artifact(path: str | Path) -> None:
    """Raise :class:`ModelIntegrityError` naming ``path`` when it differs from what its stage recorded."""
    path = Path(path)
    problems = [p for p in artifact_problems(path.parent) if p.startswith(f"{path}:")]
    if problems:
        raise ModelIntegrityError(f"{problems[0]}; it is not the file this stage wrote -- rerun the flow to "
                                  f"retrain the stage")


def load_verified_model(model_path: str | Path) -> Any:
    """The stage's Keras model, after checking it is the file the stage wrote; a clear error otherwise."""
    from core.model import load_model

    path = Path(model_path)
    if not path.exists():
        raise ModelIntegrityError(f"{path}: model file missing -- rerun the flow to retrain the stage")
    verify_artifact(path)
    try:
        return load_model(path)
    except ValueError as exc:  # keras says "File not found" for any file that is not a .keras zip
        raise ModelIntegrityError(f"{path}: not a readable .keras model ({path.stat().st_size} bytes): "
                                  f"{str(exc).split('.')[0].replace('File not found', 'not a .keras zip file')}"
                                  ) from exc


def _index(store: WindowStore, name: str) -> np.ndarray:
    return getattr(store, f"{name}_index")


def _network_predictions(stage_dir: Path, store: WindowStore, batch: int, sets: Sequence[str]) -> dict[str, Any]:
    from core.model import predict

    model = load_verified_model(stage_dir / forecasters.NETWORK.artifact)  # type: ignore[operator]
    low, high = _clip(store)
    datasets = {"validation": store.validation_dataset, "holdout": store.holdout_dataset,
                "forecast": store.forecast_dataset}
    return {name: predict(model, datasets[name](batch), clip_min=low, clip_max=high) for name in sets}


def _booster_predictions(path: Path, store: WindowStore, sets: Sequence[str]) -> dict[str, np.ndarray]:
    from core.reference import load_booster

    verify_artifact(path)
    fit = load_booster(path)
    return {name: fit.predict_samples(store.feature_tables(), _index(store, name), _clip(store)) for name in sets}


def launch_rows(store: WindowStore, index: np.ndarray) -> np.ndarray:
    """True where the sample's item has no sale before its target month (its launch month, or later)."""
    tables = store.feature_tables()
    item = tables.rows["item"][np.asarray(index[:, 0], dtype=np.int64)]
    return tables.item_first[item] >= index[:, 1]


def _launch_mask(config: NestcastConfig, store: WindowStore, index: np.ndarray) -> np.ndarray | None:
    """:func:`launch_rows`, or None when the config neither calibrates launches nor blends them apart."""
    wanted = config.train.launch_calibration or config.reference.ensemble_segments == "launch"
    return launch_rows(store, index) if wanted else None


def _selected_launch_mask(selection: Selection, store: WindowStore, index: np.ndarray) -> np.ndarray | None:
    """:func:`launch_rows` when ``selection`` treats launches apart (a scale, or a weight of their own)."""
    weights = selection.blend
    apart = bool(selection.launch_scales) or (weights is not None and weights.launch != weights.known)
    return launch_rows(store, index) if apart else None


def apply_stage(
    config: NestcastConfig, stage_dir: str | Path, selection: Selection, store: WindowStore, sets: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """Set -> forecaster -> predictions of ``store``'s samples by the forecasters a stage trained (its files),
    calibrated and blended as ``selection`` chose: what the stage exports, reproducible from its files alone."""
    stage_dir = Path(stage_dir)
    batch = max(config.train.batch_size, 4096)
    raw: dict[str, dict[str, np.ndarray]] = {name: {} for name in sets}
    for name, values in _network_predictions(stage_dir, store, batch, sets).items():
        raw[name][forecasters.NETWORK.name] = values
    for booster in forecasters.BOOSTERS:
        if booster.name in selection.rounds:
            for name, values in _booster_predictions(stage_dir / booster.artifact, store, sets).items():  # type: ignore[operator]
                raw[name][booster.name] = values
    return {name: combine(columns, selection.launch_scales, selection.blend,
                          _selected_launch_mask(selection, store, _index(store, name)), _clip(store))
            for name, columns in raw.items()}


# --- the stages ----------------------------------------------------------------------------------


def _fit_booster(config: NestcastConfig, store: WindowStore, booster: forecasters.Forecaster, **kwargs: Any) -> Any:
    from core.reference import fit_reference

    return fit_reference(
        store, store.feature_tables(), config.reference, seed=config.train.seed, budget=config.train.sample_budget,
        features=booster.features,
        **kwargs,
    )


def _boosters(config: NestcastConfig) -> tuple[forecasters.Forecaster, ...]:
    return forecasters.BOOSTERS if config.reference.reference_enabled else ()


def select(
    config: NestcastConfig,
    windows_dir: str | Path,
    stage_dir: str | Path,
    on_epoch: EpochCallback | None = None,
    callbacks: Sequence[Any] = (),
) -> Selection:
    """Stage 1: epochs, boosting rounds, launch scales and blend weights from the validation months, and every
    forecaster's validation scores. Writes ``stage_dir/selection.json`` and ``stage_dir/validation.parquet``;
    a rerun with the selection in place returns it without training."""
    from core.training import train_forecaster
    from core.window_store import WindowStore

    stage_dir = Path(stage_dir)
    done = read_json(stage_dir / SELECTION_FILE)
    if done is not None and (stage_dir / "validation.parquet").exists() and not artifact_problems(stage_dir):
        return Selection.from_dict(done)
    store = WindowStore.open(windows_dir)
    trained = train_forecaster(config, windows_dir, stage_dir, on_epoch, stage="select", callbacks=callbacks)
    batch = max(config.train.batch_size, 4096)
    raw = {forecasters.NETWORK.name: _network_predictions(stage_dir, store, batch, ("validation",))["validation"]}
    rounds, booster_seconds = {}, 0.0
    for booster in _boosters(config):
        fit = _fit_booster(config, store, booster, before_month=store.validation_start, validate=True)
        fit.save(stage_dir / booster.artifact)  # type: ignore[operator]
        raw[booster.name] = fit.predict_samples(store.feature_tables(), store.validation_index, _clip(store))
        rounds[booster.name], booster_seconds = fit.rounds, booster_seconds + fit.seconds
    record_artifacts(stage_dir)
    frame = store.validation_frame()
    actual = frame["actual"].to_numpy(np.float64)
    months = frame["date_block_num"].to_numpy()
    launch = _launch_mask(config, store, store.validation_index)
    scales, weights = choose(actual, raw, launch, months, config, _clip(store))
    columns = combine(raw, scales, weights, launch, _clip(store))
    by_month = scores_by_month({**columns, "baseline": np.clip(frame["prev"].to_numpy(np.float64), *_clip(store))},
                               actual, months)
    selection = Selection(
        validation_months=list(store.validation_months),
        epochs=max(trained.best_epoch, 1),
        epochs_run=trained.epochs_run,
        model_seconds=trained.seconds_total,
        seconds_per_epoch=trained.seconds_per_epoch,
        params=trained.params,
        rounds=rounds,
        blend=weights,
        launch_scales=scales,
        validation_rmse={name: float(np.mean(list(scores.values()))) for name, scores in by_month.items()},
        validation_rmse_by_month=by_month,
        reference_seconds=booster_seconds if rounds else None,
    )
    _write_predictions(stage_dir / "validation.parquet", columns)
    write_json_atomic(stage_dir / SELECTION_FILE, selection.to_dict())
    return selection


def refit_epochs(config: NestcastConfig, selection: Selection) -> int:
    """The epochs a refit trains: ``train.refit_epochs`` from the selection's network, else the selected count."""
    return config.train.refit_epochs if config.train.refit_from == "selection" else int(selection.epochs)


def _refit_start(config: NestcastConfig, stage_dir: str | Path, select_dir: str | Path | None) -> Path | None:
    """The selection's network a refit continues from (verified against its recorded hash), or None."""
    if config.train.refit_from != "selection":
        return None
    path = Path(select_dir or Path(stage_dir).parent / "select") / forecasters.NETWORK.artifact  # type: ignore[operator]
    verify_artifact(path)
    return path


@dataclasses.dataclass
class RefitResult:
    """What a refit stage trained and predicted."""

    stage_dir: str
    model_path: str
    epochs: int
    model_seconds: float
    seconds_per_epoch: float | None
    reference_seconds: float | None
    params: int
    sets: list[str]
    seconds: float


def refit(
    config: NestcastConfig,
    windows_dir: str | Path,
    stage_dir: str | Path,
    selection: Selection,
    on_epoch: EpochCallback | None = None,
    callbacks: Sequence[Any] = (),
    select_dir: str | Path | None = None,
) -> RefitResult:
    """Stage 2: retrain every trained forecaster on every training target with the selection's epochs and rounds;
    write ``holdout.parquet`` (when the store holds a month out) and ``forecast.parquet``, a column per forecaster
    (:func:`apply_stage`). With ``train.refit_from='selection'`` the network continues from the selection stage's
    (in ``select_dir``; default: the ``select`` directory beside ``stage_dir``) for ``train.refit_epochs`` epochs."""
    from core.training import train_forecaster
    from core.window_store import WindowStore

    started = time.perf_counter()
    stage_dir = Path(stage_dir)
    store = WindowStore.open(windows_dir)
    sets = tuple(name for name in ("holdout", "forecast") if _index(store, name).shape[0])
    trained = train_forecaster(
        config, windows_dir, stage_dir, on_epoch, stage="refit", epochs=refit_epochs(config, selection),
        callbacks=callbacks, start_from=_refit_start(config, stage_dir, select_dir),
    )
    booster_seconds = None
    for booster in _boosters(config):
        if booster.name in selection.rounds:
            fit = _fit_booster(config, store, booster, rounds=int(selection.rounds[booster.name]))
            fit.save(stage_dir / booster.artifact)  # type: ignore[operator]
            booster_seconds = (booster_seconds or 0.0) + fit.seconds
    record_artifacts(stage_dir)
    for name, columns in apply_stage(config, stage_dir, selection, store, sets).items():
        _write_predictions(stage_dir / f"{name}.parquet", columns)
    return RefitResult(
        stage_dir=str(stage_dir),
        model_path=trained.model_path,
        epochs=trained.epochs_run,
        model_seconds=trained.seconds_total,
        seconds_per_epoch=trained.seconds_per_epoch,
        reference_seconds=booster_seconds,
        params=int(trained.params),
        sets=list(sets),
        seconds=time.perf_counter() - started,
    )


def forecast_run_dir(config: NestcastConfig, windows: Any, final_windows: Any) -> Path:
    """``runs/forecast-<hash>``, named by what the models are trained from: both windows builds' content, the
    model, training and reference settings, and the code that builds and trains the models.

    The same inputs always train into the same directory, so a rerun resumes or reuses it (idempotent), and
    the flow can tell before it consults the cache whether the run's files still exist. Changed model code
    gets a fresh directory rather than resuming checkpoints written by the old code: the code is every module
    this one and the configured encoder import, followed through the project's imports (:func:`code_identity`),
    so a new encoder or feature module counts without being listed anywhere. Naming a run imports no model code.
    """
    from core.encoders import ENCODERS
    from core.lake import LakePaths

    digest = hashlib.sha256(_build_hash(windows).encode())
    digest.update(_build_hash(final_windows).encode())
    for section in (config.model, config.train, config.reference):
        digest.update(section.model_dump_json().encode())
    digest.update(code_identity(__name__, ENCODERS[config.model.kind]).encode())
    return LakePaths.of(config).forecast_run(digest.hexdigest())


def _build_hash(windows: Any) -> str:
    return windows["build_hash"] if isinstance(windows, dict) else windows.build_hash


#: Modules whose effect on training is already in a run's identity (the windows builds' content hashes, the config
#: sections) or that only move files: a change there does not retrain.
OUTSIDE_CODE_IDENTITY: tuple[str, ...] = ("core.windows", "core.aggregate", "core.ingest", "core.store", "core.files",
                                          "core.lake", "core.config", "core.errors")


def code_identity(*modules: str) -> str:
    """sha256 over the source of ``modules`` and of every project module they import, directly or not (imports
    inside functions included; :data:`OUTSIDE_CODE_IDENTITY` left out), read with ``ast`` so nothing is imported."""
    import ast

    root = Path(__file__).resolve().parents[1]

    def source(name: str) -> Path | None:
        base = root.joinpath(*name.split("."))
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)

    seen: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in seen or name.split(".")[0] not in ("core", "tasks", "flows") or any(
                name == outside or name.startswith(f"{outside}.") for outside in OUTSIDE_CODE_IDENTITY):
            continue
        path = source(name)
        if path is None:  # an attribute (``from core.nlstm import NestedLSTM``), not a module
            continue
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                pending += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode())
        digest.update(seen[name].read_bytes())
    return digest.hexdigest()
