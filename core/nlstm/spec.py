"""What one fused call is, fixed at trace time: sizes, activations and their derivatives, the packed per-step record
layout (``FusedSpec``), and the flat tensors the custom gradient takes (``FusedWeights``, ``unpack``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import keras
from keras import activations, ops

from core.nlstm.cell import NestedLSTMCell

# Derivatives written in terms of the activation's *output* y, so the backward pass needs only the
# stored activations. Activations not listed here fall back to automatic differentiation.
DERIVATIVE_FROM_OUTPUT: dict[str, Any] = {
    "tanh": lambda y: 1.0 - y * y,
    "sigmoid": lambda y: y * (1.0 - y),
    "linear": lambda y: ops.ones_like(y),
    "relu": lambda y: ops.cast(y > 0, y.dtype),
}


def derivative(fn: Any) -> Any:
    name = activations.serialize(fn)
    return DERIVATIVE_FROM_OUTPUT.get(name) if isinstance(name, str) else None


def fused_supported(cell: NestedLSTMCell) -> bool:
    """Whether ``fused_sequence`` can run this cell (all three activations have known derivatives)."""
    return all(derivative(fn) is not None for fn in (cell.activation, cell.recurrent_activation, cell.cell_activation))


@dataclass(frozen=True)
class FusedSpec:
    """Trace-time facts of one ``fused_sequence`` call: sizes, activations and which loop to build."""

    depth: int
    units: int
    steps: int
    dtype: Any
    sigma: Any
    d_sigma: Any
    psi: Any
    d_psi: Any
    candidates: tuple[Any, ...]
    d_candidates: tuple[Any, ...]
    use_bias: bool
    with_masks: bool
    return_sequences: bool
    unrolled: bool
    use_scan: bool

    # Record of one step: gates (4u per level) | squashed memories psi_l (u per level) | c_{l,t-1} (u per level).
    @property
    def psi_base(self) -> int:
        return 4 * self.units * self.depth

    @property
    def prev_base(self) -> int:
        return 5 * self.units * self.depth

    @property
    def width(self) -> int:
        return 6 * self.units * self.depth

    @property
    def operand_widths(self) -> list[int]:
        # Weight-gradient operands: hm_0 | [x_l, hm_l].
        return [self.units] + [2 * self.units] * (self.depth - 1)

    def gate(self, record: Any, level: int, k: int) -> Any:
        base = 4 * self.units * level + k * self.units
        return record[..., base : base + self.units]

    def psi_of(self, record: Any, level: int) -> Any:
        start = self.psi_base + self.units * level
        return record[..., start : start + self.units]

    def prev_of(self, row: Any, level: int) -> Any:
        start = self.prev_base + self.units * level
        return row[:, start : start + self.units]


class FusedWeights(NamedTuple):
    kernels: list[Any]
    biases: list[Any]
    masks: list[Any]


class ForwardSaved(NamedTuple):
    """What the backward pass reuses from the forward pass."""

    h0: Any
    batch: Any
    operands: list[Any]
    record: Any
    step_records: list[Any] | None  # per-step records of the Python-unrolled forward, else None


def fused_spec(
    cell: NestedLSTMCell, x_proj: Any, with_masks: bool, return_sequences: bool, unrolled: bool
) -> FusedSpec:
    depth = cell.depth
    candidates = (cell.cell_activation,) + (cell.activation,) * (depth - 1)
    return FusedSpec(
        depth=depth,
        units=cell.units,
        steps=x_proj.shape[0],
        dtype=x_proj.dtype,
        sigma=cell.recurrent_activation,
        d_sigma=derivative(cell.recurrent_activation),
        psi=cell.activation,
        d_psi=derivative(cell.activation),
        candidates=candidates,
        d_candidates=tuple(derivative(fn) for fn in candidates),
        use_bias=cell.use_bias,
        with_masks=with_masks,
        return_sequences=return_sequences,
        unrolled=unrolled,
        # JAX: lax.scan stacks per-step records itself (and can unroll); TensorFlow's keras scan cannot
        # emit outputs unlike its carry, so it writes into buffers inside fori_loop instead.
        use_scan=keras.backend.backend() == "jax" and not unrolled,
    )


def fused_weights(cell: NestedLSTMCell, spec: FusedSpec, recurrent_masks: Any) -> FusedWeights:
    def cast(value: Any) -> Any:
        return ops.cast(value, spec.dtype)

    biases = [cast(cell.biases[level]) for level in range(spec.depth)] if spec.use_bias else []
    # An inner level's input and hidden kernels are concatenated once per call so each step needs one matmul.
    kernels = [cast(cell.recurrent_kernels[0])] + [
        ops.concatenate([cast(cell.kernels[level]), cast(cell.recurrent_kernels[level])], axis=0)
        for level in range(1, spec.depth)
    ]
    masks = [cast(m) for m in recurrent_masks] if spec.with_masks else []
    return FusedWeights(kernels, biases, masks)


def unpack(spec: FusedSpec, args: Any) -> tuple[Any, Any, list[Any], FusedWeights]:
    depth = spec.depth
    args = list(args)
    zx, h0, c0 = args[0], args[1], args[2 : 2 + depth]
    rest = args[2 + depth :]
    ks, rest = rest[:depth], rest[depth:]
    bs, rest = (rest[:depth], rest[depth:]) if spec.use_bias else ([], rest)
    return zx, h0, c0, FusedWeights(ks, bs, rest)
