import numpy as np
import pytest

from featcache.errors import UserError
from featcache.cache.read import Features
from featcache.head.rows import split_validation
from featcache.head.training import train
from featcache.settings import HeadConfig


def blobs(n_per_class=60, dim=32, seed=0, spread=1.0):
    """Ten Gaussian clusters; the flip view is a slightly jittered copy."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, dim)) * 3 + 5  # offset and scale: standardisation matters
    labels = np.repeat(np.arange(10), n_per_class)
    plain = (centers[labels] + rng.normal(size=(len(labels), dim)) * spread).astype(np.float32)
    flip = (plain + rng.normal(size=plain.shape) * 0.1).astype(np.float32)
    return Features({"plain": plain, "flip": flip}, labels, tuple(f"class{i}" for i in range(10)))


def test_head_learns_a_separable_problem():
    trained = train(blobs(seed=0), blobs(n_per_class=20, seed=0),
                    HeadConfig(epochs=20, batch_size=64, lr=1e-2))
    assert trained.metrics["test_accuracy"] > 0.95
    assert trained.history["loss"][-1] < trained.history["loss"][0]
    assert trained.test_probs.shape == (200, 10)
    np.testing.assert_allclose(trained.test_probs.sum(1), 1.0, atol=1e-5)


def test_same_seed_same_result_other_seed_other_result():
    data, test = blobs(spread=3.0), blobs(n_per_class=20, seed=1, spread=3.0)
    config = dict(epochs=3, batch_size=64, hidden=16, dropout=0.2, val_split=0.2)
    a = train(data, test, HeadConfig(seed=3, **config))
    b = train(data, test, HeadConfig(seed=3, **config))
    c = train(data, test, HeadConfig(seed=4, **config))
    np.testing.assert_array_equal(a.test_probs, b.test_probs)
    assert a.metrics["val_accuracy"] == b.metrics["val_accuracy"]
    assert not np.array_equal(a.test_probs, c.test_probs)


def test_validation_split_holds_out_whole_images():
    data = blobs()
    images, val = split_validation(data, 0.25, seed=0)
    assert len(val.labels) == 150 and len(images) == 450
    fit_rows = {row.tobytes() for row in data.views["plain"][images]}
    assert not any(row.tobytes() in fit_rows for row in val.views["plain"])
    np.testing.assert_array_equal(val.views["flip"] - val.views["plain"] != 0, True)


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs must be a whole number in [1, 2147483647], got 0"),
    (dict(val_split=1.5), "val_split must be in [0, 1), got 1.5"),
    (dict(lr=0), "lr must be positive and finite, got 0"),
    (dict(lr=float("nan")), "lr must be positive and finite, got nan"),
    (dict(lr=float("inf")), "lr must be positive and finite, got inf"),
    (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (dict(batch_size=0), "batch_size must be a whole number in [1, 2147483647], got 0"),
    (dict(batch_size=10**20), f"batch_size must be a whole number in [1, 2147483647], got {10**20}"),
    (dict(l2=-1.0), "l2 must be >= 0 and finite, got -1.0"), (dict(l2=float("inf")), "l2 must be >= 0 and finite, got inf"),
    (dict(hidden=-3), "hidden must be a whole number in [0, 2147483647], got -3"),
    (dict(seed=2**63), f"seed must be a whole number in [0, 2147483647], got {2**63}"),
    (dict(epochs="5"), "epochs must be a whole number, got '5'"),
    (dict(epochs=2.5), "epochs must be a whole number, got 2.5"), (dict(tta_views=1), "tta_views must be a str, got 1"),
    (dict(train_views="plain,mirror"), "unknown view 'mirror' in train_views; choose from plain, flip, crop-tl, crop-tl-flip, crop-tr, "
     "crop-tr-flip, crop-bl, crop-bl-flip, crop-br, crop-br-flip, crop-c, crop-c-flip, crops, crops-flip"),
    (dict(solver="lbfgs", hidden=8), "solver='lbfgs' fits a linear head: it takes no hidden, dropout or label_smoothing"),
])
def test_bad_head_settings_are_refused_naming_the_parameter(bad, message):
    with pytest.raises(UserError) as caught:
        HeadConfig(**bad).check()  # where the settings enter: the API and train_head.py
    assert str(caught.value) == message


def test_tta_averages_the_probabilities_of_both_views():
    data = blobs(spread=2.5)
    test = blobs(n_per_class=20, spread=2.5)
    test.views["flip"] = test.views["plain"][::-1].copy()  # a different input per view
    trained = train(data, test, HeadConfig(epochs=2, batch_size=64, tta_views="plain,flip"))
    from featcache.head.training import predict
    plain = trained.model.predict(test.views["plain"], verbose=0)
    flip = trained.model.predict(test.views["flip"], verbose=0)
    np.testing.assert_allclose(trained.test_probs, (plain + flip) / 2, atol=1e-6)
    np.testing.assert_allclose(predict(trained.model, test, ("plain",)), plain, atol=1e-6)


def test_sweep_tries_a_coarse_grid_then_refines_around_the_best(monkeypatch):
    from featcache.head import training as head

    seen = []

    def fake_train(features, test, config, log=None, data=None):
        assert test is None, "the sweep must never see test data"
        seen.append(config.l2)
        score = -abs(np.log10(config.l2) + 3.4)  # best near 4e-4
        return head.TrainedHead(None, {}, 0.0, {"val_accuracy": 0.9 + score / 100, "val_loss": 0.5}, features.class_names)

    monkeypatch.setattr(head, "train", fake_train)
    best, table = head.sweep_l2(blobs(), HeadConfig())
    assert seen[:5] == list(head.SWEEP_GRID)
    assert len(seen) == 7 and best == pytest.approx(3.16e-4)
    assert [row["l2"] for row in table] == sorted(row["l2"] for row in table)


def test_sweep_on_real_training_prefers_weaker_penalty_on_easy_data():
    best, table = __import__("featcache.head.training", fromlist=["sweep_l2"]).sweep_l2(
        blobs(spread=1.5), HeadConfig(epochs=3, batch_size=64, lr=1e-2), grid=(1e-4, 10.0))
    accuracy = {row["l2"]: row["val_accuracy"] for row in table}
    assert accuracy[1e-4] > accuracy[10.0] and best < 1.0


def test_schedule_is_checked_by_the_config_itself():
    with pytest.raises(UserError, match="^schedule must be one of cosine, constant"):
        HeadConfig(schedule="linear").check()


def test_training_and_plotting_leave_process_wide_state_alone(tmp_path):
    """Seeds, op determinism and the plotting backend belong to the entry points, not to a fit."""
    import random

    import matplotlib
    import tensorflow as tf

    from featcache.head import plots

    backend = matplotlib.get_backend()

    def draws():
        return np.random.rand(), random.random(), float(tf.random.uniform([]))

    def seed_all():
        np.random.seed(7), random.seed(7), tf.random.set_seed(7)

    seed_all()
    expected = draws()
    seed_all()
    trained = train(blobs(), blobs(n_per_class=5, seed=1), HeadConfig(epochs=1, seed=3, hidden=4, dropout=0.1))
    plots.plot_history(trained.history, tmp_path / "curves.png")
    assert draws() == expected
    assert matplotlib.get_backend() == backend and (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("schedule, smoothing, hidden, dropout", [
    ("constant", 0.0, 0, 0.0),  # linear: the standardisation folded into the kernel
    ("cosine", 0.1, 8, 0.0),  # a narrow hidden layer: folded too
    ("cosine", 0.0, 128, 0.0),  # a hidden layer wider than a batch (the README's recipe): the batch is standardised
    ("cosine", 0.0, 0, 0.5),  # dropout on the standardised input of a linear head: the batch is standardised
])
def test_fit_loop_takes_the_steps_keras_takes(schedule, smoothing, hidden, dropout):
    """The loop's own Adam, learning-rate schedule, standardisation and loss on logits give the weights Keras'
    Adam gives the same model on the same batches: 4 batches an epoch (the last one short), in the loop's order."""
    import keras
    import tensorflow as tf

    from featcache.head.fit import Fitter
    from featcache.head.model import build_model
    from featcache.head.rows import training_data

    data = blobs(n_per_class=20, dim=16)
    config = HeadConfig(epochs=3, batch_size=64, lr=1e-2, l2=1e-3, label_smoothing=smoothing,
                        hidden=hidden, dropout=dropout, schedule=schedule, train_views="plain", tta_views="plain", compute="f32")
    rows = training_data(data, config)
    x, y, mean, variance = rows.x, rows.y, rows.mean, rows.variance
    steps = -(-len(y) // config.batch_size)
    assert steps == 4 and len(y) % config.batch_size
    ours = build_model(16, config, mean, variance, 10)
    theirs = build_model(16, config, mean, variance, 10)
    fitter = Fitter(ours, config, rows, 10)
    assert fitter.fold == (hidden < config.batch_size and not dropout)
    lr = (config.lr if schedule == "constant"
          else keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=config.epochs * steps))
    theirs.compile(keras.optimizers.Adam(lr), keras.losses.CategoricalCrossentropy(label_smoothing=smoothing))
    for epoch in range(config.epochs):
        fitter.epoch(np.int32(epoch))
        order = tf.argsort(tf.random.stateless_uniform([steps], seed=[config.seed, epoch])).numpy()
        for batch in order:  # the loop's batch order for this epoch
            rows_of = slice(batch * config.batch_size, (batch + 1) * config.batch_size)
            theirs.train_on_batch(x[rows_of], keras.ops.one_hot(y[rows_of], 10))
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    assert not np.allclose(ours.get_weights()[-1], build_model(16, config, mean, variance, 10).get_weights()[-1])


