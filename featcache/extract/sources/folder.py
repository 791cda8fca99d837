"""Class-folder source: `ROOT/<class>/<images>` (or `ROOT/train/<class>/...` and `ROOT/test/<class>/...`).

Read much as `keras.utils.image_dataset_from_directory` reads such a tree: class names are the sorted
subfolder names, files are found recursively, hidden files are ignored, and images are decoded with
`tf.io.decode_image` (JPEG, PNG, BMP, GIF's first frame, WebP, JPEG XL: every format it reads, where Keras
takes the first four; gray and RGBA become RGB). Other files in the class folders are passed over and named
(`passed_over`). With one level only, a file goes to the test split when a seeded hash of its path falls
below `test_fraction`: adding a file never moves the others between splits.

Files are decoded chunk by chunk, and an unreadable one skipped with its reason, as for every source of encoded
images (encoded.py). The fingerprint is built from paths, sizes and modification times (one stat per file).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import UserError
from ...settings import DEFAULT_TEST_FRACTION
from .encoded import OTHER_SPLIT, SPLIT_SEED, EncodedSplit, decode_file, kept_items, read_file

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".jxl", ".png", ".webp")  # what tf.io.decode_image reads
IMAGE_FORMATS = "PNG/JPEG/BMP/GIF/WebP/JPEG XL"


def is_image_name(name: str) -> bool:
    """A file name read as an image: an image suffix, and not hidden."""
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def is_nested(root: Path) -> bool:
    """True when ROOT holds train/ and test/ folders (each a class-folder tree)."""
    return (root / "train").is_dir() and (root / "test").is_dir()


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


class FolderSplit(EncodedSplit):
    """One split of a class-folder tree: the classes are its sorted class folders, the items their image files in
    sorted order (relative to the root), and their other files are `passed_over`."""

    def __init__(self, root: Path, split: str, limit: int | None = None, test_fraction: float | None = None,
                 strict: bool = False):
        self.root, self.split, self.strict = Path(root), split, strict
        self.nested = is_nested(self.root)
        self.test_fraction = split_fraction(self.root, test_fraction)
        base = self.root / split if self.nested else self.root
        names = _class_folders(base)
        if len(names) < 2:
            raise UserError(f"{base} holds one class folder ({names[0]}); a classifier needs at least 2 (a folder per "
                            "class, each holding its images)")
        if self.nested:
            other = _class_folders(self.root / OTHER_SPLIT[split])
            if other != names:
                differ = sorted(set(names) ^ set(other))
                raise UserError(f"{self.root}/train and {self.root}/test must hold the same class folders; "
                                f"they differ in {', '.join(differ[:5])}")
        files, labels, self.passed_over = [], [], []  # the images (relative to the root), their labels, other files
        for label, name in enumerate(names):
            found = _files(base / name)
            if not any(is_image_name(path.name) for path in found):
                raise UserError(f"class folder {base / name} has no images ({' '.join(IMAGE_SUFFIXES)})")
            in_split = [relative for relative in (path.relative_to(self.root).as_posix() for path in found)
                        if self.nested or self._in_split(relative)]
            images = [relative for relative in in_split if is_image_name(relative)]
            files += images
            labels += [label] * len(images)
            self.passed_over += [relative for relative in in_split if not is_image_name(relative)]
        keep = kept_items(len(files), limit)
        self.class_names, self.files = tuple(names), [files[i] for i in keep]
        self.labels = np.asarray(labels, np.int64)[keep]

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

    def attrs(self) -> dict:
        return {"split_rule": "train/ and test/ folders" if self.nested else
                f"seeded hash of the path (seed {SPLIT_SEED}), {self.test_fraction:g} to test"}

    def decode(self, item: int) -> tuple[np.ndarray | None, str]:
        return decode_file(self.root / self.files[item])

    def _blobs(self, start: int, stop: int) -> Iterator[tuple[int, bytes | None, str]]:
        for item in range(start, stop):
            yield item, *read_file(self.root / self.files[item])


def _class_folders(base: Path) -> list[str]:
    if not base.is_dir():
        raise UserError(f"data folder {base} does not exist")
    names = sorted(entry.name for entry in os.scandir(base) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise UserError(f"no class folders in {base}: expected {base}/<class name>/<images>")
    return names


def _files(folder: Path) -> list[Path]:
    """The files under `folder`, recursively and sorted; hidden files and folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / name for name in sorted(filenames) if not name.startswith(".")]
    return found
