"""The fused loops' two passes, by hand: one step's forward and backward math, the three loop drivers of each
(Python-unrolled, ``lax.scan`` on JAX, ``fori_loop`` into buffers on TensorFlow), and the weight gradients as one
matmul per level after the loop. ``forward_pass`` and ``fused_grad`` are what ``core.nlstm.fused`` wraps."""

from __future__ import annotations

from functools import partial
from typing import Any

from keras import ops

from core.nlstm.spec import ForwardSaved, FusedSpec, FusedWeights, unpack

#: Steps per iteration of the fused loops' ``lax.scan`` on JAX (a tuning knob; see benchmarks/train.py).
SCAN_UNROLL = 1


def _forward_levels(spec: FusedSpec, w: FusedWeights, z_t: Any, h: Any, cells: Any) -> tuple[Any, ...]:
    """Bottom-up half of one step: every level's gates and matmul operand, then the innermost memory."""
    units = spec.units
    gates: list[Any] = []
    operands: list[Any] = []
    output_gates: list[Any] = []
    x_in: Any = None
    h_in = h
    for level in range(spec.depth):
        if spec.with_masks:
            h_in = h_in * w.masks[level]
        if level == 0:
            operands.append(h_in)
            z = z_t + ops.matmul(h_in, w.kernels[0])
        else:
            operand = ops.concatenate([x_in, h_in], axis=-1)
            operands.append(operand)
            z = ops.matmul(operand, w.kernels[level])
        if spec.use_bias:
            z = z + w.biases[level]
        i = spec.sigma(z[:, :units])
        f = spec.sigma(z[:, units : 2 * units])
        g = spec.candidates[level](z[:, 2 * units : 3 * units])
        o = spec.sigma(z[:, 3 * units :])
        gates += [i, f, g, o]
        output_gates.append(o)
        x_in = i * g
        h_in = f * cells[level]
    memory = h_in + x_in  # innermost level: the plain LSTM update
    return gates, operands, output_gates, memory


def _forward_memories(spec: FusedSpec, output_gates: list[Any], memory: Any) -> tuple[Any, list[Any], list[Any]]:
    """Top-down half of one step: level l's new memory is the output of level l+1."""
    new_cells: list[Any] = [None] * spec.depth
    squashed: list[Any] = [None] * spec.depth
    for level in reversed(range(spec.depth)):
        new_cells[level] = memory
        squashed[level] = spec.psi(memory)
        memory = output_gates[level] * squashed[level]
    return memory, new_cells, squashed


def _forward_cell(spec: FusedSpec, w: FusedWeights, z_t: Any, h: Any, cells: Any) -> tuple[Any, list[Any], list[Any]]:
    """One forward step: ``(h_t, [c_1..c_D], [weight-gradient operands..., packed record])``."""
    gates, operands, output_gates, memory = _forward_levels(spec, w, z_t, h, cells)
    h_new, new_cells, squashed = _forward_memories(spec, output_gates, memory)
    record = ops.concatenate([*gates, *squashed, *cells], axis=-1)
    return h_new, new_cells, [*operands, record]


# The three forward drivers share one signature so ``forward_pass`` can pick one; only fori_loop needs
# ``batch`` (it preallocates its buffers). Each returns ``(final states, stacked rows, unrolled records)``.
def _forward_unrolled(spec: FusedSpec, step: Any, zx: Any, h0: Any, c0: list[Any], batch: Any) -> tuple[Any, ...]:
    h, cells, per_step = h0, list(c0), []
    for z_t in ops.unstack(zx, num=spec.steps, axis=0):
        h, cells, rows = step(z_t, h, cells)
        per_step.append(rows)
    saved = [ops.stack([rows[k] for rows in per_step], axis=0) for k in range(spec.depth + 1)]
    # The unrolled backward reads each step's record directly instead of slicing the stacked one.
    return [h, *cells], saved, [rows[-1] for rows in per_step]


def _forward_scan(spec: FusedSpec, step: Any, zx: Any, h0: Any, c0: list[Any], batch: Any) -> tuple[Any, ...]:
    def body(carry: Any, z_t: Any) -> Any:
        h, cells, rows = step(z_t, carry[0], list(carry[1:]))
        return [h, *cells], rows

    final_states, saved = ops.scan(body, [h0, *c0], zx, length=spec.steps, unroll=SCAN_UNROLL)
    return list(final_states), list(saved), None


