"""The HDF5 embedding cache: where a cache lives, what it says about itself, and crash-safe writing.

Layout: `<cache_dir>/<dataset>/<model-slug>-<hash>/<size>px-<resize>-<views>[-limitN]/<split>.h5`,
so other settings always make another file and vectors never mix (a folder dataset's
`<dataset>` names the folder and a hash of its path). Each file holds `embeddings`
(float32 [N, D]), `embeddings_flip` when flip views were asked for, and `labels` (int64 [N]),
plus attributes naming its settings, class names, the source fingerprint, the versions that
made it, `rows_done` and `complete`. A folder dataset's cache also holds `source_files` (every
file of the split, relative to the data folder), `source_index` (int64 [N]: each row's file)
and `skipped_files` ([K, 2] strings: each file that could not be decoded, and why).

Why it survives a crash at any moment (SIGKILL, Ctrl-C, power loss):
- The file is built as `<split>.partial.h5` and only renamed to `<split>.h5` (atomically,
  then the folder is fsynced) after `complete` is set. A `.h5` name therefore never holds a
  half-written cache, and a failed `--force` rebuild leaves the old cache untouched.
- The partial file is created under a temporary name and renamed once its datasets exist,
  so a kill during creation leaves nothing, or a harmless stray temp file.
- Datasets are allocated in full at creation (H5D_ALLOC_TIME_EARLY, no compression):
  every chunk has its final address and size, so appending rows is a write at a fixed
  offset and never touches HDF5's metadata (chunk index, heaps). The only metadata
  write per chunk is an in-place `rows_done` attribute update, done after the rows are
  flushed and fsynced. A kill mid-chunk leaves rows past `rows_done` that the next run
  simply writes again, so a crash costs at most the chunk in flight.
- Every HDF5 chunk carries a Fletcher-32 checksum (its last 4 bytes, no metadata), so
  bit rot fails loudly on read. A commit therefore only ever writes *whole* HDF5 chunks
  (the committed rows already in the first one, kept in memory, then the new rows, then
  padding): HDF5 never has to read a chunk back to merge a partial write, so a chunk torn
  by a kill (its committed rows intact, its checksum not) is simply written whole again
  by the next run, which takes the committed rows from the stored bytes without the check.
  Caches made before checksums (no filter) are read and resumed as they are.
We chose this over SWMR (needs h5clear after a crash) and over per-chunk side files
(more moving parts, and `h5ls` could no longer show the whole cache).
A partial file that still cannot be opened, or that belongs to other settings, is
discarded and rebuilt; a lock file keeps two writers off the same cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import UserError
from .memory import fresh_array
from .sources import DEFAULT_DATASET

FORMAT_VERSION = 1  # checksummed chunks (since 0.2) need no new version: readers see the filter, not a format
TOOL = "featcache"
CHUNK_ROWS = 256
CHECKSUM_BYTES = 4  # Fletcher-32 appends this much to every stored chunk
# Attributes that decide whether a file is the cache asked for.
IDENTITY = ("tool", "format_version", "dataset", "split", "model", "image_size", "resize",
            "views", "limit", "precision", "crop", "data_dir", "test_fraction", "model_sha256", "rows",
            "source_fingerprint")
# What a cache made before an attribute existed implicitly had.
LEGACY_DEFAULTS = {"dataset": "cifar10", "precision": "f32", "crop": "none", "data_dir": "", "test_fraction": 0.0,
                   "model_sha256": ""}
# A partial file is only resumed by the same engine (and int8 model), so one file never mixes them.
RESUME_IDENTITY = IDENTITY + ("engine", "dim", "quantized_model", "calibration_sha256")


@dataclass(frozen=True)
class CacheKey:
    """The settings that select one cache file (limit 0 means the whole split).

    Build it with `selection.select` (it resolves paths, the model's input size and content hash).
    """

    model: str
    image_size: int
    resize: str
    views: str
    limit: int = 0
    dataset: str = DEFAULT_DATASET
    precision: str = "f32"
    crop: str = "none"
    data_dir: str = ""  # a folder dataset's root; CIFAR copies are told apart by their fingerprint alone
    test_fraction: float = 0.0  # a one-level folder's split rule
    model_sha256: str = ""  # a local model folder's contents; a TF Hub handle names fixed contents

    @classmethod
    def from_attrs(cls, attrs: dict):
        """The key a cache's attributes (or a run record's "cache" entry) name; older ones lack some."""
        def get(name, default=None):
            return attrs.get(name, LEGACY_DEFAULTS.get(name, default))

        return cls(get("model", ""), int(attrs["image_size"]), attrs["resize"], attrs["views"], int(get("limit", 0)),
                   get("dataset"), get("precision"), get("crop"), get("data_dir"),
                   float(get("test_fraction")), get("model_sha256"))

    def model_dir(self, cache_dir: str | os.PathLike) -> Path:
        """`<cache_dir>/<dataset>/<model-slug>-<hash>`: every cache of this model, and its quantized versions."""
        return Path(cache_dir) / self.dataset_name() / model_slug(self.model, self.model_sha256)

    def dataset_name(self) -> str:
        """`cifar10`, `cifar100`, or `folder-<name>-<hash of its path and split rule>`."""
        if not self.data_dir:
            return self.dataset
        digest = hashlib.sha1(f"{self.data_dir}|{self.test_fraction}".encode()).hexdigest()[:8]
        return f"{self.dataset}-{_slug(Path(self.data_dir).name)}-{digest}"

    def path(self, cache_dir: str | os.PathLike, split: str) -> Path:
        return self.model_dir(cache_dir) / self.settings_name() / f"{split}.h5"

    def settings_name(self) -> str:
        """`<size>px-<resize>[-center]-<views>[-<precision>][-limitN]`; defaults add nothing (older paths stay)."""
        name = f"{self.image_size}px-{self.resize}"
        if self.crop != "none":
            name += f"-{self.crop}"
        name += f"-{self.views}"
        if self.precision != "f32":
            name += f"-{self.precision}"
        if self.limit:
            name += f"-limit{self.limit}"
        return name

    def attrs(self, split: str) -> dict:
        return {"tool": TOOL, "format_version": FORMAT_VERSION, "split": split, **asdict(self)}


def model_slug(model: str, sha256: str = "") -> str:
    """A readable, unique folder name for a model: its last path part and a hash of handle (and contents)."""
    readable = model.split("://", 1)[-1].split("/", 1)[-1] if "://" in model else Path(model).name
    digest = hashlib.sha1((model + (f"|{sha256}" if sha256 else "")).encode()).hexdigest()[:8]
    return f"{_slug(readable)[:48]}-{digest}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def skipped_files(path: Path) -> list[tuple[str, str]]:
    """(file, reason) of each source file a folder cache has no row for."""
    with _h5(path, "r") as f:
        if "skipped_files" not in f:
            return []
        return [(file.decode(), reason.decode()) for file, reason in f["skipped_files"][:]]


def class_names(attrs: dict) -> tuple[str, ...] | None:
    """The class names a cache (or run record) stores; None for caches made before they were stored."""
    names = attrs.get("class_names")
    if names is None:
        return None
    return tuple(json.loads(names) if isinstance(names, str) else names)


def view_dataset(view: str) -> str:
    return "embeddings" if view == "plain" else f"embeddings_{view}"


def partial_path(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.h5")


def _mismatches(attrs, expected: dict, names) -> list[str]:
    out = []
    for name in names:
        if name in expected and _plain(attrs.get(name, LEGACY_DEFAULTS.get(name))) != _plain(expected[name]):
            out.append(name)
    return out


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class CacheState:
    """What a cache file on disk is: 'missing', 'complete', or 'bad' with a reason."""

    status: str
    reason: str = ""


def inspect(path: Path, expected: dict) -> CacheState:
    """Compare a finished cache file with the attributes we expect, without loading rows."""
    if not path.exists():
        return CacheState("missing")
    try:
        with _h5(path, "r") as f:
            attrs = _attributes(f)
            if attrs.get("tool") != TOOL:
                return CacheState("bad", "it was not made by featcache")
            wrong = _mismatches(attrs, expected, IDENTITY)
            if wrong == ["source_fingerprint"]:
                return CacheState("bad", "its source changed since it was made (images added, removed or modified)")
            if wrong:
                return CacheState("bad", f"it was made with other {', '.join(wrong)}")
            if not attrs.get("complete") or attrs.get("rows_done") != attrs.get("rows"):
                return CacheState("bad", "it is incomplete")
            for name in ("embeddings", "labels"):
                if name not in f or f[name].shape[0] != attrs["rows"]:
                    return CacheState("bad", f"its {name} dataset is missing or the wrong length")
    except (OSError, RuntimeError, KeyError, ValueError) as exc:  # h5py's ways of meeting a damaged file
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        return CacheState("bad", f"it is not a readable HDF5 file ({first_line})")
    return CacheState("complete")


def read(path: Path, expected: dict, views: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Load a complete cache: ({view: embeddings}, labels, attributes). Refuses anything else."""
    state = inspect(path, expected)
    if state.status == "missing":
        raise UserError(f"no cache at {path}")
    if state.status == "bad":
        raise UserError(f"cache {path} cannot be used: {state.reason}")
    with _h5(path, "r") as f:
        missing = [v for v in views if view_dataset(v) not in f]
        if missing:
            raise UserError(f"cache {path} has no {missing[0]} view; extract it with --views flip")
        try:
            embeddings = {v: _read_whole(f[view_dataset(v)]) for v in views}
            labels = f["labels"][:]
        except OSError as exc:
            if _failed_checksum(exc):
                raise CorruptCache(f"cache {path} is damaged: a chunk failed its Fletcher-32 checksum") from None
            raise
        attrs = _attributes(f)
    return embeddings, labels, attrs


