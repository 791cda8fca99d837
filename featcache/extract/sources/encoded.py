"""Sources of encoded images (class folders, WebDataset tars, Parquet): how their bytes become chunks of pixels.

Every such source decodes through `decode_bytes` (tf.io.decode_image, the same limit on pixels read from the header
by Pillow, the same reasons for an unreadable image) and cuts chunks with `decoded_chunks`; `EncodedSplit` is what
their readers share. So the same pictures give the same chunks, and the same embeddings, however they are stored.
"""

from __future__ import annotations

import collections
import functools
import io
import itertools
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ...errors import UserError
from .base import Chunk

OTHER_SPLIT = {"train": "test", "test": "train"}
SPLIT_SEED = 0  # the seed of a `limit`'s subset (and of a folder's split rule)
DECODE_THREADS = 2  # TensorFlow's decoders release the GIL
MAX_IMAGE_PIXELS = 178_956_970  # more by its header: skipped unread (Pillow's decompression-bomb error threshold)
MAX_CHUNK_BYTES = 512 * 2**20  # decoded images per chunk at most: a chunk of large photos ends sooner
SHAPE_PROBE_FILES = 10  # items tried to find the size to compile for ahead

Blobs = Iterator[tuple[int, "bytes | None", str]]  # (item, its encoded bytes, "") or (item, None, why there are none)


