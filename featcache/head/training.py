"""Training and scoring a head: fit (fit.py's Adam loop, or probe.py's L-BFGS) on the rows (rows.py), refuse a
diverged fit, predict with TTA, score; and the L2 sweep on a validation split."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from ..cache.read import Features
from ..errors import UserError
from ..memory import shared_tensor
from ..settings import SWEEP_VAL_SPLIT, HeadConfig
from .fit import SCORE_EPSILON, Fitter
from .model import build_model
from .probe import fit_lbfgs
from .rows import TrainingData, training_data


def predict(model, features: Features, views: tuple[str, ...], batch_size: int = 8192) -> np.ndarray:
    """Class probabilities: the mean over `views` (test-time augmentation when there are several)."""

    def probabilities(x):
        x = shared_tensor(x)  # batches sliced from one shared tensor, not each converted from numpy
        return np.concatenate([np.asarray(model(x[i : i + batch_size], training=False))
                               for i in range(0, len(x), batch_size)])

    return np.mean([probabilities(features.views[v]) for v in views], axis=0)


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


def train(train_features: Features, test_features: Features | None, config: HeadConfig, log=None,
          data: TrainingData | None = None) -> TrainedHead:
    """Fit the head (optionally holding out a validation split) and score it.

    Every random choice is seeded from `config.seed` alone (initialisers, dropout, batches), so the
    same config gives the same head without touching process-wide random state.

    Validation accuracy per epoch (curves.png) and at the end (metrics.json) is computed the same
    way, averaged over the test-time views. `data` (see `training_data`) lets runs on the same rows share them.
    `log`, when given, gets a progress line per epoch (or every few L-BFGS iterations) with the current loss.
    """
    import tensorflow as tf

    data = training_data(train_features, config, reuse=data)
    classes = len(train_features.class_names)
    started = time.perf_counter()
    bf16, solver = False, config.solver
    try:
        model = build_model(data.x.shape[1], config, data.mean, data.variance, classes)
        if solver == "lbfgs":
            history, iterations, converged = fit_lbfgs(model, config, data, classes, log)
            length = {"iterations": iterations, "converged": converged}
            if data.val is not None:
                val = score(predict(model, data.val, config.tta_view_list), data.val.labels)
                history.update(val_accuracy=[val["accuracy"]], val_loss=[val["loss"]])
        else:
            fitter = Fitter(model, config, data, classes)
            history, untrained = _epochs(fitter, config, log)
            bf16 = fitter.bf16
            length = {"epochs": config.epochs, "batch_size": fitter.batch}
    except tf.errors.ResourceExhaustedError:
        batch = f", `batch_size` {config.batch_for(len(data.y))}" if solver == "adam" else ""
        sizes = f"`hidden` {config.hidden}{batch}"
        raise UserError(f"the head does not fit in memory ({sizes}, {len(data.y)} rows); choose smaller ones; "
                        "nothing was recorded") from None
    if solver == "adam":
        _refuse_divergence(history, config, classes, untrained)
    fit_seconds = time.perf_counter() - started
    metrics = {"fit_seconds": fit_seconds, "rows": int(len(data.y)), "train_images": data.images,
               "compute": "bf16" if bf16 else "f32", "solver": solver, **length}
    if data.val is not None:
        metrics.update(val_accuracy=history["val_accuracy"][-1], val_loss=history["val_loss"][-1])
    test_probs = None
    if test_features is not None:
        test_probs = predict(model, test_features, config.tta_view_list)
        if not np.isfinite(test_probs).all():
            raise UserError(f"the trained head predicts NaN/Inf (try a lower `lr` than {config.lr:g}); "
                            "nothing was recorded")
        test = score(test_probs, test_features.labels)
        metrics.update(test_accuracy=test["accuracy"], test_loss=test["loss"])
    return TrainedHead(model, history, fit_seconds, metrics, train_features.class_names, test_probs)


def _epochs(fitter: Fitter, config: HeadConfig, log=None) -> tuple[dict, float]:
    """Run the epochs (stopping at a non-finite loss): the history, and the untrained head's cross-entropy."""
    history: dict[str, list[float]] = {}
    untrained = float(fitter.untrained())
    for epoch in range(config.epochs):
        results = {name: float(value) for name, value in fitter.epoch(epoch).items()}
        for name, value in results.items():
            history.setdefault(name, []).append(value)
        if log:
            log(f"epoch {epoch + 1}/{config.epochs}: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
        if not np.isfinite(results["loss"]):
            break
    return history, untrained


def _refuse_divergence(history: dict, config: HeadConfig, classes: int, untrained: float):
    """A fit that left the finite numbers (the epoch loop has stopped it), or that ended with a training
    cross-entropy more than twice that of the untrained head and of guessing uniformly (ln K), is no
    result. A fit that learnt ends below both, even under a heavy penalty (a zero head scores ln K); a
    short fit on few rows stays near the untrained value; a far too high `lr` ends orders of magnitude above."""
    losses, entropy = history["loss"], history["cross_entropy"]
    hint = f"(try a lower `lr` than {config.lr:g}); nothing was recorded"
    if len(losses) < config.epochs or not np.isfinite(losses).all():
        epoch = next((i + 1 for i, v in enumerate(losses) if not np.isfinite(v)), len(losses))
        raise UserError(f"training diverged: the loss became NaN/Inf in epoch {epoch} of {config.epochs} {hint}")
    limit = 2 * max(np.log(classes), untrained)
    if entropy[-1] > limit:
        raise UserError(f"training diverged: the training cross-entropy ended at {entropy[-1]:.4g}, above {limit:.2f} "
                        f"(twice that of the untrained head or of guessing uniformly) {hint}")


SWEEP_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def sweep_l2(train_features: Features, config: HeadConfig, grid=SWEEP_GRID, log=None) -> tuple[float, list[dict]]:
    """Pick the L2 strength on a validation split carved from train: a coarse log grid, then
    half-decade steps around the best (Kornblith et al. / CLIP style). Test data is never seen.
    `log`: each fit's progress lines, then its result, as each strength is tried."""
    config = replace(config, val_split=config.val_split or SWEEP_VAL_SPLIT)
    data = training_data(train_features, config)
    tried: dict[float, dict] = {}

    def evaluate(l2):
        if l2 not in tried:
            fit_log = log and (lambda line: log(f"l2 {l2:g}: {line}"))
            metrics = train(train_features, None, replace(config, l2=l2), log=fit_log, data=data).metrics
            tried[l2] = {"l2": l2, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics.get("val_loss")}
            if log:
                log(f"l2 {l2:<8g} val accuracy {metrics['val_accuracy']:.4f}")

    def best_l2():  # ties (common on small validation splits) go to the lower validation loss
        return max(tried, key=lambda l2: (tried[l2]["val_accuracy"], -tried[l2]["val_loss"]))

    for l2 in grid:
        evaluate(l2)
    best = best_l2()
    for l2 in (best / 10**0.5, best * 10**0.5):
        evaluate(float(f"{l2:.3g}"))
    best = best_l2()
    return best, [tried[l2] for l2 in sorted(tried)]
