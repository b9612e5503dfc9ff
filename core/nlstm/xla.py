"""The fused loops' passes as XLA-compiled ``tf.function``s of their own (TensorFlow only), cached per ``FusedSpec``."""

from __future__ import annotations

from typing import Any

from keras import ops

from core.nlstm.loops import forward_pass, fused_grad
from core.nlstm.spec import ForwardSaved, FusedSpec, FusedWeights

#: The XLA functions of ``xla_passes``, one pair per ``FusedSpec``, so every layer call reuses them.
_XLA_FUNCTIONS: dict[FusedSpec, tuple[Any, Any]] = {}


def _xla_functions(spec: FusedSpec) -> tuple[Any, Any]:
    if spec not in _XLA_FUNCTIONS:
        import tensorflow as tf

        def forward(*args: Any) -> Any:
            result, saved = forward_pass(spec, *args)
            return result, saved.operands, saved.record

        def backward(
            kernels: Any, masks: Any, h0: Any, operands: Any, record: Any, d_seq: Any, d_h: Any, d_cells: Any
        ) -> Any:
            saved = ForwardSaved(h0, ops.shape(h0)[0], list(operands), record, None)
            w = FusedWeights(list(kernels), [], list(masks))
            return fused_grad(spec, w, saved, d_seq, d_h, list(d_cells))

        # jit_compile=True whatever the enclosing model's setting: keras turns XLA off by default on a
        # CPU-only TensorFlow, where these loops run several times slower op by op. Inside an outer XLA
        # function TensorFlow inlines them into the one cluster instead of compiling them apart.
        _XLA_FUNCTIONS[spec] = (
            tf.function(forward, jit_compile=True, autograph=False),
            tf.function(backward, jit_compile=True, autograph=False),
        )
    return _XLA_FUNCTIONS[spec]


def xla_passes(spec: FusedSpec) -> tuple[Any, Any]:
    forward_fn, backward_fn = _xla_functions(spec)

    def forward(*args: Any) -> tuple[list[Any], ForwardSaved]:
        # Cut from the tape: the custom gradient stands for this call, and TensorFlow would otherwise try
        # to build the XLA function's own gradient (which its buffer updates do not have).
        result, operands, record = forward_fn(*[ops.stop_gradient(a) for a in args])
        h0 = args[1]
        return list(result), ForwardSaved(h0, ops.shape(h0)[0], list(operands), record, None)

    def backward(w: FusedWeights, saved: ForwardSaved, d_seq: Any, d_h: Any, d_cells: list[Any]) -> list[Any]:
        return list(backward_fn(w.kernels, w.masks, saved.h0, saved.operands, saved.record, d_seq, d_h, d_cells))

    return forward, backward


def fused_xla_trace_count() -> int:
    """How often the XLA functions of the fused loops were traced in this process (0 on JAX).

    One trace per new input shape (or per enclosing graph): tests use it to see that a model took the
    compiled path, ``benchmarks/train.py`` to count compiles.
    """
    return sum(fn.experimental_get_tracing_count() for pair in _XLA_FUNCTIONS.values() for fn in pair)
