"""The forecast ranges of a kept backtest, offline: per origin, coverage, width and pinball loss of the exported
forecast's range against the naive range, by half and on new-item rows.

    .venv/bin/python benchmarks/quantiles.py --runs /tmp/runs [--halves 17-22,23-28] [--levels 0.1,0.5,0.9]

``--runs`` is a ``compare_models.py --keep`` directory (see ``benchmarks/accuracy.py``). At each (seed, origin) the
export is recombined as the flow would choose it (``accuracy.recombine``'s rules: ``core.protocol.choose`` and
``combine`` on the validation months, ``core.gate.decide``); ``core.quantiles.calibrate`` takes its residuals on the
validation months (the origin's two months before it) and the range is scored on the origin month, which nothing
above has seen. Naive: the previous month plus its pooled residual quantiles on the same validation months.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import origin_dirs, store_of  # noqa: E402
from core import quantiles  # noqa: E402
from core.blend import rmse  # noqa: E402
from core.config import NestcastConfig  # noqa: E402
from core.gate import decide  # noqa: E402
from core.protocol import choose, combine, launch_rows, read_predictions  # noqa: E402


def exported_columns(run_dir: Path, store: Any, config: NestcastConfig) -> tuple[str, np.ndarray, np.ndarray]:
    """The gate's pick and its validation and holdout columns (``baseline``: the previous month, clipped)."""
    clip = config.windows.clip
    valid, held = read_predictions(run_dir / "select", "validation"), read_predictions(run_dir / "refit", "holdout")
    frame, holdout = store.validation_frame(), store.holdout_frame()
    actual, months = frame["actual"].to_numpy(np.float64), frame["date_block_num"].to_numpy()
    launch_valid, launch_held = launch_rows(store, store.validation_index), launch_rows(store, store.holdout_index)
    raw_valid = {name: valid[name].to_numpy(np.float64) for name in ("model", "reference") if name in valid}
    scales, weights = choose(actual, raw_valid, launch_valid, months, config, clip)
    columns_valid = combine(raw_valid, scales, weights, launch_valid, clip)
    columns_held = combine({name: held[name].to_numpy(np.float64) for name in raw_valid}, scales, weights,
                           launch_held, clip)
    columns_valid["baseline"] = np.clip(frame["prev"].to_numpy(np.float64), *clip)
    columns_held["baseline"] = np.clip(holdout["prev"].to_numpy(np.float64), *clip)
    means = {name: np.mean([rmse(values[months == m], actual[months == m]) for m in np.unique(months)])
             for name, values in columns_valid.items()}
    name = decide(means, fallback=config.export.fallback).exported
    return name, columns_valid[name], columns_held[name]


def origin_scores(run_dir: Path, store: Any, config: NestcastConfig) -> dict[str, Any]:
    clip, levels = config.windows.clip, config.export.quantile_levels
    name, valid_point, held_point = exported_columns(run_dir, store, config)
    frame = store.validation_frame()
    codes = quantiles.frame_codes(frame)
    calibration = quantiles.calibrate(frame["actual"].to_numpy(np.float64), valid_point,
                                      frame["prev"].to_numpy(np.float64), codes, levels,
                                      months=np.unique(frame["date_block_num"]).tolist(), forecaster=name,
                                      clip=clip)
    holdout = store.holdout_frame()
    month = quantiles.Month(held_point, quantiles.frame_codes(holdout), holdout["prev"].to_numpy(np.float64),
                            holdout["actual"].to_numpy(np.float64), holdout["shop_id"].to_numpy(np.int64))
    summary = quantiles.holdout_summary(calibration, month, clip)
    naive_new = quantiles.score(month.actual[month.codes == 0],
                                quantiles.apply_naive(month.prev, calibration, clip)[month.codes == 0], levels)
    return {"exported": name, "calibrated_on": ",".join(map(str, calibration.months)), **summary,
            "naive_new_item_coverage": naive_new["interval_coverage"] if naive_new["rows"] else np.nan}


def table(frame: pd.DataFrame, halves: list[list[int]]) -> str:
    columns = ["range_coverage", "naive_coverage", "range_width", "naive_width", "range_pinball", "naive_pinball",
               "new_item_coverage", "naive_new_item_coverage", "new_item_rows"]
    by_origin = frame.groupby("origin")[columns].mean()  # mean over seeds
    by_origin["pinball_gain"] = 1 - by_origin["range_pinball"] / by_origin["naive_pinball"]
    spans = [("all", list(by_origin.index))] + [(f"{h[0]}-{h[-1]}", [o for o in h if o in by_origin.index])
                                                for h in halves]
    rows = [(str(o), by_origin.loc[[o]]) for o in by_origin.index] + [(name, by_origin.loc[span])
                                                                      for name, span in spans if span]
    header = ["origin", *columns, "pinball_gain"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, part in rows:
        mean = part.mean()
        mean["pinball_gain"] = 1 - mean["range_pinball"] / mean["naive_pinball"]
        cells = [f"{mean[c]:.0f}" if c == "new_item_rows" else f"{mean[c]:.4f}" for c in header[1:]]
        lines.append("| " + " | ".join([f"**{name}**" if not name.isdigit() else name, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="a compare_models.py --keep directory")
    parser.add_argument("--halves", default="17-22,23-28", help="origin ranges reported apart")
    parser.add_argument("--levels", default="0.1,0.5,0.9", help="quantile levels")
    args = parser.parse_args(argv)
    halves = [list(range(int(a), int(b) + 1)) for a, b in (h.split("-") for h in args.halves.split(","))]
    config = NestcastConfig().with_overrides(quantile_levels=[float(v) for v in args.levels.split(",")])
    started, rows, stores = time.perf_counter(), [], {}
    for (seed, origin), run_dir in sorted(origin_dirs(args.runs).items()):
        store = stores.setdefault(origin, store_of(args.runs, origin))
        rows.append({"seed": seed, "origin": origin} | origin_scores(run_dir, store, config))
    frame = pd.DataFrame(rows)
    print(frame[["seed", "origin", "exported", "calibrated_on"]].to_string(index=False))
    print(f"\nlevels {args.levels}; mean over seeds {sorted(frame['seed'].unique())}, then over origins; "
          f"{time.perf_counter() - started:.0f} s\n")
    print(table(frame, halves))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
