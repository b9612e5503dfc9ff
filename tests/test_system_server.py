"""System test: a real `prefect server`, the served deployments, a manual run, its artifacts and its UI page.

Everything it starts listens on 127.0.0.1 only and is stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.synthetic import write_competition_files

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 120
RUN_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _wait_until(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api,
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def healthy() -> bool:
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_until(healthy, SERVER_START_TIMEOUT, "the Prefect server")
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": {**env, "PREFECT_API_URL": api}, "home": home}
    finally:
        _stop(process)
        log.close()


@pytest.fixture(scope="module")
def served(server) -> Iterator[None]:
    log = open(server["home"] / "serve.log", "w")
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", "deployments.serve"],
        cwd=REPO, env=server["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def deployment_ready() -> bool:
        response = httpx.get(f"{server['api']}/deployments/name/sales-forecast/manual", timeout=5)
        return response.status_code == 200

    try:
        _wait_until(deployment_ready, 120, "the served deployments")
        yield
    finally:
        _stop(process)
        log.close()


def test_manual_deployment_runs_to_completion_with_artifacts_and_a_ui_page(server, served, tmp_path):
    data_dir = tmp_path / "lake"
    write_competition_files(data_dir / "raw", scale="tiny", seed=3)
    monthly = httpx.get(f"{server['api']}/deployments/name/sales-forecast/monthly", timeout=5).json()
    assert monthly["schedules"][0]["schedule"]["cron"] == "0 6 1 * *"
    assert monthly["global_concurrency_limit"]["limit"] == 1

    params = {
        "data_dir": str(data_dir), "epochs": 1, "units": 8, "lookback": 6, "batch_size": 256,
        "overrides": {"head_units": 8, "max_train_samples": 4000, "retry_delay_seconds": 0, "jit_compile": "off",
                      "max_rounds": 100},
    }  # fmt: skip
    triggered = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "sales-forecast/manual", "--params", json.dumps(params)],
        env=server["env"], capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered.stdout).group(1)

    def finished() -> dict | None:
        run = httpx.get(f"{server['api']}/flow_runs/{flow_run_id}", timeout=5).json()
        return run if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

    flow_run = _wait_until(finished, RUN_TIMEOUT, "the manual flow run", interval=2)
    assert flow_run["state"]["type"] == "COMPLETED", (server["home"] / "serve.log").read_text()[-3000:]

    artifacts = httpx.post(
        f"{server['api']}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}, timeout=5
    ).json()
    keys = {artifact["key"] for artifact in artifacts}
    expected = {"validation-sales-train-csv", "training-progress-select", "training-progress-refit-holdout",
                "training-progress-refit-final", "training-epochs-select", "evaluation", "evaluation-report",
                "submission"}  # fmt: skip
    assert expected <= keys
    assert list((data_dir / "submissions").glob("*.csv"))

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    page = f"{server['ui']}/runs/flow-run/{flow_run_id}"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000", "--virtual-time-budget=20000",
    ]  # fmt: skip
    screenshot = tmp_path / "flow-run.png"
    subprocess.run([chromium, *flags, f"--screenshot={screenshot}", page], capture_output=True, timeout=120)
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert screenshot.exists() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert flow_run["name"] in dom, "the flow-run page does not show the run's name"
    assert flow_run["name"].startswith("forecast-") and flow_run["name"].endswith("-nlstm"), flow_run["name"]
    assert "Completed" in dom
    # The report artifact's plots are inline (data URIs), so the UI's page shows them as images.
    (report,) = [artifact for artifact in artifacts if artifact["key"] == "evaluation-report"]
    artifact_page = f"{server['ui']}/artifacts/artifact/{report['id']}"
    artifact_dom = subprocess.run([chromium, *flags, "--dump-dom", artifact_page], capture_output=True, text=True,
                                  timeout=120).stdout  # fmt: skip
    assert re.search(r'<img[^>]+src="data:image/png;base64,', artifact_dom), artifact_dom[-2000:]
    artifacts_dir = REPO / "build" / "screenshots"
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, artifacts_dir / "flow-run.png")


def test_prefect_yaml_deploys_both_deployments_to_a_process_pool(server):
    env = {**server["env"], "PROJECT_ROOT": str(REPO)}
    prefect = str(BIN / "prefect")
    subprocess.run(
        [prefect, "work-pool", "create", "nestcast-process", "--type", "process", "--overwrite"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    deployed = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    for name in ("monthly", "manual"):
        deployment = httpx.get(f"{server['api']}/deployments/name/sales-forecast/{name}", timeout=5).json()
        assert deployment["work_pool_name"] == "nestcast-process"
        assert deployment["entrypoint"] == "flows/sales_forecast.py:sales_forecast"
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    monthly = httpx.get(f"{server['api']}/deployments/name/sales-forecast/monthly", timeout=5).json()
    assert monthly["schedules"][0]["schedule"] == {"cron": "0 6 1 * *", "timezone": "Europe/Moscow", "day_or": True}
