"""Step 4 as a Prefect task: train the forecaster, with a progress artifact updated every epoch.

Tagged ``gpu`` so a tag concurrency limit (`prefect concurrency-limit create gpu 1`) keeps one
training per GPU. The flow calls it directly (not ``.submit``) so its timeout can interrupt it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from core import model as model_step
from core import nlstm
from core.config import NestcastConfig
from core.lake import LakePaths
from tasks.common import RETRY_OPTIONS, artifact_key, content_cache_key, jsonable, retry_transient_only


def forecast_run_dir(config: NestcastConfig, windows: dict[str, Any]) -> Path:
    """``runs/forecast-<hash>``, named by what the model is trained from: the windows' content, the model
    and training settings, and the code that builds and trains the model.

    The same inputs always train into the same directory, so a rerun resumes or reuses it (idempotent), and
    the flow can tell before it consults the cache whether the run's files still exist. Changed model code
    gets a fresh directory rather than resuming checkpoints written by the old code.
    """
    digest = hashlib.sha256(windows["build_hash"].encode())
    digest.update(config.model.model_dump_json().encode())
    digest.update(config.train.model_dump_json().encode())
    for module in (model_step, nlstm):
        digest.update(Path(module.__file__).read_bytes())
    return LakePaths(config.data_dir).run_dir(f"forecast-{digest.hexdigest()[:12]}")


@task(
    name="train",
    tags=["nestcast", "gpu"],
    retry_condition_fn=retry_transient_only,
    cache_key_fn=content_cache_key("windows", "model", "train"),
    **RETRY_OPTIONS,
)
def train_model(config: NestcastConfig, windows: dict[str, Any]) -> dict[str, Any]:
    """Fit the configured recurrent forecaster on the training windows, early-stopped on the holdout."""
    logger = get_run_logger()
    run_dir = forecast_run_dir(config, windows)
    epochs = config.train.epochs
    progress_id = create_progress_artifact(
        progress=0.0,
        key=artifact_key("training-progress"),
        description=f"{config.model.kind} training, {epochs} epochs at most",
    )

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        update_progress_artifact(progress_id, progress=100.0 * (epoch + 1) / epochs)
        logger.info(
            "epoch %d/%d: %s", epoch + 1, epochs, ", ".join(f"{name}={value:.4f}" for name, value in logs.items())
        )

    result = jsonable(model_step.train_forecaster(config, windows["windows_dir"], run_dir, on_epoch=on_epoch))
    update_progress_artifact(progress_id, progress=100.0)
    return {**result, "run_dir": str(run_dir)}
