"""Step 4 as Prefect tasks: the training protocol's stages (``core.protocol``), with progress in the UI.

``select`` fixes the epoch count, the reference's boosting rounds and the blend weight on the validation
month; ``refit`` retrains with them, once on the store that holds out the last month (its holdout score is
the run's reported score) and once on the store without a holdout (its forecast is exported). Tagged ``gpu``
so a tag concurrency limit (`prefect concurrency-limit create gpu 1`) keeps one training per GPU. The flow
calls them directly (not ``.submit``) so their timeout can interrupt them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from core import protocol
from core.config import NestcastConfig
from core.lake import FORECAST_FILE, SELECTION_FILE, LakePaths
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


@nestcast_task(
    "select",
    tags=["gpu"],
    cache_key=content_cache_key("windows", "model", "train", "reference"),
    outputs=lambda p: [LakePaths.stage_dir(p["run_dir"], "select") / SELECTION_FILE,
                       *protocol.artifact_paths(LakePaths.stage_dir(p["run_dir"], "select"))],
)
def select_models(config: NestcastConfig, windows: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Epochs, boosting rounds and blend weight, early-stopped on the validation month (the month before the
    holdout); the validation-month RMSEs the gate decides on."""
    on_epoch = _progress("select", config.train.epochs)
    selection = protocol.select(config, windows["windows_dir"], LakePaths.stage_dir(run_dir, "select"), on_epoch)
    get_run_logger().info(
        "selected on month %s: %s epochs, %s boosting rounds, model weight %s in the ensemble; validation RMSE %s",
        selection["validation_month"], selection["epochs"], selection["rounds"], selection["blend_weight"],
        ", ".join(f"{k} {v:.4f}" for k, v in selection["validation_rmse"].items()),
    )  # fmt: skip
    return selection


@nestcast_task(
    "refit",
    task_run_name="refit-{stage}",
    tags=["gpu"],
    cache_key=content_cache_key("windows", "model", "train", "reference"),
    outputs=lambda p: [LakePaths.stage_predictions(p["run_dir"], p["stage"], REFIT_OUTPUT[p["stage"]]),
                       *protocol.artifact_paths(LakePaths.stage_dir(p["run_dir"], p["stage"]))],
)
def refit_models(
    config: NestcastConfig, windows: dict[str, Any], selection: dict[str, Any], run_dir: str, stage: str
) -> dict[str, Any]:
    """Retrain on every training month of ``windows`` with the selected epochs and rounds; predict."""
    on_epoch = _progress(f"refit-{stage}", int(selection["epochs"]))
    result = protocol.refit(config, windows["windows_dir"], LakePaths.stage_dir(run_dir, stage), selection, on_epoch)
    get_run_logger().info(
        "refit (%s): %d epochs in %.0f s, reference %s s; predicted %s",
        stage, result["epochs"], result["model_seconds"],
        "—" if result["reference_seconds"] is None else f"{result['reference_seconds']:.0f}", ", ".join(result["sets"]),
    )  # fmt: skip
    return result
