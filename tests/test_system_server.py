"""System test: a real `prefect server`, the served deployments, a manual run, its artifacts and its UI page;
with PostgreSQL installed, the server runs on it and two manual runs triggered at once keep its limits.

The server uses a throwaway PostgreSQL cluster (initdb into a temporary directory, as the ``postgres`` user when
run as root, which PostgreSQL refuses to run as) when Debian's binaries are there (``.ci/run`` installs them), and
SQLite otherwise. Everything it starts listens on 127.0.0.1 only and is stopped at the end, whatever happens.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from process_helpers import free_port, stop, wait_until

from core.synthetic import write_competition_files

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 120
RUN_TIMEOUT = 420


pytestmark = pytest.mark.slow  # a real Prefect server (PostgreSQL when installed), deployments and Chromium


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's ``initdb`` and ``pg_ctl`` (Debian keeps them off PATH), or None."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]), reverse=True)
    found = [*debian, *(Path(w) for w in [shutil.which("initdb")] if w)]
    return found[0].parent if found else None


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL will not run as root (CI's user): run its tools as ``postgres`` there."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres() -> Iterator[str | None]:
    """``postgresql+asyncpg://...`` of a throwaway cluster on 127.0.0.1 (fsync off), or None without PostgreSQL."""
    bindir = postgres_bin()
    if bindir is None:
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="nestcast-pg-"))  # not under pytest's 0700 root-owned tmp: postgres reads it
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120, check=True)
    try:
        run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E",
                               "UTF8", "--no-sync"]))
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
        run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-o",
                               options, "-w", "-t", "60", "start"]))
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres or f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api,
        "PREFECT_LOGGING_LEVEL": "INFO",
        # Runs waiting for a deployment or tag slot ask again after 2-5 s instead of 30 (the test waits on them).
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
        "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, SERVER_START_TIMEOUT, "the Prefect server")
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": {**env, "PREFECT_API_URL": api}, "home": home,
               "postgres": postgres is not None}
    finally:
        stop(process)
        log.close()


@pytest.fixture(scope="module")
def served(server) -> Iterator[None]:
    log = open(server["home"] / "serve.log", "w")
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", "deployments.serve"],
        cwd=REPO, env=server["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )

    def deployment_ready() -> bool:
        response = httpx.get(f"{server['api']}/deployments/name/sales-forecast/manual", timeout=5)
        return response.status_code == 200

    try:
        wait_until(deployment_ready, 120, "the served deployments")
        yield
    finally:
        stop(process)
        log.close()


def test_manual_deployment_runs_to_completion_with_artifacts_and_a_ui_page(server, served, tmp_path):
    data_dir = tmp_path / "lake"
    write_competition_files(data_dir / "raw", scale="tiny", seed=3)
    monthly = httpx.get(f"{server['api']}/deployments/name/sales-forecast/monthly", timeout=5).json()
    assert monthly["schedules"][0]["schedule"]["cron"] == "0 6 1 * *"
    assert monthly["global_concurrency_limit"]["limit"] == 1

    params = {
        "data_dir": str(data_dir), "epochs": 1, "units": 4, "depth": 1, "lookback": 4, "batch_size": 256,
        "overrides": {"head_units": 4, "sample_budget": 2000, "retry_delay_seconds": 0, "jit_compile": "off",
                      "max_rounds": 20},
    }
    triggered = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "sales-forecast/manual", "--params", json.dumps(params)],
        env=server["env"], capture_output=True, text=True, timeout=60, check=True,
    )
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered.stdout).group(1)

    def finished() -> dict | None:
        run = httpx.get(f"{server['api']}/flow_runs/{flow_run_id}", timeout=5).json()
        return run if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

    flow_run = wait_until(finished, RUN_TIMEOUT, "the manual flow run", interval=2)
    assert flow_run["state"]["type"] == "COMPLETED", (server["home"] / "serve.log").read_text()[-3000:]

    artifacts = httpx.post(
        f"{server['api']}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}, timeout=5
    ).json()
    keys = {artifact["key"] for artifact in artifacts}
    expected = {"validation-sales-train-csv", "training-progress-select", "training-progress-refit-holdout",
                "training-progress-refit-final", "training-epochs-select", "evaluation", "evaluation-report",
                "submission"}
    assert expected <= keys
    assert list((data_dir / "submissions").glob("*.csv"))
    # named by its month, encoder and the knobs that differ from the defaults (core/run_names.py)
    name = r"forecast-\d{4}-\d{2}-nlstm-epochs=1-batch_size=256-lookback=4-units=4-depth=1"
    assert re.fullmatch(name, flow_run["name"]), flow_run["name"]

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    page = f"{server['ui']}/runs/flow-run/{flow_run_id}"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000", "--virtual-time-budget=20000",
    ]
    screenshot = tmp_path / "flow-run.png"
    subprocess.run([chromium, *flags, f"--screenshot={screenshot}", page], capture_output=True, timeout=120)
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert screenshot.exists() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert flow_run["name"] in dom, "the flow-run page does not show the run's name"
    assert "Completed" in dom
    saved = REPO / "build" / "screenshots"
    saved.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, saved / "flow-run.png")

    def artifact_page(key: str) -> tuple[str, Path]:
        """The UI's page of one artifact: its DOM, and a screenshot kept in build/screenshots/."""
        (artifact,) = [artifact for artifact in artifacts if artifact["key"] == key]
        url = f"{server['ui']}/artifacts/artifact/{artifact['id']}"
        shot = saved / f"{key}.png"
        subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
        return subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                              timeout=120).stdout, shot

    # The report artifact's plots are inline (data URIs), so the UI's page shows them as images.
    report_dom, report_shot = artifact_page("evaluation-report")
    assert re.search(r'<img[^>]+src="data:image/png;base64,', report_dom), report_dom[-2000:]
    epochs_dom, epochs_shot = artifact_page("training-epochs-select")
    assert "validation RMSE" in epochs_dom and "seconds" in epochs_dom, epochs_dom[-2000:]
    for shot in (report_shot, epochs_shot):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot


