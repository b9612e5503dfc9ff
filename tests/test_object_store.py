"""The object-store lake (``core.store``) against a real S3-compatible server: moto's standalone server, started
on 127.0.0.1 by this module, spoken to over HTTP by s3fs as any S3 endpoint would be."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core import store as store_module
from core.files import file_sha256
from core.store import ObjectStoreLake

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """``moto_server`` in its own process on a free loopback port, for this module."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def bucket_url(s3_endpoint, tmp_path, monkeypatch) -> str:
    """A new bucket on the server (one per test: the store objects are cached per URL) and this test's own
    working-copy cache."""
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NESTCAST_STORE_CACHE", str(tmp_path / "cache"))
    import fsspec

    bucket = f"nestcast-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/lake-root"


def fresh_copy(url: str, cache: Path, monkeypatch) -> ObjectStoreLake:
    """Another machine's view of the store: a working copy in an empty cache."""
    monkeypatch.setenv("NESTCAST_STORE_CACHE", str(cache))
    store = ObjectStoreLake(url)
    store.pull()
    return store


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``root`` outside dot-names (what a store commits)."""
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def test_a_commit_round_trips_to_another_working_copy_and_publishes_each_file_at_its_own_path(
    bucket_url, tmp_path, monkeypatch
):
    writer = ObjectStoreLake(bucket_url)
    writer.pull()
    (writer.root / "lake" / "sales").mkdir(parents=True)
    (writer.root / "lake" / "sales" / "a.parquet").write_bytes(b"month one")
    (writer.root / "submissions").mkdir()
    (writer.root / "submissions" / "2015-11.csv").write_text("ID,item_cnt_month\n0,1.5\n")
    (writer.root / "lake" / ".journal.json").write_text("{}")  # a step's private file: never committed
    assert writer.commit("first") == 1
    assert writer.commit("nothing new") is None

    reader = fresh_copy(bucket_url, tmp_path / "other-machine", monkeypatch)
    assert tree(reader.root) == tree(writer.root) and "lake/.journal.json" not in tree(reader.root)
    assert writer.fs.cat_file(writer.key("submissions", "2015-11.csv")) == b"ID,item_cnt_month\n0,1.5\n"

    (writer.root / "lake" / "sales" / "a.parquet").write_bytes(b"month one, restated")
    (writer.root / "submissions" / "2015-11.csv").unlink()
    assert writer.commit("second") == 2
    reader.pull()
    assert tree(reader.root) == {"lake/sales/a.parquet": file_sha256(writer.root / "lake" / "sales" / "a.parquet")}
    assert not writer.fs.exists(writer.key("submissions", "2015-11.csv"))


def test_a_crash_before_the_manifest_leaves_the_previous_state_whole_and_the_next_commit_lands(
    bucket_url, tmp_path, monkeypatch
):
    writer = ObjectStoreLake(bucket_url)
    writer.pull()
    for name, text in {"a.txt": "a1", "b.txt": "b1"}.items():
        (writer.root / name).write_text(text)
    writer.commit("v1")
    before = tree(writer.root)

    (writer.root / "a.txt").write_text("a2")
    (writer.root / "c.txt").write_text("c2")

    def crash(key: str, data: bytes) -> None:
        raise OSError("injected: the process died before creating the manifest")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="injected"):
        patch.setattr(writer, "create_exclusive", crash)
        writer.commit("v2")
    staged = writer.fs.find(writer.key(store_module.STORE_DIR, store_module.STAGING_DIR))
    assert any(name.endswith("/c.txt") for name in staged), "the crash came after the staging uploads"
    assert writer.versions() == [1]

    reader = fresh_copy(bucket_url, tmp_path / "reader", monkeypatch)
    assert tree(reader.root) == before  # the staged a2 and c2 are invisible: no manifest names them

    assert writer.commit("v2 again") == 2  # the writer restarts: its working copy still holds the changes
    reader.pull()
    expected = {"a.txt": file_sha256(writer.root / "a.txt"), "b.txt": before["b.txt"],
                "c.txt": file_sha256(writer.root / "c.txt")}
    assert tree(reader.root) == tree(writer.root) == expected


def test_two_writers_racing_for_one_version_both_land_and_garbage_is_only_what_no_commit_names(
    bucket_url, tmp_path, monkeypatch
):
    first = ObjectStoreLake(bucket_url)
    first.pull()
    second = fresh_copy(bucket_url, tmp_path / "second", monkeypatch)
    (first.root / "runs" / "backtest-1").mkdir(parents=True)
    (first.root / "runs" / "backtest-1" / "r.json").write_text("1")
    (second.root / "runs" / "backtest-2").mkdir(parents=True)
    (second.root / "runs" / "backtest-2" / "r.json").write_text("2")
    assert first.commit("origin 1") == 1
    assert second.commit("origin 2") == 2  # version 1 was taken: its change goes on top of the first's

    head = second.head()
    assert sorted(head.files) == ["runs/backtest-1/r.json", "runs/backtest-2/r.json"]
    third = fresh_copy(bucket_url, tmp_path / "third", monkeypatch)
    assert tree(third.root) == {name: file_sha256(copy.root / name) for name, copy in
                                [("runs/backtest-1/r.json", first), ("runs/backtest-2/r.json", second)]}

    orphan = first.key(store_module.STORE_DIR, store_module.STAGING_DIR, "20200101T000000-0badf00d", "x.txt")
    first.fs.pipe_file(orphan, b"a crashed writer's upload")
    removed = first.collect_garbage()
    assert removed == [orphan]  # an old orphan goes; every object a commit names stays
    assert tree(fresh_copy(bucket_url, tmp_path / "fourth", monkeypatch).root) == tree(third.root)


def test_raw_is_mirrored_from_the_store_including_a_file_taken_away(bucket_url):
    store = ObjectStoreLake(bucket_url)
    store.fs.pipe_file(store.key("raw", "sales_train.csv"), b"date,date_block_num\n")
    store.fs.pipe_file(store.key("raw", "test.csv"), b"ID,shop_id,item_id\n")
    store.pull()
    assert sorted(p.name for p in (store.root / "raw").iterdir()) == ["sales_train.csv", "test.csv"]
    store.fs.rm_file(store.key("raw", "test.csv"))
    store.fs.pipe_file(store.key("raw", "sales_train.csv"), b"date,date_block_num\n01.01.2013,0\n")
    store.pull()
    assert [p.name for p in (store.root / "raw").iterdir()] == ["sales_train.csv"]
    assert (store.root / "raw" / "sales_train.csv").read_bytes().endswith(b"01.01.2013,0\n")
    assert store.commit("raw is input") is None  # nothing commits raw/


# --- keys and manifest entries that would leave the working copy (issue 29) ------------------------------------
def _escape_spellings(target: Path, depth: int) -> dict[str, str]:
    """Three spellings of a path that leads from a folder ``depth`` levels below ``target.parent.parent`` to
    ``target``: ``..`` segments, an absolute path, and ``..`` percent-encoded (twice, as a proxy or a second
    decoder would see it)."""
    below = target.relative_to(target.parent.parent).as_posix()
    return {"dotdot": "../" * depth + below, "absolute": str(target),
            "percent-encoded": "%252e%252E/" * depth + below}


@pytest.mark.parametrize("spelling", ["dotdot", "absolute", "percent-encoded"])
def test_a_raw_key_that_would_leave_the_working_copy_is_refused_naming_it_and_nothing_is_written(
    bucket_url, tmp_path, spelling
):
    from core.errors import DataValidationError

    store = ObjectStoreLake(bucket_url)
    target = tmp_path / "escaped" / "sales_2014-05.csv"  # raw/ is four levels below tmp_path: data, copy, cache
    rel = _escape_spellings(target, depth=4)[spelling]
    store.fs.pipe_file(store.key("raw", "items.csv"), b"item_name,item_id,item_category_id\n")
    store.fs.pipe_file(store.key("raw", rel), b"date,date_block_num,shop_id,item_id,item_price,item_cnt_day\n")
    assert store.raw_objects().keys() == {"items.csv", rel}, "the server keeps the key as it was written"

    with pytest.raises(DataValidationError) as refused:
        store.pull()
    assert repr(f"{bucket_url}/raw/{rel}") in str(refused.value) and "refused" in str(refused.value)
    assert not target.exists() and not target.parent.exists()
    assert not (store.root / "raw").exists() or not any((store.root / "raw").rglob("*")), "nothing written"
    assert "refused" in (store.raw_problem() or ""), "the CLI's check names it before a flow starts"


def _commit_by_hand(store: ObjectStoreLake, version: int, files: dict[str, bytes], objects: dict[str, str]
                    ) -> None:
    """A manifest written as anyone with access to the bucket could write one: each file's bytes staged under
    ``objects[path]`` (default ``tx/hand/<path>``), the manifest created as version ``version``."""
    entries = {}
    for rel, data in files.items():
        obj = objects.get(rel, f"{store_module.STAGING_DIR}/hand/{rel}")
        store.fs.pipe_file(store.key(store_module.STORE_DIR, obj), data)
        entries[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "object": obj}
    manifest = {"version": version, "parent": version - 1, "files": entries, "changed": sorted(files), "deleted": []}
    store.create_exclusive(store._commit_key(version), json.dumps(manifest).encode())


@pytest.mark.parametrize("spelling", ["dotdot", "absolute", "percent-encoded"])
def test_a_manifest_entry_that_would_leave_the_working_copy_is_refused_and_nothing_is_written_or_deleted(
    bucket_url, tmp_path, monkeypatch, spelling
):
    from core.errors import DataValidationError

    writer = ObjectStoreLake(bucket_url)
    writer.pull()
    (writer.root / "lake").mkdir()
    (writer.root / "lake" / "a.txt").write_text("kept")
    assert writer.commit("v1") == 1
    reader = fresh_copy(bucket_url, tmp_path / "reader", monkeypatch)
    target = tmp_path / "escaped" / "evil.txt"  # the working copy's root is three levels below tmp_path
    rel = _escape_spellings(target, depth=3)[spelling]
    _commit_by_hand(writer, 2, {rel: b"evil", "lake/b.txt": b"new"}, {})  # lake/a.txt left out: a deletion

    with pytest.raises(DataValidationError) as refused:
        reader.pull()
    assert repr(rel) in str(refused.value) and "refused" in str(refused.value)
    assert not target.exists()
    assert tree(reader.root) == {"lake/a.txt": file_sha256(writer.root / "lake" / "a.txt")}, "nothing changed"


@pytest.mark.parametrize("obj", ["tx/../../raw/items.csv", "/etc/passwd", "other/lake/b.txt"])
def test_a_manifest_entry_whose_object_lies_outside_the_staging_area_is_refused(bucket_url, tmp_path, obj):
    from core.errors import DataValidationError

    writer = ObjectStoreLake(bucket_url)
    _commit_by_hand(writer, 1, {"lake/b.txt": b"x"}, {"lake/b.txt": obj})
    reader = ObjectStoreLake(bucket_url)
    with pytest.raises(DataValidationError, match="refused") as refused:
        reader.pull()
    assert repr(obj) in str(refused.value)
    assert not (reader.root / "lake").exists()


def test_a_store_url_stays_a_url_in_the_config_and_its_lake_paths_are_the_working_copy(bucket_url):
    from core.config import NestcastConfig
    from core.lake import LakePaths
    from core.store import working_copy_dir

    config = NestcastConfig().with_overrides(data_dir=bucket_url + "/")
    assert config.data_dir == bucket_url
    assert LakePaths.of(config).submissions == working_copy_dir(bucket_url) / "data" / "submissions"


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    own = ("NESTCAST_", "PREFECT_API_URL", "PREFECT_LOGGING", "AWS_")  # this test's settings, not the session's
    clean = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(REPO), **env}, timeout=600)


def option_fields(options: list[str]) -> dict[str, str]:
    """CLI options (``--batch-size 256``, ``--set head_units=8``) as config fields (the config parses the values)."""
    pairs = zip(options[::2], options[1::2], strict=True)
    return dict(value.split("=", 1) if flag == "--set" else (flag[2:].replace("-", "_"), value)
                for flag, value in pairs)


@pytest.mark.slow
def test_the_whole_flow_runs_on_an_s3_data_dir_and_a_crash_before_a_commit_loses_nothing(
    bucket_url, s3_endpoint, tmp_path, monkeypatch
):
    """``nestcast demo-data s3://...`` and ``nestcast run --data-dir s3://...`` as a user runs them; then a run that
    dies at its export step's commit leaves the store as the steps before it committed, and a rerun finishes; another
    working copy of the bucket finds the champion the rerun crowned."""
    from tests.test_console import TINY_OPTIONS

    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "NESTCAST_STORE_CACHE": str(tmp_path / "cache"),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    made = _cli("demo-data", bucket_url, "--scale", "tiny", "--seed", "3", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    missing = _cli("run", "--data-dir", bucket_url + "-elsewhere", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "raw/ holds no files" in missing.stderr

    # The crash: the export step's commit dies between its staging uploads and its manifest (a site hook in the
    # child process, so the CLI runs unchanged), with retries off so the run fails.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import core.store as s\n"
        "real = s.ObjectStoreLake.create_exclusive\n"
        "def create(self, key, data):\n"
        "    if b'\"note\": \"export\"' in data:\n"
        "        raise OSError('injected crash before the export commit')\n"
        "    return real(self, key, data)\n"
        "s.ObjectStoreLake.create_exclusive = create\n"
    )
    crashed = _cli("run", "--data-dir", bucket_url, *TINY_OPTIONS, "--set", "retries=0",
                   env={**env, "PYTHONPATH": f"{hook}:{REPO}"}, cwd=tmp_path)
    assert crashed.returncode != 0 and "injected crash before the export commit" in crashed.stderr + crashed.stdout

    store = fresh_copy(bucket_url, tmp_path / "reader", monkeypatch)  # another machine reads what the crash left
    head = store.head()
    assert "lake/manifest.json" in head.files and any(f.startswith("runs/forecast-") for f in head.files)
    assert not any(f.startswith("submissions/") for f in head.files)  # the export never committed
    raw = {f"raw/{p.name}": file_sha256(p) for p in (store.root / "raw").iterdir()}
    assert tree(store.root) == {f: e["sha256"] for f, e in head.files.items()} | raw  # every file as committed
    assert [k for k in store.fs.find(store.key("_nestcast", "tx")) if "/submissions/" in k], "export was staged"

    committed_before = store.versions()[-1]
    rerun = _cli("run", "--data-dir", bucket_url, *TINY_OPTIONS, env=env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Cached" in rerun.stdout + rerun.stderr, "the steps the crashed run committed were not served from the cache"
    url = next(line for line in rerun.stdout.splitlines() if line.startswith("submission: ")).split(": ", 1)[1]
    assert url.startswith(f"{bucket_url}/submissions/20")
    store.pull()
    assert (store.root / "submissions" / url.rsplit("/", 1)[1]).read_bytes() == store.fs.cat_file(url)
    new_commits = [json.loads(store.fs.cat_file(store.key("_nestcast", "commits", f"{v:010d}.json")))
                   for v in store.versions() if v > committed_before]
    assert not {c["note"] for c in new_commits} & {"ingest", "build-windows", "select", "refit"}, "recomputed"
    assert any(name.startswith("submissions/") for c in new_commits for name in c["changed"])

    # Another machine, a working copy in an empty cache, finds the champion through the store (the index names it
    # inside the data directory, not by this machine's cache path) and scores it as the run that crowned it did.
    from core import champion
    from core.config import NestcastConfig
    from core.lake import LakePaths

    other = fresh_copy(bucket_url, tmp_path / "another-machine", monkeypatch)
    config = NestcastConfig(data_dir=bucket_url).with_overrides(**option_fields(TINY_OPTIONS))
    paths = LakePaths.of(config)
    record = champion.read_index(paths)["champion"]
    assert record["run_dir"].startswith("runs/") and paths.run_path(record["run_dir"]).is_relative_to(other.root)
    score = champion.score_champion(config, paths.monthly_months()[-1], paths.windows, paths.windows_final)
    sidecar = json.loads((other.root / "submissions" / url.rsplit("/", 1)[1]).with_suffix(".json").read_text())
    assert score.rmse == pytest.approx(sidecar["exported_rmse"], abs=1e-6), score.why_not
