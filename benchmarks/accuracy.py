"""The accuracy table of a backtest, by half and on launch rows, beside an outside yardstick; and the export rules
recombined offline from the backtest's saved predictions.

    .venv/bin/python benchmarks/compare_models.py --raw-dir ../shared/data/real-1c-subset --models nlstm2 \\
        --origins 17,18,19,20,21,22,23,24,25,26,27,28 --seeds 42,1 --set launch_calibration=false --keep /tmp/runs
    .venv/bin/python benchmarks/accuracy.py --runs /tmp/runs [--recipe /tmp/origins] [--variants default,launch-weight]

``--runs`` is a ``compare_models.py --keep`` directory: per seed and origin, the selection stage's validation
predictions (``select/validation.parquet``, the validation months) and the refit's holdout predictions
(``refit/holdout.parquet``, the origin), each a column per trained forecaster. Every variant re-chooses the launch
scales and blend weights on the validation months with ``core.protocol.choose`` (the function the flow runs),
applies them to the holdout with ``core.protocol.combine`` and lets ``core.gate.decide`` pick the export from the
validation scores: what the flow would have exported with that setting. The origin's month only scores.

``--recipe`` is a directory of ``o<origin>/`` cuts made by the outside yardstick's ``origin.py prepare`` with
``peer.csv`` (its submission) and ``truth.csv`` beside them; its row is scored on the same grid rows.

Prints one markdown table: each forecaster's mean RMSE over all origins, each half (17-22, 23-28 by default) and
on launch rows (items with no sale before the origin), averaged over seeds; then one row per origin.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.blend import rmse  # noqa: E402
from core.config import NestcastConfig  # noqa: E402
from core.gate import decide  # noqa: E402
from core.protocol import choose, combine, launch_rows, read_predictions  # noqa: E402
from core.window_store import WindowStore  # noqa: E402

#: Variants of the export rules, as config overrides on the default (one blend weight, no launch calibration).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "calibrated": {"launch_calibration": True},
    "launch-weight": {"ensemble_segments": "launch"},
    "launch-weight-calibrated": {"ensemble_segments": "launch", "launch_calibration": True},
}


def origin_dirs(runs: Path) -> dict[tuple[int, int], Path]:
    """(seed, origin) -> the origin's run directory of a compare_models --keep directory."""
    found = {}
    for seed_dir in sorted(runs.glob("runs/compare-*-*")):
        seed = int(seed_dir.name.rsplit("-", 1)[1])
        for origin_dir in seed_dir.glob("origin-*"):
            if (origin_dir / "refit" / "holdout.parquet").exists():  # an origin still training is left out
                found[(seed, int(origin_dir.name.split("-")[1]))] = origin_dir
    return found


def store_of(runs: Path, origin: int) -> WindowStore:
    (path,) = sorted(runs.glob(f"lake/backtest/windows-{origin}-*"))
    return WindowStore.open(path)


def recombine(run_dir: Path, store: WindowStore, config: NestcastConfig) -> dict[str, np.ndarray]:
    """The holdout columns of every forecaster and of the export, under ``config``'s export rules."""
    clip = config.windows.clip
    trained = ("model", "reference")
    valid = read_predictions(run_dir / "select", "validation")
    held = read_predictions(run_dir / "refit", "holdout")
    frame = store.validation_frame()
    actual, months = frame["actual"].to_numpy(np.float64), frame["date_block_num"].to_numpy()
    launch_valid = launch_rows(store, store.validation_index)
    launch_held = launch_rows(store, store.holdout_index)
    raw_valid = {name: valid[name].to_numpy(np.float64) for name in trained if name in valid}
    scales, weights = choose(actual, raw_valid, launch_valid, months, config, clip)
    columns_valid = combine(raw_valid, scales, weights, launch_valid, clip)
    columns = combine({name: held[name].to_numpy(np.float64) for name in raw_valid}, scales, weights, launch_held, clip)
    previous = np.clip(store.holdout_frame()["prev"].to_numpy(np.float64), *clip)
    means = {name: np.mean([rmse(values[months == m], actual[months == m]) for m in np.unique(months)])
             for name, values in {**columns_valid, "baseline": np.clip(frame["prev"].to_numpy(), *clip)}.items()}
    exported = decide(means, fallback=config.export.fallback).exported
    columns["export"] = previous if exported == "baseline" else columns[exported]
    return columns


