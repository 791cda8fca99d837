"""Stage 1 end to end: a split's plan of shards (plan.py) -> a runner runs those not yet done (runners.py here,
ray_runner.py on a cluster; `shard_index` one shard, for job arrays) -> the shards joined into the HDF5 cache.
A complete, matching cache is reported up to date before TensorFlow is even imported.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.layout import TOOL_VERSION, CacheKey, partial_path
from ..cache.read import attributes, cached_features, cached_views, check_contents, inspect, skipped_files
from ..cache.write import locked, remove_unneeded_partial
from ..errors import UserError, first_line, in_python, plural
from ..settings import (
    DEFAULT_CACHE_DIR, DEFAULT_CHUNK_SIZE, DEFAULT_ENGINE, DEFAULT_PRECISION, DEFAULT_VIEWS, check_count,
    parse_features, parse_views, views_union,
)
from . import quantize, sources
from . import plan as plans
from .extractor import ExtractorSettings, check_engine_options
from .layers import check_features, feature_dim, offered_layers
from .runners import LocalRunner
from .shard import Job

PASSED_OVER_NAMED = 10  # files passed over as not images that a summary names; the others are counted


@dataclass
class ExtractResult:
    path: Path
    rows: int
    processed: int = 0  # images embedded
    seconds: float = 0.0
    up_to_date: bool = False
    load_seconds: float = 0.0
    engine: str = ""
    skipped: list = field(default_factory=list)  # (file, reason) of source files that gave no row
    report: list = field(default_factory=list)  # the runner's lines: per-worker throughput, rows per node
    passed_over: list = field(default_factory=list)  # files of the source's folders that are not images
    shard: str = ""  # "I of N" when one shard of a plan was run
    assembled: str = ""  # "N shards, X GB in Y s (Z GB/s)" when this run joined a plan's shards

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
        what = f"shard {self.shard} " if self.shard else ""
        line = (f"{what}done: {self.rows} rows, {self.processed} images in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} images/s, {self.engine}; model load {self.load_seconds:.1f} s)"
                f"{skipped} -> {self.path}")
        if self.assembled and not self.engine:  # every shard was done: no model loaded, no image embedded
            line = f"assembled: {self.rows} rows from {self.assembled}, no image embedded{skipped} -> {self.path}"
        return "\n".join([line] + [f"  {text}" for text in self.report]
                         + [f"  skipped {file}: {reason}" for file, reason in self.skipped] + named)


def extract(key: CacheKey, split: str, data_dir=None, cache_dir=DEFAULT_CACHE_DIR, views=DEFAULT_VIEWS,
            chunk_size=None, batch_size=None, force=False, engine=DEFAULT_ENGINE, strict=False,
            progress=True, log=print, runner=None, num_shards=None, shard_index=None, layers=None) -> ExtractResult:
    """Build (or resume, or confirm) the cache for one split, holding at least `views` and the inner-layer features
    `layers` of each (a complete cache lacking some gets them added, the rest kept); `runner` runs the plan's shards
    (default: runners.LocalRunner, one shard unless a plan under way says otherwise). With `shard_index`, only that
    shard of `num_shards` is built, here; a later run without it joins the shards once all are done. `chunk_size` and
    `num_shards` default to the recorded plan's (else DEFAULT_CHUNK_SIZE and the runner's count)."""
    for name, count in (("chunk_size", chunk_size), ("batch_size", batch_size), ("num_shards", num_shards)):
        if count is not None:
            check_count(name, count)
    if shard_index is not None and (num_shards is None or not 0 <= shard_index < num_shards):
        raise UserError("`shard_index` needs `num_shards`, and must be below it")
    views = parse_views(views)
    features = parse_features(layers) if layers is not None else ()
    check_engine_options(engine, key.precision)
    if features and key.precision == "int8":
        raise UserError("`layers` are not extracted with `precision='int8'` (its calibration covers the embeddings "
                        "only); use `precision='f32'` or `precision='bf16'`")
    reader, path, expected = _target(key, split, data_dir, cache_dir, strict)
    if reader.rows == 0:
        raise UserError(f"the {split} split at {reader.where} has no images")

    state, base = inspect(path, expected), None
    if state.status == "complete" and not force:
        base = attributes(path)
        if set(views) <= set(cached_views(base)) and set(features) <= set(cached_features(base)):
            if removed := remove_unneeded_partial(path):
                log(removed)
            if removed := plans.remove_older_work(path):
                log(f"removed {removed}, not needed by the complete cache")
            return ExtractResult(path, int(base["rows"]), up_to_date=True, skipped=skipped_files(path),
                                 passed_over=getattr(reader, "passed_over", []))
        if engine == DEFAULT_ENGINE:
            engine = base["engine"]  # views are added by the engine that made the others
        if (num_shards or 1) > 1:
            raise UserError(f"views and layers are added to the complete cache {path} in one pass; drop `num_shards`")
    if state.status == "bad" and not force:
        raise UserError(f"cache {path} exists but {state.reason}; rerun with `force=True` to rebuild it")
    if force and state.status != "missing":  # a rebuild keeps every view and feature the old cache holds
        old = _readable(path)
        views = views_union(views, cached_views(old))
        features = tuple(dict.fromkeys(features + tuple(cached_features(old))))
    asked = features  # names; from here on features is {name: values per row}, the cached ones first
    features = cached_features(base) if base else {}
    if new := [feature for feature in asked if feature not in features]:  # checked against the model's layers
        offered = offered_layers(key.model, key.model_sha256, key.image_size, cache_dir, log if progress else None)
        check_features(offered, tuple(new))
        features.update((feature, feature_dim(offered, feature)) for feature in new)

    runner = runner or LocalRunner()
    if shard_index is not None and not isinstance(runner, LocalRunner):
        raise UserError("`shard_index` runs its shard in this process: drop `runner`")
    computing = tuple(v for v in views if v not in cached_views(base)) if base else views
    if base and new:  # new features: for every view of the cache
        computing = views_union(computing, cached_views(base))
    settings = ExtractorSettings(key.model, image_size=key.image_size, resize=key.resize, views=computing,
                                 batch_size=batch_size, engine=engine, precision=key.precision, crop=key.crop,
                                 model_sha256=key.model_sha256, features=tuple(features))
    quantizer = None
    if key.precision == "int8":  # calibrated on the train split's images (read when first needed), whichever split
        train_reader = reader if split == "train" else sources.open_split(key, "train", data_dir)
        quantizer = quantize.Int8Quantizer(train_reader, key.model_dir(cache_dir) / "int8")
        if note := quantizer.unmeasured_note():
            log(note)
    driver = shard_index is None
    with contextlib.ExitStack() as held:
        held.enter_context(runner)  # the caller's `with` keeps it up between runs; else what it started stops here
        if force:  # work under way since the cache was made is resumed; older work is removed first
            own = None if driver else plans.shard_path(path, shard_index, num_shards)
            if removed := plans.remove_older_work(path, own):
                log(f"`force=True` rebuilds {path}: removed {removed}")
        if driver:  # locked before planning (a stale plan's shards are removed) and the slow model load
            held.enter_context(locked(path))
        plan = _plan(path, reader, expected, chunk_size, num_shards, base, force, driver, runner, log)
        count = len(plan.shards)
        if not driver and count == 1:  # the shard is the cache
            held.enter_context(locked(path))
        attrs = dict(expected, rows=reader.rows, class_names=json.dumps(list(reader.class_names)),
                     source=str(Path(reader.where).absolute()), tool_version=TOOL_VERSION, chunk_size=plan.chunk_size,
                     **reader.attrs())
        # a worker elsewhere (Ray) opens the source and writes the shards by absolute paths: its folder and
        # environment (CIFAR10_DATA_DIR) are not this process's
        job = Job(key, split, attrs["source"], strict, settings, views, attrs, plan, path.absolute(),
                  str(Path(cache_dir).absolute()), base=base, may_skip=reader.may_skip, quantizer=quantizer,
                  features=features)
        if base:
            _check_addable(path, base)
        todo = [i for i in ([shard_index] if not driver else range(count)) if not job.done(i)]
        target = path if driver else job.target(shard_index)
        if not driver and not todo:
            rows = int(attributes(target)["rows"])
            return ExtractResult(target, rows, up_to_date=True, skipped=skipped_files(target))
        if driver and count > 1 and len(todo) < count:
            log(f"{count - len(todo)} of {count} shards of {path} are done; {len(todo)} left")
        started = time.perf_counter()
        run = runner.run(job, todo, log, progress, reader) if todo else {}
        done, assembled = time.perf_counter(), ""
        if driver and count > 1:
            log(f"assembling {count} shards into {path}")
            joined = time.perf_counter()
            listed = runner.assemble(job, reader)
            done, size = time.perf_counter(), path.stat().st_size / 1e9
            assembled = f"{count} shards, {size:.3f} GB in {done - joined:.2f} s ({size / (done - joined):.3g} GB/s)"
            if run:  # else the summary says it
                log(f"assembled {assembled}")
        else:
            listed = skipped_files(target) if reader.may_skip else []
    result = ExtractResult(target, int(attributes(target)["rows"]), seconds=done - started - run.get("load_seconds", 0),
                           skipped=listed, passed_over=getattr(reader, "passed_over", []), assembled=assembled,
                           shard="" if driver else f"{shard_index} of {count}", **run)
    if run and key.precision != DEFAULT_PRECISION:
        result.engine += f" {key.precision}"
    return result


def _plan(path: Path, reader, expected: dict, chunk_size, num_shards, base, force: bool, driver: bool, runner, log):
    """The plan under way (its partial or shard files exist) when it is this source's and, when asked, of `num_shards`
    shards and chunks of `chunk_size` (other counts are refused, unless `force`), else a new one, recorded (a driver's
    `force` removes the shards of the old one). Views added to a complete cache: one shard, not recorded."""
    selection = {k: v for k, v in expected.items() if k != "source_fingerprint"}
    if base:
        return plans.make(reader.rows, 1, chunk_size or DEFAULT_CHUNK_SIZE, reader.fingerprint, selection)
    where = plans.plan_path(path)
    stored = plans.load(where)
    if stored and not (partial_path(path).exists() if len(stored.shards) == 1 else plans.shards_dir(path).exists()):
        stored = None  # not under way (never started, or its cache published): a run may plan it otherwise
    if stored and not stored.matches(reader.fingerprint, selection):
        stored = None
    if stored and num_shards and num_shards != len(stored.shards):
        if not force:
            raise UserError(f"{path} is being built in {plural(len(stored.shards), 'shard')} (plan {where}); pass "
                            f"`num_shards={len(stored.shards)}`, or `force=True` to start again in {num_shards}")
        stored = None
    if stored and chunk_size and chunk_size != stored.chunk_size:
        if not force:
            raise UserError(f"{path} is being built in chunks of {stored.chunk_size} (plan {where}); pass "
                            f"`chunk_size={stored.chunk_size}`, or `force=True` to start again in chunks of "
                            f"{chunk_size}")
        stored = None
    if stored:
        return stored
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    count = num_shards or runner.shards(reader.rows, chunk_size)
    plan = plans.make(reader.rows, count, chunk_size, reader.fingerprint, selection)
    if plans.shards_dir(path).exists() and force and driver:
        log(f"`force=True`: removing {plans.shards_dir(path)}, the shards of an earlier plan")
        plans.remove_shards(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(where)
    except OSError as exc:
        raise UserError(f"cannot write cache folder {path.parent}: {exc.strerror or first_line(exc)}") from None
    if count > 1:
        log(f"plan: {count} shards of {plans.sizes(plan)} -> {where}")
    return plan


def _readable(path: Path) -> dict:
    """A cache's attributes, or none when it cannot be read."""
    try:
        return attributes(path)
    except (OSError, RuntimeError, KeyError, ValueError):
        return {}


def _check_addable(path: Path, base: dict):
    """Views are added only to the cache read before the lock was taken (not one another run has extended
    meanwhile)."""
    now = _readable(path)
    if (cached_views(now), cached_features(now)) != (cached_views(base), cached_features(base)):
        raise UserError(f"cache {path} changed since this run read it (another run added views to it); run again")


def _target(key: CacheKey, split: str, data_dir, cache_dir, strict=False):
    """The source's reader, the cache path, and the attributes a matching cache must carry.

    A folder's row count is known only once its files are decoded: its fingerprint stands for it."""
    reader = sources.open_split(key, split, data_dir, strict=strict)
    expected = dict(key.attrs(split), source_fingerprint=reader.fingerprint)
    if not reader.may_skip:
        expected["rows"] = reader.rows
    return reader, key.path(cache_dir, split), expected


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
