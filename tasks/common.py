"""What every nestcast task shares: one decorator (``nestcast_task``) with the retry policy and content-hash
cache keys that know the step's outputs, the task options built from the config, artifact keys."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.settings import get_current_settings
from prefect.states import State
from prefect.tasks import exponential_backoff

from core.config import NestcastConfig
from core.errors import NON_RETRYABLE
from core.files import file_sha256, read_json, tree_sha256, write_json_atomic
from core.store import data_dir_identity, store_of

F = TypeVar("F", bound=Callable[..., Any])
CacheKeyFn = Callable[[TaskRunContext, dict[str, Any]], str]
#: What a step writes, from its parameters (``config`` and the rest): the files its cached result points at.
OutputsFn = Callable[[Mapping[str, Any]], Iterable[Path]]
#: What a step shows in the UI, from its result and parameters (``nestcast_task(publish=...)``).
PublishFn = Callable[[Any, Mapping[str, Any]], None]

#: The retry policy every step task is declared with (`nestcast_task`); `step_options` sets it from the config.
RETRY_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
}


def step_options(config: NestcastConfig, *, timeout: bool = True) -> dict[str, Any]:
    """The one place the config's orchestration settings become task options (``task.with_options(**...)``).

    ``timeout=False`` for tasks mapped on a thread pool, where a timeout cannot interrupt the work.
    """
    options: dict[str, Any] = {
        "retries": config.orchestration.retries,
        "retry_delay_seconds": exponential_backoff(config.orchestration.retry_delay_seconds),
    }
    if timeout:
        options["timeout_seconds"] = config.orchestration.task_timeout_seconds
    return options


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
    """A parameter as stable text for a cache key: typed step results (pydantic models, dataclasses) by their
    fields, everything else as sorted JSON."""
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True, default=str)


def content_cache_key(
    *sections: str,
    input_trees: Callable[[NestcastConfig], Iterable[Path]] | None = None,
) -> CacheKeyFn:
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
        digest.update(_source_of(context.task.fn).encode())
        digest.update(data_dir_identity(config.data_dir).encode())
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


def _source_of(fn: Callable[..., Any]) -> str:
    """The step's source, read once where it was declared (a Dask worker may not find the file)."""
    source = getattr(fn, "__nestcast_source__", None)
    return source if source is not None else inspect.getsource(fn)


# --- cache keys that know a step's outputs --------------------------------------------------------
def output_stamps(paths: Iterable[Path]) -> dict[str, str]:
    """``path -> "size:mtime_ns:sha256"`` (or ``"missing"``) of each output.

    The content hash catches what size and mtime cannot: a file damaged or overwritten in place with its
    size kept and its mtime put back (``os.utime``). Outputs are small (a manifest, a month's Parquet, a
    store's meta, a model, predictions), so hashing them at each cache check is cheap.
    """
    stamps = {}
    for path in paths:
        try:
            stat = Path(path).stat()
            stamps[str(path)] = f"{stat.st_size}:{stat.st_mtime_ns}:{file_sha256(path)}"
        except FileNotFoundError:
            stamps[str(path)] = "missing"
    return stamps


def _stamp_file(key: str) -> Path:
    """Beside Prefect's own cached results, so that the two are kept and lost together.

    In the data directory the record went with it: a directory wiped and written again at the same path found
    no record, took "no record" for "never ran here" and was served ingest's cached result over an empty lake.
    """
    return Path(get_current_settings().results.local_storage_path) / "nestcast-task-outputs" / f"{key}.json"


def output_aware(cache_key: CacheKeyFn, outputs: OutputsFn) -> CacheKeyFn:
    """``cache_key``, made to miss when the step's outputs are gone or changed since it last succeeded.

    Prefect computes a key before the task runs, so the outputs cannot be hashed into it directly (the key
    would differ from the one the run stored its result under). Instead a step's success records its
    outputs' stamps (``nestcast_task`` does, beside Prefect's results: ``_stamp_file``); while the current stamps
    match that record, the key is the plain content key, and when they do not (a wiped lake or runs dir, a
    file rewritten or damaged in place, even with its size and mtime kept) it is salted, so the step runs
    again. Its success then records the new stamps.
    """

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        plain = cache_key(context, parameters)
        recorded = read_json(_stamp_file(plain))
        current = output_stamps(outputs(parameters))
        if recorded is None or recorded == current and "missing" not in current.values():
            return plain  # never ran here (nothing to contradict), or its outputs are as it left them
        return hashlib.sha256(f"{plain}:outputs-changed:{uuid.uuid4().hex}".encode()).hexdigest()

    return key


def record_outputs(cache_key: CacheKeyFn, outputs: OutputsFn, parameters: dict[str, Any]) -> None:
    """After a step succeeded: the stamps of its outputs, under its plain content key (see ``output_aware``)."""
    context = TaskRunContext.get()
    if context is None:  # called outside a task run (a test calling .fn): nothing to cache
        return
    plain = cache_key(context, parameters)
    write_json_atomic(_stamp_file(plain), output_stamps(outputs(parameters)))


