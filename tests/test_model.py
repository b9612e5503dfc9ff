"""The training harness: every encoder learns, early stopping, checkpoint/resume, seeding, device
selection and the run's metadata."""

from __future__ import annotations

import json
import logging
import random
import threading

import keras
import numpy as np
import pytest

from core.batches import ArrayBatches
from core.config import ModelConfig, TrainConfig
from core.device import DeviceInfo, select_device, visible_gpus
from core.errors import DeviceUnavailableError
from core.features import HEAD, ITEM_IS_NEW
from core.model import LaunchGate, build_model, load_model, predict
from core.sampling import EpochShuffled
from core.schedule import CosineLearningRate
from core.training import train_model

LOOKBACK, CHANNELS, SHOPS, CATEGORIES = 6, 2, 4, 3
# XLA compilation costs seconds per model; these small problems train faster without it.
CPU_NO_JIT = DeviceInfo("cpu", "cpu", keras.backend.backend(), ["cpu"], "default", "float32", False)


def make_data(n: int, seed: int, sign: float = 1.0):
    """A learnable problem: next count = clip(last count + shop effect), counts like the real ones."""
    rng = np.random.default_rng(seed)
    seq = np.minimum(rng.negative_binomial(1.0, 0.35, size=(n, LOOKBACK, CHANNELS)), 20).astype("float32")
    shop = rng.integers(0, SHOPS, n).astype("int32")
    category = rng.integers(0, CATEGORIES, n).astype("int32")
    y = np.clip(sign * (0.8 * seq[:, -1, 0] + 0.2 * seq[:, -2, 0]) + shop, 0, 20).astype("float32")
    return {"sequence": seq, "shop": shop, "category": category}, y


def build(kind: str = "nlstm", seed: int = 1, n_static: int = 0, **model_kw) -> keras.Model:
    model_kw.setdefault("launch_head", n_static == len(HEAD))  # the gate reads the feature room's static input
    cfg = ModelConfig(kind=kind, units=8, depth=2, head_units=8, **model_kw)
    return build_model(
        cfg,
        lookback=LOOKBACK,
        n_channels=CHANNELS,
        n_shops=SHOPS,
        n_categories=CATEGORIES,
        seed=seed,
        train_cfg=TrainConfig(learning_rate=1e-2),
        device=CPU_NO_JIT,
        n_static=n_static,
    )


def weights_of(model: keras.Model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_weights()]


@pytest.mark.parametrize("kind", ["nlstm", "lstm", "gru", "rnn"])
def test_each_kind_learns(kind, tmp_path):
    train, val = make_data(768, 0), make_data(256, 1)
    model = build(kind)
    before = model.evaluate(*val, verbose=0, return_dict=True)["loss"]
    result = train_model(model, train, val, TrainConfig(epochs=2, batch_size=64), tmp_path, device=CPU_NO_JIT)
    assert result.epochs_run == 2 and len(result.history["loss"]) == 2
    assert result.history["loss"][1] < result.history["loss"][0]
    assert result.best_val_loss < before
    preds = predict(model, val[0])
    assert preds.shape == (256,) and preds.dtype == np.float32
    assert np.sqrt(np.mean((preds - val[1]) ** 2)) < np.sqrt(before)


def test_early_stopping_restores_best_weights(tmp_path):
    # Validation targets run against the training signal: validation loss rises after the first epoch.
    train = make_data(512, 0)
    val = make_data(256, 1, sign=-1.0)
    model = build("lstm")
    result = train_model(
        model, train, val, TrainConfig(epochs=6, batch_size=32, patience=2), tmp_path, device=CPU_NO_JIT
    )
    val_losses = result.history["val_loss"]
    assert result.stopped_early and result.epochs_run < 6
    assert result.best_epoch == int(np.argmin(val_losses)) + 1
    assert result.epochs_run == result.best_epoch + 2
    restored = model.evaluate(*val, batch_size=32, verbose=0, return_dict=True)["loss"]
    assert restored == pytest.approx(min(val_losses), rel=1e-5)
    reloaded = load_model(result.model_path)
    np.testing.assert_allclose(predict(reloaded, val[0]), predict(model, val[0]), atol=1e-6)


