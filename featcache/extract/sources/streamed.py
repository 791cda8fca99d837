"""Chunks of images decoded from encoded bytes read in item order (tar members, Parquet cells).

The shard readers (webdataset.py, parquet.py) read each item's bytes sequentially and hand them here; this
module decodes them exactly as a class folder's files are decoded (decode_bytes: same decoder, same
limit on pixels, same reasons), DECODE_THREADS at a time, and cuts chunks the way folder.FolderSplit does
(at `chunk_size` items, or sooner once the decoded images reach MAX_CHUNK_BYTES). Unreadable items are
skipped and reported in the chunk, or, with `strict`, stop the run.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from ...errors import UserError
from .base import Chunk
from .folder import DECODE_THREADS, MAX_CHUNK_BYTES, decode_bytes


def decoded_chunks(blobs: Iterator[tuple[int, bytes | None, str]], labels: np.ndarray, chunk_size: int,
                   strict: bool, name_of: Callable[[int], str]) -> Iterator[Chunk]:
    """Chunks of the items `blobs` yields as (item, bytes, "") or (item, None, why they could not be read), in
    consecutive item order; `labels[item]` is each item's label, `name_of(item)` names it in a strict error."""
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
        ahead: collections.deque = collections.deque()

        def top_up():
            while len(ahead) < DECODE_THREADS:
                blob = next(blobs, None)
                if blob is None:
                    return
                item, data, reason = blob
                ahead.append((item, pool.submit(decode_bytes, data) if data is not None else None, reason))

        top_up()
        while ahead:
            images, kept, skipped, size, read = [], [], [], 0, 0
            while ahead and read < chunk_size and size < MAX_CHUNK_BYTES:
                item, future, reason = ahead.popleft()
                image, reason = future.result() if future is not None else (None, reason)
                top_up()
                read += 1
                stop = item + 1
                if image is None:
                    if strict:
                        raise UserError(f"cannot read {name_of(item)}: {reason} "
                                        "(`strict=True` stops at the first unreadable image)")
                    skipped.append((item, reason))
                else:
                    images.append(image)
                    kept.append(item)
                    size += image.nbytes
            if len({image.shape for image in images}) == 1:
                images = np.stack(images)
            kept = np.asarray(kept, np.int64)
            yield Chunk(images, labels[kept], kept, skipped, stop=stop)
