"""Nothing nestcast starts listens beyond loopback unless asked, and nothing outlives a killed `nestcast run`.

- the local Dask cluster (``--task-runner dask``): scheduler, nannies, workers and dashboard on 127.0.0.1
  (distributed's default dashboard address, ``:8787``, is every interface);
- the temporary Prefect server of ``nestcast run``: on 127.0.0.1, and gone when the CLI is SIGKILLed.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from core.config import NestcastConfig
from flows.aggregate_months import make_task_runner

NESTCAST = Path(sys.executable).parent / "nestcast"
SERVER_MARK = "prefect.server.api.server:create_app"


def listening(processes: list[psutil.Process]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket (IPv4 and IPv6) of these processes."""
    found = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found += [(process.pid, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    return found


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


def test_the_local_dask_cluster_listens_on_loopback_only():
    runner = make_task_runner(NestcastConfig().with_overrides(task_runner="dask"))
    with runner:
        client = runner.client  # starts the LocalCluster: scheduler + 2 nannies/workers in subprocesses
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3
        me = psutil.Process()
        sockets = listening([me, *me.children(recursive=True)])
        workers = client.scheduler_info()["workers"]
        dashboard = client.dashboard_link
    assert len(workers) == 2 and all(address.startswith("tcp://127.0.0.1:") for address in workers)
    assert len({pid for pid, _, _ in sockets}) >= 3, sockets  # this process (scheduler) and two workers
    assert [s for s in sockets if not is_loopback(s[1])] == []  # before: ('0.0.0.0', 8787), the dashboard
    assert dashboard.startswith("http://127.0.0.1:")


def test_the_dashboard_opens_only_where_the_config_says():
    def kwargs(**overrides):
        return make_task_runner(NestcastConfig().with_overrides(task_runner="dask", **overrides)).cluster_kwargs

    assert kwargs()["host"] == "127.0.0.1" and kwargs()["dashboard_address"] == "127.0.0.1:8787"
    assert kwargs(dask_dashboard="0.0.0.0:8787")["dashboard_address"] == "0.0.0.0:8787"  # asked for
    assert kwargs(dask_dashboard="")["dashboard_address"] is None  # no dashboard
    assert kwargs(dask_dashboard="0.0.0.0:8787")["host"] == "127.0.0.1"
    assert make_task_runner(NestcastConfig().with_overrides(task_runner="dask", dask_address="tcp://h:8786")).address


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, waiting for its new parent to reap it
    except psutil.NoSuchProcess:
        return True


def test_the_temporary_prefect_server_is_on_loopback_and_dies_with_a_killed_cli(tmp_path):
    made = subprocess.run(
        [str(NESTCAST), "demo-data", str(tmp_path), "--scale", "tiny"], capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "NESTCAST_"))}
    cli = subprocess.Popen(
        [str(NESTCAST), "run", "--data-dir", str(tmp_path), "--epochs", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environ,
    )
    server: psutil.Process | None = None
    try:
        deadline = time.monotonic() + 120
        sockets: list[tuple[int, str, int]] = []
        while time.monotonic() < deadline and not sockets:
            assert cli.poll() is None, "nestcast run ended before its server was seen"
            if server is None:
                for child in psutil.Process(cli.pid).children(recursive=True):
                    try:
                        if SERVER_MARK in " ".join(child.cmdline()):
                            server = child
                    except psutil.NoSuchProcess:
                        pass
            if server is not None:
                sockets = listening([server])
            time.sleep(0.2)
        assert server is not None and sockets, "no temporary Prefect server listening"
        assert server.ppid() == cli.pid, "the server should be the CLI's own child"
        assert all(is_loopback(ip) for _, ip, _ in sockets), sockets

        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not gone(server):
            time.sleep(0.2)
        assert gone(server), "the temporary Prefect server outlived `kill -9 nestcast run`"  # before: it did
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if server is not None and not gone(server):
            server.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_server_launcher_exits_if_its_parent_is_already_gone():
    from deployments.server import _DIE_WITH_PARENT

    # a parent pid that is not our parent: the launcher must give up before starting uvicorn
    result = subprocess.run(
        [sys.executable, "-c", _DIE_WITH_PARENT, "1", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "uvicorn" not in result.stdout
    started = subprocess.run(
        [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), "--version"], capture_output=True, text=True,
        timeout=60,
    )
    assert started.returncode == 0 and "uvicorn" in started.stdout.lower()
