"""The Nested LSTM layer: equations (vs keras' LSTM and an independent NumPy model), gradients,
serialisation, seeding, dropout and masking. Runs on any Keras backend with autodiff (TF, JAX)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from core.nlstm import IMPLEMENTATIONS, NestedLSTM, NestedLSTMCell

IMPLS = [impl for impl in IMPLEMENTATIONS if impl != "auto"]
# float64 is exact enough for tight checks where the backend honours it (JAX only with x64 enabled);
# float32 checks allow for TF32 matmuls, JAX's default on recent NVIDIA GPUs.
FLOAT64 = np.asarray(ops.convert_to_numpy(ops.ones((1,), dtype="float64"))).dtype == np.float64
# Seen on JAX/H100 with x64 on: float64 forward passes agree with NumPy to ~5e-8 (cause not established).
ATOL64 = (1e-10 if keras.backend.backend() == "tensorflow" else 1e-6) if FLOAT64 else 1e-5
ATOL32 = 1e-6 if keras.backend.backend() == "tensorflow" else 1e-3


def _np(value):
    return np.asarray(ops.convert_to_numpy(value))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_nlstm(x, weights, depth, cell_activation="tanh", h0=None, cells0=None):
    """The paper's equations, written recursively in NumPy (as hannw/nlstm's ``_recurrence``).

    ``weights`` = [W_1, U_1, b_1, …, W_D, U_D, b_D]; returns (outputs [b, T, u], final states).
    """
    batch, steps, _ = x.shape
    units = weights[1].shape[0]
    outer = {"tanh": np.tanh, "linear": lambda v: v}[cell_activation]

    def level(lvl, inputs, hidden, cells):
        kernel, recurrent, bias = weights[3 * lvl : 3 * lvl + 3]
        z = inputs @ kernel + hidden @ recurrent + bias
        i, f, g, o = (z[:, k * units : (k + 1) * units] for k in range(4))
        inner_input = _sigmoid(i) * (outer if lvl == 0 else np.tanh)(g)  # multiplied, not added
        inner_hidden = _sigmoid(f) * cells[lvl]
        if lvl == depth - 1:
            memory = inner_hidden + inner_input
            below = [memory]
        else:
            memory, deeper = level(lvl + 1, inner_input, inner_hidden, cells)
            below = [memory, *deeper]
        return _sigmoid(o) * np.tanh(memory), below

    h = np.zeros((batch, units)) if h0 is None else h0
    cells = [np.zeros((batch, units)) for _ in range(depth)] if cells0 is None else list(cells0)
    outputs = []
    for t in range(steps):
        h, cells = level(0, x[:, t, :], h, cells)
        outputs.append(h)
    return np.stack(outputs, axis=1), [h, *cells]


def _gradients(layer, x, loss_weights, training=False):
    """d(sum(outputs * loss_weights)) / d(trainable weights), through ``stateless_call``."""
    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]

    def loss(ws):
        out, _ = layer.stateless_call(ws, fixed, x, training=training)
        return ops.sum(out * loss_weights)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(trainable)
            value = loss(trainable)
        return [_np(g) for g in tape.gradient(value, trainable)]
    if keras.backend.backend() == "jax":
        import jax

        return [_np(g) for g in jax.grad(loss)(trainable)]
    pytest.skip("gradient helper covers the tensorflow and jax backends")


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("impl", IMPLS)
def test_depth_one_equals_keras_lstm(impl, rng):
    x = rng.normal(size=(4, 9, 3)).astype("float32")
    reference = keras.layers.LSTM(6, return_sequences=True, return_state=True)
    expected = [_np(v) for v in reference(x)]
    layer = NestedLSTM(6, depth=1, return_sequences=True, return_state=True, implementation=impl)
    layer(x)
    assert [w.shape for w in layer.get_weights()] == [w.shape for w in reference.get_weights()]
    layer.set_weights(reference.get_weights())
    for got, want in zip(layer(x), expected, strict=True):
        np.testing.assert_allclose(_np(got), want, atol=1e-5)


def test_depth_one_cell_equals_lstm_cell(rng):
    x = rng.normal(size=(5, 3)).astype("float32")
    h, c = rng.normal(size=(2, 5, 4)).astype("float32")
    reference = keras.layers.LSTMCell(4)
    want_h, (_, want_c) = reference(x, [h, c])
    cell = NestedLSTMCell(4, depth=1)
    cell.build(x.shape)
    cell.set_weights(reference.get_weights())
    got_h, (_, got_c) = cell(x, [h, c])
    np.testing.assert_allclose(_np(got_h), _np(want_h), atol=1e-5)
    np.testing.assert_allclose(_np(got_c), _np(want_c), atol=1e-5)


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("cell_activation", ["tanh", "linear"])
def test_deeper_levels_match_numpy_reference(depth, cell_activation, rng):
    x = rng.normal(size=(3, 7, 2))
    h0 = rng.normal(size=(3, 5))
    cells0 = list(rng.normal(size=(depth, 3, 5)))
    weights = _weights(np.random.default_rng(1), depth, 2, 5)
    expected, expected_states = reference_nlstm(x, weights, depth, cell_activation, h0, cells0)
    for impl in IMPLS:
        layer = NestedLSTM(
            5,
            depth=depth,
            cell_activation=cell_activation,
            return_sequences=True,
            return_state=True,
            implementation=impl,
            dtype="float64",
        )
        layer(x)
        layer.set_weights(weights)
        outputs, *states = layer(x, initial_state=[h0, *cells0])
        np.testing.assert_allclose(_np(outputs), expected, atol=ATOL64, rtol=0, err_msg=impl)
        for got, want in zip(states, expected_states, strict=True):
            np.testing.assert_allclose(_np(got), want, atol=ATOL64, rtol=0, err_msg=impl)


def _weights(rng, depth, n_in, units):
    weights = []
    for level in range(depth):
        weights += [
            rng.normal(scale=0.6, size=(n_in if level == 0 else units, 4 * units)),
            rng.normal(scale=0.6, size=(units, 4 * units)),
            rng.normal(scale=0.3, size=(4 * units,)),
        ]
    return weights


def test_weight_layout_is_documented_order():
    layer = NestedLSTM(3, depth=3)
    layer.build((None, 4, 2))
    names = [w.path.split("/")[-1] for w in layer.weights]
    assert names == [
        "kernel",
        "recurrent_kernel",
        "bias",
        "kernel_2",
        "recurrent_kernel_2",
        "bias_2",
        "kernel_3",
        "recurrent_kernel_3",
        "bias_3",
    ]
    assert [tuple(w.shape) for w in layer.weights[:3]] == [(2, 12), (3, 12), (12,)]
    assert tuple(layer.weights[3].shape) == (3, 12)
    # unit_forget_bias: every level's forget gate starts at 1, the rest at 0
    for bias in layer.weights[2::3]:
        np.testing.assert_array_equal(_np(bias), np.repeat([0.0, 1.0, 0.0, 0.0], 3))


@pytest.mark.skipif(not FLOAT64, reason="finite differences need float64 (JAX: set JAX_ENABLE_X64=1)")
def test_gradients_match_finite_differences_and_autodiff(rng):
    depth, units, steps = 2, 3, 4
    x = rng.normal(size=(2, steps, 2))
    loss_weights = rng.normal(size=(2, steps, units))
    weights = _weights(rng, depth, 2, units)

    def reference_loss(ws):
        out, _ = reference_nlstm(x, ws, depth)
        return float(np.sum(out * loss_weights))

    grads = {}
    for impl in IMPLS:
        layer = NestedLSTM(units, depth=depth, return_sequences=True, implementation=impl, dtype="float64")
        layer(x)
        layer.set_weights(weights)
        grads[impl] = _gradients(layer, x, loss_weights)
    eps = 1e-6
    for index, weight in enumerate(weights):
        numeric = np.zeros_like(weight)
        for pos in np.ndindex(weight.shape):
            plus = [w.copy() for w in weights]
            minus = [w.copy() for w in weights]
            plus[index][pos] += eps
            minus[index][pos] -= eps
            numeric[pos] = (reference_loss(plus) - reference_loss(minus)) / (2 * eps)
        for impl in IMPLS:
            np.testing.assert_allclose(grads[impl][index], numeric, atol=1e-7, rtol=1e-6, err_msg=f"{impl} w{index}")


def test_fused_gradient_with_dropout_matches_autodiff(rng):
    x = rng.normal(size=(3, 5, 2)).astype("float32")
    loss_weights = rng.normal(size=(3, 4)).astype("float32")
    weights = None
    results = {}
    for impl in ("fused", "fused_unrolled", "unroll"):
        # the same seed draws the same dropout masks in every implementation
        layer = NestedLSTM(4, depth=3, recurrent_dropout=0.3, dropout=0.2, seed=3, implementation=impl)
        layer(x)
        weights = layer.get_weights() if weights is None else weights
        layer.set_weights(weights)
        results[impl] = _gradients(layer, x, loss_weights, training=True)
    tolerance = 2e-5 if keras.backend.backend() == "tensorflow" else 1e-3
    for impl in ("fused", "fused_unrolled"):
        for got, want in zip(results[impl], results["unroll"], strict=True):
            np.testing.assert_allclose(got, want, atol=tolerance, rtol=tolerance, err_msg=impl)


def test_keras_rnn_wrapper_of_the_cell_equals_the_layer(rng):
    x = rng.normal(size=(3, 6, 2)).astype("float32")
    layer = NestedLSTM(4, depth=2, return_sequences=True)
    naive = keras.layers.RNN(NestedLSTMCell(4, depth=2), return_sequences=True)
    expected = _np(layer(x))
    naive(x)
    naive.set_weights(layer.get_weights())
    np.testing.assert_allclose(_np(naive(x)), expected, atol=ATOL32)


def test_the_cell_alone_in_keras_rnn_saves_and_loads_in_safe_mode(tmp_path, rng):
    """The cell is registered on its own, for users who wrap it in ``keras.layers.RNN`` themselves."""
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, keras.layers.RNN(NestedLSTMCell(4, depth=2, seed=1))(inputs))
    path = tmp_path / "cell.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded.layers[1].cell, NestedLSTMCell)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_save_load_keras_round_trip_safe_mode(tmp_path, rng):
    x = rng.normal(size=(8, 5, 3)).astype("float32")
    inputs = keras.Input((5, 3))
    hidden = NestedLSTM(6, depth=2, cell_activation="linear", dropout=0.1, seed=4)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile("adam", "mse")
    model.fit(x, np.ones(8), epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    layer = loaded.layers[1]
    assert isinstance(layer, NestedLSTM) and layer.depth == 2 and layer.cell.cell_activation.__name__ == "linear"
    assert layer.get_config() == model.layers[1].get_config()


def test_same_seed_same_weights_different_seed_different():
    def weights(seed):
        keras.utils.set_random_seed(seed)
        layer = NestedLSTM(5, depth=2)
        layer.build((None, 4, 2))
        return [_np(w) for w in layer.weights]

    first, again, other = weights(11), weights(11), weights(12)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_only_in_training(impl, rng):
    x = rng.normal(size=(16, 6, 4)).astype("float32")
    layer = NestedLSTM(8, depth=2, dropout=0.5, recurrent_dropout=0.5, seed=1, implementation=impl)
    plain = NestedLSTM(8, depth=2, implementation=impl)
    layer(x)
    plain(x)
    plain.set_weights(layer.get_weights())
    inference = _np(layer(x, training=False))
    np.testing.assert_allclose(inference, _np(plain(x)), atol=ATOL32)
    np.testing.assert_array_equal(inference, _np(layer(x)))
    train_a, train_b = _np(layer(x, training=True)), _np(layer(x, training=True))
    assert np.abs(train_a - inference).max() > 1e-3
    assert np.abs(train_a - train_b).max() > 1e-3  # a fresh mask per batch


def test_masking_skips_padded_steps(rng):
    x = rng.normal(size=(2, 6, 3)).astype("float32")
    padded = x.copy()
    padded[0, 4:] = 0.0  # sample 0 has 4 real steps
    model = keras.Sequential([keras.Input((6, 3)), keras.layers.Masking(0.0), NestedLSTM(5, depth=2)])
    short = NestedLSTM(5, depth=2)
    short(x[:1, :4])
    short.set_weights(model.layers[-1].get_weights())
    out = _np(model(padded))
    np.testing.assert_allclose(out[0], _np(short(x[:1, :4]))[0], atol=ATOL32)
    np.testing.assert_allclose(out[1], _np(model.layers[-1](x[1:]))[0], atol=ATOL32)


@pytest.mark.parametrize("impl", IMPLS)
def test_go_backwards_reads_the_reversed_sequence(impl, rng):
    x = rng.normal(size=(3, 5, 2)).astype("float32")
    backwards = NestedLSTM(4, depth=2, go_backwards=True, return_sequences=True, implementation=impl)
    forwards = NestedLSTM(4, depth=2, return_sequences=True, implementation=impl)
    backwards(x)
    forwards(x)
    forwards.set_weights(backwards.get_weights())
    np.testing.assert_allclose(_np(backwards(x)), _np(forwards(x[:, ::-1])), atol=ATOL32)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        NestedLSTMCell(4, depth=0)
    with pytest.raises(ValueError, match="implementation"):
        NestedLSTM(4, implementation="fast")
    layer = NestedLSTM(4, implementation="fused", recurrent_activation="hard_sigmoid")
    with pytest.raises(ValueError, match="fused"):
        layer(np.zeros((2, 3, 1), "float32"))


def _train_two_steps(implementation, compile_kw, x, y, weights):
    from core.nlstm import fused_xla_trace_count

    model = keras.Sequential([keras.Input(x.shape[1:]), NestedLSTM(5, depth=2, implementation=implementation)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", **compile_kw)
    model.set_weights(weights)
    before = fused_xla_trace_count()
    for _ in range(2):
        model.train_on_batch(x, y)
    return [_np(w) for w in model.get_weights()], fused_xla_trace_count() - before


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the layer compiles itself on TensorFlow only")
@pytest.mark.parametrize(
    ("compile_kw", "batch"),
    [({}, 6), ({"jit_compile": False}, 7), ({"jit_compile": True}, 8), ({"run_eagerly": True}, 9)],
    ids=str,
)
def test_the_fused_loops_run_xla_compiled_and_train_as_autodiff_whatever_the_models_jit_setting(
    compile_kw, batch, rng
):
    # A shape no other test uses, so the layer's XLA functions must be traced afresh for it.
    x = rng.normal(size=(batch, 11, 3)).astype("float32")
    y = rng.normal(size=(batch, 5)).astype("float32")
    reference = NestedLSTM(5, depth=2)
    reference(x)
    weights = reference.get_weights()
    expected, _ = _train_two_steps("unroll", {"jit_compile": False}, x, y, weights)
    got, traces = _train_two_steps("auto", compile_kw, x, y, weights)
    assert traces > 0
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