class Interrupt(RuntimeError):
    pass


def test_checkpoint_resume_after_interruption_equals_uninterrupted(tmp_path):
    train, val = make_data(384, 0), make_data(128, 1)
    cfg = TrainConfig(epochs=4, batch_size=64, patience=0, seed=5)

    reference = build()
    full = train_model(reference, train, val, cfg, tmp_path / "full", device=CPU_NO_JIT)

    def crash_after_second(epoch, logs):
        if epoch == 1:
            raise Interrupt("simulated kill after epoch 2")

    with pytest.raises(Interrupt):
        train_model(build(), train, val, cfg, tmp_path / "run", crash_after_second, device=CPU_NO_JIT)
    ckpt = tmp_path / "run" / "checkpoints"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 2 and sorted(p.name for p in ckpt.glob("epoch-*")) == ["epoch-0002.weights.h5"]
    assert not (tmp_path / "run" / "model.keras").exists()

    seen = []
    resumed_model = build(seed=99)  # fresh weights: everything must come from the checkpoint
    resumed = train_model(
        resumed_model, train, val, cfg, tmp_path / "run", lambda e, logs: seen.append(e), device=CPU_NO_JIT
    )
    assert resumed.resumed_from == 2 and resumed.epochs_run == 4 and seen == [2, 3]
    assert len(resumed.history["loss"]) == 4
    np.testing.assert_allclose(resumed.history["loss"], full.history["loss"], rtol=1e-5)
    for got, want in zip(weights_of(resumed_model), weights_of(reference), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)

    # A finished run resumed again trains no further.
    again = train_model(build(), train, val, cfg, tmp_path / "run", device=CPU_NO_JIT)
    assert again.resumed_from == 4 and again.epochs_run == 4 and again.seconds_per_epoch is None


def test_a_damaged_model_file_rebuilt_from_the_checkpoints_of_a_finished_training_is_logged(tmp_path, caplog):
    train, val = make_data(256, 0), make_data(64, 1)
    cfg = TrainConfig(epochs=2, batch_size=64, patience=0, seed=5)
    first = train_model(build(), train, val, cfg, tmp_path, device=CPU_NO_JIT)
    model_file = tmp_path / "model.keras"
    expected = load_model(model_file).predict(val[0], verbose=0)
    model_file.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="core.training"):
        again = train_model(build(seed=99), train, val, cfg, tmp_path, device=CPU_NO_JIT)
    assert again.resumed_from == again.epochs_run == first.epochs_run == 2 and again.seconds_per_epoch is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == "core.training"]
    assert line == (f"{model_file}: rebuilt from the checkpoints of its finished training (epoch 2 of 2), replacing "
                    f"the 7-byte file there; no epoch retrained")
    np.testing.assert_allclose(load_model(model_file).predict(val[0], verbose=0), expected, atol=1e-6)


