"""A replay on a real Prefect server, and screenshots of what the UI shows of it.

Starts `prefect server` on 127.0.0.1 (SQLite under a temporary PREFECT_HOME), runs `nestcast replay` against it
with the options given after `--`, prints the replay's minutes and its accountability table, and saves headless
Chromium screenshots of the newest `accountability-history` artifact (the history plot inline) and of the page of
the flow run that published it (the replay's last child run, `replay-accountability`) into
`build/screenshots/`:

    .venv/bin/python benchmarks/replay_screenshots.py --data-dir /tmp/real --from-month 20 --to-month 28 -- \
        --epochs 1 --units 16 --depth 1 --set sample_budget=20000 --set head_units=8 --set max_rounds=100
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHOTS = REPO / "build" / "screenshots"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(api: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the Prefect server at {api} did not answer within {timeout:.0f} s")


def _newest_artifact(api: str, key: str) -> dict:
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    (artifact,) = httpx.post(f"{api}/artifacts/filter", json=body, timeout=10).json()
    return artifact


def _screenshot(url: str, path: Path, profile: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (Debian: apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             f"--user-data-dir={profile}", "--window-size=1400,1400", "--virtual-time-budget=20000"]
    subprocess.run([chromium, *flags, f"--screenshot={path}", url], capture_output=True, timeout=180, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the full history (as for nestcast replay)")
    parser.add_argument("--from-month", type=int, required=True)
    parser.add_argument("--to-month", type=int, required=True)
    parser.add_argument("options", nargs="*", help="model options for nestcast replay, after --")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
    port = _free_port()
    api, ui = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api, "PREFECT_API_URL": api}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        _wait_healthy(api)
        started = time.monotonic()
        replay = subprocess.run(
            [str(BIN / "python"), "-m", "deployments.cli", "replay", "--data-dir", args.data_dir,
             "--from-month", str(args.from_month), "--to-month", str(args.to_month), *args.options],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        minutes = (time.monotonic() - started) / 60
        if replay.returncode != 0:
            raise SystemExit(f"nestcast replay failed ({replay.returncode}):\n{replay.stderr[-3000:]}")
        print(replay.stdout)
        print(f"replay of months {args.from_month}-{args.to_month}: {minutes:.1f} min on a real Prefect server")
        SHOTS.mkdir(parents=True, exist_ok=True)
        history = _newest_artifact(api, "accountability-history")
        shots = {"accountability-history": f"{ui}/artifacts/artifact/{history['id']}",
                 "replay-accountability-run": f"{ui}/runs/flow-run/{history['flow_run_id']}"}
        for name, url in shots.items():
            _screenshot(url, SHOTS / f"{name}.png", home / "chromium")
            print(f"{name}: {SHOTS / f'{name}.png'} ({url})")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
