"""The bad-input and fault probes of issue 14, run as a new user would, on the current code; prints a table.

    .venv/bin/python benchmarks/fault_probes.py                 # every probe (about 25 minutes on 2 busy cores)
    .venv/bin/python benchmarks/fault_probes.py --only 1,3b,6   # some probes ("6" selects 6a-6i)
    .venv/bin/python benchmarks/fault_probes.py --keep          # keep the data directories and the logs

Each probe gets its own data directory under one temporary root in /tmp: tiny demo data
(``nestcast demo-data DIR --scale tiny``), the fault applied as the issue describes it, then the real
``nestcast`` command in a fresh process (no ``PREFECT_API_URL``, no ``NESTCAST_*`` unless the probe sets one:
the CLI starts its own temporary Prefect server, as for a user). It records the exit code, the first error
line (or the log line that matters), what the lake holds where that matters (rows in = accepted +
quarantined, counted here from the file's bytes and the lake's Parquet files; months present), and any
process the probe started that is still running after the command ended.

Probes that need a finished run first share one: a tiny run is made once at ``ROOT/warm`` and kept as
``ROOT/template``; each such probe copies it back to ``ROOT/warm`` (the same path, so the run's cache is
warm, as for a user who reruns in place), applies its fault and reruns. Full runs use the small model of
the tests (``$TINY`` below); a probe that fails before its flow costs seconds.

Prints a markdown table: | # | probe (what the issue saw before) | command | outcome now | handled? |.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NESTCAST = Path(sys.executable).parent / "nestcast"
if not NESTCAST.exists():
    NESTCAST = REPO / ".venv" / "bin" / "nestcast"

# The small model of tests/test_console.py (one epoch, 8 units, 100 boosting rounds, no XLA, no retry delay).
TINY = ["--epochs", "1", "--units", "8", "--lookback", "6", "--batch-size", "256",
        "--set", "head_units=8", "--set", "sample_budget=3000", "--set", "jit_compile=off",
        "--set", "max_rounds=100", "--set", "retry_delay_seconds=0"]
TINY_NO_EPOCHS = TINY[2:]
SERVER_MARK = "prefect.server.api.server:create_app"  # the CLI's temporary Prefect server (deployments/cli.py)
MARKER = "FAULT_PROBE_ID"  # in the environment of every process a probe starts: finds what it left running
ANSI = re.compile(r"\x1b\[[0-9;]*m")
INGESTED = re.compile(
    r"(?:ingested|skipped \(already ingested\)) (\S+): (\d+) rows in, (\d+) accepted, (\d+) quarantined"
)
RETRY = re.compile(r"Retry \d+/\d+ will start")
TASK_STATE = re.compile(r"Task run '([^']+)' - Finished in state (\w+)\(")
DROP = "sales_2014-05.csv"  # a later drop: months 15 (2014-04, also in sales_train.csv) and 16 (2014-05)


# --- running commands --------------------------------------------------------------------------------
@dataclass
class Run:
    argv: list[str]
    rc: int
    out: str
    err: str
    seconds: float
    left_running: list[str] = field(default_factory=list)
    gone_after: float = 0.0

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    @property
    def lines(self) -> list[str]:
        return [ANSI.sub("", line).rstrip() for line in self.text.splitlines() if line.strip()]

    @property
    def err_lines(self) -> list[str]:
        return [ANSI.sub("", line).rstrip() for line in self.err.splitlines() if line.strip()]

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.text

    @property
    def traceback_lines(self) -> int:
        """Lines of the first traceback printed, up to its exception line."""
        lines = self.text.splitlines()
        start = next((i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line), None)
        if start is None:
            return 0
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), start)
        return end - start + 1

    @property
    def retries(self) -> int:
        return len(RETRY.findall(self.text))

    @property
    def flow_started(self) -> bool:
        return "Beginning flow run" in self.text

    def first_error(self) -> str:
        """The ``error: ...`` line, else the first exception line, else the first ERROR log line."""
        lines = self.lines
        for line in lines:
            if line.startswith("error:"):
                return line
        for line in lines:
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Invalid)\b.*: ", line):
                return line
        for line in lines:
            if "| ERROR" in line:
                return line.split(" - ", 1)[-1]
        return ""

    def grep(self, pattern: str) -> list[str]:
        return [line for line in self.lines if re.search(pattern, line)]

    def task_states(self) -> dict[str, str]:
        states = {}
        for line in self.lines:
            match = TASK_STATE.search(line)
            if match:
                name = re.sub(r"-[0-9a-f]{3}$", "", match.group(1))
                states[name] = match.group(2)
        return states

    def ingested(self) -> dict[str, tuple[int, int, int]]:
        found = {}
        for line in self.lines:
            match = INGESTED.search(line)
            if match:
                found[match.group(1)] = (int(match.group(2)), int(match.group(3)), int(match.group(4)))
        return found

    def summary_line(self, prefix: str) -> str:
        for line in self.out.splitlines():
            if line.startswith(prefix):
                return " ".join(line.split())
        return ""

    def short(self) -> str:
        """``exit N`` and, for a failure, the first error line and what came with it."""
        parts = [f"exit {self.rc}"]
        if self.rc != 0:
            parts.append(f"`{clip(self.first_error() or '(no error line)')}`")
            if self.traceback:
                parts.append(f"a {self.traceback_lines}-line traceback printed before it")
            if self.retries:
                parts.append(f"{self.retries} retries")
            if self.flow_started:
                parts.append("flow had started")
        if self.left_running:
            parts.append("LEFT RUNNING: " + "; ".join(self.left_running))
        return ", ".join(parts)


def clip(text: str, width: int = 170) -> str:
    text = " ".join(text.split()).replace("|", "\\|").replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"


def base_env(probe: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NESTCAST_", "TF_CPP", "PREFECT_LOGGING", "PREFECT_API_URL"))}
    env[MARKER] = probe
    env.update(extra or {})
    return env


def marked_processes(probe: str) -> list[Any]:
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid != os.getpid() and process.environ().get(MARKER) == probe:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(process: Any) -> str:
    try:
        cmd = " ".join(process.cmdline())
    except Exception:  # noqa: BLE001 - gone in between
        cmd = "?"
    what = "temporary Prefect server" if SERVER_MARK in cmd else clip(cmd, 60)
    return f"pid {process.pid} ({what})"


def reap_leftovers(probe: str, grace: float = 3.0) -> tuple[list[str], float]:
    """Processes this probe started that outlived its command, described, then killed (they are ours); and
    how long the last of the others took to go (0 when none was left)."""
    import psutil

    started = time.monotonic()
    deadline = started + grace
    left = marked_processes(probe)
    waited = 0.0
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        waited = time.monotonic() - started
    described = [describe(p) for p in left]
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return described, waited


class Context:
    def __init__(self, root: Path, keep: bool) -> None:
        self.root = root
        self.keep = keep
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._template: Path | None = None
        self.template_run: Run | None = None
        self.memo: dict[str, Any] = {}
        self.notes: list[str] = []

    # commands
    def nestcast(
        self,
        probe: str,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        poll: Callable[[Any], None] | None = None,
        timeout: float = 900,
        grace: float = 3.0,
    ) -> Run:
        return self.command(probe, [str(NESTCAST), *args], env=env, cwd=cwd, poll=poll, timeout=timeout, grace=grace)

    def command(
        self,
        probe: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        poll: Callable[[Any], None] | None = None,
        timeout: float = 900,
        grace: float = 3.0,
    ) -> Run:
        import psutil

        n = len(list(self.logs.glob(f"{probe}-*.out")))
        out_path, err_path = self.logs / f"{probe}-{n}.out", self.logs / f"{probe}-{n}.err"
        started = time.monotonic()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd or self.root, env=base_env(probe, env),
                                       start_new_session=True)
            handle = psutil.Process(process.pid)
            while process.poll() is None:
                if poll is not None:
                    poll(handle)
                if time.monotonic() - started > timeout:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    break
                time.sleep(0.2)
        seconds = time.monotonic() - started
        run = Run(argv, process.returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                  seconds)
        run.left_running, run.gone_after = reap_leftovers(probe, grace)
        return run

    def demo_data(self, directory: Path) -> None:
        made = subprocess.run([str(NESTCAST), "demo-data", str(directory), "--scale", "tiny"], capture_output=True,
                              text=True, env=base_env("demo-data"), timeout=300)
        if made.returncode != 0:
            raise RuntimeError(f"demo-data failed: {made.stderr[-2000:]}")

    def fresh(self, probe: str) -> Path:
        """A new data directory with tiny demo data in raw/ and nothing else."""
        directory = self.root / f"p{probe}"
        shutil.rmtree(directory, ignore_errors=True)
        self.demo_data(directory)
        return directory

    # the finished tiny run the warm probes start from
    @property
    def warm_path(self) -> Path:
        return self.root / "warm"

    def template(self) -> Path:
        if self._template is None:
            self.demo_data(self.warm_path)
            run = self.nestcast("template", "run", "--data-dir", str(self.warm_path), *TINY)
            if run.rc != 0:
                raise RuntimeError(f"the template run failed: {run.first_error()}\n{run.err[-3000:]}")
            self.template_run = run
            self._template = self.root / "template"
            shutil.copytree(self.warm_path, self._template, symlinks=True)
            self.notes.append(f"template: one tiny run (`nestcast run --data-dir D $TINY`) took {run.seconds:.0f} s; "
                              f"{run.summary_line('lake:')}")
        return self._template

    def warm(self, probe: str) -> Path:
        """A copy of the finished tiny run at the path it ran in (its cache warm)."""
        template = self.template()
        self.park()
        shutil.copytree(template, self.warm_path, symlinks=True)
        self.memo["warm_owner"] = probe
        return self.warm_path

    def park(self) -> None:
        """Move the previous warm probe's directory aside (``--keep``) or delete it."""
        if self.warm_path.exists():
            owner = self.memo.pop("warm_owner", None)
            if self.keep and owner:
                target = self.root / f"p{owner}"
                shutil.rmtree(target, ignore_errors=True)
                self.warm_path.rename(target)
            else:
                shutil.rmtree(self.warm_path)


