"""``NestedLSTM``: the Keras layer over ``[batch, time, features]``; picks the sequence loop (fused, unrolled or
scanned) and keeps the cell's arguments in its own config."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from core.nlstm.cell import NestedLSTMCell
from core.nlstm.fused import fused_sequence
from core.nlstm.spec import DERIVATIVE_FROM_OUTPUT, fused_supported

#: Without the fused path, sequences up to this length are Python-unrolled; longer ones use ``keras.ops.scan``.
MAX_UNROLL = 64
IMPLEMENTATIONS = ("auto", "fused", "fused_unrolled", "unroll", "scan")


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
                    f"activations among {sorted(DERIVATIVE_FROM_OUTPUT)}"
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
