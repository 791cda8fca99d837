"""Stage 2: a small Keras classifier trained on cached embeddings (seconds, not hours).

The head standardises features with statistics of its training rows (a Normalization
layer, so they are saved inside the .keras file), optionally passes them through one
hidden ReLU layer, and ends in a softmax over the cache's classes. Flip views add training rows, and at
test time the probabilities of both views can be averaged (TTA).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from .cpu import native_bf16
from .errors import UserError
from .memory import fresh_array, shared_tensor


SCHEDULES = ("cosine", "constant")
COMPUTES = ("auto", "f32", "bf16")


@dataclass
class HeadConfig:
    # Defaults chosen on a 10% validation split of the real cached train features (README).
    epochs: int = 5
    lr: float = 1e-2
    batch_size: int = 2048
    l2: float = 1e-3
    label_smoothing: float = 0.0
    hidden: int = 0
    dropout: float = 0.0
    schedule: str = "cosine"  # or "constant"
    flip_train: bool = True
    tta: bool = True
    val_split: float = 0.0
    seed: int = 0
    compute: str = "auto"  # number format of the first layer's products in training steps; see resolved_compute

    def resolved_compute(self) -> str:
        """bf16 when asked, or by default for a hidden layer on a CPU with native bf16 products (the fit
        of the README's hidden-layer recipe is compute-bound: measured 1.5-1.7x faster, same accuracy).
        A linear head is memory-bound (bf16 would only add casts), and GPUs get f32 unless asked."""
        if self.compute != "auto":
            return self.compute
        import tensorflow as tf

        return "bf16" if self.hidden and native_bf16() and not tf.config.list_physical_devices("GPU") else "f32"

    def check(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.compute not in COMPUTES:
            raise UserError(f"--compute must be one of {', '.join(COMPUTES)}, got {self.compute!r}")
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if not 0.0 <= self.val_split < 1.0:
            raise UserError(f"--val-split must be in [0, 1), got {self.val_split}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name in ("lr", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.l2 < 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise UserError("--l2 must be >= 0 and --label-smoothing in [0, 1)")

    def for_cached_views(self, views: str) -> "HeadConfig":
        """The config a cache of `views` can serve: a plain-view cache has no flips to train or average on."""
        return replace(self, flip_train=False, tta=False) if views == "plain" else self

    def views_needed(self) -> tuple[str, ...]:
        return ("plain", "flip") if self.flip_train or self.tta else ("plain",)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Features:
    """Cached embeddings of one split, per view, with labels and the names of all classes."""

    views: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]


def split_validation(train: Features, fraction: float, seed: int) -> tuple[np.ndarray | None, Features | None]:
    """Hold out whole images (all their views), chosen by a seeded permutation: the indices of the
    images left to fit on (None: all of them) and a copy of the held-out ones."""
    if fraction <= 0:
        return None, None
    n = len(train.labels)
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise UserError(f"--val-split {fraction} leaves no rows to train or validate on ({n} images)")
    val_idx = np.sort(order[:n_val])
    val = Features({v: x[val_idx] for v, x in train.views.items()}, train.labels[val_idx], train.class_names)
    return np.sort(order[n_val:]), val


@dataclass
class TrainingData:
    """What a fit reads, made once per validation split, seed and flip setting (a grid's runs share it)."""

    source: Features  # held, not its id: an id is reused once its object is freed
    settings: tuple
    x: np.ndarray
    y: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    images: int
    val: Features | None

    @staticmethod
    def settings_of(config: HeadConfig) -> tuple:
        return config.val_split, config.seed, config.flip_train


def training_data(features: Features, config: HeadConfig, reuse: TrainingData | None = None) -> TrainingData:
    """The validation split and the shuffled training rows with their column statistics; `reuse`
    (an earlier run's, on the same features) when it was made for the same split, seed and flips."""
    settings = TrainingData.settings_of(config)
    if reuse is not None and reuse.source is features and reuse.settings == settings:
        return reuse
    images, val = split_validation(features, config.val_split, config.seed)
    x, y = training_rows(features, config.flip_train, config.seed, images)
    mean, variance = column_stats(x)
    return TrainingData(features, settings, x, y, mean, variance + 1e-6,
                        len(features.labels) if images is None else len(images), val)


def build_model(dim: int, config: HeadConfig, mean: np.ndarray, variance: np.ndarray, classes: int):
    """The head as saved: embedding -> standardize -> [hidden ReLU] -> [dropout] -> softmax."""
    import keras

    def dense(units, activation, name, seed):  # seeded here: no process-wide random state is touched
        return keras.layers.Dense(units, activation=activation, name=name,
                                  kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                                  kernel_regularizer=keras.regularizers.l2(config.l2) if config.l2 else None)

    layers = []
    if config.hidden:
        layers.append(dense(config.hidden, "relu", "hidden", config.seed))
    if config.dropout:
        layers.append(keras.layers.Dropout(config.dropout, seed=config.seed))
    layers.append(dense(classes, "softmax", "classes", config.seed + 1))

    inputs = keras.Input(shape=(dim,), name="embedding")
    x = keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name="standardize")(inputs)
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name="head")


