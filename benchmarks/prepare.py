"""Benchmark of steps 2-3 (aggregate, windows) and of the input pipeline that feeds training.

    .venv/bin/python benchmarks/prepare.py --scale full
    .venv/bin/python benchmarks/prepare.py --raw-dir ../shared/data/real-1c-subset

Makes synthetic competition files (or uses ``--raw-dir``) in a temporary directory, ingests them
(``core.ingest`` when it is importable, otherwise a direct CSV -> Parquet conversion with the same
partition layout), then times aggregation, the cube + sample index build, and how many batches per
second the training dataset yields at batch sizes 128 and 512. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402

from core.aggregate import aggregate  # noqa: E402
from core.config import NestcastConfig  # noqa: E402
from core.files import write_parquet_atomic  # noqa: E402
from core.lake import LakePaths  # noqa: E402
from core.window_store import WindowStore  # noqa: E402
from core.windows import build_windows  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def lake_from_raw(raw_dir: Path, data_dir: Path, config: NestcastConfig) -> str:
    """Put the raw CSVs into ``data_dir/raw`` and ingest them; returns how ("core.ingest" or "direct")."""
    paths = LakePaths(data_dir)
    paths.raw.mkdir(parents=True, exist_ok=True)
    for name in ("sales_train.csv", "test.csv", "items.csv", "item_categories.csv", "shops.csv"):
        if (raw_dir / name).exists():
            shutil.copyfile(raw_dir / name, paths.raw / name)
    try:
        from core import ingest  # type: ignore[attr-defined]

        run = getattr(ingest, "ingest", None)
        if run is not None:
            run(config)
            return "core.ingest"
    except ImportError:
        pass
    write_lake_direct(paths, config)
    return "direct"


def write_lake_direct(paths: LakePaths, config: NestcastConfig) -> None:
    """CSV -> lake partitions without validation suites: typed columns, obvious outliers dropped."""
    sales = pacsv.read_csv(
        paths.raw / "sales_train.csv",
        convert_options=pacsv.ConvertOptions(
            column_types={
                "date": pa.string(),
                "date_block_num": pa.int16(),
                "shop_id": pa.int16(),
                "item_id": pa.int32(),
                "item_price": pa.float32(),
                "item_cnt_day": pa.float32(),
            }
        ),
    )
    date = pc.cast(pc.strptime(sales["date"], format="%d.%m.%Y", unit="s"), pa.date32())
    rules = config.ingest
    keep = pc.and_(
        pc.and_(pc.greater(sales["item_price"], 0), pc.less(sales["item_price"], rules.max_item_price)),
        pc.and_(
            pc.greater_equal(sales["item_cnt_day"], rules.min_item_cnt_day),
            pc.less_equal(sales["item_cnt_day"], rules.max_item_cnt_day),
        ),
    )
    table = pa.table(
        {
            "date": date,
            "shop_id": sales["shop_id"],
            "item_id": sales["item_id"],
            "item_price": sales["item_price"],
            "item_cnt_day": sales["item_cnt_day"],
        }
    ).filter(keep)
    months = sales["date_block_num"].filter(keep).to_numpy()
    order = np.argsort(months, kind="stable")
    bounds = np.searchsorted(months[order], np.arange(months.max() + 2))
    for month in range(int(months.max()) + 1):
        rows = order[bounds[month] : bounds[month + 1]]
        if rows.size:
            write_parquet_atomic(paths.sales / f"date_block_num={month}" / "data.parquet", table.take(rows))
    ref = {
        "items.csv": ("items.parquet", {"item_id": pa.int32(), "item_category_id": pa.int16()}),
        "item_categories.csv": ("item_categories.parquet", {"item_category_id": pa.int16()}),
        "shops.csv": ("shops.parquet", {"shop_id": pa.int16()}),
        "test.csv": ("test.parquet", {"ID": pa.int32(), "shop_id": pa.int16(), "item_id": pa.int32()}),
    }
    for source, (target, types) in ref.items():
        if (paths.raw / source).exists():
            frame = pacsv.read_csv(paths.raw / source, convert_options=pacsv.ConvertOptions(column_types=types))
            write_parquet_atomic(paths.reference / target, frame)


def batches_per_second(store: WindowStore, batch_size: int, seconds: float = 3.0) -> float:
    dataset = store.train_dataset(batch_size=batch_size, seed=0)
    n = len(dataset)
    start = time.perf_counter()
    done = 0
    while time.perf_counter() - start < seconds:
        dataset[done % n]
        done += 1
    return done / (time.perf_counter() - start)


def compare_policies(config: NestcastConfig, holdouts: list[int], steps: int, seeds: int) -> list[str]:
    """Holdout RMSE of a small LSTM (and a ridge model) trained under each sample policy.

    About equal compute per policy (``steps`` batches of 256), mean over ``seeds``; RMSE on the holdout
    grid, clipped to [0, 20] as the competition scores. Used to choose the default policy.
    """
    import keras

    def rmse(pred: np.ndarray, actual: np.ndarray) -> float:
        return float(np.sqrt(np.mean((np.clip(pred, 0, 20) - actual) ** 2)))

    def small_lstm(store: WindowStore, seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        factor = np.ones(store.n_channels, np.float32)
        factor[0] = 0.1  # the raw clipped count (0..20) next to unit-scale covariates
        seq = keras.Input((store.lookback, store.n_channels), name="sequence")
        shop = keras.Input((), dtype="int32", name="shop")
        cat = keras.Input((), dtype="int32", name="category")
        hidden = keras.layers.LSTM(32)(keras.layers.Rescaling(factor)(seq))
        shop_e = keras.layers.Flatten()(keras.layers.Embedding(store.meta["n_shops"], 4)(shop))
        cat_e = keras.layers.Flatten()(keras.layers.Embedding(store.meta["n_categories"], 4)(cat))
        hidden = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([hidden, shop_e, cat_e]))
        model = keras.Model({"sequence": seq, "shop": shop, "category": cat}, keras.layers.Dense(1)(hidden))
        model.compile(keras.optimizers.Adam(2e-3), "mse")
        return model

    def ridge(store: WindowStore, seed: int) -> np.ndarray:
        index = store.train_index
        if index.shape[0] > 400_000:
            index = index[np.random.default_rng(seed).choice(index.shape[0], 400_000, replace=False)]
        x = np.hstack([store.gather(index[:, 0], index[:, 1]).reshape(len(index), -1), np.ones((len(index), 1))])
        return np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ store.targets(index[:, 0], index[:, 1]))

    lines = [
        "| holdout | policy | train samples | zeros | previous | ridge | LSTM | LSTM / previous |",
        "|" + "---|" * 8,
    ]
    for holdout in holdouts:
        for policy in ("grid", "active", "all"):
            built = build_windows(config.with_overrides(sample_policy=policy), holdout_month=holdout)
            store = WindowStore.open(built.windows_dir)
            actual = store.holdout_frame()["actual"].to_numpy()
            index = store.holdout_index
            x = store.gather(index[:, 0], index[:, 1]).reshape(len(index), -1)
            ridge_rmse = rmse(np.hstack([x, np.ones((len(index), 1))]) @ ridge(store, 0), actual)
            scores = []
            for seed in range(seeds):
                model = small_lstm(store, seed)
                train = store.train_dataset(256, seed=seed)
                if steps <= len(train):
                    model.fit(train, epochs=1, steps_per_epoch=steps, verbose=0)
                else:  # whole epochs, as close to ``steps`` batches as they come
                    model.fit(train, epochs=max(1, round(steps / len(train))), verbose=0)
                scores.append(rmse(model.predict(store.holdout_dataset(2048), verbose=0).ravel(), actual))
            previous = rmse(store.holdout_frame()["prev"].to_numpy(), actual)
            lstm = float(np.mean(scores))
            lines.append(
                f"| {holdout} | {policy} | {len(store.train_index):,} | {rmse(np.zeros_like(actual), actual):.3f} | "
                f"{previous:.3f} | {ridge_rmse:.3f} | {lstm:.3f} | {lstm / previous:.3f} |"
            )
            print(lines[-1], flush=True)
    return lines


def keras_batches_per_second(store: WindowStore, batch_size: int, seconds: float = 3.0) -> float | None:
    """The same, through the adapter ``model.fit`` wraps a PyDataset in (tf.data.from_generator)."""
    try:
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    except ImportError:  # private module; skip the row if Keras moves it
        return None
    adapter = PyDatasetAdapter(store.train_dataset(batch_size=batch_size, seed=0), shuffle=False)
    done, start = 0, time.perf_counter()
    for _ in adapter.get_tf_dataset():
        done += 1
        if time.perf_counter() - start > seconds:
            break
    return done / (time.perf_counter() - start)


def _prepare(args: argparse.Namespace, work: Path) -> int:
    config = NestcastConfig(data_dir=work)
    if args.raw_dir is None:
        from core.synthetic import write_competition_files

        raw = work / "synthetic"
        write_competition_files(raw, scale=args.scale, seed=args.seed)
        source = f"synthetic {args.scale} (seed {args.seed})"
    else:
        raw, source = args.raw_dir, str(args.raw_dir)
    print(f"{source}, ingested by {lake_from_raw(raw, work, config)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "demo", "full"], default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-dir", type=Path, help="use these competition CSVs instead of synthetic ones")
    parser.add_argument("--lookback", type=int, default=None)
    parser.add_argument("--policy", choices=["grid", "active", "all"], default=None)
    parser.add_argument("--keep", type=Path, help="build the lake here and keep it (default: a temp dir)")
    parser.add_argument(
        "--compare-policies",
        metavar="HOLDOUTS",
        help="also train a small LSTM per sample policy and holdout month (comma-separated) and print the RMSE",
    )
    parser.add_argument("--steps", type=int, default=1500, help="training batches per policy (--compare-policies)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per policy (--compare-policies)")
    parser.add_argument("--prepare-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare_only is not None:
        return _prepare(args, args.prepare_only)

    work = args.keep or Path(tempfile.mkdtemp(prefix="nestcast-bench-"))
    config = NestcastConfig(data_dir=work).with_overrides(lookback=args.lookback, sample_policy=args.policy)
    rows: list[tuple[str, str, str]] = []
    try:
        # Data are made in a child process so that generating them does not count in this peak memory.
        start = time.perf_counter()
        child = [sys.executable, __file__, "--prepare-only", str(work), "--scale", args.scale, "--seed", str(args.seed)]
        if args.raw_dir is not None:
            child += ["--raw-dir", str(args.raw_dir)]
        how = subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(("make + ingest data", f"{time.perf_counter() - start:.1f} s", how))

        summary = aggregate(config)
        rows.append(
            (
                "aggregate (all months)",
                f"{summary.seconds:.2f} s",
                f"goal <= 2 s; {summary.rows_in:,} daily rows -> {summary.rows_out:,} monthly rows",
            )
        )
        again = aggregate(config)
        rows.append(("aggregate (unchanged rerun)", f"{again.seconds:.2f} s", f"{len(again.recomputed)} months redone"))

        built = build_windows(config)
        counts = built.sample_counts
        rows.append(
            (
                "cube + index",
                f"{built.seconds:.2f} s",
                f"goal <= 5 s; {built.n_series:,} series ({built.n_pairs_with_sales:,} with sales), "
                f"{built.n_channels} channels, {built.bytes_on_disk / 1e6:.0f} MB on disk",
            )
        )
        rows.append(
            (
                "samples",
                f"{counts['train']:,}",
                f"train ({built.sample_policy}); holdout {counts['holdout']:,}, forecast {counts['forecast']:,}",
            )
        )
        rebuilt = build_windows(config)
        rows.append(("cube + index (unchanged rerun)", f"{rebuilt.seconds:.2f} s", f"skipped={rebuilt.skipped}"))

        rows.append(
            ("peak memory after steps 2-3", f"{peak_rss_mb():,.0f} MB", "goal <= 2048 MB; RSS, before TF import")
        )
        store = WindowStore.open(built.windows_dir)
        for batch in (128, 512):
            rate = batches_per_second(store, batch)
            rows.append(
                (
                    f"train batches/s @ {batch}",
                    f"{rate:,.0f}",
                    f"{rate * batch:,.0f} windows/s, one thread; training needs ~100-200 batches/s",
                )
            )
        rate = keras_batches_per_second(store, 512)
        if rate is not None:
            rows.append(
                ("keras fit feed @ 512", f"{rate:,.0f}", "batches/s through Keras' PyDataset adapter (tf.data)")
            )
        rows.append(("peak memory incl. batching", f"{peak_rss_mb():,.0f} MB", "RSS incl. TensorFlow/Keras import"))
        policy_lines = []
        if args.compare_policies:
            holdouts = [int(h) for h in args.compare_policies.split(",")]
            policy_lines = compare_policies(config, holdouts, args.steps, args.seeds)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(f"{'stage':<{width}}  {'result':>{value_width}}  notes")
    print(f"{'-' * width}  {'-' * value_width}  -----")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{value_width}}  {note}")
    if policy_lines:
        print("\nSample policies (holdout RMSE):")
        print("\n".join(policy_lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