class RatesSeen(keras.callbacks.Callback):
    """The optimizer's learning rate at every training batch, as the train step used it."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: list[float] = []

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.rates.append(float(self.model.optimizer.learning_rate))


def test_the_cosine_rate_falls_from_the_peak_to_the_floor_and_a_refit_of_k_epochs_follows_the_selections_curve(
    tmp_path,
):
    train = make_data(256, 0)  # 4 batches an epoch
    cfg = TrainConfig(epochs=3, batch_size=64, patience=0, learning_rate=8e-3, learning_rate_floor=0.1)
    selection = RatesSeen()
    train_model(build(), train, None, cfg, tmp_path / "select", device=CPU_NO_JIT, callbacks=[selection])
    steps = 4
    expected = [8e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / (3 * steps)))) for k in range(3 * steps)]
    np.testing.assert_allclose(selection.rates, expected, rtol=1e-6)
    assert selection.rates[0] == pytest.approx(8e-3) and selection.rates[-1] < 0.15 * 8e-3
    assert all(later < earlier for earlier, later in zip(selection.rates, selection.rates[1:], strict=False))
    assert CosineLearningRate(8e-3, epochs=3, steps=steps, floor=0.1).rate(3, 0) == pytest.approx(8e-4)

    refit = RatesSeen()  # two of the three epochs, on the selection's curve (not squeezed into two epochs)
    refit_cfg = cfg.model_copy(update={"epochs": 2})
    train_model(build(), train, None, refit_cfg, tmp_path / "refit", device=CPU_NO_JIT, callbacks=[refit],
                schedule_epochs=3)
    np.testing.assert_allclose(refit.rates, selection.rates[: 2 * steps], rtol=1e-6)

    warm = RatesSeen()  # a refit from the selection's network: the curve's last epoch, not its first
    train_model(build(), train, None, cfg.model_copy(update={"epochs": 1}), tmp_path / "warm", device=CPU_NO_JIT,
                callbacks=[warm], schedule_epochs=3, schedule_offset=2)
    np.testing.assert_allclose(warm.rates, selection.rates[2 * steps :], rtol=1e-6)

    constant = RatesSeen()
    train_model(build(), train, None, cfg.model_copy(update={"learning_rate_schedule": "constant"}),
                tmp_path / "constant", device=CPU_NO_JIT, callbacks=[constant])
    np.testing.assert_allclose(constant.rates, 1e-2, rtol=1e-6)  # untouched: the rate build() compiled with


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"peak": 0.0}, "peak must be positive, got 0.0"), ({"epochs": 0}, "epochs and steps must be at least 1"),
     ({"floor": 1.5}, r"floor must lie in \[0, 1\], got 1.5"), ({"offset": -1}, "offset must be at least 0, got -1")],
)
def test_the_cosine_schedule_names_a_bad_argument(kwargs, message):
    arguments = {"peak": 1e-3, "epochs": 3, "steps": 10, "floor": 0.05} | kwargs
    with pytest.raises(ValueError, match=message):
        CosineLearningRate(**arguments)


def test_batch_order_depends_on_seed_and_epoch_only():
    x, y = make_data(100, seed=0)
    walked = ArrayBatches(x, y, batch_size=32, seed=4)
    for _ in range(3):
        walked.on_epoch_end()
    resumed = ArrayBatches(x, y, batch_size=32, seed=4)
    resumed.set_epoch(3)
    assert isinstance(resumed, EpochShuffled) and len(resumed) == 4
    for i in range(len(resumed)):
        np.testing.assert_array_equal(resumed[i][1], walked[i][1])
    assert not np.array_equal(resumed[0][1], ArrayBatches(x, y, batch_size=32, seed=4)[0][1])
    ordered = ArrayBatches(x, y, batch_size=32, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([ordered[i][1] for i in range(len(ordered))]), y)
    with pytest.raises(IndexError):
        ordered[len(ordered)]


def test_a_training_batch_is_fixed_by_its_place_in_the_stream_not_by_when_the_epoch_callback_runs():
    # keras opens the next epoch's iterator, and tf.data prefetches from it, before any epoch callback runs: a
    # batch fetched "early" must hold what it holds when fetched late (issue 29: seeded runs under load).
    x, y = make_data(100, seed=0)
    early = ArrayBatches(x, y, batch_size=32, seed=4, endless=True)
    first_of_epoch_1 = early[len(early)][1]  # fetched before anyone said epoch 1 began
    late = ArrayBatches(x, y, batch_size=32, seed=4, endless=True)
    late[0]
    for epoch in range(2):
        late.on_epoch_end()
        late.set_epoch(epoch + 1)  # keras and the checkpoint callback both move it; the stream stays put
    np.testing.assert_array_equal(late[len(late)][1], first_of_epoch_1)
    walked = ArrayBatches(x, y, batch_size=32, seed=4)  # a finite dataset positioned on epoch 1
    walked.set_epoch(1)
    np.testing.assert_array_equal(walked[0][1], first_of_epoch_1)
    assert early.num_batches is None and walked.num_batches == len(walked) == 4
    resumed = ArrayBatches(x, y, batch_size=32, seed=4, endless=True)
    resumed.set_epoch(1)  # a run resumed at epoch 1 starts its stream there
    np.testing.assert_array_equal(resumed[0][1], first_of_epoch_1)


def test_seeded_runs_are_identical(tmp_path):
    train, val = make_data(256, 0), make_data(64, 1)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=3)
    runs = []
    for name in ("a", "b"):
        model = build(seed=3, dropout=0.2)
        train_model(model, train, val, cfg, tmp_path / name, device=CPU_NO_JIT)
        runs.append(weights_of(model))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["nlstm", "lstm"])
def test_a_seeded_model_starts_from_the_same_weights_while_another_thread_draws_from_python_s_random(kind):
    """keras seeds an unseeded initializer from python's process-wide ``random``; a Dask worker's event loop and
    Prefect's client draw from it too, which gave a seeded training on a loaded Dask worker other weights."""
    alone = weights_of(build(kind, seed=3, n_static=2))
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.random()

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        beside_a_drawer = [weights_of(build(kind, seed=3, n_static=2)) for _ in range(3)]
    finally:
        stop.set()
        drawer.join()
    for weights in beside_a_drawer:
        for a, b in zip(alone, weights, strict=True):
            np.testing.assert_array_equal(a, b)
    other_seed = weights_of(build(kind, seed=4, n_static=2))
    assert not all(np.array_equal(a, b) for a, b in zip(alone, other_seed, strict=True)), "the seed matters"


