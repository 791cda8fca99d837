"""Sources of images for stage 1, one module per kind, all behind the interface in base.py.

`open_split(key, split, data_dir)` is the one place that maps a cache key's dataset to its reader,
`check_root` the one that checks the data folder (and a class folder's split rule) of a dataset read from one.

Tars and Parquet files are indexed when opened (every header, every label read). The selection opens them to refuse
a bad layout before any model loads (`keep=True`); the extraction that follows in the same process is handed those
readers instead of indexing the files again, unless a file in the data folder changed meanwhile.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import UserError
from . import cifar, folder, parquet, webdataset

# The datasets read from a data folder, and what that folder holds.
FOLDER_HOLDS = {"folder": "a folder of class folders of images",
                "webdataset": "a folder of tar shards (train-000000.tar, test-000000.tar)",
                "parquet": "a folder of Parquet files (data/train-00000-of-00001.parquet, ...)"}


def check_root(dataset: str, data_dir, test_fraction: float | None = None) -> tuple[Path, float]:
    """The resolved data folder of a dataset read from a folder (`data_dir` is part of its cache key), refused when
    not given or not a folder; and its share of files in the test split (folder.split_fraction; 0 for the others)."""
    if data_dir is None:
        raise UserError(f"`dataset={dataset!r}` needs `data_dir=PATH`: {FOLDER_HOLDS[dataset]}")
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist or is not a folder")
    return root, folder.split_fraction(root, test_fraction) if dataset == "folder" else 0.0


INDEXED = ("webdataset", "parquet")  # the datasets whose readers index their files when opened
_kept: dict = {}  # (what a reader depends on in the key, split) -> (the data folder's stamp, the reader)


def open_split(key, split: str, data_dir=None, strict: bool = False, keep: bool = False):
    """The reader of one split of the key's dataset (its `limit` applied). With `keep`, a tar or Parquet reader is
    also kept for the next call for the same split, which takes it (once) unless a file in the data folder changed."""
    if key.dataset not in INDEXED or not (keep or _kept):
        return _open(key, split, data_dir, strict)
    kept_as = (key.dataset, key.data_dir, key.limit, key.image_column, key.label_column, split)
    stamp, reader = _kept.pop(kept_as, (None, None))
    now = _stamp(Path(key.data_dir))  # before indexing: a file changed while it runs is indexed again next time
    if reader is None or now is None or stamp != now:
        reader = _open(key, split, data_dir, strict)
    reader.strict = strict
    if keep:
        _kept[kept_as] = (now, reader)
    return reader


def forget_kept():
    """Drop the readers kept by `open_split(keep=True)`."""
    _kept.clear()


def _stamp(root: Path) -> list | None:
    """Every file's name, size and modification time in ROOT, ROOT/data and their subfolders (one level): all that a
    tar or Parquet reader's index depends on (base.split_files, classes.txt), without opening a file; None when a
    file vanished or could not be read meanwhile (which counts as a change)."""
    try:
        tops = [top for top in (root, root / "data") if top.is_dir()]
        folders = set(tops) | {Path(entry.path) for top in tops for entry in os.scandir(top) if entry.is_dir()}
        stats = [(entry.path, entry.stat()) for folder in folders for entry in os.scandir(folder) if entry.is_file()]
    except OSError:
        return None
    return sorted((path, stat.st_size, stat.st_mtime_ns) for path, stat in stats)


def _open(key, split: str, data_dir, strict: bool):
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
    raise UserError(f"unknown dataset {key.dataset!r}")  # a key read back from a run's record
