"""The head's fit loop: TensorFlow graphs of Adam steps on contiguous slices of shuffled rows.

It trains the Keras model's own weights (the saved head stays Keras) but not with Keras' fit:
tests check it against Keras' fit step for step.
"""

from __future__ import annotations

import numpy as np

from ..settings import HeadConfig
from .rows import TrainingData

SCORE_EPSILON = 1e-7  # probabilities are clipped to [this, 1] for the log loss
# Multiply-adds of the first layer's forward products in one call of the steps graph. An epoch runs in calls of as
# many steps as fit in this, so that Python (Ctrl-C, SIGTERM) gets control a few times a second even with a wide
# hidden layer, while a linear head's epoch stays one call.
WORK_PER_CALL = 4e9


def steps_per_call(batch: int, dim: int, units: int) -> int:
    """Training steps per graph call for batches of `batch` rows of `dim` features into a first layer of `units`."""
    return max(1, int(WORK_PER_CALL // (batch * dim * units)))


class Fitter:
    """The training loop in TensorFlow graphs: data resident as one tensor in a seeded random row order, each
    step a contiguous slice of it (batches visited in a new order each epoch), Adam steps, running loss and
    accuracy; an epoch is one graph call, or several of `per_call` steps each for a large head."""

    BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7  # Keras' Adam defaults

    def __init__(self, model, config: HeadConfig, data: TrainingData, classes: int):
        import keras
        import tensorflow as tf

        self.model, self.config, self.classes = model, config, classes
        self.n, self.batch = len(data.y), config.batch_for(len(data.y))
        self.steps = int(np.ceil(self.n / self.batch))
        self.x, self.y, self.mean, self.scale = data.tensors()
        self.val = None
        if data.val is not None:  # scored in the epoch's graph, each of its views as `predict` would
            self.val = ([tf.constant(data.val.views[v], tf.float32) for v in config.tta_view_list],
                        tf.constant(data.val.labels.astype(np.int32)))
        # The model's layers after its standardize layer, which the loop folds into the first one.
        layers = [layer for layer in model.layers
                  if not isinstance(layer, (keras.layers.InputLayer, keras.layers.Normalization))]
        dense = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Dense)]
        self.leading = layers[: dense[0]]  # a dropout on the standardised input (no hidden layer)
        self.first, self.last = layers[dense[0]], layers[-1]
        self.bf16 = config.resolved_compute() == "bf16"
        # Scale the kernel (units x dim) or a batch (rows x dim); a batch when dropout comes between the two.
        self.fold = self.first.units < self.batch and not self.leading
        self.middle = layers[dense[0] + 1 : -1]
        assert self.last.activation is keras.activations.softmax, "the loop trains on the last layer's logits"
        self.variables = model.trainable_variables
        self.moments = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in self.variables]
        self.iterations = tf.Variable(0, dtype=tf.int64)
        self.per_call = steps_per_call(self.batch, int(data.x.shape[1]), self.first.units)
        # autograph=False: the loop is an explicit tf.while_loop; converting the Python took most of the tracing time
        i32, f32 = tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32)
        self._steps = tf.function(self._steps_graph, input_signature=[i32] * 3 + [f32, f32, i32], autograph=False)
        self.untrained = tf.function(self._untrained_graph, autograph=False)
        self._results = tf.function(self._results_graph, input_signature=[f32, f32, i32], autograph=False)

    def _logits(self, x, training: bool):
        """The model up to its softmax on raw rows.

        When the first layer's kernel is smaller than a batch (a linear head), the standardisation is
        folded into it: ((x - m) * s) @ W + b == x @ (s W) + (b - (m s) @ W), so a batch is never
        copied into a standardised one, and the kernel goes in transposed, so that its gradient is
        dz^T @ x rather than x^T @ dz (faster per step for a few columns). A wide hidden
        layer standardises the batch instead. Training steps take the first product in bf16 when
        `compute` says so; scoring stays f32, as the saved head.
        """
        import tensorflow as tf

        if self.fold:
            kernel = self.first.kernel * self.scale[:, None]
            bias = self.first.bias - tf.linalg.matvec(kernel, self.mean, transpose_a=True)
        else:
            x, kernel, bias = (x - self.mean) * self.scale, self.first.kernel, self.first.bias
            for layer in self.leading:
                x = layer(x, training=training)
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

    def epoch(self, number: int) -> dict:
        """One pass over the rows: loss, accuracy, cross-entropy (and the validation scores)."""
        import tensorflow as tf

        sums = (tf.constant(0.0), tf.constant(0.0), tf.constant(0))
        for first in range(0, self.steps, self.per_call):
            sums = self.run_steps(number, first, min(first + self.per_call, self.steps), sums)
        return self._results(*sums)

    def run_steps(self, number: int, first: int, stop: int, sums: tuple) -> tuple:
        """Steps `first` to `stop` (exclusive) of epoch `number`, in one graph call: the running sums updated."""
        return self._steps(number, first, stop, *sums)

    def _untrained_graph(self):
        """The data cross-entropy of the head as initialised, on an evenly spaced sample of the rows."""
        import tensorflow as tf

        sample = tf.range(0, self.n, max(1, self.n // 4096))
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.gather(self.y, sample), self._logits(tf.gather(self.x, sample), training=False)))

    def _steps_graph(self, number, first, stop, loss_sum, entropy_sum, correct):
        import tensorflow as tf

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
            lambda index, *_: index < stop, step, (first, loss_sum, entropy_sum, correct))
        return loss_sum, entropy_sum, correct

    def _results_graph(self, loss_sum, entropy_sum, correct):
        import tensorflow as tf

        results = {"loss": loss_sum / self.n, "accuracy": tf.cast(correct, tf.float32) / self.n,
                   "cross_entropy": entropy_sum / self.n}
        if self.val is not None:
            views, labels = self.val
            probs = tf.add_n([tf.nn.softmax(self._logits(view, training=False)) for view in views]) / len(views)
            truth = tf.gather(probs, labels, batch_dims=1)
            results["val_loss"] = -tf.reduce_mean(tf.math.log(tf.clip_by_value(truth, SCORE_EPSILON, 1.0)))
            hits = tf.equal(tf.argmax(probs, 1, output_type=tf.int32), labels)
            results["val_accuracy"] = tf.reduce_mean(tf.cast(hits, tf.float32))
        return results