def test_training_rows_are_every_view_row_once_in_a_seeded_order():
    from featcache.head.rows import column_stats, training_rows

    data = blobs(n_per_class=7, dim=8)
    x, y = training_rows(data, ("plain", "flip"), seed=1)
    rows = np.concatenate([data.views["plain"], data.views["flip"]])
    labels = np.concatenate([data.labels, data.labels])
    assert sorted(map(bytes, x)) == sorted(map(bytes, rows))  # the same rows ...
    assert {bytes(r): l for r, l in zip(x, y)} == {bytes(r): l for r, l in zip(rows, labels)}  # ... and labels
    assert not np.array_equal(x, rows)  # ... shuffled, the same way for the same seed only
    np.testing.assert_array_equal(x, training_rows(data, ("plain", "flip"), seed=1)[0])
    assert not np.array_equal(x, training_rows(data, ("plain", "flip"), seed=2)[0])
    assert x.ctypes.data % 64 == 0  # TensorFlow shares it without a copy
    mean, variance = column_stats(x, chunk=5)
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(variance, rows.var(0), rtol=1e-4)


@pytest.mark.parametrize("tta", [("plain", "flip"), ("plain",)])
def test_validation_scores_are_those_of_the_saved_head(tta):
    """The loop scores the validation split in its own graph; the saved Keras head, asked the same
    way (with TTA when TTA is on), gives the same numbers."""
    from featcache.head.training import predict, score

    data = blobs(spread=4.0)
    data.views["flip"] = data.views["plain"] + np.random.default_rng(5).normal(size=data.views["plain"].shape) * 2
    trained = train(data, None, HeadConfig(epochs=2, batch_size=64, hidden=8, val_split=0.25, tta_views=",".join(tta)))
    _, val = split_validation(data, 0.25, seed=0)
    expected = score(predict(trained.model, val, tta), val.labels)
    assert trained.metrics["val_accuracy"] == pytest.approx(expected["accuracy"], abs=1 / len(val.labels))
    assert trained.metrics["val_loss"] == pytest.approx(expected["loss"], rel=1e-4)
    other = score(predict(trained.model, val, ("plain", "flip") if len(tta) == 1 else ("plain",)), val.labels)
    assert trained.metrics["val_loss"] != pytest.approx(other["loss"], rel=1e-4)


