"""The Prefect API a command's flows report to: ``PREFECT_API_URL`` when set, else a temporary ``prefect server``
on 127.0.0.1 that is the command's child, started once per process and stopped with it (also on ``kill -9``)."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import NestcastError
from deployments import console

_SERVER_MARK = "prefect.server.api.server:create_app"
# Run in the server's own interpreter before uvicorn: ask Linux to SIGTERM it when its parent (this
# process) dies, even by SIGKILL, and exit if the parent is already gone. prefect's own temporary server
# has no such link, so `kill -9 nestcast` used to leave it running. (The signal follows the parent *thread*:
# the CLI starts the server from its main thread, which lives as long as the process.)
_DIE_WITH_PARENT = (
    "import os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        sys.exit(0)\n"
    "sys.argv = ['uvicorn', *sys.argv[2:]]\n"
    "import runpy\n"
    "runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)\n"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server() -> tuple[subprocess.Popen[bytes], str]:
    """Start the API on 127.0.0.1 as our child, as prefect's temporary server does, and wait for it."""
    import httpx
    import prefect
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    env.pop("PREFECT_API_URL", None)
    if env.get("PREFECT_LOGGING_SETTINGS_PATH") == str(console.LOGGING_CONFIG):
        env.pop("PREFECT_LOGGING_SETTINGS_PATH")  # the server runs no flow: no TensorFlow preloaded by that config
    timeout = max(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), 60.0)
    for _attempt in range(5):
        port = _free_port()
        process = subprocess.Popen(
            [
                sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()),
                "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory", _SERVER_MARK,
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
            ],
            env=env,
        )
        api_url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if client.get(f"{api_url}/health", timeout=5).status_code == 200:
                        return process, api_url
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        if process.poll() is not None:  # exited early, e.g. the port was taken in between: try another
            continue
        _stop_server(process)
        raise NestcastError(
            f"the temporary Prefect server did not start within {timeout:.0f} s (exit code {process.poll()}); "
            "set PREFECT_API_URL to a running server instead"
        )
    raise NestcastError(
        f"the temporary Prefect server exited at start (exit code {process.returncode}); "
        "set PREFECT_API_URL to a running server instead"
    )


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_SERVER: tuple[subprocess.Popen[bytes], str] | None = None  # one per process, reused by later commands


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """The API the flows report to: ``PREFECT_API_URL`` if set, else a temporary server on 127.0.0.1 that
    is this process's child and dies with it (also on SIGKILL, through PR_SET_PDEATHSIG on Linux)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    global _SERVER
    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    if _SERVER is None or _SERVER[0].poll() is not None:
        _SERVER = _start_server()
        # Stopped at exit, after Prefect's own exit hooks (registered later, so run earlier) flushed their logs.
        atexit.register(_stop_server, _SERVER[0])
    api_url = _SERVER[1]
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url  # for processes the flow spawns (Dask workers)
    try:
        # The temporary server has no UI (as prefect's own): no "View at" links to it.
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_UI_URL: ""}):
            yield api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
