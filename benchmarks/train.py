"""Training speed of the Nested LSTM on the seed notebook's shape, against the naive cell loop and LSTM.

The seed trains ``NestedLSTM(40, depth=2) -> Dense(1)`` on 214 200 windows x 33 months x 1 channel at
batch 128. This script times one epoch (after a warm-up that compiles every batch shape) of:

- ``nlstm``        this layer (``implementation="auto"``: fused loops + hand-written backward, XLA on);
- ``nlstm-nojit``  the same compiled with ``jit_compile=False`` (TensorFlow only);
- ``nlstm-dropin`` the same compiled with no ``jit_compile`` argument, as a user dropping the layer into
                   ``keras.Sequential`` would (keras then turns XLA off on a CPU-only TensorFlow; the
                   layer's fused loops compile themselves);
- ``nlstm-unroll`` the layer's autodiff path (step Python-unrolled), XLA off on TensorFlow;
- ``naive``        ``keras.layers.RNN(NestedLSTMCell)``: keras' generic per-step loop;
- ``lstm``         ``keras.layers.LSTM(40)``;

and prints s/epoch, samples/s, analytic FLOPs per epoch (matmuls; backward = 2x forward), the
achieved GFLOP/s beside a 2048x2048 float32 matmul ceiling measured in the same process, the traces of
the layer's XLA functions during the timed epoch (a trace there is a compile inside the epoch) and, at
the end, each row's s/epoch as a multiple of the ``lstm`` row's at the same batch size. Under each
``nlstm`` row, the "matmul-only floor" runs the layer's matmuls alone (same compiled loops and shapes,
no gate arithmetic): the time no elementwise optimisation can go below at that batch size.

    .venv/bin/python benchmarks/train.py                      # full epoch, every variant, batch 128
    .venv/bin/python benchmarks/train.py --samples 40000      # scaled down, extrapolated to 214 200
    .venv/bin/python benchmarks/train.py --variants nlstm --batch-sizes 128 256 512 1024
    .venv/bin/python benchmarks/train.py --samples 50000 --variants nlstm nlstm-dropin lstm   # issue 17's rows
    KERAS_BACKEND=jax python benchmarks/train.py --variants nlstm lstm   # no TensorFlow needed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import core.nlstm as nlstm_module  # noqa: E402
import core.nlstm.loops as nlstm_loops  # noqa: E402
from core.device import select_device  # noqa: E402
from core.nlstm import NestedLSTM, NestedLSTMCell  # noqa: E402

SEED_SAMPLES, STEPS, CHANNELS, UNITS, DEPTH = 214_200, 33, 1, 40, 2
VARIANTS = ("nlstm", "nlstm-nojit", "nlstm-dropin", "nlstm-unroll", "naive", "lstm")


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Monthly counts shaped like the seed's pivot: mostly zeros, a long tail, clipped to [0, 20]."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.3, 2.0, size=(n, 1))  # per-series popularity
    counts = rng.poisson(rate * rng.gamma(2.0, 0.5, size=(n, STEPS + 1)))
    counts = np.minimum(counts, 20).astype("float32")
    return counts[:, :STEPS, None], counts[:, STEPS]


def flops_per_sample(variant: str) -> float:
    """Matmul FLOPs for one window, forward + backward (2x forward)."""
    four_u = 4 * UNITS
    if variant == "lstm":
        forward = 2 * (CHANNELS * four_u + UNITS * four_u)
    else:
        # outer level: input + recurrent kernels; each inner level: [x, h] (2u) -> 4u
        forward = 2 * (CHANNELS * four_u + UNITS * four_u) + (DEPTH - 1) * 2 * (2 * UNITS * four_u)
    head = 2 * UNITS
    return 3.0 * (STEPS * forward + head)


def matmul_ceiling(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a compiled n x n float32 matmul chain on the default device."""
    backend = keras.backend.backend()
    a = keras.ops.convert_to_tensor(np.random.default_rng(0).random((n, n), dtype=np.float32))
    if backend == "jax":
        import jax

        fn = jax.jit(lambda x: x @ x)
        fn(a).block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(a)
        out.block_until_ready()
    else:
        import tensorflow as tf

        fn = tf.function(lambda x: tf.matmul(x, x))
        fn(a).numpy()
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(a)
        out.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def compiled(fn: Any) -> Any:
    """``fn`` compiled whole by the backend (XLA on TensorFlow and JAX), returning numpy-ready output."""
    if keras.backend.backend() == "jax":
        import jax

        jitted = jax.jit(fn)
        return lambda *args: np.asarray(jitted(*args))
    import tensorflow as tf

    jitted = tf.function(fn, jit_compile=True)
    return lambda *args: jitted(*args).numpy()