def test_runs_sharing_training_rows_match_runs_that_make_their_own():
    """A grid's runs share the split and shuffled rows when their split, seed and training views agree."""
    from dataclasses import replace

    from featcache.head.rows import training_data

    data, test = blobs(), blobs(n_per_class=10, seed=2)
    first = HeadConfig(epochs=2, batch_size=64, val_split=0.2)
    shared = training_data(data, first)
    other_lr = replace(first, lr=3e-3)
    assert training_data(data, other_lr, reuse=shared) is shared
    for differs in (dict(seed=1), dict(val_split=0.1), dict(train_views="plain")):
        assert training_data(data, replace(first, **differs), reuse=shared) is not shared
    assert training_data(blobs(), first, reuse=shared) is not shared  # other features
    np.testing.assert_array_equal(train(data, test, other_lr, data=shared).test_probs,
                                  train(data, test, other_lr).test_probs)
    assert shared.images == 480 and len(shared.val.labels) == 120 and len(shared.y) == 960


def test_bf16_products_are_a_training_choice_that_auto_makes_only_for_hidden_layers_on_native_bf16(monkeypatch):
    from featcache import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert HeadConfig(hidden=8).resolved_compute() == "bf16"
    assert HeadConfig(hidden=0).resolved_compute() == "f32"  # memory-bound: casts would only cost
    assert HeadConfig(hidden=8, compute="f32").resolved_compute() == "f32"
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert HeadConfig(hidden=8).resolved_compute() == "f32"
    assert HeadConfig(hidden=0, compute="bf16").resolved_compute() == "bf16"
    with pytest.raises(UserError, match="^compute must be one of auto, f32, bf16"):
        HeadConfig(compute="f16").check()

    data, test = blobs(seed=0), blobs(n_per_class=20, seed=0)
    runs = {compute: train(data, test, HeadConfig(epochs=20, batch_size=64, hidden=16, compute=compute))
            for compute in ("f32", "bf16")}
    assert {c: r.metrics["compute"] for c, r in runs.items()} == {"f32": "f32", "bf16": "bf16"}
    assert runs["bf16"].metrics["test_accuracy"] > 0.95
    assert not np.array_equal(runs["f32"].model.get_weights()[0], runs["bf16"].model.get_weights()[0])
    assert runs["bf16"].model.get_weights()[0].dtype == np.float32  # the saved head stays f32


