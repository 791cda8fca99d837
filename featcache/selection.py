"""From the options a user typed to the cache they select: the one place that knows the defaults.

extract.py, train_head.py and the Python API all build their CacheKey here, so the same
options always name the same cache, and the options that name a cache can be printed back.
"""

from __future__ import annotations

from . import models
from .errors import UserError
from .extractor import DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, DEFAULT_RESIZE, DEFAULT_VIEWS
from .sources import DATASETS, DEFAULT_DATASET, folder
from .store import CacheKey

CROPS = ("none", "center")
DEFAULT_CROP = "none"  # squash to a square, as Keras' image_dataset_from_directory does by default


def select(cache_dir, model: str = DEFAULT_MODEL, image_size: int | None = None, resize: str = DEFAULT_RESIZE,
           views: str = DEFAULT_VIEWS, limit: int | None = None, precision: str = "f32",
           dataset: str = DEFAULT_DATASET, data_dir=None, crop: str = DEFAULT_CROP,
           test_fraction: float | None = None) -> CacheKey:
    """The key of the cache these options select (a local model's contents and input size resolved)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if crop not in CROPS:
        raise UserError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
    root, fraction = "", 0.0
    if dataset == "folder":
        path = folder.check_root(data_dir)
        root, fraction = str(path), folder.split_fraction(path, test_fraction)
    elif test_fraction is not None:
        raise UserError("--test-fraction applies to --dataset folder only")
    model, sha256 = models.identity(model)
    size = models.input_size(model, sha256, image_size, DEFAULT_IMAGE_SIZE, cache_dir)
    return CacheKey(model, size, resize, views, limit or 0, dataset, precision, crop, root, fraction, sha256)


def default_key() -> CacheKey:
    """The cache that extract.py and train_head.py select without options."""
    return CacheKey(DEFAULT_MODEL, DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, DEFAULT_VIEWS, dataset=DEFAULT_DATASET)


def selection_args(key: CacheKey) -> str:
    """The options (beyond the defaults) that select this key's cache, on either CLI."""
    default = default_key()
    parts = []
    if key.dataset != default.dataset:
        parts.append(f"--dataset {key.dataset}")
    if key.data_dir:
        parts.append(f"--data-dir {key.data_dir}")
    if key.test_fraction and key.test_fraction != folder.DEFAULT_TEST_FRACTION:
        parts.append(f"--test-fraction {key.test_fraction:g}")
    for name in ("model", "image_size", "resize", "crop", "views", "precision"):
        value = getattr(key, name)
        if value != getattr(default, name):
            parts.append(f"--{name.replace('_', '-')} {value}")
    if key.limit:
        parts.append(f"--limit {key.limit}")
    return " ".join(parts)
