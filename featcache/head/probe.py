"""A converged linear probe: the linear head fit on all rows at once with L-BFGS until the gradient vanishes,
as Kornblith et al. (CVPR 2019) fit theirs; `solver='lbfgs'` chooses it instead of the Adam loop (fit.py).

Its objective is the Adam loop's for a linear head, so `l2` means the same in both: mean cross-entropy
of the standardised rows plus l2 * ||W||^2 (Keras' L2 penalty on the kernel). It is convex, so the fit
starts from zero and needs no seed. The weights go into the same Keras model, so runs, predict.py and
export.py treat both heads alike.
"""

from __future__ import annotations

import numpy as np

from ..settings import HeadConfig
from .rows import TrainingData

MAX_ITERATIONS = 1000  # L-BFGS iterations at most
GRADIENT_TOLERANCE = 1e-5  # stop when every gradient component is below this (scipy's pgtol)
PROGRESS_EVERY = 10  # iterations between progress lines


def fit_lbfgs(model, config: HeadConfig, data: TrainingData, classes: int, log=None) -> tuple[dict, int, bool]:
    """Fit `model`'s softmax layer (after its standardisation) to convergence: (history per iteration, iterations,
    whether L-BFGS met its convergence test rather than its iteration limit). `log`, when given, gets a line every
    PROGRESS_EVERY iterations with the current loss."""
    import tensorflow as tf
    from scipy.optimize import minimize

    layer = model.get_layer("classes")
    x, y, mean, scale = data.tensors()
    dim = int(x.shape[1])
    size = dim * classes

    @tf.function(input_signature=[tf.TensorSpec([size + classes], tf.float32)])
    def evaluate(theta):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            w, b = tf.reshape(theta[:size], (dim, classes)), theta[size:]
            kernel = w * scale[:, None]  # the standardisation folded in: ((x - m) s) @ W + b
            logits = tf.matmul(x, kernel) + (b - tf.linalg.matvec(kernel, mean, transpose_a=True))
            entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            loss = entropy + config.l2 * tf.reduce_sum(w * w)
        hits = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), y), tf.float32))
        return loss, tape.gradient(loss, theta), entropy, hits

    last, history = {}, {"loss": [], "cross_entropy": [], "accuracy": []}

    def objective(theta):
        loss, gradient, entropy, hits = evaluate(tf.constant(theta, tf.float32))
        last.update(loss=float(loss), cross_entropy=float(entropy), accuracy=float(hits))
        return float(loss), gradient.numpy().astype(np.float64)

    def record(*_):
        for name in history:
            history[name].append(last[name])
        done = len(history["loss"])
        if log and done % PROGRESS_EVERY == 0:
            log(f"L-BFGS iteration {done}: loss {last['loss']:.4f}  cross_entropy {last['cross_entropy']:.4f}  "
                f"accuracy {last['accuracy']:.4f}")

    result = minimize(objective, np.zeros(size + classes), jac=True, method="L-BFGS-B", callback=record,
                      options={"maxiter": MAX_ITERATIONS, "gtol": GRADIENT_TOLERANCE})
    if not history["loss"]:
        record()
    layer.kernel.assign(result.x[:size].reshape(dim, classes).astype(np.float32))
    layer.bias.assign(result.x[size:].astype(np.float32))
    return history, int(result.nit), bool(result.success)
