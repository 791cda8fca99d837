"""Class-folder source: `ROOT/<class>/<images>` (or `ROOT/train/<class>/...` and `ROOT/test/<class>/...`).

Read much as `keras.utils.image_dataset_from_directory` reads such a tree: class names are the sorted
subfolder names, files are found recursively, hidden files are ignored, and images are decoded with
`tf.io.decode_image` (JPEG, PNG, BMP, GIF's first frame, WebP, JPEG XL: every format it reads, where Keras
takes the first four; gray and RGBA become RGB). Other files in the class folders are passed over and named
(`passed_over`). With one level only, a file goes to the test split when a seeded hash of its path falls
below `test_fraction`: adding a file never moves the others between splits.

Decoding happens chunk by chunk (never a whole split in memory), and a chunk ends early once its
decoded images reach MAX_CHUNK_BYTES (large photos). A file that cannot be decoded
(random bytes, truncated, empty, unreadable, more than MAX_IMAGE_PIXELS by its header, which Pillow reads
without the pixels: a decompression bomb) is skipped and reported with its reason; `strict` makes the first one
an error instead. The fingerprint is built from
paths, sizes and modification times (one stat per file, no decoding), so confirming that a
60,000-image cache is up to date takes well under a second of it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import UserError
from ...settings import DEFAULT_TEST_FRACTION
from .base import Chunk, check_split

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".jxl", ".png", ".webp")  # what tf.io.decode_image reads
IMAGE_FORMATS = "PNG/JPEG/BMP/GIF/WebP/JPEG XL"
SPLIT_SEED = 0
DECODE_THREADS = 2  # TensorFlow's decoders release the GIL
# An image whose header claims more pixels is skipped unread: Pillow's decompression-bomb error threshold (twice the
# size it warns at), 537 MB decoded, 2.1 GB as floats; a 108 MP phone photo is within it.
MAX_IMAGE_PIXELS = 178_956_970
# Decoded images per chunk at most: 1,024 phone photos (12 MP) would be 37 GB, so a chunk of large images ends
# sooner (94 such photos in one chunk peaked at 12.7 GB, docs/benchmarks.md).
MAX_CHUNK_BYTES = 512 * 2**20
SHAPE_PROBE_FILES = 10  # files tried to find the size to compile for ahead


def is_image_name(name: str) -> bool:
    """A file name read as an image: an image suffix, and not hidden."""
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def is_nested(root: Path) -> bool:
    """True when ROOT holds train/ and test/ folders (each a class-folder tree)."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def check_root(data_dir) -> Path:
    if data_dir is None:
        raise UserError("`dataset='folder'` needs `data_dir=PATH`: a folder of class folders of images")
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist or is not a folder")
    return root


def split_fraction(root: Path, asked: float | None) -> float:
    """The share of files that forms the test split: 0 when ROOT has train/ and test/ folders (they are
    the split), else `asked` (default DEFAULT_TEST_FRACTION), strictly between 0 and 1."""
    if is_nested(root):
        if asked is not None:
            raise UserError(f"{root} has train/ and test/ folders: they are the split, `test_fraction` does not apply")
        return 0.0
    fraction = DEFAULT_TEST_FRACTION if asked is None else asked
    if not 0.0 < fraction < 1.0:
        raise UserError(f"`test_fraction` must be between 0 and 1 (exclusive), got {fraction}")
    return fraction


