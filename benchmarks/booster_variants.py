"""Refit only the LightGBM booster of every kept backtest run under a variant, for ``benchmarks/accuracy.py``.

    .venv/bin/python benchmarks/booster_variants.py --runs /tmp/runF/work --out /tmp/varB --add NAME
    .venv/bin/python benchmarks/accuracy.py --runs /tmp/varA --recipe /tmp/origins

``--runs`` is a ``compare_models.py --keep`` directory. For each (seed, origin) run in it, the booster is trained
the way the flow trains it (``core.protocol``'s stages): early-stopped on the validation months m-2 and m-1 with
training months < m-2, then refitted on every month < m with the chosen rounds; the network's columns are kept as
they are. ``--out`` mirrors the runs with the ``reference`` column of ``select/validation.parquet`` and
``refit/holdout.parquet`` replaced (its ``lake`` is a link to the original's, or to ``--stores``'s), so
``accuracy.py`` re-makes blend and gate from it. Month m only scores.

A variant is features added to or removed from the booster's (a set of ``core.features``, e.g. ``NAME``, or
feature names, comma-separated) and ``--set NAME=VALUE`` config overrides (e.g. ``num_leaves=31``). With no
change it is the control, which reproduces the kept ``reference`` column (LightGBM is run deterministically).
Prints one line per run: seconds, rounds and the reference's RMSE on month m before and after. A rerun into the
same ``--out`` skips the runs already done (the holdout file is written last).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import origin_dirs, store_of  # noqa: E402
from benchmarks.compare_models import parse_sets  # noqa: E402
from core import features as feature_room  # noqa: E402
from core import forecasters  # noqa: E402
from core.blend import rmse  # noqa: E402
from core.config import NestcastConfig  # noqa: E402
from core.files import write_parquet_atomic  # noqa: E402
from core.reference import fit_reference  # noqa: E402
from core.window_store import WindowStore  # noqa: E402

BOOSTER = forecasters.BLEND_PARTNER


def feature_names(spec: str) -> tuple[str, ...]:
    """Names from ``spec``: comma-separated feature names or sets of ``core.features`` (upper-case names)."""
    names: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        found = getattr(feature_room, part, None) if part.isupper() else None
        if isinstance(found, tuple):
            names += found
        elif part in feature_room.REGISTRY:
            names.append(part)
        else:
            raise SystemExit(f"unknown feature or feature set {part!r}")
    return tuple(names)


def variant_features(add: str, drop: str) -> tuple[str, ...]:
    dropped = set(feature_names(drop))
    kept = [name for name in BOOSTER.features if name not in dropped]
    return (*kept, *(name for name in feature_names(add) if name not in kept))


def refit_booster(store: WindowStore, config: NestcastConfig, names: tuple[str, ...]) -> dict[str, object]:
    """The booster selected on the validation months and refitted through m-1, as the flow's stages train it."""
    tables, clip = store.feature_tables(), config.windows.clip
    common = {"seed": config.train.seed, "budget": config.train.sample_budget, "features": names}
    selected = fit_reference(store, tables, config.reference, before_month=store.validation_start, validate=True,
                             **common)
    refitted = fit_reference(store, tables, config.reference, rounds=selected.rounds, **common)
    return {"validation": selected.predict_samples(tables, store.validation_index, clip),
            "holdout": refitted.predict_samples(tables, store.holdout_index, clip),
            "rounds": selected.rounds, "seconds": selected.seconds + refitted.seconds}


def same_samples(runs: Path, stores: Path, origin: int) -> WindowStore:
    """The rebuilt store of ``origin``, once its samples are checked to be the kept store's (read as arrays: the
    kept store may be one this version no longer opens)."""
    rebuilt = store_of(stores, origin)
    (kept,) = sorted(runs.glob(f"lake/backtest/windows-{origin}-*"))
    for name in ("train_index", "validation_index", "holdout_index"):
        if not np.array_equal(np.load(kept / f"{name}.npy"), getattr(rebuilt, name)):
            raise SystemExit(f"{rebuilt.dir}: its {name} differs from the kept store's {kept}")
    return rebuilt


def replace_column(source: Path, target: Path, values: np.ndarray) -> pd.DataFrame:
    frame = pd.read_parquet(source)
    frame[BOOSTER.name] = values.astype(frame[BOOSTER.name].dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(target, pa.Table.from_pandas(frame, preserve_index=False))
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="a compare_models.py --keep directory")
    parser.add_argument("--out", type=Path, required=True, help="where the variant's mirrored runs are written")
    parser.add_argument("--add", default="", help="features or feature sets the booster also reads")
    parser.add_argument("--drop", default="", help="features or feature sets the booster no longer reads")
    parser.add_argument("--stores", type=Path, help="read the windows stores of this directory instead (one rebuilt "
                        "by newer code with more arrays: its samples must be the kept runs')")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="NAME=VALUE config override")
    args = parser.parse_args(argv)
    names = variant_features(args.add, args.drop)
    base = NestcastConfig(data_dir=args.runs).with_overrides(parse_sets(args.sets))
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "lake").exists():
        (args.out / "lake").symlink_to((args.stores or args.runs).resolve() / "lake")
    print(f"{len(names)} features; overrides {parse_sets(args.sets) or 'none'}")
    for (seed, origin), run_dir in sorted(origin_dirs(args.runs).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mirror = args.out / run_dir.relative_to(args.runs)
        if (mirror / "refit" / "holdout.parquet").exists():  # a rerun goes on where the last one stopped
            continue
        started = time.perf_counter()
        store = store_of(args.runs, origin) if args.stores is None else same_samples(args.runs, args.stores, origin)
        fit = refit_booster(store, base.with_overrides(seed=seed), names)
        replace_column(run_dir / "select" / "validation.parquet", mirror / "select" / "validation.parquet",
                       fit["validation"])
        before = pd.read_parquet(run_dir / "refit" / "holdout.parquet")[BOOSTER.name].to_numpy(np.float64)
        replace_column(run_dir / "refit" / "holdout.parquet", mirror / "refit" / "holdout.parquet", fit["holdout"])
        actual = store.holdout_frame()["actual"].to_numpy(np.float64)
        print(f"origin {origin} seed {seed}: {time.perf_counter() - started:6.1f} s, {fit['rounds']} rounds, "
              f"reference {rmse(before, actual):.4f} -> {rmse(fit['holdout'], actual):.4f}", flush=True)
    (args.out / "variant.txt").write_text(" ".join(sys.argv[1:] if argv is None else argv) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
