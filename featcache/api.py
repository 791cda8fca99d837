"""The Python API, for notebooks and other libraries: extract a cache, read it as numpy, train a head.

    from featcache.api import extract, list_layers, load_cache, run_head, verify
    extract("train", limit=1000); extract("test", limit=1000)   # stage 1 (loads the network)
    extract("train", limit=1000, views="crops")  # adds five crop views to that cache
    [layer.name for layer in list_layers()]      # the inner layers a model offers to `layers`
    extract("train", limit=1000, layers="block_13_expand_relu,block_15_add@2x2")  # adds their pooled activations
    train = load_cache("train", limit=1000)    # numpy only: TensorFlow is not imported
    train.views["plain"].shape, train.labels, train.class_names, train.attrs["model"]
    result = run_head(limit=1000, epochs=5, train_views="plain,flip,crops")  # metrics, Keras model; not recorded
    result = run_head(limit=1000, features="final,block_13_expand_relu@2x2")  # inner layers extract(layers=...) added
    path, problems = verify("test", limit=1000)  # the cache against its source

Each takes the selection settings as keyword arguments (cache_dir, dataset, data_dir,
test_fraction, image_column, label_column, model, image_size, resize, crop, limit, precision), with the defaults of
featcache.settings. Errors are featcache.errors.UserError, naming these parameters.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache.read import attributes, load_features
from .errors import UserError
from .extract.layers import LayerInfo, offered_layers
from .extract import sources
from .extract.pipeline import ExtractResult
from .extract.pipeline import extract as extract_split
from .extract.pipeline import verify as verify_split
from .head.runs import TrainedHead, train_unrecorded
from .selection import SELECTION_NAMES, check_split, select, select_cached
from .settings import DEFAULT_CACHE_DIR, DEFAULT_VIEWS, HeadConfig, parse_views


@dataclass
class CachedSplit:
    """One split of a complete cache: {view: float32 [N, D]}, labels int64 [N], and what the file says."""

    views: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    attrs: dict
    path: Path


def _split_selection(options: dict) -> dict:
    return {name: options.pop(name) for name in SELECTION_NAMES if name in options}  # cache_dir is a parameter


def _takes_only(function: str, given: dict, *allowed):
    unknown = sorted(set(given).difference(SELECTION_NAMES, *allowed))
    if unknown:
        raise UserError(f"{function}() takes no parameter {', '.join(unknown)}")


def extract(split: str = "train", cache_dir=DEFAULT_CACHE_DIR, **options) -> ExtractResult:
    """Build (or resume, or confirm) one split's cache, as extract.py does. Keyword arguments: the selection
    settings above, and pipeline.extract's (views, layers, chunk_size, batch_size, engine, force, strict, progress,
    runner)."""
    check_split(split)
    _takes_only("extract", options, inspect.signature(extract_split).parameters)
    selection = _split_selection(options)
    parse_views(options.get("views", DEFAULT_VIEWS))  # before the model may be loaded to learn its input size
    key = select(cache_dir, splits=(split,), **selection)
    try:
        return extract_split(key, split, data_dir=selection.get("data_dir"), cache_dir=cache_dir, **options)
    finally:
        sources.forget_kept()  # a reader the selection kept is for this call only, whether or not it was used


def list_layers(cache_dir=DEFAULT_CACHE_DIR, **selection) -> list[LayerInfo]:
    """The layers the selected model offers to `layers` (name, height, width, channels at the selected image size),
    as extract.py's list_layers option prints them; loads the model the first time."""
    _takes_only("list_layers", selection)
    key = select(cache_dir, **selection)
    return offered_layers(key.model, key.model_sha256, key.image_size, cache_dir)


def verify(split: str = "train", cache_dir=DEFAULT_CACHE_DIR, **selection) -> tuple[Path, list[str]]:
    """Check one split's cache against its source, as extract.py's verify option does: (its path, the problems)."""
    _takes_only("verify", selection)
    check_split(split)
    return verify_split(select(cache_dir, **selection), split, data_dir=selection.get("data_dir"), cache_dir=cache_dir)


def load_cache(split: str = "train", cache_dir=DEFAULT_CACHE_DIR, **selection) -> CachedSplit:
    """Read one complete, checked cache (settings, checksums, NaN/Inf, labels; every view it holds) without
    importing TensorFlow."""
    _takes_only("load_cache", selection)
    check_split(split)
    key = select_cached(cache_dir, **selection)
    features, info = load_features(key, split, cache_dir, views=None)
    path = Path(info["path"])
    return CachedSplit(features.views, features.labels, features.class_names, attributes(path), path)


def run_head(cache_dir=DEFAULT_CACHE_DIR, **options) -> TrainedHead:
    """Train one head on the cached train split and score it on test, as train_head.py does, without
    recording a run: `.metrics` (test_accuracy, ...), `.model` (Keras), `.history`, `.test_probs`.
    Keyword arguments: the selection settings above, and HeadConfig's fields (epochs, lr, hidden, ...)."""
    _takes_only("run_head", options, HeadConfig().to_dict())
    key = select_cached(cache_dir, **_split_selection(options))
    config = HeadConfig(**options)
    config.check()
    return train_unrecorded(key, cache_dir, config)