def test_gpu_without_gpu_is_a_clear_error():
    if visible_gpus():
        pytest.skip("a GPU is visible here")
    with pytest.raises(DeviceUnavailableError, match="no GPU"):
        select_device("gpu")
    auto = select_device("auto")
    assert auto.kind == "cpu" and auto.precision == "float32" and auto.strategy == "default"
    assert select_device("cpu", jit_compile="off").jit_compile is False
    with pytest.raises(ValueError):
        select_device("tpu")


def test_metadata_and_artifacts(tmp_path):
    train, val = make_data(256, 0), make_data(64, 1)
    model = build(embeddings=False)
    epochs = []
    result = train_model(
        model,
        train,
        val,
        TrainConfig(epochs=2, batch_size=64),
        tmp_path,
        lambda e, logs: epochs.append((e, sorted(logs))),
        device=CPU_NO_JIT,
    )
    assert epochs == [(0, ["loss", "rmse", "val_loss", "val_rmse"]), (1, ["loss", "rmse", "val_loss", "val_rmse"])]
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["device"] == "cpu" and meta["precision"] == "float32" and meta["strategy"] == "default"
    assert meta["jit_compile"] is False and meta["backend"] == keras.backend.backend()
    assert meta["params"] == model.count_params() == result.params
    assert meta["train_config"]["epochs"] == 2 and meta["epochs_run"] == 2
    assert len(meta["timings"]["seconds_per_epoch"]) == 2 and meta["timings"]["mean_seconds_per_epoch"] > 0
    assert (tmp_path / "model.keras").exists() and not list(tmp_path.glob(".tmp-*"))
    # Without embeddings the shop/category inputs are accepted but unused.
    assert not any("embedding" in layer.name for layer in model.layers)


def test_predict_clips_to_the_callers_range():
    model = build("rnn")
    inputs, _ = make_data(32, 2)
    model.layers[-1].set_weights([np.zeros((8, 1), "float32"), np.array([50.0], "float32")])
    np.testing.assert_array_equal(predict(model, inputs), np.full(32, 20.0, "float32"))
    np.testing.assert_array_equal(predict(model, inputs, clip_max=7.5), np.full(32, 7.5, "float32"))


