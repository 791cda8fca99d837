"""A head's training rows: the validation split (whole images held out), the rows of the images left,
shuffled once into a buffer TensorFlow shares, and their column statistics for standardisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cache.read import Features
from ..errors import UserError, plural
from ..memory import fresh_array, shared_tensor
from ..settings import FINAL_FEATURE, HeadConfig


def side_by_side(features: Features, names: tuple[str, ...]) -> Features:
    """The head's input rows of each view: the cached features `names` ("final": the network's output vector, else
    inner layers, read into `features.inner`) side by side in their order, one float32 [N, D] array per view.
    Consumes `features`: each view's arrays are dropped once copied, so no more than one view is held twice."""
    if names == (FINAL_FEATURE,):
        return features
    joined = {}
    for view in list(features.views):
        final = features.views.pop(view)
        parts = [final if name == FINAL_FEATURE else features.inner[name].pop(view) for name in names]
        rows = joined[view] = fresh_array((len(final), sum(part.shape[1] for part in parts)), np.float32)
        start = 0
        for part in parts:
            rows[:, start : start + part.shape[1]] = part
            start += part.shape[1]
        del final, parts  # this view's arrays go before the next view is joined
    return Features(joined, features.labels, features.class_names)


def split_validation(train: Features, fraction: float, seed: int) -> tuple[np.ndarray | None, Features | None]:
    """Hold out whole images (all their views), chosen by a seeded permutation: the indices of the
    images left to fit on (None: all of them) and a copy of the held-out ones."""
    if fraction <= 0:
        return None, None
    n = len(train.labels)
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise UserError(f"`val_split` {fraction} leaves no rows to train or validate on ({plural(n, 'image')})")
    val_idx = np.sort(order[:n_val])
    val = Features({v: x[val_idx] for v, x in train.views.items()}, train.labels[val_idx], train.class_names)
    return np.sort(order[n_val:]), val


@dataclass
class TrainingData:
    """What a fit reads, made once per validation split, seed and training views (a grid's runs share it)."""

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
        return config.val_split, config.seed, config.train_view_list

    def tensors(self):
        """x, y, the column means and 1 / standard deviations as TensorFlow tensors for a fit: x in its own buffer
        (memory.shared_tensor), y as int32."""
        import tensorflow as tf

        return (shared_tensor(self.x), tf.constant(self.y.astype(np.int32)), tf.constant(self.mean),
                tf.constant(1.0 / np.sqrt(self.variance)))


def training_data(features: Features, config: HeadConfig, reuse: TrainingData | None = None) -> TrainingData:
    """The validation split and the shuffled training rows with their column statistics; `reuse`
    (an earlier run's, on the same features) when it was made for the same split, seed and views."""
    settings = TrainingData.settings_of(config)
    if reuse is not None and reuse.source is features and reuse.settings == settings:
        return reuse
    images, val = split_validation(features, config.val_split, config.seed)
    x, y = training_rows(features, config.train_view_list, config.seed, images)
    mean, variance = column_stats(x)
    return TrainingData(features, settings, x, y, mean, variance + 1e-6,
                        len(features.labels) if images is None else len(images), val)


def training_rows(features: Features, views: tuple[str, ...], seed: int,
                  images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `images` (default: all), one per image and view, in a seeded random order, in a
    buffer TensorFlow can share: the fit loop then takes its batches as contiguous slices."""
    views = [features.views[v] for v in views]
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
    No temporary the size of `x`, as numpy's var would make (docs/benchmarks.md, the fit loop)."""
    total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        rows = x[start : start + chunk]
        total += rows.sum(0)
        squares += np.einsum("ij,ij->j", rows, rows)
    mean = total / len(x)
    return mean.astype(np.float32), np.maximum(squares / len(x) - mean**2, 0).astype(np.float32)
