"""The Python API, for notebooks and other libraries: cached features as numpy, and one head experiment.

    from featcache.api import load_cache, run_head
    train = load_cache("train")                 # numpy only: TensorFlow is not imported
    train.views["plain"].shape, train.labels, train.class_names, train.attrs["model"]
    result = run_head(epochs=5, hidden=0)       # metrics, the Keras model, history; not recorded

Both take the selection options of the CLIs as keyword arguments (cache_dir, dataset, data_dir,
test_fraction, model, image_size, resize, crop, views, limit, precision), with the same defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runs, store
from .cli import DEFAULT_CACHE_DIR, SELECTION_NAMES
from .extractor import VIEWS
from .head import HeadConfig, TrainedHead, train
from .selection import select


@dataclass
class CachedSplit:
    """One split of a complete cache: {view: float32 [N, D]}, labels int64 [N], and what the file says."""

    views: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    attrs: dict
    path: Path


def load_cache(split: str = "train", cache_dir=DEFAULT_CACHE_DIR, **selection) -> CachedSplit:
    """Read one complete, checked cache (settings, checksums, NaN/Inf) without importing TensorFlow."""
    key = select(cache_dir, **selection)
    features, info = runs.load_features(key, split, cache_dir, VIEWS[key.views])
    path = Path(info["path"])
    return CachedSplit(features.views, features.labels, features.class_names, store.attributes(path), path)


def run_head(cache_dir=DEFAULT_CACHE_DIR, **options) -> TrainedHead:
    """Train one head on the cached train split and score it on test, as train_head.py does, without
    recording a run: `.metrics` (test_accuracy, ...), `.model` (Keras), `.history`, `.test_probs`.
    Keyword arguments: the selection options above, and HeadConfig's fields (epochs, lr, hidden, ...)."""
    key = select(cache_dir, **{name: options.pop(name) for name in SELECTION_NAMES if name in options})
    config = HeadConfig(**options).for_cached_views(key.views)
    config.check()
    train_split, _ = runs.load_features(key, "train", cache_dir, config.views_needed())
    test_split, _ = runs.load_features(key, "test", cache_dir, config.views_needed())
    return train(train_split, test_split, config)
