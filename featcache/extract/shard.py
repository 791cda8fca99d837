"""One shard of a split's plan, as every runner runs it: read -> embed -> write, and the shards joined at the end.

`run_shard` reads the shard's chunks in one thread and commits them (cache.write.CacheWriter) in another while the
current one is embedded, so a rerun continues inside a shard where a crashed run stopped. `assemble_shards` joins a
plan's finished shards into the split's cache. `Job` is what a process needs to run shards (Ray sends it to workers).
"""

from __future__ import annotations

import collections
import contextlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..cache.assemble import assemble, refuse_mixed
from ..cache.layout import CacheKey, partial_path
from ..cache.read import (
    attributes, cached_features, cached_views, failed_checksum, inspect, non_finite, skipped_files,
)
from ..cache.write import CacheWriteError, CacheWriter, locked
from ..errors import UserError, first_line, plural
from . import plan as plans


class Held:
    """A runner as a context manager, nested (extract.py holds it for both splits, pipeline.extract for one run):
    what it keeps between runs (a loaded model, Ray) is let go when the outermost `with` ends."""

    _entered = 0  # how many `with` blocks hold it

    def __enter__(self):
        self._entered += 1
        return self

    def __exit__(self, *exc):
        self._entered -= 1
        if not self._entered:
            self.close()


@dataclass(frozen=True)
class Job:
    """One split's extraction as any process runs its shards: small and picklable (Ray sends it to workers)."""

    key: CacheKey
    split: str
    data_dir: str | None
    strict: bool
    settings: object  # extractor.ExtractorSettings; its views: those computed
    views: tuple  # every view the cache holds once done
    attrs: dict  # what every file records besides the extractor's engine, batch size and versions
    plan: plans.Plan
    path: Path  # the cache
    cache_dir: str = ""
    base: dict | None = None  # the complete cache's attributes, when views are added to it
    may_skip: bool = False  # the source's unreadable items give no row (a folder's)
    quantizer: object = field(default=None, compare=False)  # int8 (local runner only)
    features: dict = field(default_factory=dict)  # every inner-layer feature the cache holds once done: {name: dim}

    def items(self, index: int) -> int:
        """How many items shard `index` has."""
        return self.plan.shards[index][1] - self.plan.shards[index][0]

    def target(self, index: int) -> Path:
        return plans.shard_path(self.path, index, len(self.plan.shards))

    def partial(self, index: int | None = None) -> Path:
        """Where shard `index` (None: the cache, when assembled) is written until it is complete."""
        return partial_path(self.path if index is None else self.target(index))

    def committed(self, index: int) -> int:
        """The rows an earlier run committed to shard `index`'s partial file, where a progress bar starts (0 when there
        is none to read; a folder's unreadable files read before them are not counted)."""
        # A damaged file counts 0, as CacheWriter's resume check starts it again.
        with contextlib.suppress(OSError, RuntimeError, ValueError, KeyError, TypeError):
            return int(attributes(self.partial(index))["rows_done"])
        return 0

    def done(self, index: int) -> bool:
        """Whether shard `index` of several is complete and made for this job (a folder's shard may have fewer rows
        than items: its unreadable files are skipped)."""
        expected = {k: v for k, v in self.shard_attrs(index).items() if k != "rows" or not self.may_skip}
        if len(self.plan.shards) == 1 or inspect(self.target(index), expected).status != "complete":
            return False
        held = attributes(self.target(index))  # a shard made without some views or features asked now is made again
        return set(self.views) <= set(cached_views(held)) and set(self.features) <= set(cached_features(held))

    def shard_attrs(self, index: int) -> dict:
        if len(self.plan.shards) == 1:
            return self.attrs
        start, stop = self.plan.shards[index]
        return dict(self.attrs, rows=stop - start, shard=f"{index} of {len(self.plan.shards)}: items {start}:{stop}")


def assemble_shards(job: Job, reader) -> list:
    """Join the complete shards into the cache, then remove them; the skipped files. Runs wherever the runner puts
    it (`reader`: the job's source, opened there); the caller holds the cache's lock."""
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
        raise UserError(f"writing {job.partial()} failed ({exc.strerror}); the shards are kept and the "
                        "next run assembles them again") from None
    with contextlib.suppress(FileNotFoundError):  # another run may be removing them too, once the cache is published
        shutil.rmtree(plans.shards_dir(job.path))
    return listed