class _Fitter:
    """The whole training loop in one TensorFlow graph per epoch: data resident as one tensor in a
    seeded random row order, each step a contiguous slice of it (batches visited in a new order each
    epoch), Adam steps, running loss and accuracy.

    Measured on the real default cache (README "Stage 2 speed"): Keras' fit loop took 2.3x as long
    for a head this small, and gathering each batch from a per-epoch row permutation 1.7x as long per
    step as a slice. The model and the .keras file stay Keras; the loop works on its layers' weights.
    """

    BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7  # Keras' Adam defaults

    def __init__(self, model, config: HeadConfig, data: TrainingData, classes: int):
        import keras
        import tensorflow as tf

        self.model, self.config, self.classes = model, config, classes
        self.n, self.batch = len(data.y), config.batch_size
        self.steps = int(np.ceil(self.n / self.batch))
        self.x, self.y = shared_tensor(data.x), tf.constant(data.y.astype(np.int32))
        self.val = None
        if data.val is not None:  # scored in the epoch's graph, each of its views as `predict` would
            self.val = ([tf.constant(data.val.views[v], tf.float32) for v in scored_views(config.tta)],
                        tf.constant(data.val.labels.astype(np.int32)))
        self.mean, self.scale = tf.constant(data.mean), tf.constant(1.0 / np.sqrt(data.variance))
        # The model's layers after its standardize layer, which the loop folds into the first one.
        layers = [layer for layer in model.layers
                  if not isinstance(layer, (keras.layers.InputLayer, keras.layers.Normalization))]
        self.first, self.last = layers[0], layers[-1]
        self.bf16 = config.resolved_compute() == "bf16"
        self.fold = self.first.units < self.batch  # scale the kernel (units x dim) or a batch (rows x dim)
        self.middle = layers[1:-1]
        assert self.last.activation is keras.activations.softmax, "the loop trains on the last layer's logits"
        self.variables = model.trainable_variables
        self.moments = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in self.variables]
        self.iterations = tf.Variable(0, dtype=tf.int64)
        # autograph=False: the loop is an explicit tf.while_loop; converting the Python took most of the tracing time
        self.epoch = tf.function(self._epoch, input_signature=[tf.TensorSpec([], tf.int32)], autograph=False)

    def _logits(self, x, training: bool):
        """The model up to its softmax on raw rows.

        When the first layer's kernel is smaller than a batch (a linear head), the standardisation is
        folded into it: ((x - m) * s) @ W + b == x @ (s W) + (b - (m s) @ W), so a batch is never
        copied into a standardised one, and the kernel goes in transposed, so that its gradient is
        dz^T @ x rather than x^T @ dz (for 10 columns measured ~25% faster per step). A wide hidden
        layer standardises the batch instead. Training steps take the first product in bf16 when
        `compute` says so; scoring stays f32, as the saved head.
        """
        import tensorflow as tf

        if self.fold:
            kernel = self.first.kernel * self.scale[:, None]
            bias = self.first.bias - tf.linalg.matvec(kernel, self.mean, transpose_a=True)
        else:
            x, kernel, bias = (x - self.mean) * self.scale, self.first.kernel, self.first.bias
        if training and self.bf16:
            z = tf.cast(tf.matmul(tf.cast(x, tf.bfloat16), tf.cast(kernel, tf.bfloat16)), tf.float32) + bias
        elif self.fold:
            z = tf.matmul(x, tf.transpose(kernel), transpose_b=True) + bias
        else:
            z = tf.matmul(x, kernel) + bias
        if self.first is self.last:
            return z
        z = self.first.activation(z)
        for layer in self.middle:
            z = layer(z, training=training)
        return tf.matmul(z, self.last.kernel) + self.last.bias

    def _learning_rate(self):
        import tensorflow as tf

        if self.config.schedule == "constant":
            return tf.constant(self.config.lr)
        done = tf.minimum(tf.cast(self.iterations, tf.float32) / (self.config.epochs * self.steps), 1.0)
        return self.config.lr * 0.5 * (1.0 + tf.cos(np.pi * done))  # Keras' CosineDecay to 0

    def _adam(self, gradients):
        import tensorflow as tf

        lr = self._learning_rate()
        self.iterations.assign_add(1)
        t = tf.cast(self.iterations, tf.float32)
        for variable, gradient, (m, v) in zip(self.variables, gradients, self.moments):
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=m.handle, v=v.handle, beta1_power=self.BETA_1 ** t,
                beta2_power=self.BETA_2 ** t, lr=lr, beta1=self.BETA_1, beta2=self.BETA_2,
                epsilon=self.EPSILON, grad=gradient)

    def _epoch(self, number):
        """One pass over the rows. The first epoch also returns ("before") the data cross-entropy of the
        head as initialised, on an evenly spaced sample of the rows; later ones return NaN there."""
        import tensorflow as tf

        def untrained():
            sample = tf.range(0, self.n, max(1, self.n // 4096))
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.gather(self.y, sample), self._logits(tf.gather(self.x, sample), training=False)))

        before = tf.cond(number == 0, untrained, lambda: tf.constant(np.nan, tf.float32))
        order = tf.argsort(tf.random.stateless_uniform([self.steps], seed=tf.stack([self.config.seed, number])))
        smoothing = self.config.label_smoothing

        def step(index, loss_sum, entropy_sum, correct):
            start = order[index] * self.batch
            labels = self.y[start : start + self.batch]
            with tf.GradientTape() as tape:
                logits = self._logits(self.x[start : start + self.batch], training=True)
                entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)  # per row
                if smoothing:
                    targets = tf.one_hot(labels, self.classes) * (1 - smoothing) + smoothing / self.classes
                    loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))
                else:
                    loss = tf.reduce_mean(entropy)
                if self.model.losses:
                    loss += tf.add_n(self.model.losses)
            self._adam(tape.gradient(loss, self.variables))
            hits = tf.equal(tf.argmax(logits, 1, output_type=tf.int32), labels)
            return (index + 1, loss_sum + loss * tf.cast(tf.shape(labels)[0], tf.float32),
                    entropy_sum + tf.reduce_sum(entropy), correct + tf.reduce_sum(tf.cast(hits, tf.int32)))

        _, loss_sum, entropy_sum, correct = tf.while_loop(
            lambda index, *_: index < self.steps, step,
            (tf.constant(0), tf.constant(0.0), tf.constant(0.0), tf.constant(0)))
        results = {"loss": loss_sum / self.n, "accuracy": tf.cast(correct, tf.float32) / self.n,
                   "cross_entropy": entropy_sum / self.n, "before": before}
        if self.val is not None:
            views, labels = self.val
            probs = tf.add_n([tf.nn.softmax(self._logits(view, training=False)) for view in views]) / len(views)
            truth = tf.gather(probs, labels, batch_dims=1)
            results["val_loss"] = -tf.reduce_mean(tf.math.log(tf.clip_by_value(truth, SCORE_EPSILON, 1.0)))
            hits = tf.equal(tf.argmax(probs, 1, output_type=tf.int32), labels)
            results["val_accuracy"] = tf.reduce_mean(tf.cast(hits, tf.float32))
        return results


