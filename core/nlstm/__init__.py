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
and backward loops are ``tf.function(jit_compile=True)`` functions of their own (``core.nlstm.xla``),
compiled whatever the enclosing model's ``jit_compile`` (keras leaves XLA off on a CPU-only
TensorFlow by default); inside a model compiled with ``jit_compile=True`` they are inlined into its
cluster. JAX compiles the whole step anyway. ``implementation="unroll"``/``"scan"`` are the automatic-
differentiation paths (also used for masked input); ``"fused_unrolled"`` is not compiled by the layer.
Dropout masks are drawn once per sequence.

Measured (``benchmarks/train.py --samples 50000``, 2 loaded CPU cores, b128, extrapolated to the seed's
214 200 windows): a drop-in ``Sequential([Input((33, 1)), NestedLSTM(40, depth=2), Dense(1)])`` compiled
without ``jit_compile`` went from 344–352 s/epoch (3.9–4.0x ``keras.layers.LSTM(40)``) to 73–85 s
(1.3–1.6x), at or below the same model with ``jit_compile=True`` (88–110 s) in the same runs.

Modules, each importing only those listed before it: ``cell`` (one step), ``spec`` (a fused call's trace-time
facts), ``loops`` (the hand-written forward and backward passes), ``xla`` (their compiled TensorFlow functions),
``fused`` (``fused_sequence``, the custom-gradient entry point), ``layer`` (``NestedLSTM``).
"""

from __future__ import annotations

from core.nlstm.cell import NestedLSTMCell
from core.nlstm.fused import fused_sequence
from core.nlstm.layer import IMPLEMENTATIONS, MAX_UNROLL, NestedLSTM
from core.nlstm.spec import fused_supported
from core.nlstm.xla import fused_xla_trace_count

__all__ = [
    "IMPLEMENTATIONS",
    "MAX_UNROLL",
    "NestedLSTM",
    "NestedLSTMCell",
    "fused_sequence",
    "fused_supported",
    "fused_xla_trace_count",
]
