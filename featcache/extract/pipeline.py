"""Stage 1 end to end: a split's plan of shards -> one read -> embed -> write loop per shard -> the HDF5 cache.

`extract` lists the source once and records its plan (plan.py), has a runner run the shards not yet done (runners.py
in this process, ray_runner.py on a cluster; `shard_index` runs one shard here, for job arrays), then, when the plan
has several shards, joins them into the cache (cache/assemble.py). `run_shard` is the loop every runner runs:
reader (sources.open_split(...).chunks) -> the Extractor -> writer (cache.write.CacheWriter); a thread reads and
decodes the next chunk, and another commits the previous one, while the current one is embedded. Each finished chunk
is committed, so a rerun continues inside a shard where a crashed run stopped; a complete, matching cache is
reported up to date before TensorFlow is even imported.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from . import plan as plans
from . import models, quantize, sources
from ..cache.assemble import assemble, refuse_mixed
from ..cache.layout import CacheKey, partial_path
from ..cache.read import attributes, cached_views, check_contents, inspect, non_finite, skipped_files
from ..cache.write import CacheWriteError, CacheWriter, locked
from ..errors import UserError, first_line, in_python
from .extractor import ExtractorSettings, check_engine_options, library_versions
from .runners import LocalRunner
from ..settings import (
    DEFAULT_CACHE_DIR, DEFAULT_CHUNK_SIZE, DEFAULT_ENGINE, DEFAULT_PRECISION, DEFAULT_VIEWS, check_count, parse_views,
)


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
    shard: str = ""  # "I of N" when one shard of a plan was run

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self, words=in_python) -> str:
        """One line, then one line per skipped file; `words` words the parameters it names (errors.py)."""
        count = len(self.skipped)
        skipped = f"; {count} unreadable file{'s' if count > 1 else ''} skipped" if count else ""
        if self.up_to_date:
            return words(f"up to date: {self.path} ({self.rows} rows{skipped}); 0 images processed, `force=True` "
                         "rebuilds it")
        what = f"shard {self.shard} " if self.shard else ""
        line = (f"{what}done: {self.rows} rows, {self.processed} images in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} images/s, {self.engine}; model load {self.load_seconds:.1f} s)"
                f"{skipped} -> {self.path}")
        return "\n".join([line] + [f"  {text}" for text in self.report]
                         + [f"  skipped {file}: {reason}" for file, reason in self.skipped])


@dataclass(frozen=True)
class Job:
    """One split's extraction as any process runs its shards: small and picklable (Ray sends it to workers)."""

    key: CacheKey
    split: str
    data_dir: str | None
    strict: bool
    settings: ExtractorSettings  # its views: those computed
    views: tuple  # every view the cache holds once done
    chunk_size: int
    attrs: dict  # what every file records besides the extractor's engine, batch size and versions
    plan: plans.Plan
    path: Path  # the cache
    cache_dir: str = ""
    restart: bool = False
    base: dict | None = None  # the complete cache's attributes, when views are added to it
    may_skip: bool = False  # the source's unreadable items give no row (a folder's)
    quantizer: object = field(default=None, compare=False)  # int8 (local runner only)

    def loaded(self, fixed_input_size: int | None):
        """Check (and record) the input size the loaded model fixes against the job's."""
        models.checked_size(self.key.model, models.record_input_size(fixed_input_size, self.key.model,
                                                                     self.key.model_sha256, self.cache_dir),
                            self.key.image_size)

    def target(self, index: int) -> Path:
        return plans.shard_path(self.path, index, len(self.plan.shards))

    def done(self, index: int) -> bool:
        """Whether shard `index` of several is complete and made for this job (a folder's shard may have fewer rows
        than items: its unreadable files are skipped)."""
        expected = {k: v for k, v in self.shard_attrs(index).items() if k != "rows" or not self.may_skip}
        return len(self.plan.shards) > 1 and inspect(self.target(index), expected).status == "complete"

    def shard_attrs(self, index: int) -> dict:
        if len(self.plan.shards) == 1:
            return self.attrs
        start, stop = self.plan.shards[index]
        return dict(self.attrs, rows=stop - start, shard=f"{index} of {len(self.plan.shards)}: items {start}:{stop}")


