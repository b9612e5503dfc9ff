"""What the terminal shows while ``nestcast`` runs: nestcast's own lines, not every library's.

Quiet by default (``--verbose`` turns all of this off, for today's full detail):

- TensorFlow's C++ logs (device probing, XLA service, ``failed call to cuInit``) are raised to FATAL through
  ``TF_CPP_MIN_LOG_LEVEL`` before TensorFlow is imported, and the two lines CUDA's stub prints before absl's
  logging is set up (which no variable controls) are kept off the terminal by importing TensorFlow once with
  file descriptor 2 pointed at /dev/null.
- Prefect's console handler drops the per-task "Finished in state Completed()" lines of the per-month
  fan-out (``finish-aggregation`` logs one line for all months instead) and the hook bookkeeping lines of
  tasks that republish their artifacts. Failures, retries and everything in the UI's log stay.
- Great Expectations' INFO notices ("Created temporary directory …") go.
- The run's log in the UI (Prefect's API handler, :class:`UiLogNoise`) loses the hook bookkeeping lines too, and an
  error nestcast raised on purpose (``core.errors``) is one line there, its message, not the engine's traceback.

One path for every entry point (``quiet_console``): ``nestcast run``, ``replay``, ``backtest``, ``search`` and
``serve`` run it, and it points ``PREFECT_LOGGING_SETTINGS_PATH`` at ``deployments/logging.yml`` (Prefect's own
logging config plus these filters), so the processes Prefect starts from here (a served deployment's flow runs,
Dask workers) set their logging up the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from core.errors import NestcastError

#: Characters a terminal acts on instead of showing: C0 and C1 controls (ESC starts a screen-clearing sequence, BEL
#: rings), DEL, and the bidirectional overrides that make a line read differently from what it holds.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

#: The CLI's flag that keeps every library's console output (checked before any import, see ``wants_verbose``).
VERBOSE_FLAG = "--verbose"
#: Task runs whose completion line is dropped on the console: one per month, summed up by finish-aggregation.
FAN_OUT_TASKS: tuple[str, ...] = ("aggregate-month",)
#: Prefect's default logging config plus nestcast's filters on its console and API handlers.
LOGGING_CONFIG = Path(__file__).with_name("logging.yml")


def printable(text: str) -> str:
    """``text`` with every control character spelt as its escape (``\\x1b``, ``\\x07``, ``\\u202e``): a message may
    quote a file's bytes, and what the CLI prints must not drive the terminal."""
    return _CONTROL.sub(lambda match: ascii(match.group())[1:-1], text)


def wants_verbose(argv: list[str] | None = None) -> bool:
    """Whether the command line asks for full console detail; read from ``sys.argv`` because the quieting must
    happen before typer parses the options (TensorFlow may be imported by then)."""
    return VERBOSE_FLAG in (sys.argv[1:] if argv is None else argv)


def quiet_native_logs() -> None:
    """Environment for TensorFlow/absl/XLA's C++ loggers; an explicit value in the environment still wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # 3: FATAL only (hides I/W/E, incl. the cuInit error)
    os.environ.setdefault("TF_CPP_MIN_VLOG_LEVEL", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("GLOG_minloglevel", "3")


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def preload_tensorflow() -> None:
    """Import TensorFlow and probe its GPUs with stderr silenced at the file-descriptor level: CUDA's stub
    prints "Could not find cuda drivers" before absl logging exists, where no log level reaches it. Later
    imports are no-ops, so training prints nothing. Python errors (an import failure) still propagate."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    with _stderr_to_devnull():
        try:
            import tensorflow as tf
        except ImportError:
            return
        tf.config.list_physical_devices("GPU")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def _expected_error(record: logging.LogRecord) -> bool:
    """A record of an error nestcast raised on purpose (``core.errors``): its message says it all."""
    if getattr(record, "nestcast_expected_error", False):  # its traceback already taken off (UiLogNoise)
        return True
    return bool(record.exc_info) and isinstance(record.exc_info[1], NestcastError)


def _hook_line(record: logging.LogRecord) -> bool:
    """Prefect's INFO bookkeeping around hooks (a cached task republishing its artifacts runs one); a hook's
    failure is an ERROR and stays."""
    if record.levelno != logging.INFO:
        return False
    message = record.getMessage()
    return message.startswith("Running hook ") or message.endswith("finished running successfully")


class ConsoleNoise(logging.Filter):
    """Drops the per-task completion lines of the fan-out and hook bookkeeping, and the engine's traceback of an
    error nestcast raised on purpose (the CLI ends with its one-line message, and the "Finished in state Failed"
    line names it); keeps anything else that is not INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _expected_error(record):
            return False
        if record.levelno != logging.INFO:
            return True
        if record.name.startswith("great_expectations"):  # its "Created temporary directory" notices
            return False
        message = record.getMessage()
        task = getattr(record, "task_name", None)
        if task in FAN_OUT_TASKS and message.startswith(("Finished in state Completed", "Finished in state Cached")):
            return False
        return not _hook_line(record)


class UiLogNoise(logging.Filter):
    """For the log the UI shows (Prefect's API handler): drops the hook bookkeeping lines and keeps an error
    nestcast raised on purpose as its one-line message ("Encountered exception during execution:
    DataValidationError('test.csv: ...')") instead of the engine's 80-line traceback through Prefect's internals.
    An unexpected error keeps its traceback: that is where its cause is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _hook_line(record):
            return False
        if record.exc_info and isinstance(record.exc_info[1], NestcastError):
            if record.getMessage().startswith("Engine execution exited with unexpected exception"):
                return False  # a served run's engine says so of every error; the line before named this one
            # Python 3.11's filters cannot hand a copy on; the mark tells ConsoleNoise, which sees this record next.
            record.exc_info, record.exc_text = None, None
            record.nestcast_expected_error = True
        return True


def console_noise() -> ConsoleNoise:
    """The console handler's filter in ``logging.yml``. Prefect sets logging up (at ``import prefect``) before it
    loads a flow in a process it starts, such as a served deployment's run, where nothing of nestcast's ran
    earlier: the moment to quiet TensorFlow there too, before the flow's imports load it."""
    quiet_native_logs()
    preload_tensorflow()
    return ConsoleNoise()


def _prefect_handlers(kind: str) -> list[logging.Handler]:
    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    wanted = {"console": PrefectConsoleHandler, "api": APILogHandler}[kind]
    handlers: list[logging.Handler] = []
    names = ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.extra")
    for logger in (logging.getLogger(), *(logging.getLogger(name) for name in names)):
        handlers += [h for h in logger.handlers if isinstance(h, wanted) and h not in handlers]
    return handlers


def quiet_prefect_console() -> None:
    """Add :class:`ConsoleNoise` to Prefect's console handlers and :class:`UiLogNoise` to its API handlers in this
    process, whichever logging config Prefect read (``logging.yml`` already has them; a no-op then)."""
    for kind, noise in (("console", ConsoleNoise), ("api", UiLogNoise)):
        for handler in _prefect_handlers(kind):
            if not any(isinstance(f, noise) for f in handler.filters):
                handler.addFilter(noise())


def quiet_child_processes() -> None:
    """The processes Prefect starts from this one (a served deployment's runs, Dask workers) read
    ``logging.yml``; a ``PREFECT_LOGGING_SETTINGS_PATH`` set by the user wins."""
    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(LOGGING_CONFIG))


def quiet_console(verbose: bool) -> None:
    """Everything above, unless ``verbose``: the one quieting path of every entry point."""
    if verbose:
        return
    quiet_native_logs()
    quiet_child_processes()
    preload_tensorflow()
    quiet_prefect_console()