def test_defaults_train_a_small_dataset_as_far_as_fifty_epochs_do():
    """1,500 images x 2 views: batches of 2,048 give five one-step epochs, which leave the head far from
    trained. The default batch follows the row count (32 steps an epoch), and five epochs end within a point
    of 50; so does the linear head fit to convergence (L-BFGS)."""
    data, test = blobs(n_per_class=150, dim=256, spread=10.0), blobs(n_per_class=100, dim=256, spread=10.0)
    default = train(data, test, HeadConfig())
    lbfgs = train(data, test, HeadConfig(solver="lbfgs"))
    fifty = train(data, test, HeadConfig(epochs=50))
    fixed = train(data, test, HeadConfig(batch_size=2048))
    assert default.metrics["batch_size"] == 94 and default.metrics["rows"] == 3000
    for result in (default, lbfgs):
        assert result.metrics["test_accuracy"] >= fifty.metrics["test_accuracy"] - 0.01
    assert fixed.metrics["test_accuracy"] < fifty.metrics["test_accuracy"] - 0.1


def test_auto_batch_size_keeps_the_cifar10_default_and_shrinks_for_small_datasets():
    from featcache.settings import auto_batch_size

    assert auto_batch_size(100_000) == auto_batch_size(65_536) == 2048  # the default CIFAR-10 fit, val split or not
    assert auto_batch_size(50_000) == 1563
    assert auto_batch_size(3_000) == 94
    assert auto_batch_size(100) == 16