def extract(key: CacheKey, split: str, data_dir=None, cache_dir=DEFAULT_CACHE_DIR, views=DEFAULT_VIEWS,
            chunk_size=DEFAULT_CHUNK_SIZE, batch_size=None, force=False, engine=DEFAULT_ENGINE, strict=False,
            progress=True, log=print, runner=None, num_shards=None, shard_index=None) -> ExtractResult:
    """Build (or resume, or confirm) the cache for one split, holding at least `views` (a complete cache
    lacking some gets them added, its other views kept); `runner` runs the plan's shards (default:
    runners.LocalRunner, one shard unless a plan under way says otherwise). With `shard_index`, only that shard
    of `num_shards` is built, here; a later run without it joins the shards once all are done."""
    check_count("chunk_size", chunk_size)
    if batch_size is not None:
        check_count("batch_size", batch_size)
    if num_shards is not None:
        check_count("num_shards", num_shards)
    if shard_index is not None and (num_shards is None or not 0 <= shard_index < num_shards):
        raise UserError("`shard_index` needs `num_shards`, and must be below it")
    views = parse_views(views)
    check_engine_options(engine, key.precision)
    reader, path, expected = _target(key, split, data_dir, cache_dir, strict)
    if reader.rows == 0:
        raise UserError(f"the {split} split at {reader.where} has no images")

    state, base = inspect(path, expected), None
    if state.status == "complete" and not force:
        base = attributes(path)
        if set(views) <= set(cached_views(base)):
            return ExtractResult(path, int(base["rows"]), 0, 0.0, up_to_date=True, skipped=skipped_files(path))
        if engine == DEFAULT_ENGINE:
            engine = base["engine"]  # views are added by the engine that made the others
        if (num_shards or 1) > 1:
            raise UserError(f"views are added to the complete cache {path} in one pass; drop `num_shards`")
    if state.status == "bad" and not force:
        raise UserError(f"cache {path} exists but {state.reason}; rerun with `force=True` to rebuild it")
    if force and state.status != "missing":
        views = parse_views(views + _readable_views(path))  # a rebuild keeps every view the old cache holds

    runner = runner or LocalRunner()
    if shard_index is not None and not isinstance(runner, LocalRunner):
        raise UserError("`shard_index` runs its shard in this process: drop `runner`")
    computing = tuple(v for v in views if v not in cached_views(base)) if base else views
    settings = ExtractorSettings(key.model, image_size=key.image_size, resize=key.resize, views=computing,
                                 batch_size=batch_size, engine=engine, precision=key.precision, crop=key.crop,
                                 model_sha256=key.model_sha256)
    quantizer = None
    if key.precision == "int8":  # calibrated on the train split's images (read when first needed), whichever split
        train_reader = reader if split == "train" else sources.open_split(key, "train", data_dir)
        quantizer = quantize.Int8Quantizer(train_reader, key.model_dir(cache_dir) / "int8")
        if note := quantizer.unmeasured_note():
            log(note)
    driver = shard_index is None
    with contextlib.ExitStack() as held:
        if driver:  # locked before planning (a stale plan's shards are removed) and the slow model load
            held.enter_context(locked(path))
        plan = _plan(path, reader, expected, chunk_size, num_shards, base, force, driver, runner, log)
        count = len(plan.shards)
        if not driver and count == 1:  # the shard is the cache
            held.enter_context(locked(path))
        attrs = dict(expected, rows=reader.rows, class_names=json.dumps(list(reader.class_names)),
                     source=reader.where, tool_version=__version__, chunk_size=plan.chunk_size, **reader.attrs())
        job = Job(key, split, None if data_dir is None else str(data_dir), strict, settings, views, chunk_size, attrs,
                  plan, path, str(cache_dir), restart=force, base=base, may_skip=reader.may_skip, quantizer=quantizer)
        if base:
            _check_addable(path, base)
        todo = [i for i in ([shard_index] if not driver else range(count)) if force or not job.done(i)]
        if not driver and not todo:
            done = attributes(job.target(shard_index))
            return ExtractResult(job.target(shard_index), int(done["rows"]), 0, 0.0, up_to_date=True,
                                 skipped=skipped_files(job.target(shard_index)))
        if driver and count > 1 and len(todo) < count:
            log(f"{count - len(todo)} of {count} shards of {path} are done; {len(todo)} left")
        started = time.perf_counter()
        run = runner.run(job, todo, log, progress, reader) if todo else None
        done = time.perf_counter()
        if driver and count > 1:
            log(f"assembling {count} shards into {path}")
            joined = time.perf_counter()
            listed = runner.assemble(job, reader)
            log(f"assembled {path.stat().st_size / 1e9:.3f} GB in {time.perf_counter() - joined:.2f} s")
            done = time.perf_counter()
        else:
            listed = skipped_files(job.target(todo[0])) if reader.may_skip else []
    result = ExtractResult(path if driver else job.target(shard_index), 0, 0, done - started, skipped=listed)
    if run:
        result.processed, result.engine, result.report = run.processed, run.engine, run.report
        result.load_seconds, result.seconds = run.load_seconds, done - started - run.load_seconds
        result.engine += "" if key.precision == DEFAULT_PRECISION else f" {key.precision}"
    made = attributes(result.path)
    result.rows, result.engine = int(made["rows"]), result.engine or made["engine"]
    if not driver:
        result.shard = f"{shard_index} of {count}"
    return result


