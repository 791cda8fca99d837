"""CIFAR-10 source: find the python-pickle batches, read one split, fingerprint it.

Local copies are read in place (a `cifar-10-batches-py` folder, its parent, or the
`cifar-10-python.tar.gz` archive). We deliberately do not go through
`keras.datasets.cifar10.load_data()`: it checks the archive's checksum and rejects
re-packed but byte-identical copies. This module never imports TensorFlow, so checking
whether a cache is up to date stays fast.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
DATA_DIR_ENV = "CIFAR10_DATA_DIR"
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
SPLITS = tuple(SPLIT_FILES)


@dataclass
class Split:
    """A whole split in memory (tests and small jobs; extraction streams with SplitSource)."""

    images: np.ndarray
    labels: np.ndarray
    source: str


def resolve_source(data_dir: str | os.PathLike | None) -> Path:
    """Return the batch folder or the .tar.gz archive to read.

    Order: the explicit path, then $CIFAR10_DATA_DIR, then the Keras download cache
    (downloading the official archive there if it is absent, as Keras does).
    """
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if data_dir is None:
        return _keras_cached_copy()
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise UserError(f"{path} is not a tar archive of CIFAR-10 (expected cifar-10-python.tar.gz)")
        return path
    for candidate in (path, path / BATCH_DIR):
        if (candidate / "batches.meta").exists() or (candidate / "test_batch").exists():
            return candidate
    archive = path / "cifar-10-python.tar.gz"
    if archive.is_file():
        return archive
    raise UserError(
        f"no CIFAR-10 batches in {path}: expected {BATCH_DIR}/ (data_batch_1..5, test_batch) "
        "or cifar-10-python.tar.gz"
    )


def _keras_cached_copy() -> Path:
    """The official archive, cached under ~/.keras/datasets the way Keras caches it."""
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    for folder in ("cifar-10-batches-py", "cifar-10-batches-py-target/cifar-10-batches-py"):
        if (keras_home / "datasets" / folder / "test_batch").exists():
            return keras_home / "datasets" / folder
    import keras  # only on the download path: keeps TensorFlow out of up-to-date checks

    try:
        path = keras.utils.get_file(
            fname="cifar-10-batches-py-target", origin=CIFAR10_URL, extract=True
        )
    except Exception as exc:  # noqa: BLE001 - any download failure means the same to the user
        raise UserError(
            f"could not download CIFAR-10 from {CIFAR10_URL} ({type(exc).__name__}); "
            f"pass --data-dir PATH (or set {DATA_DIR_ENV}) to read a local copy"
        ) from None
    return resolve_source(path)


class SplitSource:
    """One split read batch file by batch file: memory stays at one batch (30 MB) whatever N is.

    The archive is streamed in one pass per use; batches that the archive stores out of
    order are held until their turn (the official archive is in order). `rows` and
    `fingerprint` cost one pass, made on first use only.
    """

    def __init__(self, source: Path, split: str, limit: int | None = None):
        if split not in SPLIT_FILES:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.source, self.split, self.limit = Path(source), split, limit
        self.names = SPLIT_FILES[split]

    @property
    def rows(self) -> int:
        return self._scan[0]

    @property
    def fingerprint(self) -> str:
        return self._scan[1]

    @functools.cached_property
    def _scan(self) -> tuple[int, str]:
        """Count rows and fingerprint pixels and labels (sha256), whatever archive holds them."""
        pixels, labels, rows = hashlib.sha256(), hashlib.sha256(), 0
        for images, batch_labels in self.batches():
            pixels.update(images.tobytes())
            labels.update(batch_labels.astype("<i8").tobytes())
            rows += len(batch_labels)
        return rows, hashlib.sha256(pixels.digest() + labels.digest()).hexdigest()

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(uint8 [n,32,32,3], int64 [n]) per batch file, in order, cut at `limit` rows."""
        left = self.limit if self.limit is not None else float("inf")
        raw = _archive_batches(self.source, self.names) if self.source.is_file() else _folder_batches(self.source, self.names)
        for images, labels in raw:
            take = int(min(left, len(labels)))
            left -= take
            yield images[:take], labels[:take]
            if left <= 0:
                return

    def chunks(self, chunk_size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row, images, labels) of consecutive chunks, beginning at row `start`."""
        pending_images, pending_labels, position = [], [], 0
        for images, labels in self.batches():
            skip = min(max(start - position, 0), len(labels))
            position += len(labels)
            if skip < len(labels):
                pending_images.append(images[skip:])
                pending_labels.append(labels[skip:])
            while sum(len(x) for x in pending_labels) >= chunk_size:
                yield from self._emit(pending_images, pending_labels, chunk_size, position)
        if pending_labels:
            yield from self._emit(pending_images, pending_labels, None, position)

    @staticmethod
    def _emit(pending_images, pending_labels, size, position):
        images, labels = np.concatenate(pending_images), np.concatenate(pending_labels)
        size = len(labels) if size is None else size
        pending_images[:] = [images[size:]] if size < len(labels) else []
        pending_labels[:] = [labels[size:]] if size < len(labels) else []
        yield position - len(labels), images[:size], labels[:size]


def load_split(source: Path, split: str, limit: int | None = None) -> Split:
    """Read a whole split into memory, in the original order."""
    reader = SplitSource(source, split, limit)
    batches = list(reader.batches())
    return Split(images=np.concatenate([b[0] for b in batches]), labels=np.concatenate([b[1] for b in batches]),
                 source=str(source))


def _folder_batches(folder: Path, names: tuple[str, ...]):
    for name in names:
        path = folder / name
        if not path.is_file():
            raise UserError(f"missing CIFAR-10 batch file {path}")
        with open(path, "rb") as fh:
            yield _decode_batch(fh, str(path))


def _archive_batches(archive: Path, names: tuple[str, ...]):
    early: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    wanted = iter(names)
    next_name = next(wanted)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # one streaming pass; nothing is extracted to disk
                name = member.name.rsplit("/", 1)[-1]
                if not member.isfile() or name not in names or name in early:
                    continue
                early[name] = _decode_batch(tar.extractfile(member), f"{archive}:{member.name}")
                while next_name in early:
                    yield early.pop(next_name)
                    next_name = next(wanted, None)
                if next_name is None:
                    return
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise UserError(f"cannot read archive {archive}: {exc}") from None
    raise UserError(f"archive {archive} has no CIFAR-10 batch {next_name}")


def _decode_batch(fh, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [N,32,32,3], int64 [N]) after checking shapes and labels."""
    try:
        batch = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - truncated or foreign pickles fail in many ways
        raise UserError(f"{where} is not a readable CIFAR-10 batch ({type(exc).__name__})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{where} is not a CIFAR-10 batch (no data/labels entries)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{where}: data has shape {data.shape} {data.dtype}, expected [N, 3072] uint8")
    if labels.shape != (data.shape[0],):
        raise UserError(f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise UserError(f"{where}: labels outside 0..{len(CLASS_NAMES) - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)
