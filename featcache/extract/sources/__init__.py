"""Sources of images for stage 1, one module per kind, all behind the interface in base.py.

`open_split(key, split, data_dir)` is the one place that maps a cache key's dataset to its reader, and
`check_root` the one that checks the data folder of a dataset read from one.
"""

from __future__ import annotations

from ...errors import UserError
from ...settings import DATASETS
from . import cifar, folder, parquet, webdataset
from .base import Chunk  # noqa: F401 - the interface, re-exported

ROOT_CHECKS = {"folder": folder.check_root, "webdataset": webdataset.check_root, "parquet": parquet.check_root}


def check_root(dataset: str, data_dir):
    """The resolved data folder of a dataset read from a folder (`data_dir` is part of its cache key)."""
    return ROOT_CHECKS[dataset](data_dir)


def open_split(key, split: str, data_dir=None, strict: bool = False):
    """The reader of one split of the key's dataset (its `limit` applied)."""
    if key.dataset in cifar.LAYOUTS:
        layout = cifar.LAYOUTS[key.dataset]
        return cifar.SplitSource(cifar.resolve_source(data_dir, layout), split, key.limit or None, layout)
    if key.dataset == "folder":
        return folder.FolderSplit(key.data_dir, split, key.limit or None, key.test_fraction or None, strict=strict)
    if key.dataset == "webdataset":
        return webdataset.TarSplit(key.data_dir, split, key.limit or None, strict=strict)
    if key.dataset == "parquet":
        return parquet.ParquetSplit(key.data_dir, split, key.limit or None, strict=strict,
                                    image_column=key.image_column or None, label_column=key.label_column or None)
    raise UserError(f"unknown `dataset` {key.dataset!r}; choose one of {', '.join(DATASETS)}")