def _plan(path: Path, reader, expected: dict, chunk_size: int, num_shards, base, force: bool, driver: bool, runner,
          log):
    """The plan recorded beside the cache when it is this source's (and, when asked, of `num_shards` shards), else
    a new one, recorded (a driver's `force` removes the shards of the old one). Views added to a complete cache:
    one shard, not recorded."""
    selection = {k: v for k, v in expected.items() if k != "source_fingerprint"}
    units = reader.units() if hasattr(reader, "units") else None
    if base:
        return plans.make(reader.rows, 1, chunk_size, reader.fingerprint, selection, units)
    where = plans.plan_path(path)
    stored = None if force else plans.load(where)
    if stored and not stored.matches(reader.fingerprint, selection):
        stored = None
    under_way = stored and (partial_path(path).exists() if len(stored.shards) == 1
                            else plans.shards_dir(path).exists())
    if stored and num_shards and num_shards != len(stored.shards):
        if under_way:
            raise UserError(f"{path} is being built in {len(stored.shards)} shards (plan {where}); pass "
                            f"`num_shards={len(stored.shards)}`, or `force=True` to start again in {num_shards}")
        stored = None
    if stored:
        return stored
    count = num_shards or runner.shards(reader.rows, chunk_size)
    plan = plans.make(reader.rows, count, chunk_size, reader.fingerprint, selection, units)
    if plans.shards_dir(path).exists() and force and driver:
        shutil.rmtree(plans.shards_dir(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(where)
    if count > 1:
        log(f"plan: {count} shards of about {reader.rows // count} items each -> {where}")
    return plan


def assemble_shards(job: Job, reader=None) -> list:
    """Join the complete shards into the cache, then remove them; the skipped files. Runs wherever the runner puts
    it (`reader`, the job's source, opened here when None); the caller holds the cache's lock."""
    reader = reader or sources.open_split(job.key, job.split, job.data_dir, strict=job.strict)
    count = len(job.plan.shards)
    missing = [str(i) for i in range(count) if not job.done(i)]
    if missing:
        raise UserError(f"shards {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} of {count} of "
                        f"{job.path} are not done; run them (or this command again) first")
    shards = [job.target(i) for i in range(count)]
    refuse_mixed(shards, job.path)
    if reader.may_skip and not sum(int(attributes(shard)["rows"]) for shard in shards):
        raise UserError(f"none of the {reader.rows} {job.split} images in {reader.where} could be read (the first, "
                        f"{skipped_files(shards[0])[0][0]}: {skipped_files(shards[0])[0][1]})")
    files = reader.files if reader.may_skip else None
    try:
        listed = assemble(job.path, shards, [start for start, _ in job.plan.shards], files)
    except CacheWriteError as exc:
        raise UserError(f"writing {partial_path(job.path)} failed ({exc.strerror}); the shards are kept and the "
                        "next run assembles them again") from None
    shutil.rmtree(plans.shards_dir(job.path))
    return listed


def run_shard(job: Job, index: int, extractor, reader=None, bar=None, log=print) -> int:
    """Shard `index` of the job's plan, read -> embed -> write, resuming its partial file; published when done. The
    images it read and embedded.

    Runs wherever the runner puts it: `reader` (the job's source, opened here when None) and `extractor` are
    this process's. A one-shard plan writes the cache itself (its caller holds the cache's lock); a shard of
    several writes its own file, under its own lock."""
    reader = reader or sources.open_split(job.key, job.split, job.data_dir, strict=job.strict)
    if reader.fingerprint != job.plan.fingerprint:
        raise UserError(f"the {job.split} split at {reader.where} changed since its plan was made; run again")
    start, stop = job.plan.shards[index]
    target = job.target(index)
    attrs = dict(job.shard_attrs(index), engine=extractor.engine, batch_size=extractor.batch_size,
                 **library_versions(), **(job.quantizer.describe() if job.quantizer else {}))
    if job.base:
        _check_engine(job.path, job.base, attrs, extractor.dim)
    files = reader.files[start:stop] if reader.may_skip else None
    with locked(target) if target != job.path else contextlib.nullcontext():
        writer = CacheWriter(target, attrs, extractor.dim, job.views, restart=job.restart, files=files, base=job.base)
        try:
            with writer:
                first = start + writer.next_item
                adding = f" adding {', '.join(writer.computing)}" if job.base else ""
                if writer.resumed:
                    log(f"resuming {writer.partial}{adding} at row {writer.rows_done} (item {first} of {stop})")
                elif writer.discarded:
                    log(f"restarting {writer.partial}{adding} from row 0: {writer.discarded}")
                elif job.base:
                    log(f"adding the view{'s' if len(writer.computing) > 1 else ''} {', '.join(writer.computing)} "
                        f"to {job.path} (its {', '.join(cached_views(job.base))} views are kept)")
                if bar is not None:
                    bar.update(first - start)
                _fill(writer, extractor, reader, job, first, stop, start, bar)
        except CacheWriteError as exc:  # disk full, I/O error, at any moment: committed chunks stay
            raise UserError(f"writing {writer.partial} failed ({exc.strerror}); {writer.rows_done} "
                            "committed rows are kept and the next run resumes from there") from None
        except OSError as exc:  # the source: a file made unreadable meanwhile, a disk gone
            raise UserError(f"reading the {job.split} split at {reader.where} failed "
                            f"({exc.strerror or first_line(exc)}); {writer.rows_done} committed rows are kept and "
                            "the next run resumes from there") from None
    return stop - first


def _readable_views(path: Path) -> tuple[str, ...]:
    try:
        return cached_views(attributes(path))
    except (OSError, RuntimeError, KeyError, ValueError):
        return ()


def _check_addable(path: Path, base: dict):
    """Views are added only to the cache read before the lock was taken (not one another run has extended
    meanwhile)."""
    try:
        now = cached_views(attributes(path))
    except OSError:
        now = ()
    if now != cached_views(base):
        raise UserError(f"cache {path} changed while this run waited for it (another run added views); run again")


def _check_engine(path: Path, base: dict, attrs: dict, dim: int):
    """Views are added to a cache only by the engine (and int8 calibration) that made it."""
    for name in ("engine", "calibration_sha256", "calibration"):  # calibration: its sample; how weights were cut
        if attrs.get(name) != base.get(name):
            wanted = f"`engine={base['engine']!r}`" if name == "engine" else "the same int8 calibration"
            raise UserError(f"cache {path} was made with another {name.split('_')[0]} ({base.get(name)}); add views "
                            f"with {wanted} (one file never mixes them), or rebuild it with `force=True`")
    if dim != int(base["dim"]):
        raise UserError(f"cache {path} holds {base['dim']}-d vectors, the model gives {dim}; "
                        "rebuild it with `force=True`")


def _fill(writer: CacheWriter, extractor, reader, job: Job, first: int, stop: int, start: int, bar):
    """Embed the source's chunks of items [first, stop) and commit them, then publish the file (with its skipped
    files). The writer's items count from the shard's `start`."""
    skipped: dict[int, str] = {}
    rows_of = writer.items()  # adding views to a folder cache: only the items it has rows for, in its order
    key, split = job.key, job.split
    with ThreadPoolExecutor(1, thread_name_prefix="cache-writer") as commits:
        pending = None  # at most one chunk waits to be committed
        row, item = writer.rows_done, first
        for chunk in prefetched(reader.chunks(job.chunk_size, first, stop)):
            vectors = extractor.embed(chunk.images) if len(chunk.labels) else None
            skipped.update(chunk.skipped)
            read, item = chunk.next_item - item, chunk.next_item
            if rows_of is not None:
                vectors, chunk = _rows_of(vectors, chunk, rows_of, row, reader)
            if vectors is None:
                _count(bar, read)
                continue
            _wait(pending, bar)
            pending = None
            _refuse_non_finite(vectors, key, split, row, writer.rows_done, reader, chunk.items)
            pending = commits.submit(writer.write, row, vectors, chunk.labels, np.asarray(chunk.items) - start), read
            row += len(chunk.labels)
        _wait(pending, bar)
    if writer.base:
        return writer.finish()
    if writer.rows_done == 0 and len(job.plan.shards) == 1:
        file, reason = _skipped_lines(reader, skipped)[0]
        raise UserError(f"none of the {reader.rows} {split} images in {reader.where} could be read "
                        f"(the first, {file}: {reason})")
    writer.finish(_skipped_lines(reader, _all_skipped(reader, writer, skipped, start, stop)) if reader.may_skip else [])


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


def _all_skipped(reader, writer, skipped: dict[int, str], start: int, stop: int) -> dict[int, str]:
    """Every item of [start, stop) without a row, with its reason: those skipped before a resume are decoded again
    to say why."""
    missing = np.setdiff1d(np.arange(start, stop), writer.written_items() + start)
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
        _count(bar, rows)


def _count(bar, items: int):
    if bar is not None:
        bar.update(items)


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


def progress_bar(total: int, split: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=f"extract {split}", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


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