# --- reading the lake ----------------------------------------------------------------------------------
def data_lines(path: Path) -> int:
    """Non-empty lines after the header, from the file's bytes (none of these files quotes a newline)."""
    return sum(1 for line in path.read_bytes().split(b"\n")[1:] if line.strip(b"\r"))


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_table(path).num_rows if path.exists() else 0


def sales_months(data_dir: Path, area: str = "sales") -> dict[int, int]:
    """Rows per month of lake/<area>/date_block_num=N/."""
    root = data_dir / "lake" / area
    months = {}
    for child in sorted(root.glob("date_block_num=*")) if root.is_dir() else []:
        if child.is_dir():
            months[int(child.name.split("=")[1])] = sum(parquet_rows(p) for p in child.glob("*.parquet"))
    return dict(sorted(months.items()))


def quarantine(data_dir: Path, stem: str) -> Any:
    import pandas as pd

    path = data_dir / "lake" / "quarantine" / f"{stem}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def month_span(months: Iterable[int]) -> str:
    months = sorted(months)
    if not months:
        return "none"
    gaps = [m for m in range(months[0], months[-1] + 1) if m not in months]
    return f"{months[0]}-{months[-1]}" + (f" without {gaps}" if gaps else "")


def run_dir(data_dir: Path) -> Path:
    return next((data_dir / "runs").glob("forecast-*"))


def sed(data_dir: Path, script: str, file: str) -> None:
    subprocess.run(["sed", "-i", script, file], cwd=data_dir, check=True)


def edit_csv(path: Path, edit: Callable[[int, list[str]], list[str] | None]) -> None:
    """Rewrite a CSV's data lines through ``edit(line_number, fields)`` (None: drop the line)."""
    lines = path.read_text().split("\n")
    out = [lines[0]]
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            out.append(line)
            continue
        fields = edit(number, line.split(","))
        if fields is not None:
            out.append(",".join(fields))
    path.write_text("\n".join(out))


# --- the probes ------------------------------------------------------------------------------------------
@dataclass
class Result:
    probe: str
    before: str
    command: str
    outcome: str
    handled: bool
    why: str = ""
    seconds: float = 0.0


@dataclass
class Probe:
    id: str
    before: str
    command: str
    fn: Callable[[Context, Probe], tuple[str, bool, str, float]]


def verdict(checks: list[tuple[bool, str]]) -> tuple[bool, str]:
    failed = [why for ok, why in checks if not ok]
    return not failed, "; ".join(failed)


def full_run_outcome(run: Run) -> str:
    if run.rc == 0:
        return f"exit 0 ({run.summary_line('lake:').removeprefix('lake: ').strip()})"
    return run.short()