class EncodedSplit:
    """What the readers of encoded images share. A subclass sets `root`, `strict`, `files` (a name per item) and
    `labels`, and reads its items' bytes in order with `_blobs(start, stop)`; an unreadable item gives no row."""

    may_skip = True

    @property
    def where(self) -> str:
        return str(self.root)

    @property
    def rows(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def image_shape(self) -> tuple[int, int] | None:
        """The first readable image's (H, W): a split's images often share it (any size is accepted)."""
        for item in range(min(self.rows, SHAPE_PROBE_FILES)):
            image, _ = self.decode(item)
            if image is not None:
                return image.shape[:2]
        return None

    def labels_of(self, items: np.ndarray) -> np.ndarray:
        return self.labels[items]

    def chunks(self, chunk_size: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        stop = self.rows if stop is None else min(stop, self.rows)
        return decoded_chunks(self._blobs(start, stop), self.labels, chunk_size, self.strict, self._name)

    def decode(self, item: int) -> tuple[np.ndarray | None, str]:
        """(uint8 [H, W, 3], "") or (None, why it cannot be read)."""
        (_, data, reason), = self._blobs(item, item + 1)
        return decode_bytes(data) if data is not None else (None, reason)

    def _name(self, item: int) -> str:
        return str(self.root / self.files[item])

    def _take(self, names: tuple[str, ...] | None, shards: list, other_split: Callable[[], list],
              outside: Callable[[object, int], str], limit: int | None) -> np.ndarray:
        """Set `class_names`, `shards` (indexed files, each with `labels`), and each kept item's (kept_items) shard
        and label; return the kept items' indices among all the shards' items. The classes are `names` (a label
        outside them refused in one line: `outside(shard, row)`), else the label numbers of both splits."""
        if names is None:
            labels = [shard.labels for shard in shards + other_split()]
            names = tuple(str(n) for n in range(max(int(x.max(initial=0)) for x in labels) + 1))
        for shard in shards:
            if len(shard.labels) and shard.labels.max() >= len(names):
                raise UserError(outside(shard, int(np.argmax(shard.labels >= len(names)))))
        self.class_names, self.shards = names, shards
        shard_of = np.concatenate([np.full(len(s.labels), n, np.int64) for n, s in enumerate(shards)])
        keep = kept_items(len(shard_of), limit)
        self.shard_of, self.labels = shard_of[keep], np.concatenate([s.labels for s in shards])[keep]
        return keep


def kept_items(count: int, limit: int | None) -> np.ndarray:
    """Items 0..count-1, or a seeded `limit` of them in the same order (so a subset spans the classes)."""
    if not limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(SPLIT_SEED).permutation(count)[:limit])


def few(shards: list) -> str:
    """The first three shards' names (`relative`), for a message."""
    return ", ".join(shard.relative for shard in shards[:3]) + (", ..." if len(shards) > 3 else "")


def decoded_chunks(blobs: Blobs, labels: np.ndarray, chunk_size: int, strict: bool,
                   name_of: Callable[[int], str]) -> Iterator[Chunk]:
    """Chunks of the consecutive items `blobs` yields. A chunk ends after an item that precedes a multiple of
    `chunk_size` (so any range starting at such a multiple is cut as the whole split is), or sooner once its decoded
    images reach MAX_CHUNK_BYTES; its unreadable items are in `skipped` (with `strict`, the first stops the run, named
    by `name_of(item)`). DECODE_THREADS items are decoded ahead."""
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
        decoding = ((item, pool.submit(decode_bytes, data) if data is not None else None, reason)
                    for item, data, reason in blobs)
        ahead = collections.deque(itertools.islice(decoding, DECODE_THREADS))
        images, kept, skipped, size = [], [], [], 0
        while ahead:
            item, future, reason = ahead.popleft()
            ahead.extend(itertools.islice(decoding, 1))
            image, reason = future.result() if future is not None else (None, reason)
            if image is None:
                if strict:
                    raise UserError(f"cannot read {name_of(item)}: {reason}; `strict=True` stops at the first "
                                    "unreadable image")
                skipped.append((item, reason))
            else:
                images.append(image)
                kept.append(item)
                size += image.nbytes
            if (item + 1) % chunk_size == 0 or size >= MAX_CHUNK_BYTES or not ahead:  # large photos end a chunk early
                if len({image.shape for image in images}) == 1:
                    images = np.stack(images)
                kept = np.asarray(kept, np.int64)
                yield Chunk(images, labels[kept], kept, skipped, stop=item + 1)
                images, kept, skipped, size = [], [], [], 0


def read_file(path: Path) -> tuple[bytes | None, str]:
    try:
        return path.read_bytes(), ""
    except OSError as exc:
        return None, f"unreadable file ({exc.strerror or exc})"


def decode_file(path: Path) -> tuple[np.ndarray | None, str]:
    data, reason = read_file(path)
    return decode_bytes(data) if data is not None else (None, reason)


def decode_bytes(data: bytes) -> tuple[np.ndarray | None, str]:
    """An image file's bytes as (uint8 [H, W, 3], "") or (None, why they cannot be read)."""
    import tensorflow as tf
    from PIL import Image

    if not data:
        return None, "empty file (0 bytes)"
    try:
        size = header_size(data)
    except Image.DecompressionBombError:  # Pillow's own limit, which MAX_IMAGE_PIXELS is
        return None, f"image too large (its header states more than {MAX_IMAGE_PIXELS:,} pixels, the most decoded)"
    if size and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return None, f"image too large ({size[0]}x{size[1]} pixels; at most {MAX_IMAGE_PIXELS:,} are decoded)"
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    except (tf.errors.OpError, ValueError) as exc:
        message = re.sub(r"\s*\[Op:\w+\]", "", getattr(exc, "message", str(exc)).split("}}")[-1]).strip().splitlines()
        return None, f"not a decodable image: {message[0][:100].rstrip('.') if message else type(exc).__name__}"
    if image.shape[0] == 0 or image.shape[1] == 0:
        return None, "image has no pixels"
    return image, ""


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the file's header states it, read by Pillow without decoding the pixels; None when Pillow
    cannot read the header (the decoder then says what is wrong). Beyond Pillow's decompression-bomb limit it
    raises PIL.Image.DecompressionBombError."""
    from PIL import Image

    # Pillow warns of images between half its limit and its limit; they are decoded here as any other.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, EOFError):  # UnidentifiedImageError is an OSError
        return None