def test_lbfgs_reaches_the_optimum_of_the_linear_objective():
    """At the L-BFGS head, the gradient of mean cross-entropy + l2 ||W||^2 (computed here in float64 from the
    saved model's weights) vanishes, and 200 Adam epochs on the same objective end no lower."""
    data = blobs(n_per_class=40, dim=16, spread=4.0)
    config = HeadConfig(solver="lbfgs", l2=1e-3, train_views="plain", tta_views="plain")
    trained = train(data, None, config)
    from featcache.head.rows import training_data

    rows = training_data(data, config)
    x, labels = rows.x.astype(np.float64), rows.y
    kernel, bias = [w.astype(np.float64) for w in trained.model.get_weights()]
    z = (x - rows.mean) / np.sqrt(rows.variance)

    def objective(kernel, bias):
        logits = z @ kernel + bias
        logits -= logits.max(1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        loss = -np.mean(np.log(probs[np.arange(len(x)), labels])) + 1e-3 * np.sum(kernel**2)
        probs[np.arange(len(x)), labels] -= 1
        return loss, z.T @ probs / len(x) + 2e-3 * kernel, probs.mean(0)

    loss, grad_kernel, grad_bias = objective(kernel, bias)
    assert np.abs(grad_kernel).max() < 1e-4 and np.abs(grad_bias).max() < 1e-4
    assert trained.history["loss"][-1] == pytest.approx(loss, rel=1e-5)
    adam = train(data, None, HeadConfig(epochs=200, batch_size=64, l2=1e-3, train_views="plain", tta_views="plain"))
    assert objective(*[w.astype(np.float64) for w in adam.model.get_weights()])[0] >= loss - 1e-6


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_a_head_too_large_for_memory_is_one_line_with_either_solver(monkeypatch, solver):
    import tensorflow as tf

    from featcache.head import training

    def out_of_memory(*_args, **_kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(training, "Fitter" if solver == "adam" else "fit_lbfgs", out_of_memory)
    with pytest.raises(UserError) as caught:
        train(blobs(n_per_class=5), None, HeadConfig(solver=solver, batch_size=16))
    batch = ", batch_size 16" if solver == "adam" else ""
    assert str(caught.value) == (f"the head does not fit in memory (hidden 0{batch}, 100 rows); choose smaller ones; "
                                 "nothing was recorded")


def test_a_wide_heads_epoch_runs_in_calls_of_few_steps_and_a_linear_heads_in_one():
    """Python sees Ctrl-C only between graph calls: the README's hidden-layer recipe (batch 512, 1280 features, 2048
    units) gets it every few steps, the default linear head (batch 2048, 10 classes, 49 steps) once an epoch."""
    from featcache.head.fit import steps_per_call

    assert steps_per_call(512, 1280, 2048) <= 3
    assert steps_per_call(2048, 1280, 1024) == 1
    assert steps_per_call(2048, 1280, 10) >= 49


@pytest.mark.parametrize("hidden, dropout", [(0, 0.0), (64, 0.3)])
def test_an_epoch_in_calls_of_one_step_gives_the_same_head_bit_for_bit(monkeypatch, hidden, dropout):
    from featcache.head import fit

    config = HeadConfig(epochs=3, batch_size=64, hidden=hidden, dropout=dropout, val_split=0.2, compute="f32")
    whole = train(blobs(), None, config)
    calls = []
    original = fit.Fitter.run_steps

    def counted(self, *args):
        calls.append(args[:3])
        return original(self, *args)

    monkeypatch.setattr(fit, "WORK_PER_CALL", 1.0)
    monkeypatch.setattr(fit.Fitter, "run_steps", counted)
    stepped = train(blobs(), None, config)
    assert calls[:3] == [(0, 0, 1), (0, 1, 2), (0, 2, 3)] and len(calls) == 3 * 15  # 960 rows / 64, three epochs
    assert stepped.history == whole.history
    for a, b in zip(stepped.model.get_weights(), whole.model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_a_fit_reports_its_progress_with_the_current_loss(solver):
    lines = []
    trained = train(blobs(n_per_class=40, dim=16, spread=4.0), None,
                    HeadConfig(solver=solver, epochs=3, batch_size=64), log=lines.append)
    if solver == "adam":
        assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
        assert lines[-1].startswith(f"epoch 3/3: loss {trained.history['loss'][-1]:.4f}  accuracy ")
    else:
        every = [f"L-BFGS iteration {i}" for i in range(10, len(trained.history["loss"]) + 1, 10)]
        assert [line.split(":")[0] for line in lines] == every and len(every) >= 2
        assert lines[-1].startswith(f"{every[-1]}: loss {trained.history['loss'][len(every) * 10 - 1]:.4f}  ")