class RecordedBatches(ArrayBatches):
    """ArrayBatches that remembers the size of every batch it handed out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def __getitem__(self, i: int):
        batch = super().__getitem__(i)
        self.sizes.append(len(batch[0]["sequence"]))
        return batch


def test_predict_pads_the_short_last_batch_and_returns_one_prediction_per_row():
    model = build("nlstm")
    inputs, _ = make_data(37, 5)
    batches = RecordedBatches(inputs, None, 16, shuffle=False)
    predicted = predict(model, batches, clip_max=1e9)
    expected = np.asarray(model(inputs, training=False)).reshape(-1)  # one call on every row, no batching
    assert predicted.shape == (37,)
    np.testing.assert_allclose(predicted, np.maximum(expected, 0.0), rtol=1e-5, atol=1e-6)
    assert batches.sizes and set(batches.sizes) == {16}, batches.sizes  # one batch shape: one trace
    assert batches.pad_last is False  # the caller's dataset is as it was


def test_the_head_learns_from_static_features_and_the_month():
    """A target the window cannot explain (the static feature and the month alone decide it) is learned."""
    rng = np.random.default_rng(3)
    n = 1024
    inputs, _ = make_data(n, 4)
    static = rng.uniform(0, 3, (n, 5)).astype("float32")
    month = rng.integers(0, 12, n).astype("int32")
    y = (2.0 * static[:, 0] + (month == 11) * 5.0).astype("float32")
    model = build_model(
        ModelConfig(kind="nlstm", units=8, depth=2, head_units=16, launch_head=False),
        lookback=LOOKBACK, n_channels=CHANNELS, n_shops=SHOPS, n_categories=CATEGORIES, seed=1,
        train_cfg=TrainConfig(learning_rate=1e-2), device=CPU_NO_JIT, n_static=5,
    )
    assert {"static", "month"} <= set(model.input)
    data = {**inputs, "static": static, "month": month}
    before = float(np.mean((predict(model, data, clip_max=100.0) - y) ** 2))
    model.fit(data, y, epochs=40, batch_size=128, verbose=0)
    after = float(np.mean((predict(model, data, clip_max=100.0) - y) ** 2))
    assert after < 0.1 * before and after < 0.5


def test_a_padded_last_batch_has_the_full_size_and_its_padding_weighs_nothing():
    inputs, y = make_data(10, seed=0)
    batches = ArrayBatches(inputs, y, 4, seed=3, pad_last=True)
    shapes = [batches[i][0]["sequence"].shape[0] for i in range(len(batches))]
    weights = np.concatenate([batches[i][2] for i in range(len(batches))])
    assert shapes == [4, 4, 4]
    assert weights.sum() == 10
    real_rows = np.concatenate([batches.batch_positions(i)[batches.batch_weights(i) > 0] for i in range(3)])
    np.testing.assert_array_equal(np.sort(real_rows), np.arange(10))


def test_training_on_padded_batches_equals_training_on_the_short_last_batch(tmp_path):
    train, val = make_data(203, seed=0), make_data(45, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=32, patience=0, seed=5)
    results, weights = {}, {}
    for pad in (True, False):
        model = build()
        batches = [
            ArrayBatches(*data, 32, shuffle=shuffle, seed=5, pad_last=pad)
            for data, shuffle in ((train, True), (val, False))
        ]
        results[pad] = train_model(model, batches[0], batches[1], cfg, tmp_path / str(pad), device=CPU_NO_JIT)
        weights[pad] = weights_of(model)
    for name in ("loss", "rmse", "val_loss", "val_rmse"):
        np.testing.assert_allclose(results[True].history[name], results[False].history[name], rtol=1e-5, err_msg=name)
    for padded, short in zip(weights[True], weights[False], strict=True):
        np.testing.assert_allclose(padded, short, atol=1e-5, rtol=1e-5)


def test_a_refit_from_the_selection_continues_its_network_and_a_refit_from_scratch_starts_afresh(tmp_path):
    from lake_helpers import write_lake

    from core.aggregate import aggregate
    from core.config import NestcastConfig
    from core.synthetic import generate
    from core.training import train_forecaster
    from core.windows import build_windows

    data = generate("tiny", seed=4)
    write_lake(tmp_path / "lake", data.sales, data.items, data.test, data.shops["shop_id"].tolist())
    config = NestcastConfig(data_dir=tmp_path / "lake").with_overrides(
        lookback=4, units=8, head_units=8, epochs=1, batch_size=256, sample_budget=4096, jit_compile="off"
    )
    aggregate(config)
    windows = build_windows(config, holdout_month=14).windows_dir
    selected = train_forecaster(config, windows, tmp_path / "select", stage="select")
    # A rate of 1e-12 leaves a refit where it started: the selection's network, or fresh weights.
    still = config.with_overrides(learning_rate=1e-12)
    warm = train_forecaster(still, windows, tmp_path / "warm", stage="refit", epochs=1,
                            start_from=selected.model_path)
    cold = train_forecaster(still, windows, tmp_path / "cold", stage="refit", epochs=1)
    chosen = weights_of(load_model(selected.model_path))
    for got, want in zip(weights_of(load_model(warm.model_path)), chosen, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert any(not np.allclose(got, want, atol=1e-3)
               for got, want in zip(weights_of(load_model(cold.model_path)), chosen, strict=True))
    assert json.loads((tmp_path / "warm" / "metadata.json").read_text())["started_from"] == selected.model_path
    assert json.loads((tmp_path / "cold" / "metadata.json").read_text())["started_from"] is None
    with pytest.raises(ValueError, match="only a refit starts from a trained network"):
        train_forecaster(config, windows, tmp_path / "bad", stage="select", start_from=selected.model_path)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")  # saved before any training step
def test_the_launch_head_alone_forecasts_new_items_and_survives_a_save_and_load(tmp_path):
    rng = np.random.default_rng(5)
    n = 64
    inputs, _ = make_data(n, 6)
    static = rng.uniform(0, 3, (n, len(HEAD))).astype("float32")
    new = rng.random(n) < 0.5
    static[:, HEAD.index(ITEM_IS_NEW)] = new
    data = {**inputs, "static": static, "month": rng.integers(0, 12, n).astype("int32")}
    model = build(n_static=len(HEAD), launch_head=True)
    before = predict(model, data, clip_min=-100.0, clip_max=100.0)

    def shifted(layer: str) -> np.ndarray:
        kernel, bias = model.get_layer(layer).get_weights()
        model.get_layer(layer).set_weights([kernel, bias + 7.0])
        out = predict(model, data, clip_min=-100.0, clip_max=100.0)
        model.get_layer(layer).set_weights([kernel, bias])
        return out

    launch_moved, main_moved = shifted("launch_count") - before, shifted("count") - before
    np.testing.assert_allclose(launch_moved[new], 7.0, rtol=1e-5)
    np.testing.assert_allclose(launch_moved[~new], 0.0, atol=1e-5)
    np.testing.assert_allclose(main_moved[~new], 7.0, rtol=1e-5)
    np.testing.assert_allclose(main_moved[new], 0.0, atol=1e-5)
    model.save(tmp_path / "model.keras")
    np.testing.assert_array_equal(predict(load_model(tmp_path / "model.keras"), data, clip_min=-100.0,
                                          clip_max=100.0), before)


def test_the_launch_gate_names_a_bad_column_and_a_static_input_without_the_launch_flag():
    with pytest.raises(ValueError, match="column must be an int >= 0, got -1"):
        LaunchGate(-1)
    with pytest.raises(ValueError, match=f"launch_head reads item_is_new .*{len(HEAD)} columns.*n_static=5"):
        build(n_static=5, launch_head=True)