def training_rows(features: Features, flip: bool, seed: int,
                  images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `images` (default: all; the flip view's as extra rows) in a seeded random order,
    in a buffer TensorFlow can share: the fit loop then takes its batches as contiguous slices."""
    views = [features.views[v] for v in (("plain", "flip") if flip else ("plain",))]
    count = len(features.labels) if images is None else len(images)
    n = count * len(views)
    x, y = fresh_array((n, views[0].shape[1]), np.float32), np.empty(n, np.int32)
    place = np.random.default_rng(seed).permutation(n).reshape(len(views), count)  # where each row goes
    chunk = 4096  # rows of a view copied at a time: no temporary the size of the view
    for view, places in zip(views, place):
        for start in range(0, count, chunk):
            here = places[start : start + chunk]
            rows = slice(start, start + chunk) if images is None else images[start : start + chunk]
            x[here], y[here] = view[rows], features.labels[rows]
    return x, y


def column_stats(x: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each column: float32 sums over chunks of rows, added up in float64.
    No temporary the size of `x` (numpy's var of the default 512 MB rows: 1.3 s here; this: 0.03 s)."""
    total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        rows = x[start : start + chunk]
        total += rows.sum(0)
        squares += np.einsum("ij,ij->j", rows, rows)
    mean = total / len(x)
    return mean.astype(np.float32), np.maximum(squares / len(x) - mean**2, 0).astype(np.float32)


def scored_views(tta: bool) -> tuple[str, ...]:
    return ("plain", "flip") if tta else ("plain",)


def predict(model, features: Features, tta: bool, batch_size: int = 8192) -> np.ndarray:
    """Class probabilities; with TTA, the mean over the plain and flipped views."""
    views = scored_views(tta)

    def probabilities(x):
        x = shared_tensor(x)  # batches sliced from a tensor: 0.024 s vs 0.045 s for the default test rows here
        return np.concatenate([np.asarray(model(x[i : i + batch_size], training=False))
                               for i in range(0, len(x), batch_size)])

    return np.mean([probabilities(features.views[v]) for v in views], axis=0)


SCORE_EPSILON = 1e-7  # probabilities are clipped to [this, 1] for the log loss


def score(probs: np.ndarray, labels: np.ndarray) -> dict:
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], SCORE_EPSILON, 1.0))))
    return {"accuracy": float(np.mean(probs.argmax(1) == labels)), "loss": loss}


