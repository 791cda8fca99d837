"""What every kind of source gives stage 1: one split's images in chunks, with labels and row ids.

A split reader (cifar.SplitSource; folder.FolderSplit, webdataset.TarSplit and parquet.ParquetSplit, which share
encoded.EncodedSplit) has:
- `rows`: items in the split; the cache gets exactly these rows unless `may_skip` (unreadable
  images are skipped while reading, so they are known only then; such a reader also names each
  item in `files` and decodes one with `decode(item)`);
- `fingerprint`: changes whenever the split's content may have (cheap: no image is decoded);
- `class_names`, and `image_shape`: (H, W) of (most of) its images, for compiling ahead;
- `chunks(chunk_size, start=0, stop=None)`: Chunk objects of items [start, stop), in order;
- `labels_of(items)` for verifying a cache, and `attrs()`: what else the cache should record.
A reader trusts its split and data folder: they were checked where they entered (selection.check_split,
sources.check_root).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def split_files(root: Path, split: str, suffix: str) -> list[Path]:
    """A split's shard files, sorted: those in ROOT (or ROOT/data, the Hugging Face Hub's layout) whose names start
    with the split (`train-00000-of-00004.parquet`, `test_0.tar`), and every one in ROOT/<split>/ (or
    ROOT/data/<split>/). Hidden files are left out."""
    named = re.compile(rf"{re.escape(split)}(?![A-Za-z0-9]).*{re.escape(suffix)}$", re.I)
    found = set()
    for folder in (root, root / "data"):
        if folder.is_dir():
            found |= {path for path in folder.iterdir() if path.is_file() and named.match(path.name)}
        if (folder / split).is_dir():
            found |= {path for path in (folder / split).iterdir()
                      if path.is_file() and path.name.lower().endswith(suffix) and not path.name.startswith(".")}
    return sorted(found)


@dataclass
class Chunk:
    """Images (one uint8 [N,H,W,3] array, or a list of [H,W,3] arrays of different sizes), their
    labels, and `items`: each image's index in the split (its row id: for a folder, its file)."""

    images: np.ndarray | list
    labels: np.ndarray
    items: np.ndarray
    skipped: list = field(default_factory=list)  # (item, reason) of unreadable items among this chunk's
    stop: int | None = None  # the item after the last one read (default: items[-1] + 1)

    @property
    def next_item(self) -> int:
        return self.stop if self.stop is not None else int(self.items[-1]) + 1
