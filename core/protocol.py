"""The honest training protocol, shared by the forecast flow and the backtest so their numbers agree.

On a windows store whose holdout month is ``H`` (its validation month is ``V = H - 1``):

1. **select** -- the Nested LSTM trains on the targets before ``V`` and early-stops on ``V``'s grid; the
   LightGBM reference does the same. This fixes the epoch count, the boosting rounds and the ensemble's
   blend weight, and gives the validation-month scores the gate decides on (``core.gate``).
2. **refit** -- both models retrain from scratch on every training target (through ``V``) with the selected
   epoch count / rounds, and predict the holdout month ``H`` (the reported score, which nothing above has
   seen) and the store's forecast pairs.

The forecast flow runs 1 and 2 on the store that holds out the lake's last month ``M - 1`` (so its reported
score is the backtest at origin ``M - 1``), then 2 again on the store built without a holdout, so the
exported forecast of ``M`` comes from models trained on every month through ``M - 1``. A backtest at origin
``o`` is 1 and 2 on the store that holds out ``o``.

Each stage writes into its own directory: ``model.keras`` and ``metadata.json`` (with checkpoints, so a
crashed stage resumes), ``reference.txt`` (the reported booster) and ``trees.txt`` (the ensemble's booster,
trained on the standard features plus the launch and family ones), and the predictions as Parquet.
``metadata.json`` records the sha256 of the model and boosters (``artifacts``); a model is checked against it
before it is loaded, and a stage whose files no longer match is trained again rather than served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core.calibration import apply_launch_scale, launch_scale
from core.errors import ModelIntegrityError
from core.files import atomic_path, file_sha256, read_json, recorded_file_problems, write_json_atomic
from core.gate import BlendWeights, blend, rmse
from core.lake import SELECTION_FILE

if TYPE_CHECKING:
    from core.config import NestcastConfig
    from core.window_store import WindowStore

EpochCallback = Callable[[int, dict[str, float]], None]
PREDICTION_SETS: tuple[str, ...] = ("validation", "holdout", "forecast")


def _clip(store: WindowStore) -> tuple[float, float]:
    low, high = store.meta["target_clip"]
    return float(low), float(high)


def _write_predictions(path: Path, columns: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(columns).to_parquet(tmp, index=False)


def read_predictions(stage_dir: str | Path, name: str) -> pd.DataFrame:
    """Predictions of one set (:data:`PREDICTION_SETS`) written by a stage: a column per forecaster."""
    return pd.read_parquet(Path(stage_dir) / f"{name}.parquet")


METADATA_FILE = "metadata.json"
ARTIFACTS_KEY = "artifacts"  # in metadata.json: file name -> sha256 of the stage's model and boosters
MODEL_ARTIFACTS: tuple[str, ...] = ("model.keras", "reference.txt", "trees.txt")


def record_artifacts(stage_dir: str | Path) -> dict[str, str]:
    """Record the sha256 of the stage's model and boosters in its ``metadata.json`` (after they are written)."""
    stage_dir = Path(stage_dir)
    metadata = read_json(stage_dir / METADATA_FILE) or {}
    metadata[ARTIFACTS_KEY] = {name: file_sha256(stage_dir / name) for name in MODEL_ARTIFACTS
                               if (stage_dir / name).exists()}  # fmt: skip
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


def _model_predictions(model_path: str, store: WindowStore, batch: int, sets: tuple[str, ...]) -> dict[str, Any]:
    from core.model import predict

    model = load_verified_model(model_path)
    clip = _clip(store)
    datasets = {"validation": store.validation_dataset, "holdout": store.holdout_dataset,
                "forecast": store.forecast_dataset}  # fmt: skip
    return {name: predict(model, datasets[name](batch), clip_min=clip[0], clip_max=clip[1]) for name in sets}


def _reference_fit(config: NestcastConfig, store: WindowStore, tables: Any, **kwargs: Any) -> Any:
    from core.reference import fit_reference

    return fit_reference(
        store, tables, config.reference, seed=config.train.seed, max_samples=config.train.max_train_samples,
        budget=config.train.sample_budget, **kwargs,
    )


def _reference_predictions(fit: Any, tables: Any, store: WindowStore, sets: tuple[str, ...]) -> dict[str, Any]:
    index = {"validation": store.validation_index, "holdout": store.holdout_index, "forecast": store.forecast_index}
    return {name: fit.predict_samples(tables, index[name], _clip(store)) for name in sets}


def _launch_rows(store: WindowStore, index: np.ndarray, config: NestcastConfig | None = None) -> np.ndarray | None:
    """True where the sample's item has no sale before its target month (its launch month, or later); None when
    ``config`` neither calibrates launches nor blends them apart (the feature tables are then not built)."""
    if config is not None and not (config.train.launch_calibration or (
            config.reference.reference_enabled and config.reference.ensemble_segments == "launch")):
        return None
    tables = store.feature_tables()
    item = tables.rows["item"][np.asarray(index[:, 0], dtype=np.int64)]
    return tables.item_first[item] >= index[:, 1]