def matmul_floor(batch: int, repeats: int = 20) -> float:
    """Seconds per epoch of the NLSTM's matmuls alone, in the same loop structure as the fused layer.

    Per step, the forward's sequential matmuls ([b,u]x[u,4u] outer, [b,2u]x[2u,4u] per inner level) and
    the backward's ([b,4u]x[4u,u], [b,4u]x[4u,2u]), a cheap squash in between so nothing folds away, and
    after the loop the per-level weight-gradient matmul over all T*b rows. No gate arithmetic, no
    records: whatever the layer spends above this is elementwise work and loop overhead.
    """
    ops = keras.ops
    rng = np.random.default_rng(0)
    four_u = 4 * UNITS
    widths = [UNITS] + [2 * UNITS] * (DEPTH - 1)
    kernels = [ops.convert_to_tensor(rng.normal(0, 0.05, (w, four_u)).astype("float32")) for w in widths]
    kernels_t = [ops.transpose(k) for k in kernels]
    h0 = ops.convert_to_tensor(rng.random((batch, UNITS), dtype=np.float32))
    operands = [ops.convert_to_tensor(rng.random((STEPS * batch, w), dtype=np.float32)) for w in widths]
    d_rows = ops.convert_to_tensor(rng.random((STEPS * batch, four_u), dtype=np.float32))

    def epoch_step(h: Any, operands: list[Any], d_rows: Any) -> Any:
        def forward(_: Any, h: Any) -> Any:
            z = ops.matmul(h, kernels[0])
            for level in range(1, DEPTH):
                z = ops.matmul(ops.tanh(z[:, : 2 * UNITS]), kernels[level])
            return ops.tanh(z[:, :UNITS])

        def backward(_: Any, d: Any) -> Any:
            dz = ops.tile(d, (1, 4))
            for level in reversed(range(1, DEPTH)):
                dz = ops.tile(ops.matmul(dz, kernels_t[level]), (1, 2)) * 0.5
            return ops.matmul(dz, kernels_t[0]) * 0.5

        h = ops.fori_loop(0, STEPS, forward, h)
        d = ops.fori_loop(0, STEPS, backward, h)
        total = ops.sum(d)
        for operand in operands:
            total = total + ops.sum(ops.matmul(ops.transpose(operand), d_rows))
        return total

    run = compiled(epoch_step)
    run(h0, operands, d_rows)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(h0, operands, d_rows)
        best = min(best, time.perf_counter() - start)
    return best * -(-SEED_SAMPLES // batch)


def xla_traces() -> int:
    """Traces of the layer's own XLA functions so far (0 where the layer has none, e.g. before issue 17)."""
    return getattr(nlstm_module, "fused_xla_trace_count", lambda: 0)()


def build(
    variant: str, precision: str, jit: bool | None, steps_per_execution: int, impl: str = "auto"
) -> keras.Model:
    """``jit=None`` leaves ``jit_compile`` out of ``compile``: keras' own default ("auto")."""
    keras.utils.set_random_seed(0)
    if variant.startswith("nlstm"):
        impl = "unroll" if variant == "nlstm-unroll" else impl
        encoder = NestedLSTM(UNITS, depth=DEPTH, implementation=impl, dtype=precision)
    elif variant == "naive":
        encoder = keras.layers.RNN(NestedLSTMCell(UNITS, depth=DEPTH), dtype=precision)
    else:
        encoder = keras.layers.LSTM(UNITS, dtype=precision)
    model = keras.Sequential([keras.Input((STEPS, CHANNELS)), encoder, keras.layers.Dense(1, dtype="float32")])
    optimizer: Any = keras.optimizers.Adam(1e-3)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    jit_arg = {} if jit is None else {"jit_compile": jit}
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=steps_per_execution, **jit_arg)
    return model


def time_epoch(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int) -> tuple[float, float, int]:
    """(warm-up s, s for one epoch over x, XLA traces in it). The warm-up compiles full and partial batches."""
    warm_n = min(len(x), 4 * batch + len(x) % batch)
    start = time.perf_counter()
    model.fit(x[:warm_n], y[:warm_n], batch_size=batch, epochs=1, verbose=0, shuffle=False)
    warm = time.perf_counter() - start
    traces = xla_traces()
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
    return warm, time.perf_counter() - start, xla_traces() - traces


