"""Compare the baselines, the LightGBM reference, RNN / GRU / LSTM / NLSTM depth 1-3 and the ensemble by backtest.

    # the real slice (months 0-28), origins 26, 27, 28:
    .venv/bin/python benchmarks/compare_models.py --raw-dir ../shared/data/real-1c-subset --origins 26,27,28
    # synthetic competition data (core.synthetic):
    .venv/bin/python benchmarks/compare_models.py --scale demo --origins 31,32,33

The raw CSVs are copied (or generated) into a temporary data directory's ``raw/`` -- never into the
repository -- ingested and aggregated, then every model is backtested with ``core.backtest.backtest``
under the default configuration with only ``kind`` and ``depth`` changed (same units, head,
embeddings, windows, epochs, learning rate), so the rows differ by the encoder alone. ``--set`` changes
any other field for all models, ``--seeds`` averages over training seeds. Every backtest follows the forecast
flow's protocol (``core.protocol``): epochs, boosting rounds, the blend weights and the launch scales are chosen
on the month before each origin, then the models are refitted through that month and score the origin. The
LightGBM reference (plain and launch-calibrated) and the ensemble rows come from the default model's runs
(``nlstm2``, else the first model). Prints a markdown table: RMSE averaged over the origins and over seeds, per
origin, the mean ratio to the previous-month baseline, parameters and training seconds per origin (``--out``
also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import forecasters  # noqa: E402
from core.backtest import (  # noqa: E402
    RANGE_COLUMNS,
    BacktestResult,
    backtest,
    markdown_table,
    parse_origins,
    prepare_lake,
)
from core.config import NestcastConfig  # noqa: E402

RAW_FILES = ("sales_train.csv", "test.csv", "items.csv", "item_categories.csv", "shops.csv")
#: name -> overrides; depth is ignored by the non-nested encoders.
MODELS: dict[str, dict[str, Any]] = {
    "rnn": {"kind": "rnn"},
    "gru": {"kind": "gru"},
    "lstm": {"kind": "lstm"},
    "nlstm1": {"kind": "nlstm", "depth": 1},
    "nlstm2": {"kind": "nlstm", "depth": 2},
    "nlstm3": {"kind": "nlstm", "depth": 3},
}
LABELS = {"rnn": "SimpleRNN", "gru": "GRU", "lstm": "LSTM", "nlstm1": "NLSTM depth 1", "nlstm2": "NLSTM depth 2",
          "nlstm3": "NLSTM depth 3"}


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        name, _, raw = pair.partition("=")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def make_lake(args: argparse.Namespace, data_dir: Path) -> str:
    raw = data_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if args.raw_dir is not None:
        for name in RAW_FILES:
            if (args.raw_dir / name).exists():
                shutil.copyfile(args.raw_dir / name, raw / name)
        return str(args.raw_dir)
    from core.synthetic import write_competition_files

    write_competition_files(raw, scale=args.scale, seed=args.data_seed)
    return f"synthetic {args.scale} (seed {args.data_seed})"


def rows_for(results: dict[str, list[BacktestResult]], origins: list[int]) -> list[dict[str, Any]]:
    """Baselines (from the first model's runs: they do not depend on the model), the reference, one row per
    model, and the ensemble of the default model with the reference."""
    first = next(iter(results.values()))[0]
    previous = {o.origin: o.rmse["baseline"] for o in first.origins}

    def row(name: str, rmse: dict[int, float], params: Any, per_epoch: Any, train_s: Any) -> dict[str, Any]:
        mean = sum(rmse.values()) / len(rmse)
        ratio = sum(rmse[m] / previous[m] for m in origins) / len(origins)
        return {"predictor": name, "params": params, "rmse": mean, "vs_previous": ratio,
                **{f"rmse_{m}": rmse[m] for m in origins}, "s_per_epoch": per_epoch, "train_s": train_s}

    def mean_over_seeds(runs: list[BacktestResult], predictor: str) -> dict[int, float]:
        return {m: sum(r.origins[i].rmse[predictor] for r in runs) / len(runs) for i, m in enumerate(origins)}

    def seconds(runs: list[BacktestResult], attribute: str) -> float:
        values = [getattr(o, attribute) or 0.0 for r in runs for o in r.origins]
        return round(sum(values) / len(values), 1)

    rows = [
        row(label, {o.origin: o.rmse[key] for o in first.origins}, None, None, None)
        for key, label in (("zeros", "zeros"), ("baseline", "previous month"), ("mean3", "mean of last 3"))
    ]
    default = results.get("nlstm2") or next(iter(results.values()))
    booster = forecasters.BLEND_PARTNER.name
    if booster in default[0].predictors:
        rows.append(row(forecasters.label(booster), mean_over_seeds(default, booster), None, None,
                        seconds(default, "reference_seconds")))
    for name, runs in results.items():
        per_epoch = [o.seconds_per_epoch for r in runs for o in r.origins if o.seconds_per_epoch]
        rows.append(
            row(
                LABELS.get(name, name),
                mean_over_seeds(runs, "model"),
                runs[0].params,
                round(sum(per_epoch) / len(per_epoch), 1) if per_epoch else None,
                seconds(runs, "train_seconds"),  # training seconds per origin (select + refit), mean over seeds
            )
        )
    if forecasters.BLEND.name in default[0].predictors:
        model = LABELS.get(next(k for k, v in results.items() if v is default), "model")
        both = round(seconds(default, "train_seconds") + seconds(default, "reference_seconds"), 1)
        rows.append(row(f"ensemble: {model} + {forecasters.short(booster)}",
                        mean_over_seeds(default, forecasters.BLEND.name), None, None, both))
    return rows


def range_rows(results: dict[str, list[BacktestResult]], origins: list[int]) -> list[dict[str, Any]]:
    """Per origin and on average, the default model's exported range (``core.quantiles``: calibrated on the
    validation months, scored on the origin) beside the naive range, mean over seeds."""
    runs = results.get("nlstm2") or next(iter(results.values()))
    keys = [key for key in RANGE_COLUMNS if all(o.ranges.get(key) is not None for r in runs for o in r.origins)]
    if not keys:
        return []
    rows = [{"origin": str(m), **{k: sum(r.origins[i].ranges[k] for r in runs) / len(runs) for k in keys}}
            for i, m in enumerate(origins)]
    rows.append({"origin": "mean", **{k: sum(row[k] for row in rows) / len(rows) for k in keys}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--raw-dir", type=Path, help="competition CSVs to use (copied into the temp lake's raw/)")
    source.add_argument("--scale", choices=["tiny", "demo", "full"], default="demo", help="synthetic data scale")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--origins", default=None, help="comma-separated origin months (default: the last 3)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds to average over")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="NAME=VALUE config override")
    parser.add_argument("--keep", type=Path, help="build the lake and runs here and keep them (default: temp dir)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="nestcast-compare-"))
    try:
        described = make_lake(args, work)
        base = NestcastConfig(data_dir=work).with_overrides(parse_sets(args.sets))
        prepare_lake(base)
        if args.origins:
            origins = parse_origins(args.origins)
        else:
            from core.aggregate import read_monthly
            from core.lake import LakePaths

            last = int(read_monthly(LakePaths(work))["date_block_num"].max())
            origins = [last - 2, last - 1, last]
        seeds = [int(s) for s in args.seeds.split(",")]
        results: dict[str, list[BacktestResult]] = {}
        started = time.perf_counter()
        for name in args.models.split(","):
            for seed in seeds:
                config = base.with_overrides(**MODELS[name], seed=seed)
                result = backtest(config, origins, work / "runs" / f"compare-{name}-{seed}", prepare=False)
                results.setdefault(name, []).append(result)
                print(f"{name} seed {seed}: mean model / previous {result.mean_ratio:.4f} "
                      f"({result.params:,} params, {result.train_seconds:.0f} s)", flush=True)
        rows = rows_for(results, origins)
        ranges = range_rows(results, origins)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    cfg = base.flat()
    lines = [
        f"Data: {described}; origins {', '.join(map(str, origins))}; seeds {args.seeds}. "
        f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, no GPU; {time.perf_counter() - started:.0f} s.",
        f"Shared settings: units {cfg['units']}, head {cfg['head_units']}, embeddings {cfg['embeddings']}, "
        f"lookback {cfg['lookback']}, {cfg['sample_policy']} samples (at most {cfg['sample_budget']} an epoch), "
        f"epochs {cfg['epochs']}, batch {cfg['batch_size']}, lr {cfg['learning_rate']}, loss {cfg['loss']}.",
        "Protocol: at origin m, epochs / boosting rounds / blend weights / launch scales chosen on the validation "
        "months m-2 and m-1 (trained on months < m-2), then refitted on every month < m; month m is scored and "
        "chooses nothing.",
        "RMSE: mean over origins (and seeds) on each origin's Kaggle-style grid; vs_previous: mean over origins "
        "of RMSE / previous-month RMSE; train_s: training seconds per origin (select + refit).",
        "",
        markdown_table(rows),
    ]
    if ranges:
        lines += ["", "Ranges of the export (core.quantiles, levels " + ", ".join(map(str, cfg["quantile_levels"]))
                  + "): calibrated on the validation months, scored on the origin; coverage and width of the outer "
                  "interval, pinball loss over the levels, beside the naive range (previous month + pooled "
                  "residual quantiles).", "", markdown_table(ranges, {"origin": "origin", **RANGE_COLUMNS})]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