#: Forecaster -> (the column its launch scale applies to, the column that keeps it unscaled). The model and the
#: ensemble's trees are the project's own forecasters and are calibrated; the reference stays the standard recipe,
#: and its calibrated copy is reported beside it so the comparison stays like for like.
LAUNCH_CALIBRATED: dict[str, tuple[str, str]] = {
    "model": ("model", "model_uncalibrated"),
    "trees": ("trees", "trees_uncalibrated"),
    "reference": ("reference_calibrated", "reference"),
}


def _fit_launch_scales(
    config: NestcastConfig, predictions: dict[str, np.ndarray], actual: np.ndarray, launch: np.ndarray | None,
    clip: tuple[float, float],
) -> dict[str, float]:
    """Each forecaster's launch scale on the validation month (``core.calibration``); none when switched off."""
    if not config.train.launch_calibration or launch is None:
        return {}
    return {name: launch_scale(actual, predictions[name], launch, clip) for name in LAUNCH_CALIBRATED
            if name in predictions}  # fmt: skip


def _apply_launch_scales(
    columns: dict[str, np.ndarray], scales: dict[str, float], launch: np.ndarray | None, clip: tuple[float, float]
) -> None:
    """Scale each calibrated forecaster's launch rows in place, keeping the unscaled column beside it."""
    for name, scale in scales.items():
        scaled, unscaled = LAUNCH_CALIBRATED[name]
        raw = columns[name]
        columns[unscaled] = raw
        columns[scaled] = apply_launch_scale(raw, launch, scale, clip)


