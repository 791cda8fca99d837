"""Stage 1 end to end: a source's split -> chunks -> embeddings -> HDF5 cache.

reader (sources.open_split(...).chunks) -> mapper (a runner's: the Extractor in this process, or
Ray workers) -> writer (cache.write.CacheWriter). The three overlap: a thread reads and decodes the next
chunk, and another commits the previous one, while the mapper embeds the current one. Each
finished chunk is committed, so a rerun continues where a crashed run stopped; a complete,
matching cache is reported up to date before TensorFlow is even imported.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..cache.layout import CacheKey
from ..cache.read import attributes, cached_views, check_contents, inspect, non_finite, skipped_files
from ..cache.write import CacheWriteError, CacheWriter, locked, remove_unneeded_partial
from ..errors import UserError, first_line, in_python
from ..settings import (
    DEFAULT_CACHE_DIR, DEFAULT_CHUNK_SIZE, DEFAULT_ENGINE, DEFAULT_PRECISION, DEFAULT_VIEWS, check_count, parse_views,
)
from . import models, quantize, sources
from .extractor import ExtractorSettings, check_engine_options
from .runners import LocalRunner

PASSED_OVER_NAMED = 10  # files passed over as not images that a summary names; the others are counted


@dataclass
class ExtractResult:
    path: Path
    rows: int
    processed: int
    seconds: float
    up_to_date: bool = False
    load_seconds: float = 0.0
    engine: str = ""
    skipped: list = field(default_factory=list)  # (file, reason) of source files that gave no row
    report: list = field(default_factory=list)  # the runner's lines: per-worker throughput, rows per node
    passed_over: list = field(default_factory=list)  # files of the source's folders that are not images

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self, words=in_python) -> str:
        """One line, then one line per skipped file; `words` words the parameters it names (errors.py)."""
        count, others = len(self.skipped), len(self.passed_over)
        skipped = f"; {count} unreadable file{'s' if count > 1 else ''} skipped" if count else ""
        skipped += f"; {others} file{'s' if others > 1 else ''} passed over as not images" if others else ""
        named = [f"  passed over {file}: not an image file" for file in self.passed_over[:PASSED_OVER_NAMED]]
        named += [f"  ... and {others - PASSED_OVER_NAMED} more"] if others > PASSED_OVER_NAMED else []
        if self.up_to_date:
            return "\n".join([words(f"up to date: {self.path} ({self.rows} rows{skipped}); 0 images processed, "
                                    "`force=True` rebuilds it")] + named)
        line = (f"done: {self.rows} rows, {self.processed} images in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} images/s, {self.engine}; model load {self.load_seconds:.1f} s)"
                f"{skipped} -> {self.path}")
        return "\n".join([line] + [f"  {text}" for text in self.report]
                         + [f"  skipped {file}: {reason}" for file, reason in self.skipped] + named)


def extract(key: CacheKey, split: str, data_dir=None, cache_dir=DEFAULT_CACHE_DIR, views=DEFAULT_VIEWS,
            chunk_size=DEFAULT_CHUNK_SIZE, batch_size=None, force=False, engine=DEFAULT_ENGINE, strict=False,
            progress=True, log=print, runner=None) -> ExtractResult:
    """Build (or resume, or confirm) the cache for one split, holding at least `views` (a complete cache
    lacking some gets them added, its other views kept); `runner` embeds (default: runners.LocalRunner)."""
    check_count("chunk_size", chunk_size)
    if batch_size is not None:
        check_count("batch_size", batch_size)
    views = parse_views(views)
    check_engine_options(engine, key.precision)
    reader, path, expected = _target(key, split, data_dir, cache_dir, strict)
    if reader.rows == 0:
        raise UserError(f"the {split} split at {reader.where} has no images")

    state, base = inspect(path, expected), None
    if state.status == "complete" and not force:
        base = attributes(path)
        if set(views) <= set(cached_views(base)):
            if removed := remove_unneeded_partial(path):
                log(removed)
            return ExtractResult(path, int(base["rows"]), 0, 0.0, up_to_date=True, skipped=skipped_files(path),
                                 passed_over=getattr(reader, "passed_over", []))
        if engine == DEFAULT_ENGINE:
            engine = base["engine"]  # views are added by the engine that made the others
    if state.status == "bad" and not force:
        raise UserError(f"cache {path} exists but {state.reason}; rerun with `force=True` to rebuild it")
    if force and state.status != "missing":
        views = parse_views(views + _readable_views(path))  # a rebuild keeps every view the old cache holds

    runner = runner or LocalRunner()
    computing = tuple(v for v in views if v not in cached_views(base)) if base else views
    settings = ExtractorSettings(key.model, image_size=key.image_size, resize=key.resize, views=computing,
                                 batch_size=batch_size, engine=engine, precision=key.precision, crop=key.crop,
                                 input_shape=reader.image_shape, model_sha256=key.model_sha256)
    quantizer = None
    if key.precision == "int8":  # calibrated on the train split's images (read when first needed), whichever split
        train_reader = reader if split == "train" else sources.open_split(key, "train", data_dir)
        quantizer = quantize.Int8Quantizer(train_reader, key.model_dir(cache_dir) / "int8")
        if note := quantizer.unmeasured_note():
            log(note)
    started = time.perf_counter()
    with locked(path), runner.open(settings, quantizer, log) as mapper:  # locked before the slow model load
        models.checked_size(key.model, models.record_input_size(mapper.fixed_input_size, key.model,
                                                                key.model_sha256, cache_dir), key.image_size)
        loaded = time.perf_counter()
        attrs = dict(expected, rows=reader.rows, class_names=json.dumps(list(reader.class_names)),
                     engine=mapper.engine, source=reader.where, tool_version=__version__, chunk_size=chunk_size,
                     batch_size=mapper.batch_size, **reader.attrs(), **mapper.versions,
                     **(quantizer.describe() if quantizer else {}))
        if base:
            _check_addable(path, base, attrs, mapper.dim)
        files = reader.files if reader.may_skip else None
        writer = CacheWriter(path, attrs, mapper.dim, views, restart=force, files=files, base=base)
        try:
            with writer:
                start = writer.next_item
                adding = f" adding {', '.join(computing)}" if base else ""
                if writer.resumed:
                    log(f"resuming {writer.partial}{adding} at row {writer.rows_done} (item {start} of {reader.rows})")
                elif writer.discarded:
                    log(f"restarting {writer.partial}{adding} from row 0: {writer.discarded}")
                elif base:
                    log(f"adding the view{'s' if len(computing) > 1 else ''} {', '.join(computing)} to {path} "
                        f"(its {', '.join(cached_views(base))} views are kept)")
                listed = _fill(writer, mapper, reader, key, split, chunk_size, start, progress)
        except CacheWriteError as exc:  # disk full, I/O error, at any moment: committed chunks stay
            raise UserError(f"writing {writer.partial} failed ({exc.strerror}); {writer.rows_done} "
                            "committed rows are kept and the next run resumes from there") from None
        except OSError as exc:  # the source: a file made unreadable meanwhile, a disk gone
            raise UserError(f"reading the {split} split at {reader.where} failed ({exc.strerror or first_line(exc)}); "
                            f"{writer.rows_done} committed rows are kept and the next run resumes from there") from None
        done = time.perf_counter()
        return ExtractResult(path, writer.rows, reader.rows - start, done - loaded, load_seconds=loaded - started,
                             engine=mapper.engine + ("" if key.precision == DEFAULT_PRECISION else f" {key.precision}"),
                             skipped=listed, report=mapper.report(), passed_over=getattr(reader, "passed_over", []))


def _readable_views(path: Path) -> tuple[str, ...]:
    try:
        return cached_views(attributes(path))
    except (OSError, RuntimeError, KeyError, ValueError):
        return ()


def _check_addable(path: Path, base: dict, attrs: dict, dim: int):
    """Views are added to a cache only by the engine (and int8 calibration) that made it, and only to the cache
    read before the lock was taken (not one another run has extended meanwhile)."""
    try:
        now = cached_views(attributes(path))
    except OSError:
        now = ()
    if now != cached_views(base):
        raise UserError(f"cache {path} changed while this run waited for it (another run added views); run again")
    for name in ("engine", "calibration_sha256", "calibration"):  # calibration: its sample; how weights were cut
        if attrs.get(name) != base.get(name):
            wanted = f"`engine={base['engine']!r}`" if name == "engine" else "the same int8 calibration"
            raise UserError(f"cache {path} was made with another {name.split('_')[0]} ({base.get(name)}); add views "
                            f"with {wanted} (one file never mixes them), or rebuild it with `force=True`")
    if dim != int(base["dim"]):
        raise UserError(f"cache {path} holds {base['dim']}-d vectors, the model gives {dim}; "
                        "rebuild it with `force=True`")


def _fill(writer: CacheWriter, mapper, reader, key: CacheKey, split: str, chunk_size: int, start: int,
          progress: bool) -> list[tuple[str, str]]:
    """Embed the source's chunks from item `start` and commit them, then publish the cache; the skipped files."""
    bar = _progress_bar(reader.rows, start, split, enabled=progress)
    skipped: dict[int, str] = {}
    rows_of = writer.items()  # adding views to a folder cache: only the items it has rows for, in its order
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="cache-writer") as commits:
            pending = None  # at most one chunk waits to be committed
            row, item = writer.rows_done, start
            for chunk, vectors in mapper.map(prefetched(reader.chunks(chunk_size, start))):
                skipped.update(chunk.skipped)
                read, item = chunk.next_item - item, chunk.next_item
                if rows_of is not None:
                    vectors, chunk = _rows_of(vectors, chunk, rows_of, row, reader)
                if vectors is None:
                    bar.update(read)
                    continue
                _wait(pending, bar)
                pending = None
                _refuse_non_finite(vectors, key, split, row, writer.rows_done, reader, chunk.items)
                pending = commits.submit(writer.write, row, vectors, chunk.labels, chunk.items), read
                row += len(chunk.labels)
            _wait(pending, bar)
    finally:
        bar.close()
    if writer.base:
        writer.finish()
        return skipped_files(writer.path)
    if writer.rows_done == 0:
        file, reason = _skipped_lines(reader, skipped)[0]
        raise UserError(f"none of the {reader.rows} {split} images in {reader.where} could be read "
                        f"(the first, {file}: {reason})")
    listed = _skipped_lines(reader, _all_skipped(reader, writer, skipped)) if reader.may_skip else []
    writer.finish(listed)
    return listed


