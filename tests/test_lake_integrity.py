"""The lake is never served damaged, half-committed or out of step with raw/ (issue 14, second part).

Real files, real Parquet and, where the cache decides, real Prefect runs on a temporary backend.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from prefect import flow
from test_ingest import _sales, _write_raw

from core.aggregate import MonthlyLake, aggregate
from core.config import NestcastConfig
from core.errors import ModelIntegrityError
from core.files import file_sha256, read_json, write_json_atomic
from core.ingest import RemovedFile, ingest, read_manifest, read_sales
from core.ingest.commit import JOURNAL
from core.lake import LakePaths
from core.windows import UNIVERSE_ID_STRIDE
from flows.aggregate_months import aggregate_months
from tasks.ingest import ingest_raw_files
from tasks.windows import build_windows as build_windows_task

pytestmark = pytest.mark.usefixtures("harness")

DROP = "sales_2013-04.csv"
# Month 2 (March) replaces sales_train.csv's three rows; month 3 (April) only this file has.
DROP_BYTES = _sales("12.04.2013,3,1,0,5.0,1.0", rows=["20.03.2013,2,0,1,7.0,4.0"])


def _lake_files(paths: LakePaths) -> dict[str, bytes]:
    """Every file of the lake by relative path (the manifest without its timestamps and arrival numbers)."""
    files = {}
    for path in sorted(p for p in paths.lake.rglob("*") if p.is_file()):
        rel = path.relative_to(paths.lake).as_posix()
        if rel.startswith("validation/"):
            continue  # the HTML/JSON docs carry run timestamps
        data = path.read_bytes()
        if rel == "manifest.json":
            manifest = json.loads(data)
            for entry in manifest["files"].values():
                entry.pop("ingested_at", None)
                entry.pop("seq", None)
            data = json.dumps(manifest, sort_keys=True).encode()
        files[rel] = data
    return files


def _damage_in_place(path: Path) -> None:
    """Overwrite bytes in the middle of ``path``: same size, and the mtime put back."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    with open(path, "r+b") as handle:
        handle.write(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


# --- 1. damaged lake files -------------------------------------------------------------------------


def test_a_monthly_file_damaged_in_place_with_size_and_mtime_kept_is_recomputed_by_the_flow(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    ingested = ingest(config)
    aggregate_months(config, ingested)
    paths = LakePaths(tmp_path)
    target = paths.monthly_file(1)
    good = target.read_bytes()
    _damage_in_place(target)
    assert target.read_bytes() != good
    aggregate_months(config, ingested)  # the same inputs: without content stamps the month was a cache hit
    assert target.read_bytes() == good
    assert pq.read_table(target).num_rows == 2


def test_a_monthly_file_damaged_in_place_or_truncated_is_recomputed_by_aggregate(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    ingest(config)
    assert aggregate(config).recomputed == [0, 1, 2]
    paths = LakePaths(tmp_path)
    good = {m: paths.monthly_file(m).read_bytes() for m in (0, 2)}
    _damage_in_place(paths.monthly_file(0))
    with open(paths.monthly_file(2), "r+b") as handle:
        handle.truncate(len(good[2]) - 10)
    summary = aggregate(config)
    assert summary.recomputed == [0, 2] and summary.skipped == [1]
    assert {m: paths.monthly_file(m).read_bytes() for m in (0, 2)} == good
    assert aggregate(config).recomputed == []


# --- 2. an interrupted commit ----------------------------------------------------------------------


@flow(name="ingest-only")
def _ingest_flow(config: NestcastConfig) -> str:
    return ingest_raw_files(config, return_state=True).name


def _crash_half_way(paths: LakePaths, target_lake: Path) -> None:
    """Leave ``paths.lake`` as a commit towards ``target_lake`` that died after its journal and first rename:
    the journal, the staging area with the rest of the files, the manifest (renamed last) still the old one."""
    current = {p.relative_to(paths.lake).as_posix() for p in paths.lake.rglob("*") if p.is_file()}
    target = {p.relative_to(target_lake).as_posix() for p in target_lake.rglob("*") if p.is_file()}
    moves = sorted(rel for rel in target
                   if rel not in current or (paths.lake / rel).read_bytes() != (target_lake / rel).read_bytes())
    moves = [m for m in moves if m != "manifest.json"] + ["manifest.json"]
    deletes = sorted(rel for rel in current - target if not rel.startswith("."))
    staging = paths.lake / ".staging-0123456789ab"
    for rel in moves:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(target_lake / rel, staging / rel)
    write_json_atomic(paths.lake / JOURNAL, {"staging": staging.name, "moves": moves, "deletes": deletes})
    first = next(m for m in moves if m.startswith("sales/"))
    (paths.lake / first).parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging / first, paths.lake / first)  # then the process died


def test_an_interrupted_commit_is_completed_before_a_cached_ingest_is_served(tmp_path: Path) -> None:
    config = _write_raw(tmp_path / "a", **{DROP.removesuffix(".csv"): DROP_BYTES})
    paths = LakePaths(config.data_dir)
    clean = _write_raw(tmp_path / "clean", **{DROP.removesuffix(".csv"): DROP_BYTES})
    ingest(clean)
    assert _ingest_flow(config) == "Completed"
    assert _lake_files(paths) == _lake_files(LakePaths(clean.data_dir))

    # Someone removed the drop file, and that ingest died half-way through its commit ...
    other = _write_raw(tmp_path / "other")
    shutil.copytree(paths.lake, LakePaths(other.data_dir).lake)
    ingest(other)
    assert read_manifest(LakePaths(other.data_dir))["months"] == {"0": "sales_train.csv", "1": "sales_train.csv",
                                                                   "2": "sales_train.csv"}
    _crash_half_way(paths, LakePaths(other.data_dir).lake)
    # ... then the drop file came back: the raw tree of the first, successful run (the ingest cache key).
    assert read_manifest(paths)["months"]["3"] == DROP  # the old manifest: without recovery, a cache hit
    assert _ingest_flow(config) == "Completed"  # rolled forward first, so the manifest missed the cache
    assert not (paths.lake / JOURNAL).exists() and not list(paths.lake.glob(".staging-*"))
    assert _lake_files(paths) == _lake_files(LakePaths(clean.data_dir))
    assert _ingest_flow(config) == "Cached"


def test_a_sales_partition_deleted_or_damaged_behind_the_manifest_makes_a_cached_ingest_rewrite_it(
        tmp_path: Path) -> None:
    config = _write_raw(tmp_path / "a", **{DROP.removesuffix(".csv"): DROP_BYTES})
    paths = LakePaths(config.data_dir)
    assert _ingest_flow(config) == "Completed"
    clean = _lake_files(paths)
    assert _ingest_flow(config) == "Cached"
    shutil.rmtree(paths.sales_file(1).parent)  # rm -rf lake/sales/date_block_num=1: raw/ is unchanged
    assert _ingest_flow(config) == "Completed", "a cache hit would serve the lake without month 1"
    assert _lake_files(paths) == clean
    _damage_in_place(paths.sales_file(3))  # the drop's month, owned by another file
    assert _ingest_flow(config) == "Completed"
    assert _lake_files(paths) == clean
    assert _ingest_flow(config) == "Cached"


def test_aggregation_completes_an_interrupted_commit_before_reading_the_lake(tmp_path: Path) -> None:
    config = _write_raw(tmp_path / "a", **{DROP.removesuffix(".csv"): DROP_BYTES})
    paths = LakePaths(config.data_dir)
    ingest(config)
    other = _write_raw(tmp_path / "other")
    shutil.copytree(paths.lake, LakePaths(other.data_dir).lake)
    ingest(other)
    _crash_half_way(paths, LakePaths(other.data_dir).lake)
    summary = aggregate(config)  # no ingest ran: aggregation itself finishes the commit first
    assert not (paths.lake / JOURNAL).exists()
    assert summary.months == [0, 1, 2]
    lake = {k: v for k, v in _lake_files(paths).items() if not k.startswith("monthly/")}
    assert lake == _lake_files(LakePaths(other.data_dir))


# --- 4. the lake mirrors raw/ ----------------------------------------------------------------------


def test_a_removed_drop_file_takes_its_own_months_out_and_restores_those_sales_train_covers(tmp_path: Path) -> None:
    config = _write_raw(tmp_path, **{DROP.removesuffix(".csv"): DROP_BYTES})
    paths = LakePaths(tmp_path)
    assert ingest(config).months == [0, 1, 2, 3]
    assert read_sales(paths, [2]).num_rows == 1
    (paths.raw / DROP).unlink()
    summary = ingest(config)
    assert summary.removed == [RemovedFile(
        file=DROP, outputs=["quarantine/sales_2013-04.parquet", "validation/sales_2013-04.json",
                            "validation/sales_2013-04.html"],
        months_deleted=[3], rows_deleted=1, months_restored=[2], restored_from=["sales_train.csv"])]
    assert summary.removed[0].message() == (
        "raw/sales_2013-04.csv is gone; removed lake/quarantine/sales_2013-04.parquet, "
        "lake/validation/sales_2013-04.json, lake/validation/sales_2013-04.html; removed months [3] (1 rows) "
        "from lake/sales; restored months [2] from sales_train.csv")
    assert summary.months == [0, 1, 2] and paths.sales_months() == [0, 1, 2]
    manifest = read_manifest(paths)
    assert DROP not in manifest["files"] and set(manifest["months"].values()) == {"sales_train.csv"}
    clean = _write_raw(tmp_path / "clean")
    ingest(clean)
    assert read_sales(paths).equals(read_sales(LakePaths(clean.data_dir)))
    assert not (paths.quarantine / "sales_2013-04.parquet").exists()
    assert ingest(config).removed == [] and not ingest(config).changed


def test_a_removed_test_csv_removes_lake_reference_test_parquet(tmp_path: Path) -> None:
    config = _write_raw(tmp_path)
    paths = LakePaths(tmp_path)
    ingest(config)
    assert paths.reference_table("test").exists()
    (paths.raw / "test.csv").unlink()
    summary = ingest(config)
    assert [r.message() for r in summary.removed] == [
        "raw/test.csv is gone; removed lake/reference/test.parquet, lake/quarantine/test.parquet, "
        "lake/validation/test.json, lake/validation/test.html"]
    assert not paths.reference_table("test").exists()
    assert "test.csv" not in read_manifest(paths)["files"]
    assert read_manifest(paths)["months"] == {"0": "sales_train.csv", "1": "sales_train.csv", "2": "sales_train.csv"}


# --- 3. model files ---------------------------------------------------------------------------------


def test_a_replaced_model_file_is_a_hash_mismatch_naming_the_file(tmp_path: Path) -> None:
    from core.protocol import artifact_problems, load_verified_model, record_artifacts

    stage = tmp_path / "holdout"
    stage.mkdir()
    write_json_atomic(stage / "metadata.json", {"epochs_run": 2})
    (stage / "model.keras").write_bytes(b"PK\x03\x04 a model")
    (stage / "reference.txt").write_text("tree\n")
    recorded = record_artifacts(stage)
    assert recorded == {"model.keras": file_sha256(stage / "model.keras"),
                        "reference.txt": file_sha256(stage / "reference.txt")}
    assert read_json(stage / "metadata.json")["epochs_run"] == 2 and artifact_problems(stage) == []
    (stage / "model.keras").write_bytes(b"garbage, not the model")
    (stage / "reference.txt").unlink()
    problems = artifact_problems(stage)
    assert problems[0].startswith(f"{stage / 'model.keras'}: hash mismatch (metadata.json records sha256 ")
    assert problems[1] == f"{stage / 'reference.txt'}: missing"
    with pytest.raises(ModelIntegrityError, match="hash mismatch") as caught:
        load_verified_model(stage / "model.keras")
    assert str(stage / "model.keras") in str(caught.value)


def test_an_unreadable_model_file_that_exists_is_not_reported_as_file_not_found(tmp_path: Path) -> None:
    from core.protocol import load_verified_model

    (tmp_path / "model.keras").write_bytes(b"garbage")  # no metadata.json: nothing recorded to compare with
    with pytest.raises(ModelIntegrityError) as caught:
        load_verified_model(tmp_path / "model.keras")
    message = str(caught.value)
    assert "File not found" not in message
    assert message.startswith(f"{tmp_path / 'model.keras'}: not a readable .keras model (7 bytes)")


# --- 3 and 4 through the whole forecast flow ---------------------------------------------------------


@pytest.mark.slow
def test_a_replaced_model_is_retrained_and_a_removed_test_csv_exports_the_last_months_grid(tmp_path, tiny_data):
    from test_flow import run_flow, task_runs

    from core.aggregate import read_monthly
    from core.protocol import artifact_problems

    data_dir = tiny_data(tmp_path, seed=5)
    first = run_flow(data_dir)
    assert first.is_completed(), first.message
    run_dir = Path(first.result()["run_dir"])
    for stage in ("select", "holdout", "final"):
        recorded = read_json(run_dir / stage / "metadata.json")["artifacts"]
        assert set(recorded) == {"model.keras", "reference.txt"}
        assert recorded["model.keras"] == file_sha256(run_dir / stage / "model.keras")

    # A garbage model.keras: the stage that wrote it trains again; the rest is served from cache.
    model = run_dir / "holdout" / "model.keras"
    model.write_bytes(b"garbage")
    assert artifact_problems(run_dir / "holdout")[0].startswith(f"{model}: hash mismatch")
    second = run_flow(data_dir)
    assert second.is_completed(), second.message
    runs = task_runs(second.state_details.flow_run_id)
    assert runs["refit-holdout"].state.name == "Completed"
    assert runs["select"].state.name == runs["refit-final"].state.name == runs["ingest"].state.name == "Cached"
    assert artifact_problems(run_dir / "holdout") == [] and model.stat().st_size > 1000

    # test.csv removed: lake/reference/test.parquet goes with it; the forecast is the universe (the last month's
    # grid and the last three months' sellers), each row's ID its pair's stable ID.
    paths = LakePaths(data_dir)
    (paths.raw / "test.csv").unlink()
    third = run_flow(data_dir)
    assert third.is_completed(), third.message
    assert not paths.reference_table("test").exists()
    summary = third.result()
    submission = pd.read_csv(summary["submission"])
    last = read_monthly(paths, [summary["months"][-1]])
    pairs = pd.read_parquet(paths.submission_pairs(Path(summary["submission"]).stem))
    stable = pairs["shop_id"].astype("int64") * UNIVERSE_ID_STRIDE + pairs["item_id"]
    assert list(submission["ID"]) == list(pairs["ID"]) == list(stable)
    # The grid within it: every shop with sales in the last month x every item sold that month.
    grid = pd.MultiIndex.from_product([last["shop_id"].unique(), last["item_id"].unique()])
    assert grid.isin(pd.MultiIndex.from_frame(pairs[["shop_id", "item_id"]])).all()
    sidecar = json.loads(Path(summary["submission"]).with_suffix(".json").read_text())
    assert sidecar["submission"]["rows"] == len(submission)


@pytest.mark.slow
def test_a_data_dir_that_never_had_a_test_csv_runs_end_to_end(tmp_path, tiny_data):
    from test_flow import run_flow

    data_dir = tiny_data(tmp_path, seed=5)
    (data_dir / "raw" / "test.csv").unlink()
    state = run_flow(data_dir)
    assert state.is_completed(), state.message
    summary = state.result()
    submission = pd.read_csv(summary["submission"])
    assert len(submission) > 0 and list(submission.columns) == ["ID", "item_cnt_month"]
    assert not LakePaths(data_dir).reference_table("test").exists()


@flow(name="windows-only")
def _windows_flow(config: NestcastConfig, monthly: MonthlyLake) -> str:
    return build_windows_task(config, monthly, purpose="evaluation", return_state=True).name


def test_a_windows_array_deleted_or_damaged_in_place_is_rebuilt_not_served(tmp_path: Path, tiny_data) -> None:
    config = NestcastConfig(data_dir=tiny_data(tmp_path, seed=2))
    ingest(config)
    monthly = MonthlyLake(months=aggregate(config).months, input_hashes={}, removed=[], state="")
    assert _windows_flow(config, monthly) == "Completed"
    store = LakePaths(tmp_path).windows
    built = {p.name: p.read_bytes() for p in store.iterdir()}
    assert len(built) > 5 and _windows_flow(config, monthly) == "Cached"
    _damage_in_place(store / "pair_count.npy")
    assert _windows_flow(config, monthly) == "Completed", "a damaged array was served from the cache"
    assert {p.name: p.read_bytes() for p in store.iterdir()} == built
    (store / "train_index.npy").unlink()
    assert _windows_flow(config, monthly) == "Completed"
    assert {p.name: p.read_bytes() for p in store.iterdir()} == built
    assert _windows_flow(config, monthly) == "Cached"