def _read_whole(dataset) -> np.ndarray:
    """All of a dataset, into a fresh buffer (steadier and often faster to fill than numpy's, see memory.py)."""
    rows = fresh_array(dataset.shape, dataset.dtype)
    if rows.size:
        dataset.read_direct(rows)
    return rows


def attributes(path: Path) -> dict:
    """A cache file's attributes as plain Python values, without reading any rows."""
    with _h5(path, "r") as f:
        return _attributes(f)


def _attributes(f) -> dict:
    return {k: _plain(v) for k, v in f.attrs.items()}


def _failed_checksum(exc: OSError) -> bool:
    """h5py reports a Fletcher-32 mismatch as an OSError from the filter pipeline."""
    return "filter returned failure" in str(exc)


class CorruptCache(UserError):
    """Stored bytes no longer match their checksum (bit rot, a failing disk)."""


def non_finite(array: np.ndarray) -> tuple[int, int]:
    """(count of NaN/Inf values, first row holding one, or -1): a cheap check before any use.

    Fast path: one NaN or Inf anywhere makes the sum NaN or Inf (a sum of finite values
    overflowing, never seen for embeddings, only costs the exact scan below).
    """
    if np.isfinite(array.sum()):
        return 0, -1
    bad = ~np.isfinite(array)
    if not bad.any():
        return 0, -1
    rows = bad.reshape(len(array), -1).any(axis=1)
    return int(bad.sum()), int(np.argmax(rows))


