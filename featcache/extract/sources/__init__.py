"""Sources of images for stage 1, one module per kind, all behind the interface in base.py.

`open_split(key, split, data_dir)` is the one place that maps a cache key's dataset to its reader.
"""

from __future__ import annotations

from ...errors import UserError
from ...settings import DATASETS
from . import cifar, folder
from .base import Chunk  # noqa: F401 - the interface, re-exported


def open_split(key, split: str, data_dir=None, strict: bool = False):
    """The reader of one split of the key's dataset (its `limit` applied)."""
    if key.dataset in cifar.LAYOUTS:
        layout = cifar.LAYOUTS[key.dataset]
        return cifar.SplitSource(cifar.resolve_source(data_dir, layout), split, key.limit or None, layout)
    if key.dataset == "folder":
        return folder.FolderSplit(key.data_dir, split, key.limit or None, key.test_fraction or None, strict=strict)
    raise UserError(f"unknown `dataset` {key.dataset!r}; choose one of {', '.join(DATASETS)}")
