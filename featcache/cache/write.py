"""Writing a cache: one file built chunk by chunk, so that a crash at any moment loses at most a chunk.

Why it survives a crash at any moment (SIGKILL, Ctrl-C, power loss):
- The file is built as `<split>.partial.h5` and only renamed to `<split>.h5` (atomically,
  then the folder is fsynced) after `complete` is set. A `.h5` name therefore never holds a
  half-written cache, and a failed rebuild leaves the old cache untouched.
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
- Adding views (or inner-layer features) to a complete cache works the same way: the partial
  file starts as a copy of the complete one (HDF5 copies its stored chunks, bytes unchanged)
  plus the new datasets, preallocated, and `rows_done` counts their rows (attribute `computing`
  names them: a view, or `<view>@<feature>`). The complete file stays in use until the
  extended one replaces it.
We chose this over SWMR (needs h5clear after a crash) and over per-chunk side files
(more moving parts, and `h5ls` could no longer show the whole cache).
A partial file that still cannot be opened, or that belongs to other settings, is
discarded and rebuilt; a lock file keeps two writers off the same cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError, first_line
from .layout import (
    CHUNK_ROWS, IDENTITY, RESUME_IDENTITY, feature_dataset, mismatches, open_h5, partial_path, stored_rows,
    view_dataset,
)


_LAYOUT = ("engine", "dim", "quantized_model", "calibration_sha256", "views", "computing", "features")  # per file


@contextlib.contextmanager
def locked(path: Path):
    """Hold `<file>.lock` while writing a cache, so a second writer is turned away: in another process, or in
    this one (a thread, a notebook cell), since each call opens the file anew.

    An flock, which belongs to the open file: the kernel drops it when the process dies, so a crash never
    leaves it stuck. A child forked meanwhile shares the open file (OpenVINO's telemetry forks one), so the
    lock is released explicitly, not by closing: the child's copy then holds nothing.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot write cache folder {path.parent}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise UserError(f"cache {path} is busy: another writer (an extract.py run, or a thread) holds it") from None
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_unneeded_partial(path: Path) -> str | None:
    """A complete cache at `path` holds all a run asks for: a partial file beside it, left by an interrupted run
    (adding views, or rebuilding), is removed unless a writer is at work on it. The line saying so, if removed."""
    partial = partial_path(path)
    if not partial.exists():
        return None
    try:
        with locked(path):
            try:
                with open_h5(partial, "r") as f:
                    computing = ", ".join(json.loads(f.attrs["computing"]))
            except (OSError, KeyError, TypeError, ValueError):  # damaged, or made before views were added
                computing = "its views"
            partial.unlink()
    except UserError:  # busy (a writer holds it), or a folder this run cannot write
        return None
    return f"removed {partial}: the unfinished copy of an interrupted run computing {computing}, not needed here"


class CacheWriteError(OSError):
    """Writing the cache file failed (disk full, an I/O error): what was committed before is kept."""


@contextlib.contextmanager
def _io_errors():
    """Any failed write of the cache file as a CacheWriteError with its errno. h5py reports one (disk full, an
    I/O error) as an error whose message names the errno: a ValueError, a RuntimeError, or an OSError
    without its errno."""
    try:
        yield
    except CacheWriteError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        number = getattr(exc, "errno", None)
        if not number:
            found = re.search(r"errno = (\d+)", str(exc))
            if not found and not isinstance(exc, OSError):
                raise
            number = int(found.group(1)) if found else 0
        raise CacheWriteError(number, os.strerror(number) if number else first_line(exc)) from exc


class CacheWriter:
    """Builds one cache file chunk by chunk, resuming a matching partial file.

    Use as a context manager inside `locked(path)`: `rows_done` says where to continue,
    `write()` commits rows, `finish()` publishes the complete file.

    With `files` (a folder source, whose unreadable files are skipped), `attrs["rows"]` is the
    number of files, an upper bound: each row records its file in `source_index`, `next_item`
    says which file to read next, and `finish()` shrinks the datasets to the rows written.

    With `features` ({feature: values per row}), every view also gets a dataset per inner-layer feature;
    `write()` takes its rows keyed `<view>@<feature>`.

    With `base` (the complete cache at `path`), the writer adds the views and features it lacks: its rows,
    labels, views and features are copied, and `write()` takes the new datasets' rows only (in the base's row
    order): the new views' (with every feature) and the new features' of its views.
    """

    def __init__(self, path: Path, attrs: dict, dim: int, views: tuple[str, ...],
                 checksums: bool = True, files: list[str] | None = None, base: dict | None = None,
                 features: dict[str, int] | None = None):
        self.path = Path(path)
        self.checksums = checksums  # False only to measure what they cost (bench/)
        self.partial = partial_path(self.path)
        self.base = base  # the complete cache's attributes, when adding views to it
        present = tuple(json.loads(base["views"])) if base else ()
        had = json.loads(base.get("features", "{}")) if base else {}
        self.views = present + tuple(v for v in views if v not in present)  # every view the file will hold
        self.features = dict(had, **(features or {}))  # every feature the file will hold, for each view
        self.widths = {}  # what this writer writes: `<view>` (embeddings), `<view>@<feature>`; values per row
        for view in self.views:
            if view not in present:
                self.widths[view] = dim
            for feature, size in self.features.items():
                if view not in present or feature not in had:
                    self.widths[f"{view}@{feature}"] = size
        self.computing = tuple(self.widths)
        self.attrs = dict(attrs, dim=dim, views=json.dumps(list(self.views)),
                          computing=json.dumps(list(self.computing)))
        if self.features:
            self.attrs["features"] = json.dumps(self.features, sort_keys=True)  # the order asked is no identity
        # Adding views: the base's record of how its rows were made stays; what differs for the new views (versions,
        # batch size, when) is recorded on their datasets.
        self.made = {k: v for k, v in self.attrs.items()
                     if base and k not in IDENTITY + _LAYOUT and base.get(k) != v}
        if base:
            self.attrs = dict(base, **{k: self.attrs[k] for k in ("views", "computing", "dim", "features")
                                       if k in self.attrs}, complete=False, rows_done=np.int64(0))
        self.files = files
        self.rows = int(self.attrs["rows"])
        self.rows_done = 0
        self.resumed = False
        self.discarded = ""  # why a partial file found here could not be resumed
        self._file = None
        self._tails: dict[str, np.ndarray] = {}  # committed rows of each dataset's current HDF5 chunk

    @_io_errors()
    def __enter__(self):
        if self.partial.exists():
            self.discarded = self._resume()
        if not self.resumed:
            self._create()
        try:
            self._tails = {name: self._committed_tail(self._file[name]) for name in self._names()}
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc):
        self._close()

    def _resume(self) -> str:
        """Open the partial file to go on with it; or why it cannot be (it is then rebuilt from row 0)."""
        try:
            f = open_h5(self.partial, "r+")
        except (OSError, RuntimeError, ValueError):
            return "it could not be opened"
        try:
            # A folder's partial whose publishing was interrupted: already cut to the rows written (every file was
            # read), perhaps its skipped files listed.
            published = self.files is not None and not self.base and f.attrs.get("rows") == f.attrs.get("rows_done")
            wrong = [name for name in mismatches(f.attrs, self.attrs, RESUME_IDENTITY)
                     if not (published and name == "rows")]
            if not wrong and self._has_datasets(f, published):
                self._file, self.rows_done, self.resumed = f, int(f.attrs["rows_done"]), True
                if published:
                    self.rows = self.rows_done
                return ""
            done = int(f.attrs.get("rows_done", 0))
            wrong = list(dict.fromkeys("views" if name == "computing" else name for name in wrong))
            why = f"it was made with other {', '.join(wrong)}" if wrong else "its datasets are not these settings'"
            reason = f"{done} rows of it are not reused: {why}"
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:  # its metadata is damaged
            reason = f"it could not be read ({type(exc).__name__})"
        f.close()
        return reason

    def _names(self) -> list[str]:
        """The datasets this writer gives one entry per row."""
        rows = [] if self.base else ["labels"] + (["source_index"] if self.files is not None else [])
        return [view_dataset(key) for key in self.computing] + rows

    def _has_datasets(self, f, published: bool = False) -> bool:
        names = {feature_dataset(v, feature) for v in self.views for feature in self.features}
        names |= {view_dataset(v) for v in self.views} | {"labels"}
        if self.files is not None:
            names |= {"source_index", "source_files"} | ({"skipped_files"} if self.base else set())
        return set(f) - ({"skipped_files"} if published else set()) == names

    @property
    def next_item(self) -> int:
        """The source item after the last committed row's (its row number when nothing is skipped)."""
        if self.files is None or self.rows_done == 0:
            return self.rows_done
        if self.rows == self.rows_done and not self.base:  # every file read: publishing was interrupted
            return len(self.files)
        tail = self._tails.get("source_index", ())  # none when adding views: the base's rows are all intact
        return int(tail[-1] if len(tail) else self._file["source_index"][self.rows_done - 1]) + 1

    def items(self) -> np.ndarray | None:
        """Adding views to a folder cache: the source item of each of its rows (their rows must be made
        again in this order); None otherwise."""
        return self._file["source_index"][:] if self.base and self.files is not None else None

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
        try:
            self._create_datasets(tmp)
            _fsync_path(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.partial)
        _fsync_path(self.partial.parent)
        self._file = open_h5(self.partial, "r+")

    def _create_datasets(self, tmp: Path):
        shrinkable = self.files is not None and not self.base  # finish() cuts the rows of skipped files off the end
        with open_h5(tmp, "w") as f:
            if self.base:
                with open_h5(self.path, "r") as old:
                    for name in old:  # stored chunks copied as they are: the old views' bytes stay
                        old.copy(old[name], f, name)
            def rows_dataset(name, width, dtype, chunk_rows):
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)  # all space allocated now, never filled: raw writes
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                f.create_dataset(name, shape=(self.rows, *width), dtype=dtype,
                                 chunks=(max(1, min(chunk_rows, self.rows)), *width),
                                 maxshape=(None, *width) if shrinkable else None, fletcher32=self.checksums, dcpl=dcpl)

            for key, width in self.widths.items():
                rows_dataset(view_dataset(key), (width,), "<f4", CHUNK_ROWS)
                if self.base:
                    f[view_dataset(key)].attrs.update(self.made, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            if not self.base:
                rows_dataset("labels", (), "<i8", CHUNK_ROWS * 64)
            if shrinkable:
                rows_dataset("source_index", (), "<i8", CHUNK_ROWS * 64)
                f.create_dataset("source_files", data=np.array(self.files, dtype=h5py.string_dtype()))
            f.attrs.update(self.attrs)
            if not self.base:
                f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs.update(rows_done=np.int64(0), complete=False)

    @_io_errors()
    def write(self, start: int, embeddings: dict[str, np.ndarray], labels: np.ndarray, items: np.ndarray | None = None):
        """Write rows [start, start+n) and commit them: after this returns they survive a crash.

        `items`: each row's source item (file), recorded when the writer was given `files`."""
        stop = start + len(labels)
        if start != self.rows_done or stop > self.rows:
            raise ValueError(f"rows {start}:{stop} do not follow committed row {self.rows_done}")
        f = self._file
        for key in self.computing:
            self._write_whole_chunks(f[view_dataset(key)], stop, embeddings[key])
        if not self.base:
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

    @_io_errors()
    def finish(self, skipped: list[tuple[str, str]] = ()):
        """Mark complete and publish under the final name; replaces an older cache atomically.

        `skipped`: (file, reason) of the source files that gave no row (then fewer rows than files)."""
        if self.rows_done != self.rows and (self.files is None or self.base):
            raise ValueError(f"only {self.rows_done} of {self.rows} rows written")
        f = self._file
        if self.rows_done != self.rows:
            for name in self._names():
                f[name].resize(self.rows_done, axis=0)
            f.attrs.modify("rows", np.int64(self.rows_done))
            self.rows = self.rows_done
        if self.files is not None and not self.base:
            listed = np.array([list(pair) for pair in skipped], dtype=h5py.string_dtype())
            if "skipped_files" in f:  # listed by the interrupted run that resumed here
                del f["skipped_files"]
            f.create_dataset("skipped_files", data=listed, shape=(len(skipped), 2))
            f.attrs["skipped"] = np.int64(len(skipped))
        f.attrs.modify("complete", True)
        self._sync()
        self._close()
        os.replace(self.partial, self.path)
        _fsync_path(self.path.parent)

    def written_items(self) -> np.ndarray:
        """The source item of every committed row (all rows' own numbers when nothing is skipped)."""
        return np.arange(self.rows_done) if self.files is None else self._file["source_index"][: self.rows_done]

    def _sync(self):
        self._file.flush()
        os.fsync(self._file.id.get_vfd_handle())

    def _close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


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


def _fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