@contextlib.contextmanager
def locked(path: Path):
    """Hold `<file>.lock` while writing a cache, so a second writer is turned away.

    A POSIX record lock (lockf), not flock: the kernel drops it when the process dies, so a
    crash never leaves it stuck, and a child forked meanwhile does not inherit it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot write cache folder {path.parent}: {exc.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        os.close(fd)
        raise UserError(f"cache {path} is busy: another extract.py is writing it") from None
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


def list_caches(cache_dir) -> list[dict]:
    """Every cache file under `cache_dir` (complete or partial): its key, split, rows, state and size."""
    found = []
    for path in sorted(Path(cache_dir).glob("*/*/*/*.h5")):
        entry = {"path": path, "megabytes": path.stat().st_size / 1e6, "key": None}
        try:
            a = attributes(path)
            entry.update(split=a["split"], rows=int(a["rows"]), rows_done=int(a["rows_done"]),
                         complete=bool(a["complete"]) and not path.name.endswith(".partial.h5"),
                         key=CacheKey.from_attrs(a))
        except (OSError, KeyError, ValueError, TypeError):
            pass  # not a readable featcache file: listed by path only
        found.append(entry)
    return found


VERIFY_BLOCK_ROWS = 10_000


def check_contents(path: Path, reader) -> list[str]:
    """Row-level checks that `inspect` leaves out: shapes, labels vs the source, NaN/Inf.

    Reads a block of rows at a time, so memory stays bounded for any split size.
    """
    problems = []
    with _h5(path, "r") as f:
        rows = int(f.attrs.get("rows", -1))
        names = [n for n in f if n.startswith("embeddings")]
        if not names:
            return ["no embeddings dataset"]
        for name in names:
            if f[name].ndim != 2 or f[name].shape[0] != rows:
                problems.append(f"{name} has shape {f[name].shape}, expected ({rows}, D)")
        if "labels" not in f or f["labels"].shape != (rows,):
            return problems + ["labels dataset missing or the wrong length"]
        if not reader.may_skip and rows != reader.rows:
            return problems + [f"{rows} rows, but the source has {reader.rows}"]
        items = f["source_index"][:] if "source_index" in f else np.arange(rows)
        if len(items) != rows or (rows and not 0 <= items.min() <= items.max() < reader.rows):
            return problems + ["its rows name source files that the source does not have"]
        expected = reader.labels_of(items)
        for lo in range(0, rows, VERIFY_BLOCK_ROWS):
            hi = min(lo + VERIFY_BLOCK_ROWS, rows)
            if not np.array_equal(f["labels"][lo:hi], expected[lo:hi]):
                problems.append(f"labels differ from the source in rows {lo}:{hi}")
            for name in names:
                try:
                    block = f[name][lo:hi]
                except OSError as exc:
                    if not _failed_checksum(exc):
                        raise
                    problems.append(f"{name} fails its checksum in rows {lo}:{hi} (damaged)")
                    continue
                if not np.isfinite(block).all():
                    problems.append(f"{name} has NaN or Inf in rows {lo}:{hi}")
    return problems


class CacheWriter:
    """Builds one cache file chunk by chunk, resuming a matching partial file.

    Use as a context manager inside `locked(path)`: `rows_done` says where to continue,
    `write()` commits rows, `finish()` publishes the complete file.

    With `files` (a folder source, whose unreadable files are skipped), `attrs["rows"]` is the
    number of files, an upper bound: each row records its file in `source_index`, `next_item`
    says which file to read next, and `finish()` shrinks the datasets to the rows written.
    """

    def __init__(self, path: Path, attrs: dict, dim: int, views: tuple[str, ...], restart: bool = False,
                 checksums: bool = True, files: list[str] | None = None):
        self.path = Path(path)
        self.checksums = checksums  # False only to measure what they cost (bench/)
        self.partial = partial_path(self.path)
        self.attrs = dict(attrs, dim=dim)
        self.files = files
        self.rows = int(attrs["rows"])
        self.dim = dim
        self.views = views
        self.restart = restart
        self.rows_done = 0
        self.resumed = False
        self.discarded = ""  # why a partial file found here could not be resumed
        self._file = None
        self._tails: dict[str, np.ndarray] = {}  # committed rows of each dataset's current HDF5 chunk

    def __enter__(self):
        self._open()
        self._tails = {name: self._committed_tail(self._file[name]) for name in self._names()}
        return self

    def __exit__(self, *exc):
        self._close()

    def _open(self):
        if self.partial.exists() and not self.restart:
            try:
                f = _h5(self.partial, "r+")
            except OSError:
                f, self.discarded = None, "it could not be opened"
            if f is not None:
                wrong = _mismatches(f.attrs, self.attrs, RESUME_IDENTITY)
                if not wrong and self._has_datasets(f):
                    self._file = f
                    self.rows_done = int(f.attrs["rows_done"])
                    self.resumed = True
                    return
                done = int(f.attrs.get("rows_done", 0))
                why = f"it was made with other {', '.join(wrong)}" if wrong else "its datasets are not these settings'"
                self.discarded = f"{done} rows of it are not reused: {why}"
                f.close()
        self._create()

    def _names(self) -> list[str]:
        """The datasets that get one entry per row."""
        return [view_dataset(v) for v in self.views] + ["labels"] + (["source_index"] if self.files is not None else [])

    def _has_datasets(self, f) -> bool:
        names = set(self._names()) | ({"source_files"} if self.files is not None else set())
        return set(f) == names

    @property
    def next_item(self) -> int:
        """The source item after the last committed row's (its row number when nothing is skipped)."""
        if self.files is None or self.rows_done == 0:
            return self.rows_done
        tail = self._tails["source_index"]
        last = tail[-1] if len(tail) else self._file["source_index"][self.rows_done - 1]
        return int(last) + 1

    def _committed_tail(self, ds) -> np.ndarray:
        """Committed rows between the start of the HDF5 chunk holding `rows_done` and `rows_done`.

        Read from the stored bytes without checking the checksum: a kill may have torn that
        chunk's last write, which rewrote these very bytes but not necessarily its checksum.
        """
        n = self.rows_done % ds.chunks[0]
        return stored_rows(ds, self.rows_done - n, n)
    def _create(self):
        tmp = self.partial.with_name(self.partial.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shrinkable = self.files is not None  # finish() cuts the rows of skipped files off the end
        with _h5(tmp, "w") as f:
            def rows_dataset(name, width, dtype, chunk_rows):
                f.create_dataset(name, shape=(self.rows, *width), dtype=dtype,
                                 chunks=(max(1, min(chunk_rows, self.rows)), *width),
                                 maxshape=(None, *width) if shrinkable else None, fletcher32=self.checksums,
                                 dcpl=_preallocated())

            for view in self.views:
                rows_dataset(view_dataset(view), (self.dim,), "<f4", CHUNK_ROWS)
            rows_dataset("labels", (), "<i8", CHUNK_ROWS * 64)
            if shrinkable:
                rows_dataset("source_index", (), "<i8", CHUNK_ROWS * 64)
                f.create_dataset("source_files", data=np.array(self.files, dtype=h5py.string_dtype()))
            for name, value in self.attrs.items():
                f.attrs[name] = value
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["rows_done"] = np.int64(0)
            f.attrs["complete"] = False
        _fsync_path(tmp)
        os.replace(tmp, self.partial)
        _fsync_path(self.partial.parent)
        self._file = _h5(self.partial, "r+")
        self.rows_done = 0

    def write(self, start: int, embeddings: dict[str, np.ndarray], labels: np.ndarray, items: np.ndarray | None = None):
        """Write rows [start, start+n) and commit them: after this returns they survive a crash.

        `items`: each row's source item (file), recorded when the writer was given `files`."""
        stop = start + len(labels)
        if start != self.rows_done or stop > self.rows:
            raise ValueError(f"rows {start}:{stop} do not follow committed row {self.rows_done}")
        f = self._file
        for view in self.views:
            self._write_whole_chunks(f[view_dataset(view)], stop, embeddings[view])
        self._write_whole_chunks(f["labels"], stop, labels)
        if self.files is not None:
            self._write_whole_chunks(f["source_index"], stop, np.asarray(items, np.int64))
        self._sync()
        f.attrs.modify("rows_done", np.int64(stop))
        self._sync()
        self.rows_done = stop

    def _write_whole_chunks(self, ds, stop: int, rows: np.ndarray):
        """Write the dataset's current chunk's committed rows, `rows`, and zero padding up to a chunk end.

        Only whole chunks are written, so HDF5 never reads one back (it would refuse a torn
        one). The last chunk of a dataset is shorter than a chunk; it goes through
        `_write_edge_chunk`, since HDF5 still reads back a short edge chunk it is given.
        """
        tail = self._tails[ds.name.lstrip("/")]
        size = ds.chunks[0]
        lo = stop - len(rows) - len(tail)
        hi = min(-(-stop // size) * size, self.rows)
        block = np.zeros((hi - lo, *ds.shape[1:]), ds.dtype)
        block[: len(tail)] = tail
        block[len(tail) : stop - lo] = rows
        edge = self.rows - self.rows % size if ds.fletcher32 and self.rows % size and hi == self.rows else hi
        if edge > lo:
            ds[lo:edge] = block[: edge - lo]
        if edge < hi:
            _write_edge_chunk(ds, edge, block[edge - lo :])
        self._tails[ds.name.lstrip("/")] = block[stop - stop % size - lo : stop - lo].copy()

    def finish(self, skipped: list[tuple[str, str]] = ()):
        """Mark complete and publish under the final name; replaces an older cache atomically.

        `skipped`: (file, reason) of the source files that gave no row (then fewer rows than files)."""
        if self.rows_done != self.rows and self.files is None:
            raise ValueError(f"only {self.rows_done} of {self.rows} rows written")
        f = self._file
        if self.rows_done != self.rows:
            for name in self._names():
                f[name].resize(self.rows_done, axis=0)
            f.attrs.modify("rows", np.int64(self.rows_done))
            self.rows = self.rows_done
        if self.files is not None:
            listed = np.array([list(pair) for pair in skipped], dtype=h5py.string_dtype())
            f.create_dataset("skipped_files", data=listed, shape=(len(skipped), 2))
            f.attrs["skipped"] = np.int64(len(skipped))
        f.attrs.modify("complete", True)
        self._sync()
        self._close()
        os.replace(self.partial, self.path)
        _fsync_path(self.path.parent)

    def written_items(self) -> np.ndarray:
        """The source item of every committed row (all rows' own numbers when nothing is skipped)."""
        if self.files is None:
            return np.arange(self.rows_done)
        return self._file["source_index"][: self.rows_done]

    def _sync(self):
        self._file.flush()
        os.fsync(self._file.id.get_vfd_handle())

    def _close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _h5(path, mode: str) -> h5py.File:
    """Open without HDF5's own flock: `locked()` already keeps writers apart, readers only open
    published files (never written again), and a flock would also be held by any child a
    library forks meanwhile (OpenVINO's telemetry does), making this very process's reopen fail."""
    return h5py.File(path, mode, locking=False)


def stored_rows(ds, lo: int, n: int) -> np.ndarray:
    """The first `n` rows of the chunk starting at row `lo`, as stored, without checking its checksum."""
    if n == 0:
        return np.empty((0, *ds.shape[1:]), ds.dtype)
    if not ds.fletcher32:
        return ds[lo : lo + n]
    _, stored = ds.id.read_direct_chunk((lo,) + (0,) * (ds.ndim - 1))
    return np.frombuffer(stored[:-CHECKSUM_BYTES], ds.dtype).reshape(ds.chunks)[:n].copy()


def _write_edge_chunk(ds, lo: int, rows: np.ndarray):
    """Write a dataset's short last chunk as one whole stored chunk, checksummed by HDF5 itself.

    HDF5 filters a full-size chunk (padding past the dataset's end) in a scratch in-memory
    file, and the stored bytes are copied to the chunk's fixed place with write_direct_chunk.
    """
    padded = np.zeros(ds.chunks, ds.dtype)
    padded[: len(rows)] = rows
    with h5py.File(io.BytesIO(), "w") as scratch:
        chunk = scratch.create_dataset("chunk", data=padded, chunks=ds.chunks, fletcher32=True)
        mask, stored = chunk.id.read_direct_chunk((0,) * ds.ndim)
    ds.id.write_direct_chunk((lo,) + (0,) * (ds.ndim - 1), stored, mask)


def _preallocated():
    """Dataset creation properties: all space allocated now, never filled, so writes are raw."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
