"""CIFAR-10 and CIFAR-100 sources: find the python-pickle batches, read one split, fingerprint it.

Local copies are read in place (a `cifar-10-batches-py` / `cifar-100-python` folder, its
parent, or the official .tar.gz). We deliberately do not go through
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

from ...errors import UserError, first_line
from .base import Chunk


@dataclass(frozen=True)
class Layout:
    """How one CIFAR dataset is published: its files, pickle keys, classes and download."""

    name: str
    title: str
    folder: str  # the folder inside the archive
    archive: str
    url: str
    env: str  # environment variable naming a local copy
    split_files: dict
    label_key: bytes
    classes: int
    meta: str  # the file holding the class names
    names_key: bytes


CIFAR10 = Layout("cifar10", "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10_DATA_DIR",
                 {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                 b"labels", 10, "batches.meta", b"label_names")
CIFAR100 = Layout("cifar100", "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
                  "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100_DATA_DIR",
                  {"train": ("train",), "test": ("test",)}, b"fine_labels", 100, "meta", b"fine_label_names")
LAYOUTS = {layout.name: layout for layout in (CIFAR10, CIFAR100)}
IMAGE_SHAPE = (32, 32)
# CIFAR-10's names as its batches.meta lists them; CIFAR-100's 100 names are read from its meta file.
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Split:
    """A whole split in memory (tests and small jobs; extraction streams with SplitSource)."""

    images: np.ndarray
    labels: np.ndarray


def resolve_source(data_dir: str | os.PathLike | None, layout: Layout = CIFAR10) -> Path:
    """Return the batch folder or the .tar.gz archive to read.

    Order: the explicit path, then the layout's environment variable, then the Keras download
    cache (downloading the official archive there if it is absent, as Keras does).
    """
    data_dir = data_dir or os.environ.get(layout.env)
    if data_dir is None:
        return _keras_download_present(layout) or _download(layout)
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise UserError(f"{path} is not a tar archive of {layout.title} (expected {layout.archive})")
        return path
    marker = layout.split_files["test"][0]
    for candidate in (path, path / layout.folder):
        if (candidate / layout.meta).exists() or (candidate / marker).exists():
            return candidate
    archive = path / layout.archive
    if archive.is_file():
        return archive
    files = ", ".join(name for names in layout.split_files.values() for name in names)
    raise UserError(f"no {layout.title} batches in {path}: expected {layout.folder}/ ({files}) or {layout.archive}")


def local_copy(data_dir: str | os.PathLike | None, layout: Layout = CIFAR10) -> Path | None:
    """What resolve_source reads, or None where it would download the official archive."""
    if data_dir or os.environ.get(layout.env):
        return resolve_source(data_dir, layout)
    return _keras_download_present(layout)


def _keras_download_present(layout: Layout) -> Path | None:
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    marker = layout.split_files["test"][0]
    for folder in (layout.folder, f"{layout.folder}-target/{layout.folder}"):  # the second: keras.datasets' place
        if (keras_home / "datasets" / folder / marker).exists():
            return keras_home / "datasets" / folder
    return None


def _download(layout: Layout) -> Path:
    """The official archive, downloaded to ~/.keras/datasets the way Keras caches it."""
    target = f"{layout.folder}-target"  # the folder name keras.datasets uses
    import keras  # only on the download path: keeps TensorFlow out of up-to-date checks

    try:
        path = keras.utils.get_file(fname=target, origin=layout.url, extract=True)
    except Exception as exc:
        # Keras words a failed fetch as a bare Exception ("URL fetch failure on ..."); a full disk or a damaged
        # download surfaces as an OSError, tarfile or zlib error. Anything else is a bug: raised as it is.
        if type(exc) is not Exception and not isinstance(exc, (OSError, tarfile.TarError, EOFError, zlib.error)):
            raise
        raise UserError(f"could not download {layout.title} from {layout.url} ({_cause(exc)}); pass `data_dir=PATH` "
                        f"(or set {layout.env}) to read a local copy") from None
    return resolve_source(path, layout)


def _cause(exc: BaseException) -> str:
    """Why a download failed, in one line: Keras wraps the network's error in a bare Exception ("URL fetch failure
    on ...: None -- [Errno -3] Temporary failure in name resolution"), whose last part says it."""
    text = first_line(exc).rsplit(" -- ", 1)[-1] if str(exc).strip() else ""
    kind = "" if type(exc) is Exception else type(exc).__name__
    return ": ".join(filter(None, [kind, text])) or type(exc).__name__


