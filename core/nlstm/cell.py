"""``NestedLSTMCell``: one step of the Nested LSTM, its weights, dropout masks and Keras config.

The equations and the weight layout are in ``core.nlstm``'s docstring. The cell runs alone in ``keras.layers.RNN``;
``core.nlstm.layer.NestedLSTM`` drives it (or the fused loops) over a whole sequence.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import activations, constraints, initializers, ops, regularizers

from core.initializers import seeded_initializer

try:  # Not exported publicly; keras.layers.RNN pre-draws dropout masks only for its subclasses.
    from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
except ImportError:  # pragma: no cover - keras layout change

    class DropoutRNNCell:  # type: ignore[no-redef]
        def reset_dropout_mask(self) -> None:
            self._dropout_mask = None

        def reset_recurrent_dropout_mask(self) -> None:
            self._recurrent_dropout_mask = None



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
                    ),
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