def run_shard(job: Job, index: int, extractor, reader, bar=None, log=print) -> int:
    """Shard `index` of the job's plan, read -> embed -> write, resuming its partial file; published when done. The
    images it embedded (not those skipped: before a resume, or unreadable).

    Runs wherever the runner puts it: `reader` (the job's source) and `extractor` are this process's. A one-shard
    plan writes the cache itself (its caller holds the cache's lock); a shard of several writes its own file, under
    its own lock."""
    if reader.fingerprint != job.plan.fingerprint:
        raise UserError(f"the {job.split} split at {reader.where} changed since its plan was made; run again")
    start, stop = job.plan.shards[index]
    target = job.target(index)
    attrs = dict(job.shard_attrs(index), **extractor.provenance())
    if job.base:
        _check_engine(job.path, job.base, attrs, extractor.dim)
    files = reader.files[start:stop] if reader.may_skip else None
    with locked(target) if target != job.path else contextlib.nullcontext():
        writer = CacheWriter(target, attrs, extractor.dim, job.views, files=files, base=job.base, features=job.features)
        try:
            with writer:
                first, committed = start + writer.next_item, writer.rows_done
                adding = f" adding {', '.join(writer.computing)}" if job.base else ""
                if writer.resumed:
                    log(f"resuming {writer.partial}{adding} at row {writer.rows_done} (item {first} of {stop})")
                elif writer.discarded:
                    log(f"restarting {writer.partial}{adding} from row 0: {writer.discarded}")
                elif job.base:
                    kept = cached_views(job.base)
                    log(f"adding {plural(len(writer.computing), 'dataset')} ({', '.join(writer.computing)}) to "
                        f"{job.path} (its {', '.join(kept)} {'views are' if len(kept) > 1 else 'view is'} kept)")
                _count(bar, first - start, resumed=True)
                _fill(writer, extractor, reader, job, first, stop, start, bar)
        except CacheWriteError as exc:  # disk full, I/O error, at any moment: committed chunks stay
            raise UserError(f"writing {writer.partial} failed ({exc.strerror}); {writer.rows_done} "
                            "committed rows are kept and the next run resumes from there") from None
        except OSError as exc:  # the source: a file made unreadable meanwhile, a disk gone
            if failed_checksum(exc):  # or the cache's own rows
                damaged = f"cache {job.path}" if job.base else f"{writer.partial}"
                remedy = "rebuild it with `force=True`" if job.base else "remove it and run again"
                raise UserError(f"{damaged} is damaged: a chunk failed its Fletcher-32 checksum; {remedy}") from None
            raise UserError(f"reading the {job.split} split at {reader.where} failed "
                            f"({exc.strerror or first_line(exc)}); {writer.rows_done} committed rows are kept and "
                            "the next run resumes from there") from None
    return writer.rows_done - committed


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
        for chunk in prefetched(reader.chunks(job.plan.chunk_size, first, stop)):
            vectors = extractor.embed(chunk.images) if len(chunk.labels) else None
            skipped.update(chunk.skipped)
            read, item = chunk.next_item - item, chunk.next_item
            if rows_of is not None:
                vectors, chunk = _rows_of(vectors, chunk, rows_of, row, reader)
            if vectors is None:
                commits.submit(_count, bar, read)  # the bar is counted in the writer's thread only
                continue
            if pending:  # the commit in flight: its error is raised here
                pending.result()
            _refuse_non_finite(vectors, key, split, row, writer.rows_done, reader, chunk.items)
            pending = commits.submit(_commit, writer, row, vectors, chunk, start, bar, read)
            row += len(chunk.labels)
        if pending:
            pending.result()
    if writer.base:
        return writer.finish()
    if writer.rows_done == 0 and len(job.plan.shards) == 1:
        file, reason = _skipped_lines(reader, skipped)[0]
        raise UserError(f"none of the {reader.rows} {split} images in {reader.where} could be read "
                        f"(the first, {file}: {reason})")
    writer.finish(_skipped_lines(reader, _all_skipped(reader, writer, skipped, start, stop)) if reader.may_skip else [])


def _commit(writer: CacheWriter, row: int, vectors: dict, chunk, start: int, bar, read: int):
    """Commit a chunk's rows, then count its items on the bar (as soon as the commit ends, not when the next chunk
    is embedded)."""
    writer.write(row, vectors, chunk.labels, np.asarray(chunk.items) - start)
    _count(bar, read)


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


def _count(bar, items: int, resumed: bool = False):
    """Count items done on the progress bar; those `resumed` (done by an earlier run) stay out of its rate."""
    if bar is None or bar.disable:
        return
    if resumed:
        bar.initial, bar.n, bar.last_print_n = bar.initial + items, bar.n + items, bar.last_print_n + items
        bar.refresh()
    else:
        bar.update(items)


def prefetched(items, depth: int = 1):
    """Iterate `items` while a background thread reads the next `depth`; its errors are re-raised here.

    When the consumer stops early (an error downstream), the thread ends with the read under way, and is gone when
    this generator is closed.
    """
    end = object()
    items = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="chunk-reader") as reader:
        ahead = collections.deque(reader.submit(next, items, end) for _ in range(depth))
        try:
            while (item := ahead.popleft().result()) is not end:
                ahead.append(reader.submit(next, items, end))
                yield item
        finally:  # stopped early: reads not yet started are dropped, not run by the executor's shutdown
            for read in ahead:
                read.cancel()


def progress_bar(job: Job, indices, enabled: bool, initial: int = 0):
    """The bar of a run of shards `indices` of `job`, counting their items from `initial` (done by an earlier run,
    out of its rate); closed at the end of a `with`."""
    from tqdm import tqdm

    return tqdm(total=sum(map(job.items, indices)), initial=initial, unit="img", desc=f"extract {job.split}",
                disable=not enabled, dynamic_ncols=True, smoothing=0.1)
