"""Nested LSTM (Moniz & Krueger 2018, arXiv:1801.10308) for Keras 3, written with ``keras.ops`` only.

A Nested LSTM replaces the additive memory update of an LSTM, ``c_t = f * c_{t-1} + i * g``, by a
*learned* update: the two terms become the input and the hidden state of an inner LSTM, whose
output is the outer memory. Nesting repeats ``depth`` times.

Equations for one time step (levels ``l = 1 .. D``, ``D = depth``; ``σ`` = ``recurrent_activation``,
``φ_1`` = ``cell_activation``, ``φ_l`` = ``activation`` for ``l > 1``, ``ψ`` = ``activation``)::

    x_1 = x_t                      h_1 = h_{t-1}                         (outer level)
    [z_i, z_f, z_g, z_o] = x_l W_l + h_l U_l + b_l                        (Keras LSTM gate order)
    x_{l+1} = σ(z_i) * φ_l(z_g)         inner input   (multiplied, as in the paper and hannw/nlstm)
    h_{l+1} = σ(z_f) * c_{l, t-1}       inner hidden state
    c_{D,t} = h_{D+1} + x_{D+1}         innermost level: the plain LSTM memory update
    c_{l,t} = o-output of level l+1     for l < D, i.e. c_{l,t} = σ(z_o^{l+1}) * ψ(c_{l+1,t})
    h_t     = σ(z_o^1) * ψ(c_{1,t})

State = ``[h_t, c_1, …, c_D]`` (``c_l`` for ``l < D`` equals the output of level ``l+1``, as in the
reference implementation). With ``depth=1`` and ``cell_activation="tanh"`` this is exactly
``keras.layers.LSTMCell`` (same gate order, same weight shapes and order).

``cell_activation`` defaults to ``"tanh"``: a depth-1 NLSTM is then an LSTM, and the inner LSTM gets a
bounded input. The seed notebook used ``"linear"`` for the outermost candidate (its reading of the
paper); pass ``cell_activation="linear"`` to get that variant.

Weight layout (created level by level, in this order; ``C`` = input features, ``u`` = units)::

    level 1:  kernel [C, 4u]   recurrent_kernel [u, 4u]   bias [4u]
    level l:  kernel_l [u, 4u] recurrent_kernel_l [u, 4u] bias_l [4u]      (l = 2 .. D)

Each 4u axis is split [input gate i, forget gate f, candidate g, output gate o].

Speed: ``NestedLSTM`` does not run the cell once per step through ``keras.layers.RNN``'s generic loop.
It projects the whole input sequence with one matmul (``[b*T, C] x [C, 4u]``) and runs only the
recurrent part per step. Its default path (``implementation="fused"``, see ``fused_sequence``) has a
hand-written backward pass: per step only the sequential matmuls remain (input and recurrent kernels
apart at the outer level; an inner level's two kernels concatenated once per call), and the weight
gradients are one large matmul per level after the loop. It wants XLA, so on TensorFlow its forward
and backward loops are ``tf.function(jit_compile=True)`` functions of their own (``_xla_functions``),
compiled whatever the enclosing model's ``jit_compile`` (keras leaves XLA off on a CPU-only
TensorFlow by default); inside a model compiled with ``jit_compile=True`` they are inlined into its
cluster. JAX compiles the whole step anyway. ``implementation="unroll"``/``"scan"`` are the automatic-
differentiation paths (also used for masked input); ``"fused_unrolled"`` is not compiled by the layer.
Dropout masks are drawn once per sequence.

Measured (``benchmarks/train.py --samples 50000``, 2 loaded CPU cores, b128, extrapolated to the seed's
214 200 windows): a drop-in ``Sequential([Input((33, 1)), NestedLSTM(40, depth=2), Dense(1)])`` compiled
without ``jit_compile`` went from 344–352 s/epoch (3.9–4.0x ``keras.layers.LSTM(40)``) to 73–85 s
(1.3–1.6x), at or below the same model with ``jit_compile=True`` (88–110 s) in the same runs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import keras
from keras import activations, constraints, initializers, ops, regularizers

try:  # Not exported publicly; keras.layers.RNN pre-draws dropout masks only for its subclasses.
    from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
except ImportError:  # pragma: no cover - keras layout change

    class DropoutRNNCell:  # type: ignore[no-redef]
        def reset_dropout_mask(self) -> None:
            self._dropout_mask = None

        def reset_recurrent_dropout_mask(self) -> None:
            self._recurrent_dropout_mask = None


__all__ = ["NestedLSTMCell", "NestedLSTM"]

#: Without the fused path, sequences up to this length are Python-unrolled; longer ones use ``keras.ops.scan``.
MAX_UNROLL = 64
IMPLEMENTATIONS = ("auto", "fused", "fused_unrolled", "unroll", "scan")
#: Steps per iteration of the fused loops' ``lax.scan`` on JAX (a tuning knob; see benchmarks/train.py).
SCAN_UNROLL = 1


def seeded_initializer(initializer: Any, seed: int | None, name: str) -> Any:
    """``initializer`` with its own seed drawn from ``(seed, name)``; unchanged when ``seed`` is None or it takes
    no seed (``zeros``) or already has one.

    keras gives an unseeded initializer a seed from python's process-wide ``random`` the moment it is built;
    ``keras.utils.set_random_seed`` seeds that, but every other thread of the process (Prefect's client, a Dask
    worker's event loop) draws from it too, so a seeded model built under load started from other weights. A
    seed of its own per weight makes the start a function of ``seed`` alone.
    """
    initializer = initializers.get(initializer)
    config = initializer.get_config() if hasattr(initializer, "get_config") else {}
    if seed is None or "seed" not in config or config["seed"] is not None:
        return initializer
    derived = zlib.crc32(f"{seed}/{name}".encode()) % (2**31 - 1)
    return initializer.__class__.from_config({**config, "seed": derived})


@keras.saving.register_keras_serializable(package="nestcast")
class NestedLSTMCell(keras.layers.Layer, DropoutRNNCell):
    """One step of a Nested LSTM (see the module docstring for the equations and weight layout).

    Args:
        units: size of the output and of every memory level.
        depth: nesting depth D >= 1 (1 = a plain LSTM when ``cell_activation="tanh"``).
        activation: candidate activation of the inner levels and output squashing of every level.
        recurrent_activation: gate activation.
        cell_activation: candidate activation of the outermost level.
        use_bias, kernel/recurrent/bias initializers, regularizers, constraints: as ``LSTMCell``;
            the ``kernel_*`` ones apply to every level's input kernel, the ``recurrent_*`` ones to
            every level's recurrent kernel.
        unit_forget_bias: add 1 to every level's forget-gate bias at initialisation.
        dropout: fraction of input features dropped (one mask per sequence).
        recurrent_dropout: fraction of each level's recurrent input dropped (one mask per level
            and sequence).
        seed: seed of the dropout masks and of the initial weights (``seeded_initializer``).
    """

    def __init__(
        self,
        units: int,
        depth: int = 2,
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        cell_activation: Any = "tanh",
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        unit_forget_bias: bool = True,
        kernel_regularizer: Any = None,
        recurrent_regularizer: Any = None,
        bias_regularizer: Any = None,
        kernel_constraint: Any = None,
        recurrent_constraint: Any = None,
        bias_constraint: Any = None,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if units <= 0:
            raise ValueError(f"units must be a positive integer, got {units}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        super().__init__(**kwargs)
        self.units = int(units)
        self.depth = int(depth)
        self.activation = activations.get(activation)
        self.recurrent_activation = activations.get(recurrent_activation)
        self.cell_activation = activations.get(cell_activation)
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.recurrent_initializer = initializers.get(recurrent_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.unit_forget_bias = unit_forget_bias
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = regularizers.get(recurrent_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.recurrent_constraint = constraints.get(recurrent_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.dropout = min(1.0, max(0.0, float(dropout)))
        self.recurrent_dropout = min(1.0, max(0.0, float(recurrent_dropout)))
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)
        self.state_size = [self.units] * (self.depth + 1)
        self.output_size = self.units
        self._dropout_mask = None
        self._recurrent_dropout_mask = None

    # --- weights --------------------------------------------------------------------------------
    def build(self, input_shape: tuple[int | None, ...]) -> None:
        input_dim = input_shape[-1]
        self.kernels: list[Any] = []
        self.recurrent_kernels: list[Any] = []
        self.biases: list[Any] = []
        for level in range(self.depth):
            suffix = "" if level == 0 else f"_{level + 1}"
            self.kernels.append(
                self.add_weight(
                    shape=(input_dim if level == 0 else self.units, 4 * self.units),
                    name=f"kernel{suffix}",
                    initializer=seeded_initializer(self.kernel_initializer, self.seed, f"kernel{suffix}"),
                    regularizer=self.kernel_regularizer,
                    constraint=self.kernel_constraint,
                )
            )
            self.recurrent_kernels.append(
                self.add_weight(
                    shape=(self.units, 4 * self.units),
                    name=f"recurrent_kernel{suffix}",
                    initializer=seeded_initializer(
                        self.recurrent_initializer, self.seed, f"recurrent_kernel{suffix}"
                    ),  # fmt: skip
                    regularizer=self.recurrent_regularizer,
                    constraint=self.recurrent_constraint,
                )
            )
            if self.use_bias:
                self.biases.append(
                    self.add_weight(
                        shape=(4 * self.units,),
                        name=f"bias{suffix}",
                        initializer=self._bias_initializer(f"bias{suffix}"),
                        regularizer=self.bias_regularizer,
                        constraint=self.bias_constraint,
                    )
                )
        self.built = True

    def _bias_initializer(self, name: str) -> Any:
        base = seeded_initializer(self.bias_initializer, self.seed, name)
        if not self.unit_forget_bias:
            return base
        units = self.units

        def init(_shape: Any, *args: Any, **kwargs: Any) -> Any:
            # Forget gate starts open (bias 1), as Jozefowicz et al. recommend.
            return ops.concatenate(
                [
                    base((units,), *args, **kwargs),
                    initializers.get("ones")((units,), *args, **kwargs),
                    base((2 * units,), *args, **kwargs),
                ]
            )

        return init

    # --- dropout masks (drawn once per sequence; RNN.call pre-draws them outside the loop) ------
    def get_dropout_mask(self, step_input: Any) -> Any:
        if self._dropout_mask is None and self.dropout > 0:
            self._dropout_mask = keras.random.dropout(
                ops.ones_like(step_input), rate=self.dropout, seed=self.seed_generator
            )
        return self._dropout_mask

    def get_recurrent_dropout_mask(self, step_input: Any) -> Any:
        if self._recurrent_dropout_mask is None and self.recurrent_dropout > 0:
            ones = ops.ones_like(step_input)
            self._recurrent_dropout_mask = [
                keras.random.dropout(ones, rate=self.recurrent_dropout, seed=self.seed_generator)
                for _ in range(self.depth)
            ]
        return self._recurrent_dropout_mask

    # --- the recurrence -------------------------------------------------------------------------
    def project_inputs(self, inputs: Any) -> Any:
        """Outer level's input term ``x W_1 + b_1``; works on [b, C] and on [b, T, C] alike."""
        z = ops.matmul(inputs, ops.cast(self.kernels[0], inputs.dtype))
        if self.use_bias:
            z = z + ops.cast(self.biases[0], z.dtype)
        return z

    def step(self, z_x: Any, states: list[Any] | tuple[Any, ...], recurrent_masks: Any = None) -> tuple[Any, list[Any]]:
        """One step from the pre-projected input ``z_x`` = ``x_t W_1 + b_1`` and ``[h, c_1 … c_D]``."""
        units = self.units
        sigma = self.recurrent_activation
        h_prev, cells = states[0], states[1:]
        x_in: Any = None
        h_in = h_prev
        output_gates = []
        for level in range(self.depth):
            if recurrent_masks is not None:
                h_in = h_in * recurrent_masks[level]
            z = ops.matmul(h_in, self.recurrent_kernels[level])
            if level == 0:
                z = z + z_x
            else:
                z = z + ops.matmul(x_in, self.kernels[level])
                if self.use_bias:
                    z = z + self.biases[level]
            candidate = self.cell_activation if level == 0 else self.activation
            x_in = sigma(z[:, :units]) * candidate(z[:, 2 * units : 3 * units])
            h_in = sigma(z[:, units : 2 * units]) * cells[level]
            output_gates.append(z[:, 3 * units :])
        memory = h_in + x_in  # innermost: the plain LSTM update
        new_cells = [memory]
        for level in reversed(range(self.depth)):
            out = sigma(output_gates[level]) * self.activation(memory)
            if level > 0:
                new_cells.append(out)  # the outer level's memory is this level's output
            memory = out
        new_cells.reverse()
        return memory, [memory, *new_cells]

    def call(self, inputs: Any, states: Any, training: bool = False) -> tuple[Any, list[Any]]:
        states = list(states) if isinstance(states, (list, tuple)) else [states]
        if training and 0.0 < self.dropout < 1.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        masks = None
        if training and 0.0 < self.recurrent_dropout < 1.0:
            masks = self.get_recurrent_dropout_mask(states[0])
        return self.step(self.project_inputs(inputs), states, masks)

    def get_initial_state(self, batch_size: Any = None) -> list[Any]:
        return [ops.zeros((batch_size, size), dtype=self.compute_dtype) for size in self.state_size]

    def get_config(self) -> dict[str, Any]:
        config = {
            "units": self.units,
            "depth": self.depth,
            "activation": activations.serialize(self.activation),
            "recurrent_activation": activations.serialize(self.recurrent_activation),
            "cell_activation": activations.serialize(self.cell_activation),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": initializers.serialize(self.recurrent_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "unit_forget_bias": self.unit_forget_bias,
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "recurrent_regularizer": regularizers.serialize(self.recurrent_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "recurrent_constraint": constraints.serialize(self.recurrent_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}


# Derivatives written in terms of the activation's *output* y, so the backward pass needs only the
# stored activations. Activations not listed here fall back to automatic differentiation.
_DERIVATIVE_FROM_OUTPUT: dict[str, Any] = {
    "tanh": lambda y: 1.0 - y * y,
    "sigmoid": lambda y: y * (1.0 - y),
    "linear": lambda y: ops.ones_like(y),
    "relu": lambda y: ops.cast(y > 0, y.dtype),
}


def _derivative(fn: Any) -> Any:
    name = activations.serialize(fn)
    return _DERIVATIVE_FROM_OUTPUT.get(name) if isinstance(name, str) else None


def fused_supported(cell: NestedLSTMCell) -> bool:
    """Whether ``fused_sequence`` can run this cell (all three activations have known derivatives)."""
    return all(_derivative(fn) is not None for fn in (cell.activation, cell.recurrent_activation, cell.cell_activation))


@dataclass(frozen=True)
class _FusedSpec:
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


class _FusedWeights(NamedTuple):
    kernels: list[Any]
    biases: list[Any]
    masks: list[Any]


class _ForwardSaved(NamedTuple):
    """What the backward pass reuses from the forward pass."""

    h0: Any
    batch: Any
    operands: list[Any]
    record: Any
    step_records: list[Any] | None  # per-step records of the Python-unrolled forward, else None


def _fused_spec(
    cell: NestedLSTMCell, x_proj: Any, with_masks: bool, return_sequences: bool, unrolled: bool
) -> _FusedSpec:
    depth = cell.depth
    candidates = (cell.cell_activation,) + (cell.activation,) * (depth - 1)
    return _FusedSpec(
        depth=depth,
        units=cell.units,
        steps=x_proj.shape[0],
        dtype=x_proj.dtype,
        sigma=cell.recurrent_activation,
        d_sigma=_derivative(cell.recurrent_activation),
        psi=cell.activation,
        d_psi=_derivative(cell.activation),
        candidates=candidates,
        d_candidates=tuple(_derivative(fn) for fn in candidates),
        use_bias=cell.use_bias,
        with_masks=with_masks,
        return_sequences=return_sequences,
        unrolled=unrolled,
        # JAX: lax.scan stacks per-step records itself (and can unroll); TensorFlow's keras scan cannot
        # emit outputs unlike its carry, so it writes into buffers inside fori_loop instead.
        use_scan=keras.backend.backend() == "jax" and not unrolled,
    )


def _fused_weights(cell: NestedLSTMCell, spec: _FusedSpec, recurrent_masks: Any) -> _FusedWeights:
    def cast(value: Any) -> Any:
        return ops.cast(value, spec.dtype)

    biases = [cast(cell.biases[level]) for level in range(spec.depth)] if spec.use_bias else []
    # An inner level's input and hidden kernels are concatenated once per call so each step needs one matmul.
    kernels = [cast(cell.recurrent_kernels[0])] + [
        ops.concatenate([cast(cell.kernels[level]), cast(cell.recurrent_kernels[level])], axis=0)
        for level in range(1, spec.depth)
    ]
    masks = [cast(m) for m in recurrent_masks] if spec.with_masks else []
    return _FusedWeights(kernels, biases, masks)


def _unpack(spec: _FusedSpec, args: Any) -> tuple[Any, Any, list[Any], _FusedWeights]:
    depth = spec.depth
    args = list(args)
    zx, h0, c0 = args[0], args[1], args[2 : 2 + depth]
    rest = args[2 + depth :]
    ks, rest = rest[:depth], rest[depth:]
    bs, rest = (rest[:depth], rest[depth:]) if spec.use_bias else ([], rest)
    return zx, h0, c0, _FusedWeights(ks, bs, rest)


def _forward_levels(spec: _FusedSpec, w: _FusedWeights, z_t: Any, h: Any, cells: Any) -> tuple[Any, ...]:
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


def _forward_memories(spec: _FusedSpec, output_gates: list[Any], memory: Any) -> tuple[Any, list[Any], list[Any]]:
    """Top-down half of one step: level l's new memory is the output of level l+1."""
    new_cells: list[Any] = [None] * spec.depth
    squashed: list[Any] = [None] * spec.depth
    for level in reversed(range(spec.depth)):
        new_cells[level] = memory
        squashed[level] = spec.psi(memory)
        memory = output_gates[level] * squashed[level]
    return memory, new_cells, squashed


def _forward_cell(spec: _FusedSpec, w: _FusedWeights, z_t: Any, h: Any, cells: Any) -> tuple[Any, list[Any], list[Any]]:
    """One forward step: ``(h_t, [c_1..c_D], [weight-gradient operands..., packed record])``."""
    gates, operands, output_gates, memory = _forward_levels(spec, w, z_t, h, cells)
    h_new, new_cells, squashed = _forward_memories(spec, output_gates, memory)
    record = ops.concatenate([*gates, *squashed, *cells], axis=-1)
    return h_new, new_cells, [*operands, record]


# The three forward drivers share one signature so ``_fused_run`` can pick one; only fori_loop needs
# ``batch`` (it preallocates its buffers). Each returns ``(final states, stacked rows, unrolled records)``.
def _forward_unrolled(spec: _FusedSpec, step: Any, zx: Any, h0: Any, c0: list[Any], batch: Any) -> tuple[Any, ...]:
    h, cells, per_step = h0, list(c0), []
    for z_t in ops.unstack(zx, num=spec.steps, axis=0):
        h, cells, rows = step(z_t, h, cells)
        per_step.append(rows)
    saved = [ops.stack([rows[k] for rows in per_step], axis=0) for k in range(spec.depth + 1)]
    # The unrolled backward reads each step's record directly instead of slicing the stacked one.
    return [h, *cells], saved, [rows[-1] for rows in per_step]


def _forward_scan(spec: _FusedSpec, step: Any, zx: Any, h0: Any, c0: list[Any], batch: Any) -> tuple[Any, ...]:
    def body(carry: Any, z_t: Any) -> Any:
        h, cells, rows = step(z_t, carry[0], list(carry[1:]))
        return [h, *cells], rows

    final_states, saved = ops.scan(body, [h0, *c0], zx, length=spec.steps, unroll=SCAN_UNROLL)
    return list(final_states), list(saved), None


def _write_step(buffers: list[Any], t: Any, rows: list[Any]) -> list[Any]:
    return [ops.slice_update(buf, (t, 0, 0), ops.expand_dims(row, 0)) for buf, row in zip(buffers, rows, strict=True)]


def _forward_fori(spec: _FusedSpec, step: Any, zx: Any, h0: Any, c0: list[Any], batch: Any) -> tuple[Any, ...]:
    depth = spec.depth

    def body(t: Any, carry: Any) -> Any:
        h, cells, buffers = carry[0], carry[1 : 1 + depth], carry[1 + depth :]
        h, cells, rows = step(ops.take(zx, t, axis=0), h, cells)
        return (h, *cells, *_write_step(buffers, t, rows))

    buffers0 = [ops.zeros((spec.steps, batch, w), dtype=spec.dtype) for w in (*spec.operand_widths, spec.width)]
    final = ops.fori_loop(0, spec.steps, body, (h0, *c0, *buffers0))
    return list(final[: 1 + depth]), list(final[1 + depth :]), None


def _output_gate_grads(spec: _FusedSpec, row: Any, dh: Any, dcs: Any) -> tuple[list[Any], Any]:
    """Top-down: gradients of each level's output gate and memory m_l (m_l = output of l+1)."""
    d_out_gate, g_out = [], dh
    for level in range(spec.depth):
        o = spec.gate(row, level, 3)
        squashed = spec.psi_of(row, level)
        d_out_gate.append(g_out * squashed * spec.d_sigma(o))
        g_out = dcs[level] + g_out * o * spec.d_psi(squashed)
    return d_out_gate, g_out


def _gate_grads(
    spec: _FusedSpec, kernels_t: list[Any], masks: list[Any], row: Any, d_out_gate: list[Any], g_out: Any
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
    spec: _FusedSpec, kernels_t: list[Any], masks: list[Any], row: Any, dh: Any, dcs: Any
) -> tuple[Any, list[Any], list[Any]]:
    """One backward step: ``(dL/dh_{t-1}, [dL/dc_{l,t-1}], [dL/dz_l])`` from the step's packed record."""
    d_out_gate, g_out = _output_gate_grads(spec, row, dh, dcs)
    return _gate_grads(spec, kernels_t, masks, row, d_out_gate, g_out)


def _backward_unrolled(spec: _FusedSpec, step: Any, saved: _ForwardSaved, d_seq: Any, d_h: Any, d_cells: Any) -> Any:
    dh, dcs = d_h, d_cells
    seq_rows = ops.unstack(d_seq, num=spec.steps, axis=0) if d_seq is not None else None
    dz_rows: list[Any] = [None] * spec.steps
    for t in reversed(range(spec.steps)):
        if seq_rows is not None:
            dh = dh + seq_rows[t]
        dh, dcs, dz_rows[t] = step(saved.step_records[t], dh, dcs)
    dz_seqs = [ops.stack([rows[k] for rows in dz_rows], axis=0) for k in range(spec.depth)]
    return [dh, *dcs], dz_seqs


def _backward_scan(spec: _FusedSpec, step: Any, saved: _ForwardSaved, d_seq: Any, d_h: Any, d_cells: Any) -> Any:
    def body(carry: Any, xs: Any) -> Any:
        dh = carry[0] if d_seq is None else carry[0] + xs[1]
        dh, dcs, d_z = step(xs[0], dh, list(carry[1:]))
        return [dh, *dcs], d_z

    xs = [saved.record] + ([d_seq] if d_seq is not None else [])
    d_initial, dz_seqs = ops.scan(body, [d_h, *d_cells], xs, length=spec.steps, reverse=True, unroll=SCAN_UNROLL)
    return list(d_initial), list(dz_seqs)


def _backward_fori(spec: _FusedSpec, step: Any, saved: _ForwardSaved, d_seq: Any, d_h: Any, d_cells: Any) -> Any:
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


def _split_upstream(spec: _FusedSpec, h0: Any, upstream: Any) -> tuple[Any, Any, list[Any]]:
    """``(d_seq or None, dL/dh_T, [dL/dc_l,T])``; outputs nobody used arrive as None."""
    flat = list(keras.tree.flatten(upstream))
    d_seq = None
    if spec.return_sequences:
        d_seq, flat = flat[0], flat[1:]
    zeros = ops.zeros_like(h0)
    d_h = zeros if flat[0] is None else flat[0]
    d_cells = [zeros if d is None else d for d in flat[1 : 1 + spec.depth]]
    return d_seq, d_h, d_cells


def _flat_rows(seq: Any) -> Any:
    return ops.reshape(seq, (-1, seq.shape[-1]))


def _weight_grads(spec: _FusedSpec, operands: list[Any], dz_seqs: list[Any]) -> tuple[list[Any], list[Any]]:
    """One ``[2u, T*b] x [T*b, 4u]`` matmul per level (biases: a ones-vector matmul) after the loop."""
    dz_rows = [_flat_rows(dz) for dz in dz_seqs]
    d_kernels = [ops.matmul(ops.transpose(_flat_rows(op)), dz) for op, dz in zip(operands, dz_rows, strict=True)]
    d_biases = []
    if spec.use_bias:
        ones = ops.ones((1, dz_rows[0].shape[0] or ops.shape(dz_rows[0])[0]), dtype=spec.dtype)
        d_biases = [ops.reshape(ops.matmul(ones, dz), (-1,)) for dz in dz_rows]
    return d_kernels, d_biases


def _fused_grad(
    spec: _FusedSpec, w: _FusedWeights, saved: _ForwardSaved, d_seq: Any, d_h: Any, d_cells: list[Any]
) -> list[Any]:
    kernels_t = [ops.transpose(k) for k in w.kernels]
    step = partial(_backward_cell, spec, kernels_t, w.masks)
    driver = _backward_unrolled if spec.unrolled else _backward_scan if spec.use_scan else _backward_fori
    d_initial, dz_seqs = driver(spec, step, saved, d_seq, d_h, d_cells)
    d_kernels, d_biases = _weight_grads(spec, saved.operands, dz_seqs)
    d_masks = [ops.zeros_like(m) for m in w.masks]
    # x_proj enters the outer level's pre-activation unchanged, so its gradient is that level's dL/dz.
    return [dz_seqs[0], *d_initial, *d_kernels, *d_biases, *d_masks]


def _forward_pass(spec: _FusedSpec, *args: Any) -> tuple[list[Any], _ForwardSaved]:
    """Both loops' forward half: ``[H?, h, c_1..c_D]`` and what the backward pass reuses."""
    zx, h0, c0, w = _unpack(spec, args)
    batch = ops.shape(h0)[0]
    step = partial(_forward_cell, spec, w)
    driver = _forward_unrolled if spec.unrolled else _forward_scan if spec.use_scan else _forward_fori
    final_states, saved, step_records = driver(spec, step, zx, h0, c0, batch)
    operands, record = saved[: spec.depth], saved[spec.depth]
    outputs = spec.gate(record, 0, 3) * spec.psi_of(record, 0) if spec.return_sequences else None
    result = ([outputs] if spec.return_sequences else []) + final_states
    return result, _ForwardSaved(h0, batch, operands, record, step_records)


def _fused_passes(spec: _FusedSpec) -> tuple[Any, Any]:
    """``(forward(args), backward(w, saved, d_seq, d_h, d_cells))``; XLA-compiled on TensorFlow."""
    if keras.backend.backend() != "tensorflow" or spec.unrolled:
        # JAX compiles the whole train step anyway; the unrolled loops are meant for graphs without XLA.
        return partial(_forward_pass, spec), partial(_fused_grad, spec)
    return _xla_passes(spec)


#: The XLA functions of ``_xla_passes``, one pair per ``_FusedSpec``, so every layer call reuses them.
_XLA_FUNCTIONS: dict[_FusedSpec, tuple[Any, Any]] = {}


def _xla_functions(spec: _FusedSpec) -> tuple[Any, Any]:
    if spec not in _XLA_FUNCTIONS:
        import tensorflow as tf

        def forward(*args: Any) -> Any:
            result, saved = _forward_pass(spec, *args)
            return result, saved.operands, saved.record

        def backward(
            kernels: Any, masks: Any, h0: Any, operands: Any, record: Any, d_seq: Any, d_h: Any, d_cells: Any
        ) -> Any:
            saved = _ForwardSaved(h0, ops.shape(h0)[0], list(operands), record, None)
            w = _FusedWeights(list(kernels), [], list(masks))
            return _fused_grad(spec, w, saved, d_seq, d_h, list(d_cells))

        # jit_compile=True whatever the enclosing model's setting: keras turns XLA off by default on a
        # CPU-only TensorFlow, where these loops run several times slower op by op. Inside an outer XLA
        # function TensorFlow inlines them into the one cluster instead of compiling them apart.
        _XLA_FUNCTIONS[spec] = (
            tf.function(forward, jit_compile=True, autograph=False),
            tf.function(backward, jit_compile=True, autograph=False),
        )
    return _XLA_FUNCTIONS[spec]


def _xla_passes(spec: _FusedSpec) -> tuple[Any, Any]:
    forward_fn, backward_fn = _xla_functions(spec)

    def forward(*args: Any) -> tuple[list[Any], _ForwardSaved]:
        # Cut from the tape: the custom gradient stands for this call, and TensorFlow would otherwise try
        # to build the XLA function's own gradient (which its buffer updates do not have).
        result, operands, record = forward_fn(*[ops.stop_gradient(a) for a in args])
        h0 = args[1]
        return list(result), _ForwardSaved(h0, ops.shape(h0)[0], list(operands), record, None)

    def backward(w: _FusedWeights, saved: _ForwardSaved, d_seq: Any, d_h: Any, d_cells: list[Any]) -> list[Any]:
        return list(backward_fn(w.kernels, w.masks, saved.h0, saved.operands, saved.record, d_seq, d_h, d_cells))

    return forward, backward


def fused_xla_trace_count() -> int:
    """How often the XLA functions of the fused loops were traced in this process (0 on JAX).

    One trace per new input shape (or per enclosing graph): tests use it to see that a model took the
    compiled path, ``benchmarks/train.py`` to count compiles.
    """
    return sum(fn.experimental_get_tracing_count() for pair in _XLA_FUNCTIONS.values() for fn in pair)


def _fused_run(spec: _FusedSpec) -> Any:
    """The custom-gradient function of ``fused_sequence``: flat tensors in, ``[H?, h, c_1..c_D]`` out."""
    forward, backward = _fused_passes(spec)

    @ops.custom_gradient
    def run(*args: Any) -> Any:
        w = _unpack(spec, args)[3]
        result, saved = forward(*args)

        def grad(*upstream: Any, **kwargs: Any) -> Any:
            d_seq, d_h, d_cells = _split_upstream(spec, saved.h0, kwargs.get("upstream", upstream))
            return backward(w, saved, d_seq, d_h, d_cells)

        return result, grad

    return run


def fused_sequence(
    cell: NestedLSTMCell,
    x_proj: Any,
    states: list[Any],
    recurrent_masks: Any = None,
    return_sequences: bool = False,
    unrolled: bool = False,
) -> tuple[Any, list[Any]]:
    """Run the whole sequence with a hand-written backward pass (back-propagation through time).

    ``x_proj`` is the outer input term without bias, ``x_t W_1``, for every step, time-major
    ``[T, b, 4u]`` with a static ``T``. Returns ``(H or None, new_states)``; ``H`` = every step's
    output ``[T, b, u]`` when ``return_sequences``.

    Why: automatic differentiation of the loop computes every weight gradient step by step as small
    matmuls, and XLA on CPU re-fuses an unrolled memory-gradient chain with quadratic duplication.
    Here the two loops (forward, then backward in reverse) keep only the sequential work per step:
    one ``[b, u] x [u, 4u]`` matmul for the outer level and one ``[b, 2u] x [2u, 4u]`` per inner level
    (an inner level's input and hidden kernels are concatenated once per call, not per step). Each
    step stores the operands of the weight gradients in per-level buffers laid out for one large
    ``[2u, T*b] x [T*b, 4u]`` matmul per level after the loop (biases: a ones-vector matmul), and the
    gates, squashed memories and previous memories the backward step needs in one packed record.
    Loops: ``fori_loop`` writing into buffers (TensorFlow), ``lax.scan`` stacking its outputs (JAX),
    or Python-unrolled (``unrolled=True``, for graph executors without XLA).

    Structure: ``_forward_cell``/``_backward_cell`` are one step's math; ``_forward_*``/``_backward_*``
    are the three loop drivers; ``_weight_grads`` is the after-loop weight-gradient matmuls.
    """
    spec = _fused_spec(cell, x_proj, recurrent_masks is not None, return_sequences, unrolled)
    weights = _fused_weights(cell, spec, recurrent_masks)
    result = _fused_run(spec)(x_proj, *states, *weights.kernels, *weights.biases, *weights.masks)
    if return_sequences:
        return result[0], list(result[1:])
    return None, list(result)


_CELL_ARGS = (
    "units",
    "depth",
    "activation",
    "recurrent_activation",
    "cell_activation",
    "use_bias",
    "kernel_initializer",
    "recurrent_initializer",
    "bias_initializer",
    "unit_forget_bias",
    "kernel_regularizer",
    "recurrent_regularizer",
    "bias_regularizer",
    "kernel_constraint",
    "recurrent_constraint",
    "bias_constraint",
    "dropout",
    "recurrent_dropout",
    "seed",
)


@keras.saving.register_keras_serializable(package="nestcast")
class NestedLSTM(keras.layers.RNN):
    """Nested LSTM layer over ``[batch, time, features]`` with a fast sequence loop.

    Takes every ``NestedLSTMCell`` argument plus ``return_sequences``, ``return_state``,
    ``go_backwards``, ``stateful`` and ``implementation``:

    - ``"fused"``: ``keras.ops.scan`` forward and a hand-written backward pass (``fused_sequence``),
      XLA-compiled by the layer itself on TensorFlow (any ``jit_compile``) and by JAX. Needs known
      activation derivatives (tanh, sigmoid, linear, relu) and no mask.
    - ``"unroll"``: the step Python-unrolled over a static sequence length, automatic differentiation.
    - ``"scan"``: ``keras.ops.scan`` with automatic differentiation (dynamic lengths; not XLA-differentiable
      on TensorFlow).
    - ``"auto"`` (default): fused when possible, else unroll when the length is static and at most
      ``MAX_UNROLL``, else scan.

    Supports masking (a masked step keeps the previous state and output).
    """

    def __init__(
        self,
        units: int,
        depth: int = 2,
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        cell_activation: Any = "tanh",
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        unit_forget_bias: bool = True,
        kernel_regularizer: Any = None,
        recurrent_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        recurrent_constraint: Any = None,
        bias_constraint: Any = None,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: int | None = None,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        implementation: str = "auto",
        **kwargs: Any,
    ) -> None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        kwargs.pop("unroll", None)
        cell = NestedLSTMCell(
            units,
            depth=depth,
            activation=activation,
            recurrent_activation=recurrent_activation,
            cell_activation=cell_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            unit_forget_bias=unit_forget_bias,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            name="nested_lstm_cell",
        )
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=False,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.implementation = implementation
        self.input_spec = keras.layers.InputSpec(ndim=3)

    def inner_loop(self, sequences: Any, initial_state: Any, mask: Any, training: bool = False) -> Any:
        cell: NestedLSTMCell = self.cell
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if training and 0.0 < cell.dropout < 1.0:
            sequences = sequences * ops.expand_dims(cell.get_dropout_mask(sequences[:, 0, :]), 1)
        rec_masks = None
        if training and 0.0 < cell.recurrent_dropout < 1.0:
            rec_masks = cell.get_recurrent_dropout_mask(initial_state[0])
        states = list(initial_state)
        steps = sequences.shape[1]
        mode = self.implementation
        if mode == "auto":
            if mask is None and steps is not None and fused_supported(cell):
                mode = "fused"
            else:
                mode = "unroll" if steps is not None and steps <= MAX_UNROLL else "scan"
        if mode in ("fused", "fused_unrolled"):
            if mask is not None or steps is None or not fused_supported(cell):
                raise ValueError(
                    f"NestedLSTM(implementation={mode!r}) needs a static sequence length, no mask and "
                    f"activations among {sorted(_DERIVATIVE_FROM_OUTPUT)}"
                )
            # Time-major first (C is small), then the one big matmul: every step's input term at once
            # (its bias is added inside the fused loop, whose backward sums its gradient cheaply).
            z_x = ops.matmul(ops.transpose(sequences, (1, 0, 2)), ops.cast(cell.kernels[0], sequences.dtype))
            if self.go_backwards:
                z_x = ops.flip(z_x, axis=0)
            outputs, new_states = fused_sequence(
                cell, z_x, states, rec_masks, self.return_sequences, unrolled=mode == "fused_unrolled"
            )
            sequence = ops.transpose(outputs, (1, 0, 2)) if self.return_sequences else new_states[0]
            return new_states[0], sequence, new_states
        z_x = cell.project_inputs(sequences)
        if mode == "unroll":
            if steps is None:
                raise ValueError("NestedLSTM(implementation='unroll') needs a static sequence length")
            return self._unrolled(cell, z_x, states, mask, rec_masks, steps)
        return self._scanned(cell, z_x, states, mask, rec_masks)

    def _unrolled(
        self, cell: NestedLSTMCell, z_x: Any, states: list[Any], mask: Any, rec_masks: Any, steps: int
    ) -> Any:
        order = range(steps - 1, -1, -1) if self.go_backwards else range(steps)
        outputs = []
        output = states[0]
        # unstack (gradient: one stack) rather than slicing per step (gradient: T pads of the whole tensor).
        inputs = ops.unstack(z_x, num=steps, axis=1)
        step_masks = ops.unstack(ops.cast(mask, "bool"), num=steps, axis=1) if mask is not None else None
        for t in order:
            new_output, new_states = cell.step(inputs[t], states, rec_masks)
            emitted = new_output
            if mask is not None:
                keep = ops.expand_dims(step_masks[t], -1)
                new_output = ops.where(keep, new_output, output)
                new_states = [ops.where(keep, new, old) for new, old in zip(new_states, states, strict=True)]
                emitted = new_output
                if self.zero_output_for_mask:
                    emitted = ops.where(keep, new_output, ops.zeros_like(new_output))
            output, states = new_output, new_states
            if self.return_sequences:
                outputs.append(emitted)
        stacked = ops.stack(outputs, axis=1) if self.return_sequences else output
        return output, stacked, states

    def _scanned(self, cell: NestedLSTMCell, z_x: Any, states: list[Any], mask: Any, rec_masks: Any) -> Any:
        xs: Any = ops.transpose(z_x, (1, 0, 2))
        if mask is not None:
            xs = (xs, ops.transpose(ops.cast(mask, "bool"), (1, 0)))

        def body(carry: Any, x: Any) -> Any:
            output, old = carry[0], list(carry[1:])
            if mask is None:
                new_output, new = cell.step(x, old, rec_masks)
            else:
                z, m = x
                new_output, new = cell.step(z, old, rec_masks)
                keep = ops.expand_dims(m, -1)
                new_output = ops.where(keep, new_output, output)
                new = [ops.where(keep, n, o) for n, o in zip(new, old, strict=True)]
            carry = [new_output, *new]
            emitted = carry
            if mask is not None and self.zero_output_for_mask:
                emitted = [ops.where(keep, new_output, ops.zeros_like(new_output)), *new]
            # keras' TensorFlow scan needs the per-step outputs to mirror the carry's structure.
            return carry, emitted

        carry, ys = ops.scan(body, [states[0], *states], xs, reverse=self.go_backwards)
        output, final_states = carry[0], list(carry[1:])
        sequence = ops.transpose(ys[0], (1, 0, 2)) if self.return_sequences else output
        if self.return_sequences and self.go_backwards:
            # RNN convention: a backwards layer returns its outputs in processing order.
            sequence = ops.flip(sequence, axis=1)
        return output, sequence, final_states

    def call(self, sequences: Any, initial_state: Any = None, mask: Any = None, training: bool = False) -> Any:
        return super().call(sequences, mask=mask, training=training, initial_state=initial_state)

    @property
    def units(self) -> int:
        return self.cell.units

    @property
    def depth(self) -> int:
        return self.cell.depth

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        cell_config = config.pop("cell")
        cell_config = cell_config.get("config", cell_config)
        for name in _CELL_ARGS:
            config[name] = cell_config[name]
        config["implementation"] = self.implementation
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NestedLSTM:
        return cls(**config)