class SplitSource:
    """One split read batch file by batch file (memory stays at one batch), in one pass of the archive per use
    (batches stored out of order are held until their turn); `rows` and `fingerprint` cost one pass, on first use."""

    may_skip = False  # every row of a batch file is an image
    image_shape = IMAGE_SHAPE

    def __init__(self, source: Path, split: str, limit: int | None = None, layout: Layout = CIFAR10):
        self.source, self.split, self.limit, self.layout = Path(source), split, limit, layout

    @functools.cached_property
    def class_names(self) -> tuple[str, ...]:
        """The dataset's class names; CIFAR-10's are fixed, CIFAR-100's come from its meta file."""
        layout = self.layout
        if layout is CIFAR10:
            return CIFAR10_CLASS_NAMES
        what = f"{layout.title} meta file"
        meta = next(_members(self.source, (layout.meta,), lambda fh, where: _unpickle(fh, where, what), what))
        names = meta.get(layout.names_key) if isinstance(meta, dict) else None
        if not names or len(names) != layout.classes:
            raise UserError(f"{self.source}: {layout.meta} has no list of {layout.classes} class names")
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    @property
    def where(self) -> str:
        return str(self.source)

    def attrs(self) -> dict:
        return {}

    def labels_of(self, items: np.ndarray) -> np.ndarray:
        return np.concatenate([labels for _, labels in self.batches()])[items]

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
        decode = functools.partial(_decode_batch, layout=self.layout)
        names = self.layout.split_files[self.split]
        for images, labels in _members(self.source, names, decode, f"{self.layout.title} batch"):
            take = int(min(left, len(labels)))
            left -= take
            yield images[:take], labels[:take]
            if left <= 0:
                return

    def chunks(self, chunk_size: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        """Consecutive chunks of rows [start, stop) (stop None: the split's end)."""
        images, labels = np.zeros((0, *IMAGE_SHAPE, 3), np.uint8), np.zeros(0, np.int64)  # rows pending
        first, position = start, 0  # the item of the first row pending; the item after the batches read
        for batch_images, batch_labels in self.batches():
            if stop is not None and position >= stop:
                break
            lo, position = position, position + len(batch_labels)
            rows = slice(max(start - lo, 0), None if stop is None else stop - lo)
            images, labels = np.concatenate([images, batch_images[rows]]), np.concatenate([labels, batch_labels[rows]])
            while len(labels) >= chunk_size:
                yield Chunk(images[:chunk_size], labels[:chunk_size], np.arange(first, first + chunk_size))
                images, labels, first = images[chunk_size:], labels[chunk_size:], first + chunk_size
        if len(labels):
            yield Chunk(images, labels, np.arange(first, first + len(labels)))


def load_split(source: Path, split: str, limit: int | None = None, layout: Layout = CIFAR10) -> Split:
    """Read a whole split into memory, in the original order."""
    images, labels = zip(*SplitSource(source, split, limit, layout).batches())
    return Split(np.concatenate(images), np.concatenate(labels))


def _members(source: Path, names: tuple[str, ...], decode, what: str):
    """decode(file object, where) of each named file, in the order named, from a folder or an archive."""
    if source.is_file():
        yield from _archive_members(source, names, decode, what)
        return
    for name in names:
        path = source / name
        if not path.is_file():
            raise UserError(f"missing {what} file {path}")
        with open(path, "rb") as fh:
            yield decode(fh, str(path))


def _archive_members(archive: Path, names: tuple[str, ...], decode, what: str):
    early: dict[str, object] = {}
    wanted = iter(names)
    next_name = next(wanted)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # one streaming pass; nothing is extracted to disk
                name = member.name.rsplit("/", 1)[-1]
                if not member.isfile() or name not in names or name in early:
                    continue
                early[name] = decode(tar.extractfile(member), f"{archive}:{member.name}")
                while next_name in early:
                    yield early.pop(next_name)
                    next_name = next(wanted, None)
                if next_name is None:
                    return
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise UserError(f"cannot read archive {archive}: {exc}") from None
    raise UserError(f"archive {archive} has no {what} {next_name}")


def _unpickle(fh, where: str, what: str):
    try:
        return pickle.load(fh, encoding="bytes")
    # What the pickle module documents for data it cannot unpickle, and what damaged bytes were seen to raise.
    except (pickle.UnpicklingError, AttributeError, EOFError, ImportError, IndexError, ValueError, TypeError,
            OverflowError, MemoryError) as exc:
        raise UserError(f"{where} is not a readable {what} ({type(exc).__name__})") from None


def _decode_batch(fh, where: str, layout: Layout = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [N,32,32,3], int64 [N]) after checking shapes and labels."""
    batch = _unpickle(fh, where, f"{layout.title} batch")
    key = layout.label_key
    if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
        raise UserError(f"{where} is not a {layout.title} batch (no data/{key.decode()} entries)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[key])
    height, width = IMAGE_SHAPE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * height * width:
        raise UserError(f"{where}: data has shape {data.shape} {data.dtype}, expected [N, {3 * height * width}] uint8")
    if labels.shape != (data.shape[0],):
        raise UserError(f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.classes):
        raise UserError(f"{where}: labels outside 0..{layout.classes - 1}")
    images = data.reshape(-1, 3, height, width).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)