# --- the one task decorator -------------------------------------------------------------------------
def nestcast_task(
    name: str,
    *,
    tags: Iterable[str] = (),
    cache_key: CacheKeyFn | None = None,
    outputs: OutputsFn | None = None,
    task_run_name: str | None = None,
    publish: PublishFn | None = None,
) -> Callable[[F], Task[..., Any]]:
    """Every nestcast step's ``@task``: ``tags`` only where a concurrency limit applies (``gpu``: Prefect asks the
    server for a slot of every tag before each task run, 0.3 s a task on a local server), the shared retry policy
    (retries, exponential backoff with jitter, transient errors only), and, with ``cache_key``, caching on content;
    with ``outputs`` as well, a cached result is only served while the files it points at are as the step
    left them. ``publish(result, parameters)`` creates the step's artifacts; it runs as an on-completion hook,
    which Prefect calls for a cached run too, so the newest run's page is complete even when nothing ran."""
    if outputs is not None and cache_key is None:
        raise ValueError(f"{name}: outputs only matter to a cached task; give cache_key too")

    def decorate(fn: F) -> Task[..., Any]:
        key_fn = output_aware(cache_key, outputs) if cache_key is not None and outputs is not None else cache_key
        fn.__nestcast_source__ = inspect.getsource(fn)  # type: ignore[attr-defined]
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            parameters = dict(bound.arguments)
            store = _store(parameters)
            if store is not None:
                store.pull()
            result = fn(*args, **kwargs)
            if cache_key is not None and outputs is not None:
                record_outputs(cache_key, outputs, parameters)
            if store is not None:
                store.commit(note=name)  # only a step that succeeded: a failed one leaves the store as it was
            return result

        body.__nestcast_source__ = fn.__nestcast_source__  # type: ignore[attr-defined]
        return task(
            body,
            name=name,
            task_run_name=task_run_name,
            tags=list(tags),
            cache_key_fn=_pulled_first(key_fn) if key_fn is not None else None,
            retry_condition_fn=retry_transient_only,
            on_completion=[_publish_hook(publish)] if publish is not None else None,
            **RETRY_OPTIONS,
        )

    return decorate


def _store(parameters: Mapping[str, Any]) -> Any:
    """The object store of the step's data directory (``core.store``), None for a local one."""
    config = parameters.get("config")
    return store_of(config.data_dir) if isinstance(config, NestcastConfig) else None


def _pulled_first(key_fn: CacheKeyFn) -> CacheKeyFn:
    """``key_fn`` computed on the store's newest state: the cache check hashes inputs and outputs in the working
    copy, so it is brought up to date first (on a Dask worker of another machine it may be empty)."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        store = _store(parameters)
        if store is not None:
            store.pull()
        return key_fn(context, parameters)

    return key


def _publish_hook(publish: PublishFn) -> Callable[[Task[..., Any], TaskRun, State], None]:
    def publish_artifacts(task: Task[..., Any], task_run: TaskRun, state: State) -> None:
        context = TaskRunContext.get()  # the hook runs inside the task run: artifacts attach to it
        publish(state.result(), dict(context.parameters) if context is not None else {})

    return publish_artifacts


class RenamedFlowRuns(logging.Filter):
    """Give a renamed flow run's log records its new name.

    Prefect's engine builds its logger, with the run's name frozen in the adapter's `extra`, before the flow body
    runs, so without this its own lines (the final "Finished in state ...") would carry the name the run started
    with. Installed on `prefect.flow_runs`, where the engine logs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name = self.names.get(str(getattr(record, "flow_run_id", "")))
        if name is not None:
            record.flow_run_name = name
        return True


def renamed_flow_runs() -> RenamedFlowRuns:
    """The one filter on `prefect.flow_runs` (installed on first use, so every process has exactly one)."""
    logger = logging.getLogger("prefect.flow_runs")
    for existing in logger.filters:
        if isinstance(existing, RenamedFlowRuns):
            return existing
    installed = RenamedFlowRuns()
    logger.addFilter(installed)
    return installed


def name_flow_run(name: str) -> None:
    """Rename the current flow run (its name is only known once the data is read: the forecast month)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(context.flow_run.id, name=name)
    context.flow_run.name = name  # the task and flow log lines from here on carry the new name
    renamed_flow_runs().names[str(context.flow_run.id)] = name  # and so do the engine's own


def name_failed_flow_run(flow: Any, flow_run: Any, state: State) -> None:
    """A flow's ``on_failure`` hook: ``forecast-2014-05-nlstm`` becomes ``forecast-failed-2014-05-nlstm``, so a
    failed run reads as one in the UI's list whenever it failed (before its month was known too)."""
    from prefect.client.orchestration import get_client

    prefix, _, rest = flow_run.name.partition("-")
    if not rest or rest.startswith("failed-"):
        return
    name = f"{prefix}-failed-{rest}"
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)
    renamed_flow_runs().names[str(flow_run.id)] = name


def flow_run_url() -> str | None:
    """The current flow run's page in the UI, when there is a UI (a temporary server has none)."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    run_id = flow_run.get_id()
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if ui and run_id else None


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(str(part) for part in parts).lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9]+", "-", text)).strip("-")


def flow_run_record() -> dict[str, Any]:
    """Which flow run made a file: its id, name, page in the UI (when there is one) and the time, for sidecars."""
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    return {"flow_run": {"id": flow_run.get_id(), "name": flow_run.get_name(), "url": flow_run_url(),
                         "written_at": datetime.now(UTC).isoformat(timespec="seconds")}}
