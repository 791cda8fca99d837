"""Thumbnails of cached test rows, read back from the cache's source (CIFAR's batches, a folder's files): the
pictures of the Projector's sprite. Stage 2 reads images here only, and only when a Projector sample is asked for."""

from __future__ import annotations

import numpy as np

from ..cache.layout import CacheKey
from ..cache.read import row_files

SIDE = 32  # pixels: CIFAR's own size, and 10,000 of them fit the Projector's 8,192-pixel sprite limit (100 x 32 px)


def test_thumbnails(key: CacheKey, cache_dir, rows: np.ndarray, labels: np.ndarray,
                    data_dir=None) -> tuple[np.ndarray | None, str]:
    """uint8 [len(rows), SIDE, SIDE, 3] of the test split's `rows` (sorted), or None and why there are none.

    `labels` are the cache's labels of those rows: a CIFAR copy whose labels differ is not the cache's source.
    A folder file that cannot be read any more is a grey square.
    """
    from ..extract.sources import cifar

    if key.dataset in cifar.LAYOUTS:
        layout = cifar.LAYOUTS[key.dataset]
        source = cifar.local_copy(data_dir, layout)
        if source is None:
            return None, f"no local copy of {layout.title} to draw thumbnails from (pass `data_dir=PATH`)"
        images, found, start = [], [], 0
        for batch, batch_labels in cifar.SplitSource(source, "test", key.limit or None, layout).batches():
            inside = rows[(rows >= start) & (rows < start + len(batch_labels))] - start
            images.append(batch[inside])
            found.append(batch_labels[inside])
            start += len(batch_labels)
        if start <= rows.max() or not np.array_equal(np.concatenate(found), labels):
            return None, f"{source} is not the source of this cache (other images or labels); no thumbnails"
        return np.concatenate(images), ""
    if key.dataset != "folder":
        return None, f"thumbnails are drawn from CIFAR copies and class folders only, not from {key.dataset} files"
    files = row_files(key.path(cache_dir, "test"), rows)
    if files is None:
        return None, "the cache names no source files; no thumbnails"
    return np.stack([_thumbnail(f"{key.data_dir}/{file}") for file in files]), ""


def _thumbnail(path: str) -> np.ndarray:
    from pathlib import Path

    from PIL import Image

    from ..extract.sources.folder import decode_file

    image, _ = decode_file(Path(path))
    if image is None:
        return np.full((SIDE, SIDE, 3), 128, np.uint8)
    return np.asarray(Image.fromarray(image).resize((SIDE, SIDE), Image.BILINEAR))  # squashed, as crop none does
