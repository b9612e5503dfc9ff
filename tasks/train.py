"""Step 4 as Prefect tasks: the training protocol's stages (``core.protocol``), with progress in the UI.

``select`` fixes the epoch count, the boosting rounds, the launch scales and the blend weights on the validation
months; ``refit`` retrains with them, once on the store that holds out the last month (its holdout score is
the run's reported score) and once on the store without a holdout (its forecast is exported). Tagged ``gpu``
so a tag concurrency limit (`prefect concurrency-limit create gpu 1`) keeps one training per GPU. The flow
calls them directly (not ``.submit``) so their timeout can interrupt them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from core import protocol
from core.config import NestcastConfig
from core.files import read_json
from core.lake import FORECAST_FILE, METADATA_FILE, SELECTION_FILE, LakePaths
from core.progress import TrainingProgress, describe_device, epoch_table
from core.windows import WindowsSummary
from tasks.common import artifact_key, content_cache_key, nestcast_task

#: What each refit stage predicts, the file that says it finished.
REFIT_OUTPUT = {"holdout": "holdout", "final": Path(FORECAST_FILE).stem}


def _progress(label: str, epochs: int) -> Callable[[int, dict[str, float]], None]:
    logger = get_run_logger()
    progress_id = create_progress_artifact(
        progress=0.0, key=artifact_key("training-progress", label), description=f"{label}: {epochs} epochs at most"
    )

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        update_progress_artifact(progress_id, progress=min(100.0, 100.0 * (epoch + 1) / epochs))
        logger.info(
            "%s epoch %d/%d: %s", label, epoch + 1, epochs, ", ".join(f"{k}={v:.4f}" for k, v in logs.items())
        )

    return on_epoch


def _terminal_progress(label: str) -> TrainingProgress:
    """The start line (device, samples, batches, compile time) in the run's log; the bar on a TTY only."""
    return TrainingProgress(label, get_run_logger().info)


def _publish_epochs(stage: str, stage_dir: Path) -> None:
    """The stage's per-epoch table (epoch, loss, validation RMSE, seconds), read back from its metadata.json,
    so that a cached stage shows it as well."""
    metadata = read_json(stage_dir / METADATA_FILE)
    if not metadata:
        return
    device = describe_device({"kind": metadata.get("device"), "devices": metadata.get("devices"),
                              "precision": metadata.get("precision"), "jit_compile": metadata.get("jit_compile"),
                              "requested": (metadata.get("train_config") or {}).get("device")})
    create_table_artifact(
        key=artifact_key("training-epochs", stage),
        table=epoch_table(metadata),
        description=f"{stage}: {metadata.get('epochs_run')} epochs on {device}, best epoch {metadata.get('best_epoch')}"
        f"{' (stopped early)' if metadata.get('stopped_early') else ''}",
    )


def _publish_selection(selection: protocol.Selection, parameters: Mapping[str, Any]) -> None:
    if "run_dir" in parameters:
        _publish_epochs("select", LakePaths.stage_dir(parameters["run_dir"], "select"))


def _publish_refit(result: protocol.RefitResult, parameters: Mapping[str, Any]) -> None:
    _publish_epochs(f"refit-{parameters.get('stage', '')}", Path(result.stage_dir))


@nestcast_task(
    "select",
    tags=["gpu"],
    cache_key=content_cache_key("windows", "model", "train", "reference"),
    outputs=lambda p: [LakePaths.stage_dir(p["run_dir"], "select") / SELECTION_FILE,
                       *protocol.artifact_paths(LakePaths.stage_dir(p["run_dir"], "select"))],
    publish=_publish_selection,
)
def select_models(config: NestcastConfig, windows: WindowsSummary, run_dir: str) -> protocol.Selection:
    """Epochs, boosting rounds, launch scales and blend weights from the validation months (the months before the
    holdout); the validation RMSEs the gate decides on."""
    on_epoch = _progress("select", config.train.epochs)
    selection = protocol.select(config, windows.windows_dir, LakePaths.stage_dir(run_dir, "select"), on_epoch,
                                callbacks=[_terminal_progress("select")])
    blend = selection.blend
    get_run_logger().info(
        "selected on months %s: %s epochs, boosting rounds %s, model weight %s in the ensemble (%s for launch items), "
        "launch scales %s; mean validation RMSE %s",
        selection.validation_months, selection.epochs, selection.rounds or "—", blend and blend.known,
        blend and blend.launch, selection.launch_scales or "—",
        ", ".join(f"{k} {v:.4f}" for k, v in selection.validation_rmse.items()),
    )
    return selection


@nestcast_task(
    "refit",
    task_run_name="refit-{stage}",
    tags=["gpu"],
    cache_key=content_cache_key("windows", "model", "train", "reference"),
    outputs=lambda p: [LakePaths.stage_predictions(p["run_dir"], p["stage"], REFIT_OUTPUT[p["stage"]]),
                       *protocol.artifact_paths(LakePaths.stage_dir(p["run_dir"], p["stage"]))],
    publish=_publish_refit,
)
def refit_models(config: NestcastConfig, windows: WindowsSummary, selection: protocol.Selection, run_dir: str,
                 stage: str) -> protocol.RefitResult:
    """Retrain on every training month of ``windows`` with the selected rounds, the network from the selection's
    (or from scratch for the selected epochs: ``train.refit_from``); predict."""
    on_epoch = _progress(f"refit-{stage}", protocol.refit_epochs(config, selection))
    result = protocol.refit(config, windows.windows_dir, LakePaths.stage_dir(run_dir, stage), selection, on_epoch,
                            callbacks=[_terminal_progress(f"refit-{stage}")],
                            select_dir=LakePaths.stage_dir(run_dir, "select"))
    get_run_logger().info(
        "refit (%s): %d epochs in %.0f s, LightGBM %s s; predicted %s",
        stage, result.epochs, result.model_seconds,
        "—" if result.reference_seconds is None else f"{result.reference_seconds:.0f}", ", ".join(result.sets),
    )
    return result
