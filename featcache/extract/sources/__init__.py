"""Sources of images for stage 1, one module per kind, all behind the interface in base.py.

`open_split(key, split, data_dir)` is the one place that maps a cache key's dataset to its reader,
`check_root` the one that checks the data folder of a dataset read from one; `changed_since_cached` tells stage 2
whether a folder changed under its cache.
"""

from __future__ import annotations

from ...cache.read import CacheUnusable, attributes
from ...errors import UserError
from ...settings import DATASETS, SPLITS
from . import cifar, folder, parquet, webdataset

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


def changed_since_cached(key, cache_dir) -> list[CacheUnusable]:
    """For a class folder, each split whose cache records another fingerprint than the folder has now (files
    added, removed or changed since it was made): the problem and its remedy (cheap, no image is read). CIFAR
    archives are not looked at; a missing or unreadable cache is left to whatever reads it."""
    if key.dataset != "folder":
        return []
    changed = []
    for split in SPLITS:
        path = key.path(cache_dir, split)
        try:
            recorded = attributes(path).get("source_fingerprint")
        except (OSError, KeyError, ValueError):
            continue
        if recorded != open_split(key, split).fingerprint:
            changed.append(CacheUnusable(f"{key.data_dir} has changed since its {split} cache was made (files added, "
                                         "removed or modified); the head trains on the images cached then",
                                         key, split, cache_dir, "rebuild"))
    return changed
