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
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator

from core.errors import NestcastError

#: Characters a terminal acts on instead of showing: C0 and C1 controls (ESC starts a screen-clearing sequence, BEL
#: rings), DEL, and the bidirectional overrides that make a line read differently from what it holds.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

#: The CLI's flag that keeps every library's console output (checked before any import, see ``wants_verbose``).
VERBOSE_FLAG = "--verbose"
#: Task runs whose completion line is dropped on the console: one per month, summed up by finish-aggregation.
FAN_OUT_TASKS: tuple[str, ...] = ("aggregate-month",)


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


class ConsoleNoise(logging.Filter):
    """Drops the per-task completion lines of the fan-out and hook bookkeeping, and the engine's traceback of an
    error nestcast raised on purpose (the CLI ends with its one-line message, and the "Finished in state Failed"
    line names it); keeps anything else that is not INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], NestcastError):
            return False
        if record.levelno != logging.INFO:
            return True
        if record.name.startswith("great_expectations"):  # its "Created temporary directory" notices
            return False
        message = record.getMessage()
        task = getattr(record, "task_name", None)
        if task in FAN_OUT_TASKS and message.startswith(("Finished in state Completed", "Finished in state Cached")):
            return False
        hook_line = message.startswith("Running hook ") or message.endswith("finished running successfully")
        if task is not None and hook_line:
            return False
        return True


def _console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = []
    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in ("prefect", "prefect.flow_runs",
                                                                         "prefect.task_runs"))):  # fmt: skip
        handlers += [h for h in logger.handlers if isinstance(h, PrefectConsoleHandler)]
    return handlers


def quiet_prefect_console() -> None:
    """Add :class:`ConsoleNoise` to Prefect's console handlers (the API log handler keeps every line)."""
    for handler in _console_handlers():
        if not any(isinstance(f, ConsoleNoise) for f in handler.filters):
            handler.addFilter(ConsoleNoise())


def quiet_console(verbose: bool) -> None:
    """Everything above, unless ``verbose``."""
    if verbose:
        return
    quiet_native_logs()
    preload_tensorflow()
    quiet_prefect_console()