def _ensemble_partner(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The booster the model is blended with: the extended trees, else the (calibrated) reference."""
    return columns.get("trees", columns.get("reference_calibrated", columns["reference"]))


def _tree_members(config: NestcastConfig) -> dict[str, tuple[str, ...]]:
    """The boosters a stage trains, each with the features it reads: the reported ``reference`` (the standard
    recipe), and the ensemble's ``trees`` (also the launch features) unless the ensemble uses the reference."""
    from core import features

    members = {"reference": features.RECIPE}
    if config.reference.ensemble_trees == "extended":
        members["trees"] = features.BOOSTER
    return members


def select(
    config: NestcastConfig,
    windows_dir: str | Path,
    stage_dir: str | Path,
    on_epoch: EpochCallback | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Stage 1: the epoch count, the boosting rounds, the blend weight and the validation-month scores.

    Writes ``stage_dir/selection.json`` (returned) and ``stage_dir/validation.parquet``; a rerun with the
    selection in place returns it without training.
    """
    from core.model import train_forecaster
    from core.window_store import WindowStore

    stage_dir = Path(stage_dir)
    done = read_json(stage_dir / SELECTION_FILE)
    if done is not None and (stage_dir / "validation.parquet").exists() and not artifact_problems(stage_dir):
        return done
    store = WindowStore.open(windows_dir)
    trained = train_forecaster(config, windows_dir, stage_dir, on_epoch, stage="select", callbacks=callbacks)
    record_artifacts(stage_dir)
    batch = max(config.train.batch_size, 4096)
    predictions = {"model": _model_predictions(trained.model_path, store, batch, ("validation",))["validation"]}
    validation = store.validation_frame()
    actual = validation["actual"].to_numpy(np.float64)
    launch = _launch_rows(store, store.validation_index, config)
    scales = _fit_launch_scales(config, predictions, actual, launch, _clip(store))
    _apply_launch_scales(predictions, scales, launch, _clip(store))
    scores = {"model": rmse(predictions["model"], actual)}
    selection: dict[str, Any] = {
        "validation_month": store.validation_month,
        "epochs": max(trained.best_epoch, 1),
        "epochs_run": trained.epochs_run,
        "model_seconds": trained.seconds_total,
        "seconds_per_epoch": trained.seconds_per_epoch,
        "params": trained.params,
        "rounds": None,
        "blend_weight": None,
        "launch_blend_weight": None,
        "reference_seconds": None,
    }
    if config.reference.reference_enabled:
        tables = store.feature_tables()
        rounds, seconds = {}, 0.0
        for member, names in _tree_members(config).items():
            fit = _reference_fit(
                config, store, tables, before_month=store.validation_month, validate=True, features=names
            )
            fit.save(stage_dir / f"{member}.txt")
            predictions[member] = _reference_predictions(fit, tables, store, ("validation",))["validation"]
            rounds[member], seconds = fit.rounds, seconds + fit.seconds
        tree_scales = _fit_launch_scales(config, {k: predictions[k] for k in _tree_members(config)}, actual, launch,
                                         _clip(store))  # fmt: skip
        _apply_launch_scales(predictions, tree_scales, launch, _clip(store))
        scales |= tree_scales
        partner = _ensemble_partner(predictions)
        segments = launch if config.reference.ensemble_segments == "launch" else None
        weights = BlendWeights.fit(actual, predictions["model"], partner, segments)
        predictions["ensemble"] = blend(predictions["model"], partner, weights.per_row(segments, actual.size),
                                        _clip(store))  # fmt: skip
        scores |= {name: rmse(predictions[name], actual) for name in ("reference", "ensemble")}
        selection |= {"rounds": rounds["reference"], "tree_rounds": rounds, "blend_weight": weights.known,
                      "launch_blend_weight": weights.launch, "reference_seconds": seconds}  # fmt: skip
    selection["launch_scales"] = scales
    baseline = np.clip(validation["prev"].to_numpy(np.float64), *_clip(store))
    selection["validation_rmse"] = scores | {"baseline": rmse(baseline, actual)}
    _write_predictions(stage_dir / "validation.parquet", predictions)
    record_artifacts(stage_dir)
    write_json_atomic(stage_dir / SELECTION_FILE, selection)
    return selection


def refit(
    config: NestcastConfig,
    windows_dir: str | Path,
    stage_dir: str | Path,
    selection: dict[str, Any],
    on_epoch: EpochCallback | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Stage 2: retrain on every training target with the selection's epochs and rounds; predict.

    Writes ``holdout.parquet`` (when the store holds a month out) and ``forecast.parquet`` into
    ``stage_dir``: a column per forecaster (``model``, and with the reference ``reference`` and ``ensemble``
    blended with the selected weight). Returns paths and timings.
    """
    from core.model import train_forecaster
    from core.window_store import WindowStore

    started = time.perf_counter()
    stage_dir = Path(stage_dir)
    store = WindowStore.open(windows_dir)
    sets = tuple(name for name in ("holdout", "forecast") if getattr(store, f"{name}_index").shape[0])
    trained = train_forecaster(
        config, windows_dir, stage_dir, on_epoch, stage="refit", epochs=selection["epochs"], callbacks=callbacks
    )
    record_artifacts(stage_dir)
    batch = max(config.train.batch_size, 4096)
    predictions = {name: {"model": values} for name, values in
                   _model_predictions(trained.model_path, store, batch, sets).items()}  # fmt: skip
    reference_seconds = None
    if selection.get("rounds"):
        tables = store.feature_tables()
        reference_seconds = 0.0
        rounds = selection.get("tree_rounds") or {"reference": selection["rounds"]}
        members = _tree_members(config)
        for member, count in rounds.items():
            fit = _reference_fit(config, store, tables, rounds=int(count), features=members[member])
            fit.save(stage_dir / f"{member}.txt")
            reference_seconds += fit.seconds
            for name, values in _reference_predictions(fit, tables, store, sets).items():
                predictions[name][member] = values
    for name, columns in predictions.items():
        launch = _launch_rows(store, getattr(store, f"{name}_index"), config)
        _apply_launch_scales(columns, selection.get("launch_scales") or {}, launch, _clip(store))
        if selection.get("rounds"):
            segments = launch if config.reference.ensemble_segments == "launch" else None
            partner = _ensemble_partner(columns)
            weights = BlendWeights.of(selection).per_row(segments, partner.size)
            columns["ensemble"] = blend(columns["model"], partner, weights, _clip(store))
    record_artifacts(stage_dir)
    for name, columns in predictions.items():
        _write_predictions(stage_dir / f"{name}.parquet", columns)
    return {
        "stage_dir": str(stage_dir),
        "model_path": trained.model_path,
        "epochs": trained.epochs_run,
        "model_seconds": trained.seconds_total,
        "seconds_per_epoch": trained.seconds_per_epoch,
        "reference_seconds": reference_seconds,
        "params": trained.params,
        "sets": list(sets),
        "seconds": time.perf_counter() - started,
    }


def forecast_run_dir(config: NestcastConfig, windows: dict[str, Any], final_windows: dict[str, Any]) -> Path:
    """``runs/forecast-<hash>``, named by what the models are trained from: both windows builds' content, the
    model, training and reference settings, and the code that builds and trains the models.

    The same inputs always train into the same directory, so a rerun resumes or reuses it (idempotent), and
    the flow can tell before it consults the cache whether the run's files still exist. Changed model code
    gets a fresh directory rather than resuming checkpoints written by the old code. The code is read from
    the modules' files, so naming a run imports no model code.
    """
    import hashlib
    import importlib.util

    from core.lake import LakePaths

    digest = hashlib.sha256(windows["build_hash"].encode())
    digest.update(final_windows["build_hash"].encode())
    for section in (config.model, config.train, config.reference):
        digest.update(section.model_dump_json().encode())
    for module in ("core.model", "core.nlstm", "core.protocol", "core.reference", "core.features"):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        digest.update(Path(spec.origin).read_bytes())
    return LakePaths.of(config).forecast_run(digest.hexdigest())