@dataclass
class TrainedHead:
    model: object
    history: dict
    fit_seconds: float
    metrics: dict
    class_names: tuple[str, ...]
    test_probs: np.ndarray | None = None


def train(train_features: Features, test_features: Features | None, config: HeadConfig, verbose: int = 0,
          data: TrainingData | None = None) -> TrainedHead:
    """Fit the head (optionally holding out a validation split) and score it.

    Every random choice is seeded from `config.seed` alone (initialisers, dropout, batches), so the
    same config gives the same head without touching process-wide random state.

    Validation accuracy per epoch (curves.png) and at the end (metrics.json) is computed the same
    way, with TTA when TTA is on. `data` (see `training_data`) lets runs on the same rows share them.
    """
    import tensorflow as tf

    config.check()
    data = training_data(train_features, config, reuse=data)
    classes = len(train_features.class_names)
    model = build_model(data.x.shape[1], config, data.mean, data.variance, classes)
    started = time.perf_counter()
    fitter = _Fitter(model, config, data, classes)
    history: dict[str, list[float]] = {}
    for epoch in range(config.epochs):
        results = {name: float(value) for name, value in fitter.epoch(tf.constant(epoch, tf.int32)).items()}
        before = results.pop("before")
        if epoch == 0:
            untrained = before
        loss = results["loss"]
        for name, value in results.items():
            history.setdefault(name, []).append(value)
        if verbose:
            print(f"epoch {epoch + 1}/{config.epochs}: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
        if not np.isfinite(loss):
            break
    fit_seconds = time.perf_counter() - started
    _refuse_divergence(history, config, classes, untrained)
    metrics = {"fit_seconds": fit_seconds, "epochs": config.epochs, "rows": int(len(data.y)),
               "train_images": data.images, "compute": "bf16" if fitter.bf16 else "f32"}
    if data.val is not None:
        metrics.update(val_accuracy=history["val_accuracy"][-1], val_loss=history["val_loss"][-1])
    test_probs = None
    if test_features is not None:
        test_probs = predict(model, test_features, config.tta)
        if not np.isfinite(test_probs).all():
            raise UserError(f"the trained head predicts NaN/Inf (try a lower --lr than {config.lr:g}); nothing was recorded")
        test = score(test_probs, test_features.labels)
        metrics.update(test_accuracy=test["accuracy"], test_loss=test["loss"])
    return TrainedHead(model, history, fit_seconds, metrics, train_features.class_names, test_probs)


def _refuse_divergence(history: dict, config: HeadConfig, classes: int, untrained: float):
    """A fit that left the finite numbers (the epoch loop has stopped it), or that ended with a training
    cross-entropy more than twice that of the untrained head and of guessing uniformly (ln K), is no
    result. A fit that learnt ends below both, even under a heavy penalty (a zero head scores ln K); a
    short fit on few rows stays near the untrained value; `--lr 1e6` on the default cache ends near 3e4."""
    losses, entropy = history["loss"], history["cross_entropy"]
    hint = f"(try a lower --lr than {config.lr:g}); nothing was recorded"
    if len(losses) < config.epochs or not np.isfinite(losses).all():
        epoch = next((i + 1 for i, v in enumerate(losses) if not np.isfinite(v)), len(losses))
        raise UserError(f"training diverged: the loss became NaN/Inf in epoch {epoch} of {config.epochs} {hint}")
    limit = 2 * max(np.log(classes), untrained)
    if entropy[-1] > limit:
        raise UserError(f"training diverged: the training cross-entropy ended at {entropy[-1]:.4g}, above {limit:.2f} "
                        f"(twice that of the untrained head or of guessing uniformly) {hint}")


SWEEP_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def sweep_l2(train_features: Features, config: HeadConfig, grid=SWEEP_GRID) -> tuple[float, list[dict]]:
    """Pick the L2 strength on a validation split carved from train: a coarse log grid, then
    half-decade steps around the best (Kornblith et al. / CLIP style). Test data is never seen."""
    config = replace(config, val_split=config.val_split or 0.2)
    data = training_data(train_features, config)
    tried: dict[float, dict] = {}

    def evaluate(l2):
        if l2 not in tried:
            metrics = train(train_features, None, replace(config, l2=l2), data=data).metrics
            tried[l2] = {"l2": l2, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics.get("val_loss")}

    def best_l2():
        return max(tried, key=lambda l2: tried[l2]["val_accuracy"])

    for l2 in grid:
        evaluate(l2)
    best = best_l2()
    for l2 in (best / 10**0.5, best * 10**0.5):
        evaluate(float(f"{l2:.3g}"))
    best = best_l2()
    return best, [tried[l2] for l2 in sorted(tried)]