def _write_step(buffers: list[Any], t: Any, rows: list[Any]) -> list[Any]:
    return [ops.slice_update(buf, (t, 0, 0), ops.expand_dims(row, 0)) for buf, row in zip(buffers, rows, strict=True)]


def _forward_fori(spec: FusedSpec, step: Any, zx: Any, h0: Any, c0: list[Any], batch: Any) -> tuple[Any, ...]:
    depth = spec.depth

    def body(t: Any, carry: Any) -> Any:
        h, cells, buffers = carry[0], carry[1 : 1 + depth], carry[1 + depth :]
        h, cells, rows = step(ops.take(zx, t, axis=0), h, cells)
        return (h, *cells, *_write_step(buffers, t, rows))

    buffers0 = [ops.zeros((spec.steps, batch, w), dtype=spec.dtype) for w in (*spec.operand_widths, spec.width)]
    final = ops.fori_loop(0, spec.steps, body, (h0, *c0, *buffers0))
    return list(final[: 1 + depth]), list(final[1 + depth :]), None


def _output_gate_grads(spec: FusedSpec, row: Any, dh: Any, dcs: Any) -> tuple[list[Any], Any]:
    """Top-down: gradients of each level's output gate and memory m_l (m_l = output of l+1)."""
    d_out_gate, g_out = [], dh
    for level in range(spec.depth):
        o = spec.gate(row, level, 3)
        squashed = spec.psi_of(row, level)
        d_out_gate.append(g_out * squashed * spec.d_sigma(o))
        g_out = dcs[level] + g_out * o * spec.d_psi(squashed)
    return d_out_gate, g_out


def _gate_grads(
    spec: FusedSpec, kernels_t: list[Any], masks: list[Any], row: Any, d_out_gate: list[Any], g_out: Any
) -> tuple[Any, list[Any], list[Any]]:
    """Bottom-up: the innermost memory is inner hidden + inner input, so both start from ``g_out``."""
    units = spec.units
    g_x = g_h = g_out
    d_z: list[Any] = [None] * spec.depth
    d_prev: list[Any] = [None] * spec.depth
    for level in reversed(range(spec.depth)):
        i, f, g = spec.gate(row, level, 0), spec.gate(row, level, 1), spec.gate(row, level, 2)
        c_prev = spec.prev_of(row, level)
        d_z[level] = ops.concatenate(
            [
                g_x * g * spec.d_sigma(i),
                g_h * c_prev * spec.d_sigma(f),
                g_x * i * spec.d_candidates[level](g),
                d_out_gate[level],
            ],
            axis=-1,
        )
        d_prev[level] = g_h * f
        d_in = ops.matmul(d_z[level], kernels_t[level])
        if level > 0:
            g_x, g_h = d_in[:, :units], d_in[:, units:]
        else:
            g_h = d_in
        if spec.with_masks:
            g_h = g_h * masks[level]
    return g_h, d_prev, d_z


def _backward_cell(
    spec: FusedSpec, kernels_t: list[Any], masks: list[Any], row: Any, dh: Any, dcs: Any
) -> tuple[Any, list[Any], list[Any]]:
    """One backward step: ``(dL/dh_{t-1}, [dL/dc_{l,t-1}], [dL/dz_l])`` from the step's packed record."""
    d_out_gate, g_out = _output_gate_grads(spec, row, dh, dcs)
    return _gate_grads(spec, kernels_t, masks, row, d_out_gate, g_out)


def _backward_unrolled(spec: FusedSpec, step: Any, saved: ForwardSaved, d_seq: Any, d_h: Any, d_cells: Any) -> Any:
    dh, dcs = d_h, d_cells
    seq_rows = ops.unstack(d_seq, num=spec.steps, axis=0) if d_seq is not None else None
    dz_rows: list[Any] = [None] * spec.steps
    for t in reversed(range(spec.steps)):
        if seq_rows is not None:
            dh = dh + seq_rows[t]
        dh, dcs, dz_rows[t] = step(saved.step_records[t], dh, dcs)
    dz_seqs = [ops.stack([rows[k] for rows in dz_rows], axis=0) for k in range(spec.depth)]
    return [dh, *dcs], dz_seqs


