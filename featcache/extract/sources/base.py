"""What every kind of source gives stage 1: one split's images in chunks, with labels and row ids.

A split reader (cifar.SplitSource, folder.FolderSplit) has:
- `rows`: items in the split; the cache gets exactly these rows unless `may_skip` (a folder's
  unreadable files are skipped while reading, so they are known only then);
- `fingerprint`: changes whenever the split's content may have (cheap: no image is decoded);
- `class_names`, and `image_shape`: (H, W) of (most of) its images, for compiling ahead;
- `chunks(chunk_size, start, stop=None)`: Chunk objects of items [start, stop), in order;
- `labels_of(items)` for verifying a cache, and `attrs()`: what else the cache should record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import UserError
from ...settings import SPLITS


def check_split(split: str):
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


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