def print_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's s/epoch over the ``lstm`` row's at the same batch size (when that row ran)."""
    lstm = {row["batch"]: row["s_per_epoch"] for row in rows if row["variant"] == "lstm"}
    for row in rows:
        if row["batch"] in lstm:
            row["ratio_to_lstm"] = row["s_per_epoch"] / lstm[row["batch"]]
            ratio = row["ratio_to_lstm"]
            print(f"{row['variant']:22s} jit={str(row['jit']):7s} b{row['batch']:<5d} {ratio:5.2f}x lstm")


def holdout_mse(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    pred = np.asarray(model.predict(x, batch_size=4096, verbose=0)).reshape(-1)
    return float(np.mean((np.clip(pred, 0, 20) - y) ** 2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=SEED_SAMPLES, help="windows per timed epoch")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--precision", default=None, help="float32 | mixed_float16 (default: by device)")
    parser.add_argument("--steps-per-execution", type=int, default=None, help="default: 1 on CPU, 16 on GPU")
    parser.add_argument(
        "--accuracy-epochs", type=int, default=0, help="also train this many epochs per batch size, report holdout MSE"
    )
    parser.add_argument(
        "--nlstm-impl", default="auto", help="implementation of the 'nlstm' variant (auto, fused, fused_unrolled, ...)"
    )
    parser.add_argument("--scan-unroll", type=int, default=None, help="JAX: steps per iteration of the fused loops")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args(argv)

    if args.scan_unroll:
        nlstm_loops.SCAN_UNROLL = args.scan_unroll
    device = select_device(args.device)
    precision = args.precision or device.precision
    spe = args.steps_per_execution or (16 if device.kind == "gpu" else 1)
    backend = keras.backend.backend()
    x, y = make_data(args.samples)
    x_hold, y_hold = make_data(20_000, seed=1)
    ceiling = matmul_ceiling()
    scale = SEED_SAMPLES / args.samples
    print(
        f"backend={backend} device={device.kind} {device.devices} precision={precision} "
        f"steps_per_execution={spe} cpus={os.cpu_count()} samples/epoch={args.samples} "
        f"(extrapolated x{scale:.2f} to {SEED_SAMPLES}) load={os.getloadavg()[0]:.1f}"
    )
    print(f"matmul ceiling 2048x2048 float32: {ceiling:.1f} GFLOP/s")
    header = f"{'variant':22s} {'precision':>13s} {'jit':>7s} {'batch':>6s} {'warm s':>7s} {'s/epoch':>8s}"
    header += f" {'samples/s':>10s}"
    header += f" {'GFLOP/ep':>9s} {'GFLOP/s':>8s} {'% ceil':>7s} {'traces':>7s}"
    if args.accuracy_epochs:
        header += f" {'holdout MSE':>12s}"
    print(header)
    rows = []
    for variant in args.variants:
        if variant in ("nlstm-nojit", "nlstm-dropin") and backend != "tensorflow":
            continue
        # XLA where it helps: the fused NLSTM needs it on TF; the autodiff loops are slower under XLA on CPU.
        jit = device.jit_compile if variant == "nlstm" or backend != "tensorflow" or device.kind == "gpu" else False
        if variant == "nlstm-nojit":
            jit = False
        if variant == "nlstm-dropin":
            jit = None
        run_precision = precision
        if variant == "lstm" and backend == "jax" and device.kind == "gpu":
            run_precision = "float32"  # JAX's cuDNN LSTM rejects float16
        for batch in args.batch_sizes if variant in ("nlstm", "nlstm-dropin", "lstm") else args.batch_sizes[:1]:
            with device.scope():
                model = build(variant, run_precision, jit, spe, args.nlstm_impl)
                warm, seconds, traces = time_epoch(model, x, y, batch)
                mse = None
                if args.accuracy_epochs:
                    model = build(variant, run_precision, jit, spe, args.nlstm_impl)
                    model.fit(x, y, batch_size=batch, epochs=args.accuracy_epochs, verbose=0)
                    mse = holdout_mse(model, x_hold, y_hold)
            epoch = seconds * scale
            flops = flops_per_sample(variant) * SEED_SAMPLES
            row = {
                "variant": variant if variant != "nlstm" else f"nlstm[{args.nlstm_impl}]",
                "jit": "default" if jit is None else jit,
                "resolved_jit": bool(model.jit_compile),
                "precision": run_precision,
                "scan_unroll": nlstm_loops.SCAN_UNROLL,
                "batch": batch,
                "warmup_s": warm,
                "s_per_epoch": epoch,
                "samples_per_s": SEED_SAMPLES / epoch,
                "gflop_per_epoch": flops / 1e9,
                "gflop_per_s": flops / epoch / 1e9,
                "holdout_mse": mse,
                "xla_traces_in_epoch": traces,
            }
            rows.append(row)
            line = (
                f"{row['variant']:22s} {run_precision:>13s} {str(row['jit'])[:7]:>7s} {batch:6d} {warm:7.1f}"
                f" {epoch:8.2f} {row['samples_per_s']:10.0f}"
                f" {row['gflop_per_epoch']:9.1f} {row['gflop_per_s']:8.1f} {100 * row['gflop_per_s'] / ceiling:6.1f}%"
                f" {traces:7d}"
            )
            if mse is not None:
                line += f" {mse:12.4f}"
            print(line, flush=True)
            if variant == "nlstm":
                with device.scope():
                    row["matmul_floor_s_per_epoch"] = matmul_floor(batch)
                print(f"{'  matmul-only floor':22s} {'':>13s} {'True':>7s} {batch:6d} {'':>7s}"
                      f" {row['matmul_floor_s_per_epoch']:8.2f}", flush=True)
    print_ratios(rows)
    result = {
        "backend": backend,
        "device": device.to_dict(),
        "precision": precision,
        "steps_per_execution": spe,
        "samples": args.samples,
        "matmul_ceiling_gflops": ceiling,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
