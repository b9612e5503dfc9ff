"""``fused_sequence``: the whole sequence as one custom-gradient call whose backward pass is written by hand
(``core.nlstm.loops``), compiled by ``core.nlstm.xla`` on TensorFlow."""

from __future__ import annotations

from functools import partial
from typing import Any

import keras
from keras import ops

from core.nlstm.cell import NestedLSTMCell
from core.nlstm.loops import forward_pass, fused_grad
from core.nlstm.spec import FusedSpec, fused_spec, fused_weights, unpack
from core.nlstm.xla import xla_passes


def split_upstream(spec: FusedSpec, h0: Any, upstream: Any) -> tuple[Any, Any, list[Any]]:
    """``(d_seq or None, dL/dh_T, [dL/dc_l,T])``; outputs nobody used arrive as None."""
    flat = list(keras.tree.flatten(upstream))
    d_seq = None
    if spec.return_sequences:
        d_seq, flat = flat[0], flat[1:]
    zeros = ops.zeros_like(h0)
    d_h = zeros if flat[0] is None else flat[0]
    d_cells = [zeros if d is None else d for d in flat[1 : 1 + spec.depth]]
    return d_seq, d_h, d_cells



def fused_passes(spec: FusedSpec) -> tuple[Any, Any]:
    """``(forward(args), backward(w, saved, d_seq, d_h, d_cells))``; XLA-compiled on TensorFlow."""
    if keras.backend.backend() != "tensorflow" or spec.unrolled:
        # JAX compiles the whole train step anyway; the unrolled loops are meant for graphs without XLA.
        return partial(forward_pass, spec), partial(fused_grad, spec)
    return xla_passes(spec)



def fused_run(spec: FusedSpec) -> Any:
    """The custom-gradient function of ``fused_sequence``: flat tensors in, ``[H?, h, c_1..c_D]`` out."""
    forward, backward = fused_passes(spec)

    @ops.custom_gradient
    def run(*args: Any) -> Any:
        w = unpack(spec, args)[3]
        result, saved = forward(*args)

        def grad(*upstream: Any, **kwargs: Any) -> Any:
            d_seq, d_h, d_cells = split_upstream(spec, saved.h0, kwargs.get("upstream", upstream))
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

    Structure (``core.nlstm.loops``): ``_forward_cell``/``_backward_cell`` are one step's math;
    ``_forward_*``/``_backward_*`` are the three loop drivers; ``_weight_grads`` is the after-loop weight-gradient
    matmuls.
    """
    spec = fused_spec(cell, x_proj, recurrent_masks is not None, return_sequences, unrolled)
    weights = fused_weights(cell, spec, recurrent_masks)
    result = fused_run(spec)(x_proj, *states, *weights.kernels, *weights.biases, *weights.masks)
    if return_sequences:
        return result[0], list(result[1:])
    return None, list(result)