def _backward_scan(spec: FusedSpec, step: Any, saved: ForwardSaved, d_seq: Any, d_h: Any, d_cells: Any) -> Any:
    def body(carry: Any, xs: Any) -> Any:
        dh = carry[0] if d_seq is None else carry[0] + xs[1]
        dh, dcs, d_z = step(xs[0], dh, list(carry[1:]))
        return [dh, *dcs], d_z

    xs = [saved.record] + ([d_seq] if d_seq is not None else [])
    d_initial, dz_seqs = ops.scan(body, [d_h, *d_cells], xs, length=spec.steps, reverse=True, unroll=SCAN_UNROLL)
    return list(d_initial), list(dz_seqs)


def _backward_fori(spec: FusedSpec, step: Any, saved: ForwardSaved, d_seq: Any, d_h: Any, d_cells: Any) -> Any:
    depth, steps = spec.depth, spec.steps

    def body(k: Any, carry: Any) -> Any:
        t = steps - 1 - k
        dh, dcs, dz_bufs = carry[0], list(carry[1 : 1 + depth]), carry[1 + depth :]
        if d_seq is not None:
            dh = dh + ops.take(d_seq, t, axis=0)
        dh, dcs, d_z = step(ops.take(saved.record, t, axis=0), dh, dcs)
        return (dh, *dcs, *_write_step(dz_bufs, t, d_z))

    dz0 = [ops.zeros((steps, saved.batch, 4 * spec.units), dtype=spec.dtype) for _ in range(depth)]
    final = ops.fori_loop(0, steps, body, (d_h, *d_cells, *dz0))
    return list(final[: 1 + depth]), list(final[1 + depth :])



def _flat_rows(seq: Any) -> Any:
    return ops.reshape(seq, (-1, seq.shape[-1]))


def _weight_grads(spec: FusedSpec, operands: list[Any], dz_seqs: list[Any]) -> tuple[list[Any], list[Any]]:
    """One ``[2u, T*b] x [T*b, 4u]`` matmul per level (biases: a ones-vector matmul) after the loop."""
    dz_rows = [_flat_rows(dz) for dz in dz_seqs]
    d_kernels = [ops.matmul(ops.transpose(_flat_rows(op)), dz) for op, dz in zip(operands, dz_rows, strict=True)]
    d_biases = []
    if spec.use_bias:
        ones = ops.ones((1, dz_rows[0].shape[0] or ops.shape(dz_rows[0])[0]), dtype=spec.dtype)
        d_biases = [ops.reshape(ops.matmul(ones, dz), (-1,)) for dz in dz_rows]
    return d_kernels, d_biases


def fused_grad(
    spec: FusedSpec, w: FusedWeights, saved: ForwardSaved, d_seq: Any, d_h: Any, d_cells: list[Any]
) -> list[Any]:
    kernels_t = [ops.transpose(k) for k in w.kernels]
    step = partial(_backward_cell, spec, kernels_t, w.masks)
    driver = _backward_unrolled if spec.unrolled else _backward_scan if spec.use_scan else _backward_fori
    d_initial, dz_seqs = driver(spec, step, saved, d_seq, d_h, d_cells)
    d_kernels, d_biases = _weight_grads(spec, saved.operands, dz_seqs)
    d_masks = [ops.zeros_like(m) for m in w.masks]
    # x_proj enters the outer level's pre-activation unchanged, so its gradient is that level's dL/dz.
    return [dz_seqs[0], *d_initial, *d_kernels, *d_biases, *d_masks]


def forward_pass(spec: FusedSpec, *args: Any) -> tuple[list[Any], ForwardSaved]:
    """Both loops' forward half: ``[H?, h, c_1..c_D]`` and what the backward pass reuses."""
    zx, h0, c0, w = unpack(spec, args)
    batch = ops.shape(h0)[0]
    step = partial(_forward_cell, spec, w)
    driver = _forward_unrolled if spec.unrolled else _forward_scan if spec.use_scan else _forward_fori
    final_states, saved, step_records = driver(spec, step, zx, h0, c0, batch)
    operands, record = saved[: spec.depth], saved[spec.depth]
    outputs = spec.gate(record, 0, 3) * spec.psi_of(record, 0) if spec.return_sequences else None
    result = ([outputs] if spec.return_sequences else []) + final_states
    return result, ForwardSaved(h0, batch, operands, record, step_records)