def p1_items_quote(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    sed(d, '19s/^/"/', "raw/items.csv")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    lines = data_lines(d / "raw" / "items.csv")
    accepted = parquet_rows(d / "lake" / "reference" / "items.parquet")
    frame = quarantine(d, "items")
    quarantined = 0 if frame is None else len(frame)
    where = [] if frame is None else frame[["line_number", "rule"]].values.tolist()
    import pandas as pd

    ids = set(pd.read_parquet(d / "lake" / "reference" / "items.parquet")["item_id"]) if accepted else set()
    sales_q = quarantine(d, "sales_train")
    sales_rules = {} if sales_q is None else sales_q["rule"].value_counts().to_dict()
    logged = run.ingested().get("items.csv")
    outcome = (
        f"{full_run_outcome(run)}; log `items.csv: {logged[0] if logged else '?'} rows in, "
        f"{logged[1] if logged else '?'} accepted, {logged[2] if logged else '?'} quarantined`; "
        f"lake: {lines} lines = {accepted} accepted + {quarantined} quarantined {where}; "
        f"items 18-22 in lake: {sorted({18, 19, 20, 21, 22} & ids)}; sales_train quarantine {sales_rules}"
    )
    ok, why = verdict(
        [
            (run.rc == 0, f"exit {run.rc}"),
            (lines == accepted + quarantined, "rows in != accepted + quarantined"),
            (bool(logged) and logged[0] == lines, "logged rows in is not the file's line count"),
            (where == [[19, "unbalanced_quote"]], "line 19 not quarantined as unbalanced_quote"),
            ({18, 19, 20, 21, 22} <= ids, "items after the quote are missing"),
        ]
    )
    return outcome, ok, why, run.seconds


def p2_sales_quote(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    sed(d, '19s/^/"/', "raw/sales_train.csv")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    lines = data_lines(d / "raw" / "sales_train.csv")
    accepted = sum(sales_months(d).values())
    frame = quarantine(d, "sales_train")
    quarantined = 0 if frame is None else len(frame)
    quote = [] if frame is None else frame.loc[frame["rule"] == "unbalanced_quote", "line_number"].tolist()
    logged = run.ingested().get("sales_train.csv")
    outcome = (
        f"{full_run_outcome(run)}; log `sales_train.csv: {logged[0] if logged else '?'} rows in, "
        f"{logged[1] if logged else '?'} accepted, {logged[2] if logged else '?'} quarantined`; "
        f"lake: {lines} lines = {accepted} accepted + {quarantined} quarantined "
        f"(unbalanced_quote on lines {quote}); {run.retries} retries"
    )
    ok, why = verdict(
        [
            (run.rc == 0, f"exit {run.rc}"),
            (run.retries == 0, "retried"),
            (lines == accepted + quarantined, "rows in != accepted + quarantined"),
            (quote == [19], "line 19 not quarantined as unbalanced_quote"),
        ]
    )
    return outcome, ok, why, run.seconds


def p3a_month_removed(ctx: Context, probe: Probe):
    d = ctx.warm(probe.id)
    before = sales_months(d)
    shutil.rmtree(d / "lake" / "sales" / "date_block_num=7")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    after = sales_months(d)
    samples = run.summary_line("lake:")
    template_samples = ctx.template_run.summary_line("lake:") if ctx.template_run else ""
    states = run.task_states()
    outcome = (
        f"{full_run_outcome(run)}; ingest {states.get('ingest', '?')}; lake/sales months "
        f"{month_span(after)}, month 7: {after.get(7, 0)} rows (template {before.get(7)}); "
        f"total {sum(after.values())} rows (template {sum(before.values())})"
    )
    ok, why = verdict(
        [
            (run.rc == 0, f"exit {run.rc}"),
            (after == before, "lake/sales differs from the template"),
            (samples == template_samples, f"training samples differ: {samples!r} vs {template_samples!r}"),
        ]
    )
    return outcome, ok, why, run.seconds


def _lake_files(lake: Path) -> set[str]:
    return {p.relative_to(lake).as_posix() for p in lake.rglob("*") if p.is_file()}


def p3b_half_commit(ctx: Context, probe: Probe):
    """A commit that died after its journal and first rename, towards a lake with one row more than raw/ has."""
    d = ctx.warm(probe.id)
    before = sales_months(d)
    other = ctx.root / f"p{probe.id}-target"
    shutil.rmtree(other, ignore_errors=True)
    (other).mkdir()
    shutil.copytree(d / "raw", other / "raw")
    shutil.copytree(d / "lake", other / "lake")
    sales = (other / "raw" / "sales_train.csv").read_text().split("\n")
    month7 = next(line.split(",") for line in sales[1:] if line.split(",")[1:2] == ["7"])
    extra = f"31.08.2013,7,{month7[2]},{month7[3]},123.0,1.0"
    (other / "raw" / "sales_train.csv").write_text(
        "\n".join([*sales[:-1], extra, sales[-1]]) if sales[-1] == "" else "\n".join([*sales, extra])
    )
    made = subprocess.run(
        [sys.executable, "-c", "import sys; from core.config import NestcastConfig; from core.ingest import ingest; "
         "ingest(NestcastConfig(data_dir=sys.argv[1]))", str(other)],
        cwd=REPO, env=base_env(probe.id), capture_output=True, text=True, timeout=600,
    )
    if made.returncode != 0 or sales_months(other).get(7) != before.get(7, 0) + 1:
        return f"setup failed: {made.stderr[-500:]}", False, "setup", 0.0
    # _crash_half_way of tests/test_lake_integrity.py: journal, staging with the rest, the first sales rename done
    lake, target = d / "lake", other / "lake"
    current, wanted = _lake_files(lake), _lake_files(target)
    moves = sorted(
        rel for rel in wanted if rel not in current or (lake / rel).read_bytes() != (target / rel).read_bytes()
    )
    moves = [m for m in moves if m != "manifest.json"] + ["manifest.json"]
    deletes = sorted(rel for rel in current - wanted if not rel.startswith("."))
    staging = lake / ".staging-0123456789ab"
    for rel in moves:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(target / rel, staging / rel)
    (lake / ".journal.json").write_text(json.dumps({"staging": staging.name, "moves": moves, "deletes": deletes}))
    first = next(m for m in moves if m.startswith("sales/"))
    os.replace(staging / first, lake / first)  # then the process died
    shutil.rmtree(other)
    crashed = sales_months(d)
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    after = sales_months(d)
    leftovers = [p.name for p in lake.glob(".staging-*")] + ([".journal.json"] if (lake / ".journal.json").exists()
                                                             else [])
    states = run.task_states()
    outcome = (
        f"{full_run_outcome(run)}; ingest {states.get('ingest', '?')}; month 7 rows: template {before.get(7)}, "
        f"half-committed {crashed.get(7)}, after rerun {after.get(7)}; journal/staging left: "
        f"{leftovers or 'none'}"
    )
    ok, why = verdict(
        [
            (run.rc == 0, f"exit {run.rc}"),
            (not leftovers, f"left {leftovers}"),
            (after == before, "lake/sales keeps rows that raw/ does not have"),
        ]
    )
    return outcome, ok, why, run.seconds


def p3c_truncated_monthly(ctx: Context, probe: Probe):
    d = ctx.warm(probe.id)
    target = d / "lake" / "monthly" / "date_block_num=7" / "data.parquet"
    good = sha256(target)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    repaired = target.exists() and sha256(target) == good
    try:
        readable = parquet_rows(target) > 0
    except Exception as error:  # noqa: BLE001 - what a later reader would hit
        readable = False
        ctx.notes.append(f"3c: reading the monthly file after the rerun: {type(error).__name__}: {error}")
    outcome = (
        f"{full_run_outcome(run)}; lake/monthly/date_block_num=7/data.parquet "
        f"{'recomputed, byte-identical to the template' if repaired else 'NOT restored'}"
        f"{'' if readable else ', unreadable'}"
    )
    ok, why = verdict([(run.rc == 0, f"exit {run.rc}"), (repaired and readable, "damaged file kept")])
    return outcome, ok, why, run.seconds


def _garbage_model(ctx: Context, probe: Probe, remove_forecast: bool):
    d = ctx.warm(probe.id)
    stage = run_dir(d) / "final"
    (stage / "model.keras").write_bytes(b"garbage\n")
    if remove_forecast:
        (stage / "forecast.parquet").unlink()
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    recorded = json.loads((stage / "metadata.json").read_text()).get("artifacts", {}).get("model.keras")
    model = stage / "model.keras"
    size = model.stat().st_size if model.exists() else 0
    matches = model.exists() and sha256(model) == recorded
    states = run.task_states()
    not_found = run.grep(r"File not found")
    outcome = (
        f"{full_run_outcome(run)}; refit-final {states.get('refit-final', '?')} (select "
        f"{states.get('select', '?')}); final/model.keras {size} bytes, sha256 "
        f"{'matches' if matches else 'DOES NOT match'} metadata.json"
        f"{'; log says File not found' if not_found else ''}"
    )
    ok, why = verdict(
        [
            (run.rc == 0, f"exit {run.rc}"),
            (matches and size > 1000, "garbage model kept"),
            (not not_found, "misleading 'File not found'"),
        ]
    )
    return outcome, ok, why, run.seconds


def p3d_garbage_model(ctx: Context, probe: Probe):
    return _garbage_model(ctx, probe, remove_forecast=False)


def p3e_garbage_model_no_forecast(ctx: Context, probe: Probe):
    return _garbage_model(ctx, probe, remove_forecast=True)


def _is_loopback(ip: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


def p4_dask_listening(ctx: Context, probe: Probe):
    import psutil

    d = ctx.warm(probe.id)
    shutil.rmtree(d / "lake" / "monthly")  # the per-month aggregation runs again, on the Dask workers
    seen: dict[tuple[int, str, int], str] = {}

    def poll(cli: Any) -> None:
        try:
            processes = [cli, *cli.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                for c in process.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        key = (process.pid, c.laddr.ip, c.laddr.port)
                        if key not in seen:
                            seen[key] = " ".join(process.cmdline())[:200]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), "--task-runner", "dask", *TINY, poll=poll)
    open_ = sorted({f"{ip}:{port}" for (_, ip, port) in seen if not _is_loopback(ip)})
    pids = {pid for pid, _, _ in seen}
    dashboard = sorted({f"{ip}:{port}" for (_, ip, port) in seen if port == 8787})
    outcome = (
        f"{full_run_outcome(run)}; {len(seen)} listening sockets in {len(pids)} processes "
        f"(CLI + Prefect server + Dask workers), dashboard {dashboard or 'not seen'}; beyond loopback: "
        f"{open_ or 'none'}"
    )
    ok, why = verdict(
        [
            (run.rc == 0, f"exit {run.rc}"),
            (not open_, f"listening beyond loopback: {open_}"),
            (len(pids) >= 3, "no Dask worker sockets seen: the cluster did not start?"),
        ]
    )
    return outcome, ok, why, run.seconds


def p5a_test_removed(ctx: Context, probe: Probe):
    d = ctx.warm(probe.id)
    (d / "raw" / "test.csv").unlink()
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    stale = (d / "lake" / "reference" / "test.parquet").exists()
    gone = run.grep(r"raw/test\.csv is gone")
    submission = Path(run.summary_line("submission:").removeprefix("submission:").strip() or "/nonexistent")
    rows = data_lines(submission) if submission.is_file() else 0
    logged = clip(gone[0].split(" - ", 1)[-1], 120) if gone else "no removal line"
    outcome = (
        f"{full_run_outcome(run)}; log `{logged}`; lake/reference/test.parquet "
        f"{'STILL THERE' if stale else 'gone'}; submission {rows} rows (the universe of pairs)"
    )
    ok, why = verdict(
        [
            (run.rc == 0, f"exit {run.rc}"),
            (not stale, "stale test.parquet"),
            (bool(gone), "no log line"),
            (rows > 0, "no submission"),
        ]
    )
    return outcome, ok, why, run.seconds


def p5b_no_test_ever(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    (d / "raw" / "test.csv").unlink()
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    submission = Path(run.summary_line("submission:").removeprefix("submission:").strip() or "/nonexistent")
    rows = data_lines(submission) if submission.is_file() else 0
    outcome = f"{full_run_outcome(run)}; submission {rows} rows (the universe of pairs)"
    ok, why = verdict([(run.rc == 0, f"exit {run.rc}"), (rows > 0, "no submission")])
    return outcome, ok, why, run.seconds


def _drop_runs(ctx: Context, probe: Probe) -> dict[str, Any]:
    """One drop file replacing month 15 and adding month 16, then deleted: shared by 5c and 7d."""
    if "drop" in ctx.memo:
        return ctx.memo["drop"]
    d = ctx.warm("drop")
    template = sales_months(d)
    sales = (d / "raw" / "sales_train.csv").read_text().split("\n")
    month15 = [line for line in sales[1:] if line.split(",")[1:2] == ["15"]][:40]
    month16 = []
    for line in month15:
        f = line.split(",")
        day = f[0].split(".")[0]
        month16.append(",".join([f"{day}.05.2014", "16", *f[2:]]))
    (d / "raw" / DROP).write_text("\n".join([sales[0], *month15, *month16]) + "\n")
    first = ctx.nestcast("drop", "run", "--data-dir", str(d), *TINY)
    with_drop = sales_months(d)
    (d / "raw" / DROP).unlink()
    second = ctx.nestcast("drop", "run", "--data-dir", str(d), *TINY)
    ctx.memo["drop"] = {"template": template, "first": first, "with_drop": with_drop, "second": second,
                        "after": sales_months(d), "rows": len(month15)}
    return ctx.memo["drop"]


def p5c_drop_removed(ctx: Context, probe: Probe):
    r = _drop_runs(ctx, probe)
    first, second, template, after = r["first"], r["second"], r["template"], r["after"]
    gone = second.grep(rf"raw/{re.escape(DROP)} is gone")
    outcome = (
        f"with the drop: {full_run_outcome(first)}, months {month_span(r['with_drop'])}; after `rm`: "
        f"{full_run_outcome(second)}, months {month_span(after)}, month 15 {after.get(15)} rows "
        f"(sales_train.csv has {template.get(15)}); log `{clip(gone[0].split(' - ', 1)[-1], 200) if gone else 'none'}`"
    )
    ok, why = verdict(
        [
            (first.rc == 0 and second.rc == 0, f"exit {first.rc}/{second.rc}"),
            (16 in r["with_drop"] and 16 not in after, "month 16 stays in the lake"),
            (after == template, "lake/sales is not back to sales_train.csv's rows"),
            (bool(gone), "no log line"),
        ]
    )
    return outcome, ok, why, first.seconds + second.seconds


def p7d_drop_replaced(ctx: Context, probe: Probe):
    r = _drop_runs(ctx, probe)
    first = r["first"]
    replaced = first.grep(r"replaced \d+ rows")
    outcome = (f"{full_run_outcome(first)}; log: " + " / ".join(f"`{clip(line.split(' - ', 1)[-1], 110)}`"
                                                                  for line in replaced)) if replaced else (
        f"{full_run_outcome(first)}; no log line about replaced rows")
    expected = r["template"].get(15)
    ok, why = verdict([(first.rc == 0, f"exit {first.rc}"), (bool(replaced), "no log line"),
                       (any(f"replaced {expected} rows" in line for line in replaced),
                        f"the count is not month 15's {expected} rows")])
    return outcome, ok, why, 0.0


def p6a_set_epochs(ctx: Context, probe: Probe):
    d = ctx.warm(probe.id)
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY_NO_EPOCHS, "--set", "epochs=2")
    up_to = run.grep(r"up to \d+ epochs")
    used = sorted({m.group(0) for line in up_to for m in [re.search(r"up to \d+ epochs", line)] if m})
    outcome = f"{full_run_outcome(run)}; training log: {used or 'no training line'}"
    ok, why = verdict([(run.rc == 0, f"exit {run.rc}"), ("up to 2 epochs" in used, "epochs=2 not applied")])
    return outcome, ok, why, run.seconds


def _one_line_error(run: Run, *needles: str, code: int = 2) -> tuple[str, bool, str]:
    error = run.first_error()
    outcome = f"exit {run.rc}, {len(run.err_lines)} stderr line(s): `{clip(error or (run.err_lines or [''])[0])}`"
    if run.flow_started:
        outcome += ", flow had started"
    if run.traceback:
        outcome += ", traceback"
    if run.left_running:
        outcome += ", LEFT RUNNING: " + "; ".join(run.left_running)
    ok, why = verdict([
        (run.rc == code, f"exit {run.rc}"), (not run.traceback, "traceback"), (not run.flow_started, "flow started"),
        (len([line for line in run.err_lines if not line.startswith("warning:")]) == 1, "not one line"),
        *[(needle in error, f"does not name {needle!r}") for needle in needles],
        (not run.left_running, "left processes running"),
    ])
    return outcome, ok, why


def p6b_set_clash(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), "--epochs", "3", "--set", "epochs=2")
    return (*_one_line_error(run, "--epochs 3", "epochs=2"), run.seconds)


def p6c_set_invalid(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY, "--set", "head_units=abc")
    return (*_one_line_error(run, "head_units", "abc"), run.seconds)


def p6d_env_help(ctx: Context, probe: Probe):
    run = ctx.nestcast(probe.id, "--help", env={"NESTCAST_TRAIN__EPOCHS": "abc"})
    return (*_one_line_error(run, "NESTCAST_TRAIN__EPOCHS"), run.seconds)


def p6e_data_dir_under_file(ctx: Context, probe: Probe):
    base = ctx.root / f"p{probe.id}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    (base / "afile").write_text("not a directory\n")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(base / "afile" / "data"), *TINY)
    return (*_one_line_error(run, str(base / "afile")), run.seconds)


def p6f_lake_is_file(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    (d / "lake").write_text("")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    return (*_one_line_error(run, str(d / "lake")), run.seconds)


def p6g_submissions_is_file(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    (d / "submissions").write_text("")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    return (*_one_line_error(run, str(d / "submissions")), run.seconds)


def _failed_run(run: Run, *needles: str) -> tuple[str, bool, str]:
    error = run.first_error()
    ok, why = verdict([
        (run.rc != 0, "exit 0"), (run.retries == 0, f"{run.retries} retries"),
        (not run.traceback, f"a {run.traceback_lines}-line traceback on the console before the error line"),
        *[(needle in error, f"error does not name {needle!r}") for needle in needles],
        (not run.left_running, "left processes running"),
    ])
    return run.short(), ok, why


def p6h_every_row_rejected(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    edit_csv(d / "raw" / "sales_train.csv", lambda n, f: [*f[:2], "999", *f[3:]])  # a shop shops.csv lacks
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    outcome, ok, why = _failed_run(run, "sales_train.csv", "shop_id")
    return outcome, ok, why, run.seconds


def p6i_drop_all_quarantined(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    rows = [f"{day:02d}.05.2014,16,{shop},99999,349.0,1.0" for day in range(1, 11) for shop in (0, 10)]
    (d / "raw" / DROP).write_text("\n".join(["date,date_block_num,shop_id,item_id,item_price,item_cnt_day", *rows])
                                  + "\n")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    outcome, ok, why = _failed_run(run, DROP, "item_id")
    return outcome, ok, why, run.seconds


def p7a_kill_server(ctx: Context, probe: Probe):
    import psutil

    d = ctx.fresh(probe.id)
    found: dict[str, Any] = {}

    def poll(cli: Any) -> None:
        if "killed" in found:
            return
        try:
            children = cli.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                if SERVER_MARK in " ".join(child.cmdline()):
                    sockets = [c.laddr.ip for c in child.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
                    if sockets:
                        found["server"], found["ips"] = child, sockets
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if "server" in found:
            time.sleep(2)  # let the flow begin
            cli.send_signal(signal.SIGKILL)
            found["killed"] = time.monotonic()

    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY, poll=poll, timeout=300, grace=20)
    server = found.get("server")
    if server is None:
        return f"no temporary server seen ({run.short()})", False, "setup", run.seconds
    # reap_leftovers has waited up to 20 s (the loopback test's limit) and killed what remained
    left = [x for x in run.left_running if "Prefect server" in x]
    others = [x for x in run.left_running if x not in left]
    try:  # the server's own handle, whatever its environment says
        alive = server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    if alive and not left:
        left = [describe(server)]
        server.kill()
    gone = (f"was gone {run.gone_after:.1f} s after the CLI's death was seen" if run.gone_after
            else "was already gone when the CLI's death was seen (polled every 0.2 s)")
    outcome = (
        f"CLI killed with SIGKILL (exit {run.rc}); its server (on {sorted(set(found['ips']))}) "
        f"{'STILL RUNNING 20 s later: ' + '; '.join(left) if left else gone}"
        f"{'; other leftovers: ' + '; '.join(others) if others else ''}"
    )
    ok, why = verdict(
        [
            (not left and not others, "left processes running"),
            (all(_is_loopback(ip) for ip in found["ips"]), "server beyond loopback"),
        ]
    )
    return outcome, ok, why, run.seconds


def p7b_test_line(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    sed(d, r"10s/^\([0-9]*\),[0-9]*,/\1,abc,/", "raw/test.csv")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    outcome, ok, why = _failed_run(run, "test.csv", "line 10")
    return outcome, ok, why, run.seconds


def p7c_quarantine_nan(ctx: Context, probe: Probe):
    d = ctx.warm(probe.id)
    before = quarantine(d, "sales_train")
    # A line the template already quarantines (item_price -1.0): with "NaN" it stays quarantined, so the
    # accepted rows, the windows and the trained models are the template's (cached); only ingest runs.
    line = int(before.loc[before["rule"] == "item_price_positive", "line_number"].iloc[0])
    script = f"{line}s/^\\([^,]*,[^,]*,[^,]*,[^,]*\\),[^,]*,/\\1,NaN,/"
    sed(d, script, "raw/sales_train.csv")
    text = (d / "raw" / "sales_train.csv").read_text().split("\n")[line - 1]
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    after = quarantine(d, "sales_train")
    row = after.loc[after["line_number"] == line] if after is not None else None
    value = None if row is None or row.empty else row["item_price"].iloc[0]
    rule = None if row is None or row.empty else row["rule"].iloc[0]
    outcome = f"{full_run_outcome(run)}; line {line} `{text}` quarantined as {rule}, item_price stored as {value!r}"
    ok, why = verdict([(run.rc == 0, f"exit {run.rc}"), (value == "NaN", f"raw text stored as {value!r}")])
    probe.command = (
        f"`sed -i '{script}' raw/sales_train.csv` (a line already quarantined); `nestcast run --data-dir D $TINY`"
    )
    return outcome, ok, why, run.seconds


def p7e_env_typo(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY, env={"NESTCAST_TRAIN__EPOCS": "3"})
    return (*_one_line_error(run, "NESTCAST_TRAIN__EPOCS", "NESTCAST_TRAIN__EPOCHS"), run.seconds)


def p7f_env_unknown(ctx: Context, probe: Probe):
    d = ctx.warm(probe.id)
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY, env={"NESTCAST_EPOCHS": "3"})
    warning = run.grep(r"^warning:.*NESTCAST_EPOCHS")
    outcome = f"{full_run_outcome(run)}; `{clip(warning[0]) if warning else 'no warning'}`"
    ok, why = verdict([(run.rc == 0, f"exit {run.rc}"), (bool(warning), "silently ignored")])
    return outcome, ok, why, run.seconds


# --- issue 29: paths from outside, drops of one month, hand-edited submissions, smaller items --------------
PART1, PART2 = "sales_2014-04_part1.csv", "sales_2014-04_part2.csv"


class MotoServer:
    """moto's standalone S3 server on a free loopback port (as tests/test_object_store.py starts it), with a bucket,
    and the environment a `nestcast` process needs to use it. Started without the probe's marker: the reaping after
    each command must not take it."""

    def __init__(self, ctx: Context, probe: str) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {"AWS_ACCESS_KEY_ID": "probe", "AWS_SECRET_ACCESS_KEY": "probe", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                    "NESTCAST_STORE_CACHE": str(ctx.root / f"p{probe}-cache")}
        self.url = f"s3://probe-{probe}/lake"
        shutil.rmtree(self.env["NESTCAST_STORE_CACHE"], ignore_errors=True)
        os.environ.update(self.env)  # for this process's own s3fs
        import fsspec
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(self.env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        self.fs = fsspec.filesystem("s3", skip_instance_cache=True)
        self.fs.mkdir(f"probe-{probe}")

    def demo_data(self, ctx: Context, probe: str) -> Run:
        return ctx.nestcast(probe, "demo-data", self.url, "--scale", "tiny", env=self.env)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        for name in self.env:
            os.environ.pop(name, None)


def p8a_s3_key_escapes(ctx: Context, probe: Probe):
    server = MotoServer(ctx, probe.id)
    try:
        server.demo_data(ctx, probe.id)
        target = ctx.root / f"p{probe.id}-escaped" / "ESCAPED_sales.csv"  # raw/ of the working copy: 4 levels below
        key = f"{server.url.removeprefix('s3://')}/raw/../../../../{target.parent.name}/{target.name}"
        server.fs.pipe_file(key, b"date,date_block_num,shop_id,item_id,item_price,item_cnt_day\n")
        run = ctx.nestcast(probe.id, "run", "--data-dir", server.url, *TINY, env=server.env)
    finally:
        server.stop()
    copy_raw = list(Path(server.env["NESTCAST_STORE_CACHE"]).rglob("raw/*"))
    outcome, ok, why = _one_line_error(run, "/raw/../../../../", "refused")
    outcome += f"; {target.name} {'WRITTEN' if target.exists() else 'not written'}; working copy raw/: " \
               f"{len(copy_raw)} files"
    ok, why = ok and not target.exists() and not copy_raw, why or "a file was written"
    return outcome, ok, why, run.seconds


def p8b_s3_manifest_escapes(ctx: Context, probe: Probe):
    import hashlib as hashes

    server = MotoServer(ctx, probe.id)
    try:
        server.demo_data(ctx, probe.id)
        target = ctx.root / f"p{probe.id}-escaped" / "evil.txt"  # the working copy's root: 3 levels below
        rel = "%2e%2e/%2e%2e/%2e%2e/" + f"{target.parent.name}/{target.name}"  # '..' percent-encoded
        base = server.url.removeprefix("s3://")
        server.fs.pipe_file(f"{base}/_nestcast/tx/hand/evil", b"evil")
        entry = {"sha256": hashes.sha256(b"evil").hexdigest(), "size": 4, "object": "tx/hand/evil"}
        server.fs.pipe_file(f"{base}/_nestcast/commits/0000000001.json",
                            json.dumps({"version": 1, "files": {rel: entry}}).encode())
        run = ctx.nestcast(probe.id, "run", "--data-dir", server.url, *TINY, env=server.env)
    finally:
        server.stop()
    outcome, ok, why = _failed_run(run, repr(rel), "refused")
    outcome += f"; {target.name} {'WRITTEN' if target.exists() else 'not written'}"
    return outcome, ok and not target.exists(), why or "a file was written", run.seconds


def p8c_parts_of_one_month(ctx: Context, probe: Probe):
    d = ctx.warm(probe.id)
    template = sales_months(d)
    header, *rows = (d / "raw" / "sales_train.csv").read_text().strip("\n").split("\n")
    month = [row for row in rows if row.split(",")[1] == "15"]
    parts = {PART1: [r for r in month if int(r.split(",")[2]) % 2 == 0],
             PART2: [r for r in month if int(r.split(",")[2]) % 2 == 1]}
    for name, lines in parts.items():
        (d / "raw" / name).write_text("\n".join([header, *lines]) + "\n")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    logged = run.ingested()
    accepted = sum(logged.get(name, (0, 0, 0))[1] for name in parts)
    quarantined = sum(logged.get(name, (0, 0, 0))[2] for name in parts)
    lines = sum(data_lines(d / "raw" / name) for name in parts)
    owners = json.loads((d / "lake" / "manifest.json").read_text())["months"].get("15")
    after = sales_months(d).get(15, 0)
    shared = run.grep(r"holds months \[15\] together with")
    outcome = (f"{full_run_outcome(run)}; {PART1} {logged.get(PART1)}, {PART2} {logged.get(PART2)} (rows in, "
               f"accepted, quarantined); lake month 15: {after} rows (sales_train.csv's: {template.get(15)}); "
               f"manifest owners {owners}; log `{clip(shared[0].split(' - ', 1)[-1], 110) if shared else 'none'}`")
    ok, why = verdict([(run.rc == 0, f"exit {run.rc}"), (lines == accepted + quarantined, "rows in != acc + quar"),
                       (after == accepted, "the lake's month is not every part's accepted rows"),
                       (owners == [PART1, PART2], "manifest does not name both"), (bool(shared), "no log line")])
    return outcome, ok, why, run.seconds


def p8d_bad_submission_value(ctx: Context, probe: Probe):
    d = ctx.warm(probe.id)
    submission = Path(ctx.template_run.summary_line("submission:").removeprefix("submission:").strip()
                      if ctx.template_run else "")
    submission = d / "submissions" / submission.name
    lines = submission.read_text().split("\n")
    lines[2] = lines[2].split(",")[0] + ",abc"  # line 3
    submission.write_text("\n".join(lines))
    header, *rows = (d / "raw" / "sales_train.csv").read_text().strip("\n").split("\n")
    drop = [f"{r.split(',')[0][:2]}.05.2014,16,{','.join(r.split(',')[2:])}" for r in rows if r.split(",")[1] == "15"]
    (d / "raw" / f"sales_{submission.stem}.csv").write_text("\n".join([header, *drop]) + "\n")
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    import pandas as pd

    records = d / "lake" / "accountability" / "records.parquet"
    record = pd.read_parquet(records).set_index("month_label").loc[submission.stem] if records.exists() else None
    warned = run.grep(r"accountability: cannot score the forecast of")
    outcome = (f"{full_run_outcome(run)}; record {submission.stem}: "
               f"{'none' if record is None else record['status'] + ' / ' + repr(record['note'])}; "
               f"log `{clip(warned[0].split(' - ', 1)[-1], 150) if warned else 'no warning'}`")
    ok, why = verdict([(run.rc == 0, f"exit {run.rc}"), (record is not None and record["status"] == "unresolved"
                       and "line 3" in record["note"] and "'abc'" in record["note"], "no unresolved record naming "
                       "line and value"), (bool(warned), "no warning")])
    return outcome, ok, why, run.seconds


def p8e_escape_bytes(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    items = d / "raw" / "items.csv"
    lines = items.read_bytes().split(b"\n")
    lines[5] = b"\x1b[2J\x07caf\xe9 " + lines[5]
    items.write_bytes(b"\n".join(lines))
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    outcome, ok, why = _failed_run(run, "items.csv", "line 6", "\\x1b[2J\\x07")
    raw_control = "\x07" in run.text or "\x1b[2J" in run.text
    outcome += f"; raw ESC/BEL on the console: {'YES' if raw_control else 'none'}"
    return outcome, ok and not raw_control, why or "raw control characters printed", run.seconds


def p8f_iso_dates(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    edit_csv(d / "raw" / "sales_train.csv",
             lambda n, f: ["-".join(reversed(f[0].split("."))), *f[1:]])  # dd.mm.yyyy -> yyyy-mm-dd
    run = ctx.nestcast(probe.id, "run", "--data-dir", str(d), *TINY)
    outcome, ok, why = _failed_run(run, "sales_train.csv", "dd.mm.yyyy", "Nothing was written")
    pointer = "lake/quarantine" in run.first_error() or "lake/validation" in run.first_error()
    written = [p.name for p in (d / "lake").rglob("*") if p.is_file()] if (d / "lake").exists() else []
    outcome += f"; points to lake/: {'YES' if pointer else 'no'}; lake files: {len(written)}"
    return outcome, ok and not pointer and not written, why or "points to files never written", run.seconds


def p8g_model_rebuilt_logged(ctx: Context, probe: Probe):
    outcome, ok, why, seconds = _garbage_model(ctx, probe, remove_forecast=False)
    logs = ctx.logs.glob(f"{probe.id}-*.err")
    line = next((ln for path in logs for ln in path.read_text(errors="replace").splitlines()
                 if "rebuilt from the checkpoints" in ln), "")
    outcome += f"; log `{clip(ANSI.sub('', line).split(' - ', 1)[-1], 160) if line else 'no line'}`"
    return outcome, ok and bool(line), why or "no log line about the repair", seconds


def p8h_backtest_runs_deleted(ctx: Context, probe: Probe):
    d = ctx.fresh(probe.id)
    args = ["backtest", "--data-dir", str(d), "--origins", "15", *TINY]
    first = ctx.nestcast(probe.id, *args)
    shutil.rmtree(d / "runs", ignore_errors=True)
    second = ctx.nestcast(probe.id, *args)
    result = next((d / "runs").glob("backtest-*/backtest.json"), None)
    origins = json.loads(result.read_text())["origins"] if result else []
    gone = [o["run_dir"] for o in origins if not (Path(o["run_dir"]) / "refit" / "holdout.parquet").exists()]
    states = second.task_states()
    outcome = (f"first exit {first.rc}, after `rm -rf runs` exit {second.rc}; backtest-origin "
               f"{states.get('backtest-origin', '?')}; origin run dirs missing: {gone or 'none'}")
    ok, why = verdict([(first.rc == 0 and second.rc == 0, f"exit {first.rc}/{second.rc}"), (bool(origins), "no "
                       "backtest.json"), (not gone, "links gone run directories")])
    return outcome, ok, why, first.seconds + second.seconds


RUN = "nestcast run --data-dir D $TINY"
PROBES = [
    Probe(
        "1",
        "stray quote in items.csv: exit 0, `55 rows in` for 60 lines, items 18-22 lost silently",
        f"`sed -i '19s/^/\"/' raw/items.csv`; `{RUN}`",
        p1_items_quote,
    ),
    Probe(
        "2",
        "same stray quote in sales_train.csv: `_csv.Error: field larger than field limit`, no file/line, 3 retries",
        f"`sed -i '19s/^/\"/' raw/sales_train.csv`; `{RUN}`",
        p2_sales_quote,
    ),
    Probe(
        "3a",
        "month partition deleted: rerun is a cache hit, exit 0, month 7 silently gone (2563 -> 2377 samples)",
        f"after a run: `rm -rf lake/sales/date_block_num=7`; `{RUN}`",
        p3a_month_removed,
    ),
    Probe(
        "3b",
        "commit killed half-way: never completed on a cached rerun, journal+staging stay, lake keeps a row not in raw/",
        f"after a run: journal + staging of a commit towards raw/ + 1 row, first rename done; `{RUN}`",
        p3b_half_commit,
    ),
    Probe(
        "3c",
        "truncated monthly Parquet kept until a parameter change, then ArrowInvalid",
        f"after a run: truncate `lake/monthly/date_block_num=7/data.parquet` to half; `{RUN}`",
        p3c_truncated_monthly,
    ),
    Probe(
        "3d",
        "garbage model.keras served as the run's model",
        f"after a run: `echo garbage > runs/forecast-*/final/model.keras`; `{RUN}`",
        p3d_garbage_model,
    ),
    Probe(
        "3e",
        "garbage model.keras + forecast removed: `File not found: …model.keras` (file exists), every rerun",
        f"as 3d, and `rm runs/forecast-*/final/forecast.parquet`; `{RUN}`",
        p3e_garbage_model_no_forecast,
    ),
    Probe(
        "4",
        "`--task-runner dask`: Dask dashboard on 0.0.0.0:8787",
        f"after a run: `rm -rf lake/monthly`; `{RUN} --task-runner dask`, listening sockets polled",
        p4_dask_listening,
    ),
    Probe(
        "5a",
        "test.csv removed after a run: exit 0 with the stale lake/reference/test.parquet",
        f"after a run: `rm raw/test.csv`; `{RUN}`",
        p5a_test_removed,
    ),
    Probe(
        "5b",
        "no test.csv ever: trains, then export FileNotFoundError after 2 retries",
        f"`rm raw/test.csv`; `{RUN}`",
        p5b_no_test_ever,
    ),
    Probe(
        "5c",
        "drop file deleted: its months stay in the lake",
        f"after a run: add `raw/{DROP}` (40 rows of month 15 + 40 of month 16); `{RUN}`; `rm raw/{DROP}`; `{RUN}`",
        p5c_drop_removed,
    ),
    Probe(
        "6a",
        "`--set epochs=2`: TypeError multiple values for keyword argument",
        "after a run: `nestcast run --data-dir D $TINY_WITHOUT_--epochs --set epochs=2`",
        p6a_set_epochs,
    ),
    Probe(
        "6b",
        "(option and --set disagree; not in the issue's list, the rule that replaced the TypeError)",
        "`nestcast run --data-dir D --epochs 3 --set epochs=2`",
        p6b_set_clash,
    ),
    Probe(
        "6c", "`--set` values not validated before the flow starts", f"`{RUN} --set head_units=abc`", p6c_set_invalid
    ),
    Probe(
        "6d",
        "`NESTCAST_TRAIN__EPOCHS=abc nestcast --help`: pydantic traceback not naming the variable",
        "`NESTCAST_TRAIN__EPOCHS=abc nestcast --help`",
        p6d_env_help,
    ),
    Probe(
        "6e",
        "data dir under a file: traceback after retries",
        "`touch F`; `nestcast run --data-dir F/data $TINY`",
        p6e_data_dir_under_file,
    ),
    Probe("6f", "`lake` is a file: traceback after retries", f"`touch D/lake`; `{RUN}`", p6f_lake_is_file),
    Probe(
        "6g",
        "`submissions` is a file: traceback after retries",
        f"`touch D/submissions`; `{RUN}`",
        p6g_submissions_is_file,
    ),
    Probe(
        "6h",
        "every row rejected: `no sales partitions … did ingest accept any row?`, no file or rule named",
        f"every sales_train.csv row's shop_id -> 999 (`awk -F, -v OFS=, 'NR>1{{$3=999}}1'`); `{RUN}`",
        p6h_every_row_rejected,
    ),
    Probe(
        "6i",
        "a file 100 % quarantined passes with exit 0 and no warning",
        f"add `raw/{DROP}`: 20 rows of month 16, all item_id 99999 (unknown); `{RUN}`",
        p6i_drop_all_quarantined,
    ),
    Probe(
        "7a",
        "`kill -9` of `nestcast run` leaves the temporary Prefect server running",
        f"`{RUN} &`; once its server listens: `kill -9 $!`",
        p7a_kill_server,
    ),
    Probe(
        "7b",
        "test.csv errors name no line",
        f"`sed -i '10s/^\\([0-9]*\\),[0-9]*,/\\1,abc,/' raw/test.csv`; `{RUN}`",
        p7b_test_line,
    ),
    Probe(
        "7c",
        "quarantine stores null for the raw text 'NaN'",
        "after a run: item_price of a quarantined sales_train.csv line -> NaN; `" + RUN + "`",
        p7c_quarantine_nan,
    ),
    Probe(
        "7d",
        "no log says how many rows a drop replaced",
        "(the first run of 5c: the drop replaces month 15)",
        p7d_drop_replaced,
    ),
    Probe("7e", "misspelt `NESTCAST_*` variable silently ignored", f"`NESTCAST_TRAIN__EPOCS=3 {RUN}`", p7e_env_typo),
    Probe(
        "7f",
        "unknown `NESTCAST_*` variable silently ignored",
        f"after a run: `NESTCAST_EPOCHS=3 {RUN}`",
        p7f_env_unknown,
    ),
    Probe(
        "8a",
        "object key `raw/../../…` on S3: `nestcast run` (rc 0) wrote the file outside the working copy",
        "moto server; `nestcast demo-data s3://B/lake`; put `raw/../../../../ESCAPED_sales.csv`; "
        "`nestcast run --data-dir s3://B/lake $TINY`",
        p8a_s3_key_escapes,
    ),
    Probe(
        "8b",
        "a store manifest entry with `..` is written where it points; percent-encoded, it lands under a folder "
        "named `%2e%2e`, exit 0, no word",
        "moto server; demo data; a hand-made commit naming `%2e%2e/%2e%2e/%2e%2e/…/evil.txt`; "
        "`nestcast run --data-dir s3://B/lake $TINY`",
        p8b_s3_manifest_escapes,
    ),
    Probe(
        "8c",
        "two drop files for one month: both log all rows accepted, the lake keeps only the second",
        f"after a run: month 15 split by shop parity into `raw/{PART1}` and `{PART2}`; `{RUN}`",
        p8c_parts_of_one_month,
    ),
    Probe(
        "8d",
        "`abc` in a hand-edited submission: 85-line traceback, no forecast until fixed by hand",
        f"after a run: line 3 of `submissions/2014-05.csv` -> `ID,abc`; add the month's drop; `{RUN}`",
        p8d_bad_submission_value,
    ),
    Probe(
        "8e",
        "ESC/BEL from a file's bytes reach the terminal in the final `error:` line",
        f"`\\x1b[2J\\x07caf\\xe9` (ESC, BEL, a non-UTF-8 byte) at the start of line 6 of items.csv; `{RUN}`",
        p8e_escape_bytes,
    ),
    Probe(
        "8f",
        "an all-ISO-dates sales file: no word of the expected format; points to lake/quarantine, never written",
        f"every sales_train.csv date rewritten yyyy-mm-dd; `{RUN}`",
        p8f_iso_dates,
    ),
    Probe(
        "8g",
        "a damaged model.keras is repaired from checkpoints without a log line",
        f"after a run: `echo garbage > runs/forecast-*/final/model.keras`; `{RUN}`",
        p8g_model_rebuilt_logged,
    ),
    Probe(
        "8h",
        "a backtest rerun after `runs/` was deleted is served from the cache, linking gone run directories",
        "`nestcast backtest --data-dir D --origins 15 $TINY`; `rm -rf runs`; the same again",
        p8h_backtest_runs_deleted,
    ),
]


def selected(only: str | None) -> list[Probe]:
    if not only:
        return PROBES
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [p for p in PROBES if any(p.id == w or (w.isdigit() and p.id.rstrip("abcdefghi") == w) for w in wanted)]
    unknown = [w for w in wanted if not any(p.id == w or p.id.rstrip("abcdefghi") == w for p in PROBES)]
    if unknown:
        raise SystemExit(f"--only: unknown probe(s) {unknown}; known: {', '.join(p.id for p in PROBES)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated probe ids (1, 3b, ...; a bare number selects its sub-cases)")
    parser.add_argument("--keep", action="store_true", help="keep the data directories and logs under the root")
    parser.add_argument("--root", type=Path, help="parent of the temporary root (default /tmp)")
    args = parser.parse_args()
    probes = selected(args.only)
    root = Path(tempfile.mkdtemp(prefix="fault-probes-", dir=args.root or "/tmp"))
    ctx = Context(root, args.keep)
    started = time.monotonic()
    results: list[Result] = []
    try:
        for probe in probes:
            t0 = time.monotonic()
            try:
                outcome, ok, why, seconds = probe.fn(ctx, probe)
            except Exception as error:  # noqa: BLE001 - a probe that cannot run is reported, the rest go on
                outcome, ok, why, seconds = f"probe failed to run: {type(error).__name__}: {clip(str(error), 300)}", \
                    False, "probe error", time.monotonic() - t0
            results.append(Result(probe.id, probe.before, probe.command, outcome, ok, why, seconds))
            print(f"[{probe.id}] {time.monotonic() - t0:.0f} s: {'handled' if ok else 'NOT handled: ' + why}",
                  file=sys.stderr, flush=True)
        ctx.park()
    finally:
        total = time.monotonic() - started
        print_table(results, ctx, total, root if args.keep else None)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def print_table(results: list[Result], ctx: Context, total: float, kept: Path | None) -> None:
    print("| # | probe (what the issue saw before) | command | outcome now | handled? |")
    print("|---|---|---|---|---|")
    for r in results:
        handled = "yes" if r.handled else f"**no**: {r.why}"
        seconds = f" ({r.seconds:.0f} s)" if r.seconds else ""
        print(f"| {r.probe} | {r.before} | {r.command} | {r.outcome}{seconds} | {handled} |")
    print()
    print(f"$TINY = {' '.join(TINY)}")
    for note in ctx.notes:
        print(f"- {note}")
    print(f"{sum(r.handled for r in results)} of {len(results)} handled; wall time {total / 60:.1f} min")
    if kept:
        print(f"data directories and logs kept under {kept}")


if __name__ == "__main__":
    main()
