"""What every nestcast task shares: the retry policy, content-hash cache keys, artifact keys."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import exponential_backoff

from core.config import NestcastConfig
from core.errors import NON_RETRYABLE
from core.lake import tree_sha256

#: Defaults every step task is declared with; the flow may override retries from the config.
RETRY_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
}


def retry_transient_only(task: Task[..., Any], task_run: TaskRun, state: State) -> bool:
    """Retry I/O hiccups and timeouts; never retry bad data or bad configuration."""
    try:
        state.result(raise_on_failure=True)
    except NON_RETRYABLE:
        return False
    except Exception:  # noqa: BLE001 - anything else is presumed transient
        return True
    return True


def _fingerprint(value: Any) -> str:
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()
    return json.dumps(value, sort_keys=True, default=str)


def content_cache_key(
    *sections: str,
    input_trees: Callable[[NestcastConfig], Iterable[Path]] | None = None,
) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A cache key from what a step's result really depends on.

    The key combines the task's source, the data directory, the named config ``sections``, every
    other parameter (upstream references, which carry content hashes) and, when given, the
    content hash of input files (``input_trees``). Flow-run ids are deliberately left out, so a
    rerun after a failure finds the results of the steps that already succeeded.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        config: NestcastConfig = parameters["config"]
        digest = hashlib.sha256()
        digest.update(context.task.name.encode())
        digest.update(inspect.getsource(context.task.fn).encode())
        digest.update(str(Path(config.data_dir).resolve()).encode())
        for section in sections:
            digest.update(_fingerprint(getattr(config, section)).encode())
        for name in sorted(parameters):
            if name != "config":
                digest.update(name.encode())
                digest.update(_fingerprint(parameters[name]).encode())
        if input_trees is not None:
            for tree in input_trees(config):
                digest.update(tree_sha256(tree).encode() if tree.exists() else b"missing")
        return digest.hexdigest()

    return key


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(str(part) for part in parts).lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9]+", "-", text)).strip("-")


def jsonable(result: Any) -> Any:
    """A step's summary as plain JSON data (tasks pass small references, never frames)."""
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return json.loads(json.dumps(dataclasses.asdict(result), default=str))
    return json.loads(json.dumps(result, default=str))


def refresh_if_missing(*outputs: Path) -> dict[str, Any]:
    """Task options that bypass the cache when a step's outputs are gone (say, the lake was wiped).

    Cache keys hash the inputs only, so a cached result could otherwise point at files that no longer exist.
    """
    return {"refresh_cache": True} if not all(Path(path).exists() for path in outputs) else {}