class FolderSplit:
    """One split of a class-folder tree."""

    may_skip = True

    def __init__(self, root: Path, split: str, limit: int | None = None, test_fraction: float | None = None,
                 strict: bool = False):
        check_split(split)
        self.root, self.split, self.strict = check_root(root), split, strict
        self.nested = is_nested(self.root)
        self.test_fraction = split_fraction(self.root, test_fraction)
        self.class_names, files, labels, self.passed_over = self._scan()
        if limit:  # a seeded subset in the same order, so it spans the classes
            keep = np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(files))[:limit])
            files, labels = [files[i] for i in keep], labels[keep]
        self.files, self.labels = files, labels

    @property
    def where(self) -> str:
        return str(self.root)

    @property
    def rows(self) -> int:
        return len(self.files)

    def _scan(self) -> tuple[tuple[str, ...], list[str], np.ndarray, list[str]]:
        """Class names, then each image file (relative to the root) and its label, in sorted order, and the other
        files of the split's class folders (passed over as not images)."""
        base = self.root / self.split if self.nested else self.root
        names = _class_folders(base)
        if len(names) < 2:
            raise UserError(f"{base} holds one class folder ({names[0]}); a classifier needs at least 2 (a folder per "
                            "class, each holding its images)")
        if self.nested:
            other = _class_folders(self.root / ("test" if self.split == "train" else "train"))
            if other != names:
                differ = sorted(set(names) ^ set(other))
                raise UserError(f"{self.root}/train and {self.root}/test must hold the same class folders; "
                                f"they differ in {', '.join(differ[:5])}")
        files, labels, passed_over = [], [], []
        for label, name in enumerate(names):
            found, others = _files(base / name)
            if not found:
                raise UserError(f"class folder {base / name} has no images ({' '.join(IMAGE_SUFFIXES)})")
            for path in found:
                relative = path.relative_to(self.root).as_posix()
                if self.nested or self._in_split(relative):
                    files.append(relative)
                    labels.append(label)
            passed_over += [relative for relative in (path.relative_to(self.root).as_posix() for path in others)
                            if self.nested or self._in_split(relative)]
        return tuple(names), files, np.asarray(labels, np.int64), passed_over

    def _in_split(self, relative: str) -> bool:
        digest = hashlib.sha1(f"{SPLIT_SEED}:{relative}".encode()).digest()
        in_test = int.from_bytes(digest[:8], "big") / 2**64 < self.test_fraction
        return in_test == (self.split == "test")

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of class names, the split rule, and every file's path, size and modification time."""
        h = hashlib.sha256(f"{self.class_names}|{self.test_fraction}|{SPLIT_SEED}".encode())
        for relative in self.files:
            try:
                st = os.stat(self.root / relative)
                h.update(f"{relative}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{relative}\0missing\n".encode())
        return h.hexdigest()

    @functools.cached_property
    def image_shape(self) -> tuple[int, int] | None:
        """The first readable image's (H, W): images of a folder often share it (any size is accepted)."""
        for item in range(min(self.rows, SHAPE_PROBE_FILES)):
            image, _ = self.decode(item)
            if image is not None:
                return image.shape[:2]
        return None

    def attrs(self) -> dict:
        return {"split_rule": "train/ and test/ folders" if self.nested else
                f"seeded hash of the path (seed {SPLIT_SEED}), {self.test_fraction:g} to test"}

    def labels_of(self, items: np.ndarray) -> np.ndarray:
        return self.labels[items]

    def units(self) -> list[int]:
        """Files per class folder, in item order: a folder has no shards of its own, its classes are contiguous."""
        return np.bincount(self.labels, minlength=len(self.class_names)).tolist()

    def chunks(self, chunk_size: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        """Chunks of files [start, stop) (stop None: the split's end), each within one multiple of `chunk_size`
        and the next (so any range starting at such a multiple is cut as the whole split is), ending early once
        the decoded images reach MAX_CHUNK_BYTES; a chunk's unreadable files are in `skipped`. DECODE_THREADS
        files are decoded ahead."""
        stop = self.rows if stop is None else min(stop, self.rows)
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
            lo = start
            while lo < stop:
                end, images, kept, skipped, size = min((lo // chunk_size + 1) * chunk_size, stop), [], [], [], 0
                ahead = collections.deque(pool.submit(self.decode, i) for i in range(lo, min(lo + DECODE_THREADS, end)))
                item = lo
                while item < end and size < MAX_CHUNK_BYTES:  # large photos end a chunk early
                    image, reason = ahead.popleft().result()
                    if item + len(ahead) + 1 < end:
                        ahead.append(pool.submit(self.decode, item + len(ahead) + 1))
                    if image is None:
                        if self.strict:
                            raise UserError(f"cannot read {self.root / self.files[item]}: {reason} "
                                            "(`strict=True` stops at the first unreadable image)")
                        skipped.append((item, reason))
                    else:
                        images.append(image)
                        kept.append(item)
                        size += image.nbytes
                    item += 1
                for future in ahead:  # decoded ahead past the chunk's end: the next chunk decodes them again
                    future.cancel()
                if len({image.shape for image in images}) == 1:
                    images = np.stack(images)
                kept = np.asarray(kept, np.int64)
                yield Chunk(images, self.labels[kept], kept, skipped, stop=item)
                lo = item

    def decode(self, item: int) -> tuple[np.ndarray | None, str]:
        """(uint8 [H, W, 3], "") or (None, why it cannot be read)."""
        return decode_file(self.root / self.files[item])


def decode_file(path: Path) -> tuple[np.ndarray | None, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable file ({exc.strerror or exc})"
    return decode_bytes(data)


def decode_bytes(data: bytes) -> tuple[np.ndarray | None, str]:
    """An image file's bytes as (uint8 [H, W, 3], "") or (None, why they cannot be read): every source of encoded
    images (folders, tar shards, Parquet) decodes through here, under the same limits."""
    import tensorflow as tf

    if not data:
        return None, "empty file (0 bytes)"
    if too_large := _too_large(data):
        return None, too_large
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    except (tf.errors.OpError, ValueError) as exc:
        message = re.sub(r"\s*\[Op:\w+\]", "", getattr(exc, "message", str(exc)).split("}}")[-1]).strip().splitlines()
        return None, f"not a decodable image ({message[0][:100] if message else type(exc).__name__})"
    if image.shape[0] == 0 or image.shape[1] == 0:
        return None, "image has no pixels"
    return image, ""


def _too_large(data: bytes) -> str:
    """Why an image is not decoded for its size (more than MAX_IMAGE_PIXELS by its header), or ''."""
    from PIL import Image

    try:
        size = header_size(data)
    except Image.DecompressionBombError:  # Pillow's own limit, which MAX_IMAGE_PIXELS is
        return f"image too large (its header states more than {MAX_IMAGE_PIXELS:,} pixels, the most decoded)"
    if size and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return f"image too large ({size[0]}x{size[1]} pixels; at most {MAX_IMAGE_PIXELS:,} are decoded)"
    return ""


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


def _class_folders(base: Path) -> list[str]:
    if not base.is_dir():
        raise UserError(f"data folder {base} does not exist")
    names = sorted(entry.name for entry in os.scandir(base) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise UserError(f"no class folders in {base}: expected {base}/<class name>/<images>")
    return names


def _files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files under `folder`, recursively and sorted, and the other files; hidden files and folders neither."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):
            (images if is_image_name(name) else others).append(Path(dirpath) / name)
    return images, others