def _rows_of(vectors, chunk, rows_of: np.ndarray, row: int, reader):
    """The rows of a chunk whose items the cache being extended has rows for: they must be its next ones."""
    expected = rows_of[row:]
    wanted = expected[: np.searchsorted(expected, chunk.next_item)]
    items = np.asarray(chunk.items) if vectors is not None else np.empty(0, np.int64)
    keep = np.isin(items, wanted)
    if not np.array_equal(items[keep], wanted):
        missing = sorted(set(wanted.tolist()) - set(items.tolist()))
        raise UserError(f"{reader.files[missing[0]]} cannot be read any more, but the cache has a row for it; "
                        "rebuild the cache with `force=True`")
    if not keep.any():
        return None, chunk
    picked = {view: rows[keep] for view, rows in vectors.items()}
    return picked, replace(chunk, labels=chunk.labels[keep], items=items[keep], stop=chunk.next_item)


def _all_skipped(reader, writer, skipped: dict[int, str]) -> dict[int, str]:
    """Every item without a row, with its reason: those skipped before a resume are decoded again to say why."""
    missing = np.setdiff1d(np.arange(reader.rows), writer.written_items())
    return {int(item): skipped.get(int(item)) or reader.decode(int(item))[1] or "unreadable" for item in missing}


def _skipped_lines(reader, skipped: dict[int, str]) -> list[tuple[str, str]]:
    return [(reader.files[item], reason) for item, reason in sorted(skipped.items())]