def recipe_column(recipe: Path, origin: int, holdout: pd.DataFrame) -> np.ndarray | None:
    cut = recipe / f"o{origin}"
    if not (cut / "peer.csv").exists():
        return None
    truth = pd.read_csv(cut / "truth.csv").merge(pd.read_csv(cut / "peer.csv"), on="ID")
    by_pair = truth.set_index(["shop_id", "item_id"])["item_cnt_month"]
    values = by_pair.reindex(pd.MultiIndex.from_frame(holdout[["shop_id", "item_id"]].astype(int)))
    if values.isna().any():
        missing = int(values.isna().sum())
        raise ValueError(f"{cut}: the recipe's submission misses {missing} grid pairs of origin {origin}")
    return np.clip(values.to_numpy(np.float64), 0, 20)


def scores(runs: Path, recipe: Path | None, config: NestcastConfig) -> pd.DataFrame:
    """One row per (seed, origin, forecaster): RMSE on the grid and on its launch rows."""
    rows = []
    stores: dict[int, WindowStore] = {}
    for (seed, origin), run_dir in sorted(origin_dirs(runs).items()):
        store = stores.setdefault(origin, store_of(runs, origin))
        holdout = store.holdout_frame()
        actual = holdout["actual"].to_numpy(np.float64)
        launch = holdout["new_item"].to_numpy(bool)
        columns = recombine(run_dir, store, config)
        columns |= {"zeros": np.zeros_like(actual), "previous month": np.clip(holdout["prev"].to_numpy(), 0, 20),
                    "mean of last 3": np.clip(holdout["mean3"].to_numpy(), 0, 20)}
        if recipe is not None and (peer := recipe_column(recipe, origin, holdout)) is not None:
            columns["recipe"] = peer
        for name, values in columns.items():
            rows.append({"seed": seed, "origin": origin, "forecaster": name, "rmse": rmse(values, actual),
                         "launch": rmse(values[launch], actual[launch]) if launch.any() else np.nan})
    return pd.DataFrame(rows)


ORDER = ("zeros", "previous month", "mean of last 3", "recipe", "reference", "model", "ensemble", "export")
LABELS = {"recipe": "the standard recipe (outside yardstick)", "reference": "LightGBM (core/reference)",
          "model": "NLSTM", "ensemble": "ensemble", "export": "**exported (the gate's choice)**"}


def table(frame: pd.DataFrame, halves: list[list[int]]) -> str:
    by_origin = frame.groupby(["forecaster", "origin"])[["rmse", "launch"]].mean()  # mean over seeds
    names = [n for n in ORDER if n in by_origin.index.get_level_values(0)]
    origins = sorted(frame["origin"].unique())
    spans = [("all", origins)] + [(f"{h[0]}-{h[-1]}", [o for o in h if o in origins]) for h in halves]
    spans = [(name, span) for name, span in spans if span]
    header = ["forecaster", *(f"RMSE {s}" for s, _ in spans), *(f"launch {s}" for s, _ in spans),
              *(str(o) for o in origins)]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name in names:
        part = by_origin.loc[name]
        cells = [f"{part.loc[list(o), 'rmse'].mean():.4f}" for _, o in spans]
        cells += [f"{np.nanmean(part.loc[list(o), 'launch']):.3f}" for _, o in spans]
        cells += [f"{part.loc[o, 'rmse']:.4f}" for o in origins]
        lines.append("| " + " | ".join([LABELS.get(name, name), *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="a compare_models.py --keep directory")
    parser.add_argument("--recipe", type=Path, help="the outside yardstick's per-origin cuts (o<origin>/peer.csv)")
    parser.add_argument("--variants", default="default", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--halves", default="17-22,23-28", help="origin ranges reported apart")
    args = parser.parse_args(argv)
    halves = [list(range(int(a), int(b) + 1)) for a, b in (h.split("-") for h in args.halves.split(","))]
    for variant in args.variants.split(","):
        config = NestcastConfig().with_overrides(VARIANTS[variant])
        frame = scores(args.runs, args.recipe, config)
        seeds = ", ".join(str(s) for s in sorted(frame["seed"].unique()))
        print(f"\n### {variant} (seeds {seeds}; mean over seeds, then over origins)\n")
        print(table(frame, halves))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
