"""Time the ingest step: read, validate (Great Expectations), write, total; print a table.

    .venv/bin/python benchmarks/ingest.py --scale full            # makes the demo data in a temp dir
    .venv/bin/python benchmarks/ingest.py --data-dir data --repeat 3

Each repetition ingests into an empty lake (the raw files are reused); the table shows the median
and the best repetition. GE's import (seconds, once per process) is timed on its own and kept out
of the phases, as is a second, no-op ingest of the same files (the skip path). Two pyarrow-only
baselines (read the sales CSV typed, write it as one Parquet file) put the numbers in context.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _baselines(raw: Path, scratch: Path) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    sales = raw / "sales_train.csv"
    types = {"date": pa.string(), "date_block_num": pa.int16(), "shop_id": pa.int16(), "item_id": pa.int32(),
             "item_price": pa.float32(), "item_cnt_day": pa.float32()}
    start = time.perf_counter()
    table = pcsv.read_csv(sales, convert_options=pcsv.ConvertOptions(column_types=types))
    read = time.perf_counter() - start
    start = time.perf_counter()
    pq.write_table(table, scratch / "baseline.parquet", compression="zstd")
    write = time.perf_counter() - start
    (scratch / "baseline.parquet").unlink()
    return {"pyarrow read_csv (typed)": read, "pyarrow write_table (zstd)": write}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="A data dir with raw/ (default: make demo data in a temp dir).")
    parser.add_argument("--scale", default="full", choices=["tiny", "demo", "full"],
                        help="Demo data scale when no --data-dir is given (full: competition size).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="Ingests into an empty lake to time (default 3).")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="nestcast-bench-ingest-"))
    try:
        if args.data_dir is None:
            from core.synthetic import write_competition_files

            start = time.perf_counter()
            write_competition_files(work / "source" / "raw", scale=args.scale, seed=args.seed)
            print(f"made {args.scale} demo data in {time.perf_counter() - start:.1f} s", flush=True)
            raw = work / "source" / "raw"
        else:
            raw = args.data_dir / "raw"
        # Ingest writes lake/ beside raw/: work on a copy so a real data dir is never touched.
        data_dir = work / "data"
        (data_dir / "raw").mkdir(parents=True)
        for path in sorted(raw.iterdir()):
            if path.is_file():
                os.link(path, data_dir / "raw" / path.name) if _same_fs(path, data_dir) else shutil.copy2(
                    path, data_dir / "raw" / path.name)

        start = time.perf_counter()
        import great_expectations  # noqa: F401 - timed apart: a one-off per process

        ge_import = time.perf_counter() - start
        from core.config import NestcastConfig
        from core.ingest import ingest

        config = NestcastConfig(data_dir=data_dir)
        runs = []
        for _ in range(max(1, args.repeat)):
            shutil.rmtree(data_dir / "lake", ignore_errors=True)
            summary = ingest(config)
            runs.append(summary.timings)
        noop = ingest(config)
        assert not noop.changed
        baselines = _baselines(data_dir / "raw", work)
        size = sum(p.stat().st_size for p in (data_dir / "raw").iterdir() if p.name.startswith("sales_"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sales_rows = sum(f.rows_in for f in summary.files if f.kind == "sales")
    print(f"\ningest of {sales_rows:,} sales rows ({size / 1e6:.0f} MB) + reference files + test.csv, "
          f"{os.cpu_count()} CPUs, {len(runs)} run(s) into an empty lake")
    print(f"quarantined: {summary.rows_quarantined} rows {dict(summary.file('sales_train.csv').failed_rules)}"
          if any(f.file == "sales_train.csv" for f in summary.files) else "")
    print(f"\n| {'phase':<36} | {'median s':>9} | {'best s':>7} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 9}|")
    for phase in ("read", "validate", "write", "total"):
        values = [run.get(phase, 0.0) for run in runs]
        print(f"| {phase:<36} | {statistics.median(values):>9.2f} | {min(values):>7.2f} |")
    print(f"| {'GE context (first run only)':<36} | {runs[0].get('ge_setup', 0.0):>9.2f} | {'':>7} |")
    print(f"| {'GE import (once per process)':<36} | {ge_import:>9.2f} | {'':>7} |")
    print(f"| {'second ingest (no-op)':<36} | {noop.timings['total']:>9.2f} | {'':>7} |")
    for name, seconds in baselines.items():
        print(f"| {'baseline: ' + name:<36} | {seconds:>9.2f} | {'':>7} |")
    return 0


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