def _refuse_non_finite(vectors: dict, key: CacheKey, split: str, lo: int, committed: int, reader, items):
    """A NaN/Inf embedding never reaches the cache: stop before committing its chunk."""
    for view, rows in vectors.items():
        count, first = non_finite(rows)
        if count:
            image = f" ({reader.files[items[first]]})" if reader.may_skip else ""
            raise UserError(
                f"model {key.model} gave {count} NaN/Inf values for {split} rows {lo}:{lo + len(rows)} "
                f"(first in row {lo + first}{image}, {view} view); nothing of them was written, {committed} "
                "committed rows are kept and the next run resumes from there")


def _wait(pending, bar):
    """Wait for the commit in flight (its error is raised here), then count its rows as done."""
    if pending is not None:
        future, rows = pending
        future.result()
        bar.update(rows)


def prefetched(items, depth: int = 1):
    """Iterate `items` in a background thread that keeps `depth` items ready; its errors are re-raised here.

    When the consumer stops early (an error downstream), the thread stops too, and is gone when this
    generator is closed, instead of waiting forever on a full queue with the source file open.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for item in items:
                ready.put((item, None))
                if stop.is_set():
                    return
            ready.put((end, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put((end, exc))

    thread = threading.Thread(target=produce, name="chunk-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            ready.get_nowait()  # frees a producer blocked on the full queue
        thread.join()  # it stops after the item it is reading: a put, then it sees `stop`


def _target(key: CacheKey, split: str, data_dir, cache_dir, strict=False):
    """The source's reader, the cache path, and the attributes a matching cache must carry.

    A folder's row count is known only once its files are decoded: its fingerprint stands for it."""
    reader = sources.open_split(key, split, data_dir, strict=strict)
    expected = dict(key.attrs(split), source_fingerprint=reader.fingerprint)
    if not reader.may_skip:
        expected["rows"] = reader.rows
    return reader, key.path(cache_dir, split), expected


def _progress_bar(total: int, initial: int, split: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=f"extract {split}",
                disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def verify(key: CacheKey, split: str, data_dir=None, cache_dir=DEFAULT_CACHE_DIR) -> tuple[Path, list[str]]:
    """Check a cache against its source: settings, completeness, shapes, labels, fingerprint, NaN/Inf."""
    reader, path, expected = _target(key, split, data_dir, cache_dir)
    state = inspect(path, expected)
    if state.status == "missing":
        return path, ["no cache file"]
    problems = [state.reason] if state.status == "bad" else []
    try:
        problems += check_contents(path, reader)
    except OSError as exc:
        problems.append(f"unreadable: {first_line(exc, 120)}")
    return path, list(dict.fromkeys(problems))