TINY_RUN = {
    "epochs": 1, "units": 4, "depth": 1, "lookback": 4, "batch_size": 256,
    "overrides": {"head_units": 4, "embedding_dim": 2, "sample_budget": 2000, "retry_delay_seconds": 0,
                  "jit_compile": "off", "max_rounds": 20},
}
CONCURRENT_RUNS = 2  # one more than RUN_LIMIT
RUN_LIMIT = 1  # the deployment's own limit, set again here so that the test does not rest on the YAML alone


def _intervals(runs: list[dict]) -> list[tuple[datetime, datetime]]:
    return sorted((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])) for r in runs)


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    """The largest number of the intervals open at one instant (an end at the next one's start is no overlap)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


def _post(server: dict, path: str, body: dict) -> httpx.Response:
    response = httpx.post(f"{server['api']}{path}", json=body, timeout=10)
    response.raise_for_status()
    return response


@pytest.mark.timeout(1200)
def test_concurrent_manual_runs_on_postgresql_all_complete_within_the_limits(server, served, tmp_path):
    if not server["postgres"]:
        pytest.skip("PostgreSQL binaries not found (initdb under /usr/lib/postgresql/*/bin or on PATH); "
                    ".ci/run installs Debian's postgresql")
    manual = httpx.get(f"{server['api']}/deployments/name/sales-forecast/manual", timeout=5).json()
    httpx.patch(f"{server['api']}/deployments/{manual['id']}", json={"concurrency_limit": RUN_LIMIT},
                timeout=10).raise_for_status()
    subprocess.run([str(BIN / "prefect"), "concurrency-limit", "create", "gpu", "1"], env=server["env"],
                   capture_output=True, text=True, timeout=60, check=True)
    run_ids = []
    for k in range(CONCURRENT_RUNS):  # one data directory each, triggered back to back through the API
        data_dir = tmp_path / f"lake-{k}"
        write_competition_files(data_dir / "raw", scale="tiny", seed=k)
        created = _post(server, f"/deployments/{manual['id']}/create_flow_run",
                        {"parameters": {**TINY_RUN, "data_dir": str(data_dir)}})
        run_ids.append(created.json()["id"])

    def all_finished() -> list[dict] | None:
        runs = _post(server, "/flow_runs/filter", {"flow_runs": {"id": {"any_": run_ids}}}).json()
        done = [r for r in runs if r["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}]
        return runs if len(done) == CONCURRENT_RUNS else None

    runs = wait_until(all_finished, 1100, f"{CONCURRENT_RUNS} manual runs", interval=3)
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"] * CONCURRENT_RUNS, (
        (server["home"] / "serve.log").read_text()[-3000:]
    )
    # `serve` itself takes one run at a time (deployments/serve.py, limit=1), so today the runs never meet.
    assert most_at_once(_intervals(runs)) <= RUN_LIMIT, "the deployment limit held"
    trainings = _post(server, "/task_runs/filter", {
        "flow_runs": {"id": {"any_": run_ids}}, "task_runs": {"tags": {"all_": ["gpu"]}},
    }).json()
    assert len(trainings) >= 2 * CONCURRENT_RUNS and all(t["state"]["type"] == "COMPLETED" for t in trainings)
    assert most_at_once(_intervals(trainings)) == 1, "the gpu tag limit kept trainings from overlapping"


def test_prefect_yaml_deploys_both_deployments_to_a_process_pool(server):
    env = {**server["env"], "PROJECT_ROOT": str(REPO)}
    prefect = str(BIN / "prefect")
    subprocess.run(
        [prefect, "work-pool", "create", "nestcast-process", "--type", "process", "--overwrite"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )
    deployed = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    for name in ("monthly", "manual"):
        deployment = httpx.get(f"{server['api']}/deployments/name/sales-forecast/{name}", timeout=5).json()
        assert deployment["work_pool_name"] == "nestcast-process"
        assert deployment["entrypoint"] == "flows/sales_forecast.py:sales_forecast"
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    monthly = httpx.get(f"{server['api']}/deployments/name/sales-forecast/monthly", timeout=5).json()
    assert monthly["schedules"][0]["schedule"] == {"cron": "0 6 1 * *", "timezone": "Europe/Moscow", "day_or": True}
