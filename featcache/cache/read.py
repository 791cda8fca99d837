"""Reading caches: is a file the cache asked for, its rows and attributes, listing and checking caches.

Nothing here imports TensorFlow: a cache is checked and read with h5py and numpy alone.
`load_features` is what stage 2 and the API call: it refuses any cache that is missing,
incomplete, made with other settings, damaged (Fletcher-32) or holding NaN/Inf or labels
outside its classes, and says in one line what would make a usable one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from ..memory import fresh_array
from ..settings import LISTED_CACHES, SPLITS, VIEWS, views_label
from .layout import IDENTITY, TOOL, CacheKey, feature_dataset, mismatches, open_h5, partial_path, plain, view_dataset

VERIFY_BLOCK_ROWS = 10_000


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
        with open_h5(path, "r") as f:
            attrs = _attributes(f)
            if attrs.get("tool") != TOOL:
                return CacheState("bad", "it was not made by featcache")
            if "format_version" in expected and attrs.get("format_version") != expected["format_version"]:
                return CacheState("bad", "it was made with other format_version")  # other attributes, other checks
            # besides views and class_names, the attributes readers use
            if missing := [name for name in ("rows", "source_fingerprint", "engine") if name not in attrs]:
                return CacheState("bad", f"its {', '.join(missing)} attribute is missing")
            wrong = mismatches(attrs, expected, IDENTITY)
            if wrong == ["source_fingerprint"]:
                return CacheState("bad", "its source changed since it was made (images added, removed or modified)")
            if wrong:
                return CacheState("bad", f"it was made with other {', '.join(wrong)}")
            if not attrs.get("complete") or attrs.get("rows_done") != attrs.get("rows"):
                return CacheState("bad", "it is incomplete")
            if not (views := cached_views(attrs)):
                return CacheState("bad", "its views attribute is missing or not a list of known views")
            try:
                class_names(attrs)
            except (KeyError, TypeError, ValueError):
                return CacheState("bad", "its class_names attribute is missing or not a list of names")
            rows = attrs["rows"]
            dim = int(attrs["dim"]) if "dim" in attrs else None
            widths = {view_dataset(view): dim for view in views}  # values per row, None: unrecorded
            for feature, size in cached_features(attrs).items():
                widths.update((feature_dataset(view, feature), size) for view in views)
            for name, width in widths.items():
                if name not in f or not _float_rows(f[name], rows):
                    return CacheState("bad", f"its {name} dataset is missing or not {rows} rows of floats")
                if width is not None and f[name].shape[1] != width:
                    return CacheState("bad", f"its {name} rows have {f[name].shape[1]} values, its dim or features "
                                             f"attribute says {width}")
            if "labels" not in f or f["labels"].shape != (rows,) or f["labels"].dtype.kind not in "iu":
                return CacheState("bad", f"its labels dataset is missing or not {rows} whole numbers")
    except (OSError, RuntimeError, KeyError, ValueError) as exc:  # h5py's ways of meeting a damaged file
        return CacheState("bad", f"it is not a readable HDF5 file ({first_line(exc, 120)})")
    return CacheState("complete")


def _float_rows(dataset, rows: int) -> bool:
    """Whether an embeddings dataset holds `rows` vectors of floats."""
    return dataset.ndim == 2 and dataset.shape[0] == rows and dataset.dtype.kind == "f"


def cached_views(attrs: dict) -> tuple[str, ...]:
    """The views a cache file holds (its `views` attribute, a JSON list)."""
    try:
        views = json.loads(attrs.get("views", "[]"))
    except (TypeError, ValueError):
        return ()
    return tuple(views) if isinstance(views, list) and all(v in VIEWS for v in views) else ()


def cached_features(attrs: dict) -> dict[str, int]:
    """The inner-layer features a cache file holds for each of its views, {feature: values per row} (its `features`
    attribute, a JSON object; absent: none)."""
    try:
        features = json.loads(attrs.get("features", "{}"))
    except (TypeError, ValueError):
        return {}
    if not isinstance(features, dict) or not all(type(dim) is int and dim > 0 for dim in features.values()):
        return {}
    return features


class Missing(UserError):
    """A cache lacks views or inner-layer features a head asked for: extraction adds them (`option`: 'views' or
    'layers')."""

    def __init__(self, problem: str, option: str, missing: tuple[str, ...]):
        self.problem, self.option, self.missing = problem, option, missing
        super().__init__(f"{problem}; add them with `{option}={','.join(missing)!r}`")


class CorruptCache(UserError):
    """Stored bytes no longer match their checksum (bit rot, a failing disk)."""


def read(path: Path, expected: dict, views: tuple[str, ...] | None) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Load a complete cache: ({view: embeddings} of `views`, default all it holds; labels; attributes).
    Refuses anything else."""
    state = inspect(path, expected)
    if state.status == "missing":
        raise UserError(f"no cache at {path}")
    if state.status == "bad":
        raise UserError(f"cache {path} cannot be used: {state.reason}")
    return _read(path, views)[:3]


def _read(path: Path, views: tuple[str, ...] | None, features: tuple[str, ...] = ()):
    """(embeddings, labels, attributes) as `read` gives them, and the inner-layer `features` of those views,
    {feature: {view: rows}}, of a cache `inspect` found complete."""
    with open_h5(path, "r") as f, _checksummed(path):
        attrs = _attributes(f)
        held = cached_views(attrs)
        views = held if views is None else views
        if missing := tuple(v for v in views if v not in held):
            raise Missing(f"cache {path} holds no {', '.join(missing)} view (it holds {', '.join(held)})", "views",
                          missing)
        _refuse_missing(path, cached_features(attrs), features)
        embeddings = {v: _read_whole(f[view_dataset(v)]) for v in views}
        labels = f["labels"][:]
        inner = {feature: {view: _read_whole(f[feature_dataset(view, feature)]) for view in views}
                 for feature in features}
    return embeddings, labels, attrs, inner


def _refuse_missing(path: Path, held: dict, features: tuple[str, ...]):
    if missing := tuple(feature for feature in features if feature not in held):
        raise Missing(f"cache {path} holds no feature {', '.join(missing)} (it holds {', '.join(held) or 'none'})",
                      "layers", missing)


def failed_checksum(exc: OSError) -> bool:
    """Whether h5py's error is a Fletcher-32 mismatch (an OSError from the filter pipeline)."""
    return "filter returned failure" in str(exc)


@contextlib.contextmanager
def _checksummed(path: Path):
    """A Fletcher-32 mismatch as a CorruptCache."""
    try:
        yield
    except OSError as exc:
        if not failed_checksum(exc):
            raise
        raise CorruptCache(f"cache {path} is damaged: a chunk failed its Fletcher-32 checksum") from None


def _read_whole(dataset) -> np.ndarray:
    """All of a dataset, into a fresh buffer (steadier and often faster to fill than numpy's, see memory.py)."""
    rows = fresh_array(dataset.shape, dataset.dtype)
    if rows.size:
        dataset.read_direct(rows)
    return rows


def attributes(path: Path) -> dict:
    """A cache file's attributes as plain Python values, without reading any rows."""
    with open_h5(path, "r") as f:
        return _attributes(f)


def _attributes(f) -> dict:
    return {k: plain(v) for k, v in f.attrs.items()}


def class_names(attrs: dict) -> tuple[str, ...]:
    """The class names a cache stores (ValueError when they are not a JSON list of names)."""
    names = json.loads(attrs["class_names"])
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"class_names is {str(names)[:40]!r}, not a list of names")
    return tuple(names)


def skipped_files(path: Path) -> list[tuple[str, str]]:
    """(file, reason) of each source file a folder cache has no row for."""
    with open_h5(path, "r") as f:
        return [tuple(pair) for pair in f["skipped_files"].asstr()[:]] if "skipped_files" in f else []


def row_files(path: Path, rows: np.ndarray) -> list[str] | None:
    """The source file (relative to the data folder) of each of `rows` of a folder cache; None for a cache whose
    rows name no files (CIFAR: row i is the split's image i)."""
    with open_h5(path, "r") as f:
        if "source_files" not in f:
            return None
        files, index = f["source_files"], f["source_index"][:]
        return [files[int(i)].decode() for i in index[rows]]


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


def labels_outside(labels: np.ndarray, classes: int) -> tuple[int, int]:
    """(count of labels outside [0, classes), first row holding one, or -1)."""
    bad = (labels < 0) | (labels >= classes)
    count = int(bad.sum())
    return count, int(np.argmax(bad)) if count else -1


def list_caches(cache_dir) -> list[dict]:
    """Every cache file under `cache_dir` (complete or partial): its key, split, rows, views, inner-layer
    features, state and size."""
    found = []
    for path in sorted(Path(cache_dir).glob("*/*/*/*.h5")):
        try:
            entry = {"path": path, "megabytes": path.stat().st_size / 1e6, "key": None}
        except FileNotFoundError:
            continue  # published or discarded meanwhile
        try:
            a = attributes(path)
            entry.update(split=a["split"], rows=int(a["rows"]), rows_done=int(a["rows_done"]), views=cached_views(a),
                         features=tuple(cached_features(a)),
                         complete=bool(a["complete"]) and not path.name.endswith(".partial.h5"),
                         key=CacheKey.from_attrs(a))
            if entry["complete"] and (state := inspect(path, {})).status == "bad":
                entry["problem"] = state.reason  # what can be told without the source or reading every row
        except (OSError, RuntimeError, KeyError, ValueError, TypeError):
            pass  # not a readable featcache file: listed by path only
        found.append(entry)
    return found


def check_contents(path: Path, reader) -> list[str]:
    """Row-level checks that `inspect` leaves out: shapes, labels vs the source, NaN/Inf.

    Reads a block of rows at a time, so memory stays bounded for any split size.
    """
    problems = []
    with open_h5(path, "r") as f:
        rows = f.attrs.get("rows")
        if not isinstance(rows, (int, np.integer)):
            return [f"its rows attribute is {str(rows)[:20]!r}, not a whole number"]
        names = [n for n in f if n.startswith("embeddings")]
        if not names:
            return ["no embeddings dataset"]
        for name in list(names):
            if not _float_rows(f[name], rows):
                problems.append(f"{name} is {f[name].dtype} of shape {f[name].shape}, expected float ({rows}, D)")
                names.remove(name)
        if "labels" not in f or f["labels"].shape != (rows,):
            return problems + ["labels dataset missing or the wrong length"]
        if not reader.may_skip and rows != reader.rows:
            return problems + [f"{rows} rows, but the source has {reader.rows}"]
        items = f["source_index"][:] if "source_index" in f else np.arange(rows)
        if len(items) != rows or (rows and not 0 <= items.min() <= items.max() < reader.rows):
            return problems + ["its rows name source files that the source does not have"]
        expected = reader.labels_of(items)
        classes = len(reader.class_names)
        for lo in range(0, rows, VERIFY_BLOCK_ROWS):
            hi = min(lo + VERIFY_BLOCK_ROWS, rows)
            stored = f["labels"][lo:hi]
            outside, first = labels_outside(stored, classes)
            if outside:
                problems.append(f"{outside} labels outside [0, {classes}) in rows {lo}:{hi} "
                                f"(first in row {lo + first})")
            elif not np.array_equal(stored, expected[lo:hi]):
                problems.append(f"labels differ from the source in rows {lo}:{hi}")
            for name in names:
                try:
                    with _checksummed(path):
                        block = f[name][lo:hi]
                except CorruptCache:
                    problems.append(f"{name} fails its checksum in rows {lo}:{hi} (damaged)")
                    continue
                if not np.isfinite(block).all():
                    problems.append(f"{name} has NaN or Inf in rows {lo}:{hi}")
    return problems


# --- what stage 2 and the API read ------------------------------------------------------------------


@dataclass
class Features:
    """Cached embeddings of one split, per view, with labels and the names of all classes; `inner`: the inner-layer
    features read, {feature: {view: rows}}."""

    views: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    inner: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


class CacheUnusable(UserError):
    """A cache a run needs is missing or cannot be used. Besides the message, it carries what would
    make a usable one: the cache's `key`, `split` and `cache_dir`, and `action`: 'extract' (it is
    missing), 'rebuild' (force a new one) or 'verify' (check it against its source, then rebuild)."""

    def __init__(self, problem: str, key: CacheKey, split: str, cache_dir, action: str, present: list | None = None,
                 views: tuple[str, ...] = (), layers: tuple[str, ...] = ()):
        self.problem, self.key, self.split, self.cache_dir, self.action = problem, key, split, cache_dir, action
        self.views, self.layers = views, layers  # views and inner-layer features to add to the cache ('extract')
        self.present = present or []  # (selection kwargs, state) of other caches in cache_dir
        added = " and ".join(f"`{option}={','.join(names)!r}`"
                             for option, names in (("views", views), ("layers", layers)) if names)
        remedy = {"extract": f"add them with {added}" if added else "extract it",
                  "rebuild": "rebuild it with `force=True`",
                  "verify": "check it with featcache.api.verify, rebuild it with `force=True`"}[action]
        more = len(self.present) - LISTED_CACHES
        listed = (". Caches present: " + " | ".join(f"{_marked(kwargs) or '(defaults)'}: {state}"
                                                    for kwargs, state in self.present[:LISTED_CACHES])
                  + (f" | {more} more" if more > 0 else "")) if self.present else ""
        super().__init__(f"{problem}; {remedy}{listed}")


def _marked(kwargs: dict) -> str:
    """Selection keyword arguments as marked parameters (errors.py): `resize='bilinear'` `limit=100`."""
    return " ".join(f"`{name}={value!r}`" for name, value in kwargs.items())


def size_label(megabytes: float) -> str:
    """A file's size as people read it: 512 bytes, 45 kB, 3.2 MB, 412 MB, 1.6 GB (a small cache is never '0 MB')."""
    if megabytes < 1e-3:
        return f"{megabytes * 1e6:.0f} bytes"
    if megabytes < 1:
        return f"{megabytes * 1e3:.0f} kB"
    value, unit = (megabytes, "MB") if megabytes < 1e3 else (megabytes / 1e3, "GB")
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def caches_present(cache_dir, entries: list[dict] | None = None) -> list[tuple[dict, str]]:
    """(the selection kwargs that differ from the defaults, its splits and their states) per cached settings;
    `entries`: list_caches(cache_dir) when the caller has it already."""
    groups: dict[CacheKey, list[str]] = {}
    for entry in list_caches(cache_dir) if entries is None else entries:
        if entry.get("key") is None:
            continue
        state = (f"damaged ({entry['problem']})" if "problem" in entry else "complete" if entry["complete"]
                 else f"partial {entry['rows_done']}/{entry['rows']}")
        groups.setdefault(entry["key"], []).append(
            f"{entry['split']} {entry['rows']} rows {state} {size_label(entry['megabytes'])}, "
            f"views {views_label(entry['views']) if entry['views'] else 'none'}"
            + (f", features {'+'.join(entry['features'])}" if entry.get("features") else ""))
    return sorted(((key.chosen(), "; ".join(splits)) for key, splits in groups.items()),
                  key=lambda item: repr(item[0]))


def views_present(key: CacheKey, cache_dir) -> tuple[str, ...]:
    """The views both splits' caches hold (every view when one is unreadable: reading it then says why)."""
    present = set(VIEWS)
    for split in ("train", "test"):
        try:
            present &= set(cached_views(attributes(key.path(cache_dir, split))))
        except (OSError, RuntimeError, KeyError, ValueError):
            continue
    return tuple(view for view in VIEWS if view in present)


def check_features(key: CacheKey, cache_dir, features: tuple[str, ...]):
    """Refuse inner-layer `features` a split's cache lacks, naming them all, before anything is read (a cache whose
    attributes cannot be read is left to load_features, which says what is wrong with it)."""
    for split in SPLITS:
        path = key.path(cache_dir, split)
        try:
            held = cached_features(attributes(path))
        except (OSError, RuntimeError, KeyError, ValueError):
            continue
        try:
            _refuse_missing(path, held, features)
        except Missing as exc:
            raise CacheUnusable(exc.problem, key, split, cache_dir, "extract", layers=exc.missing) from None


def load_features(key: CacheKey, split: str, cache_dir, views: tuple[str, ...] | None,
                  features: tuple[str, ...] = ()) -> tuple[Features, dict]:
    """Read one complete, checked cache (`views` of it, None: all; and the inner-layer `features` of those views):
    its Features and where they came from (path, fingerprint, engine, rows)."""
    path = key.path(cache_dir, split)
    state = inspect(path, key.attrs(split))
    if state.status == "missing":
        hint = " (an interrupted extraction is waiting to resume)" if partial_path(path).exists() else ""
        raise CacheUnusable(f"no {split} cache at {path}{hint}", key, split, cache_dir, "extract",
                            caches_present(cache_dir))
    if state.status == "bad":
        raise CacheUnusable(f"{split} cache {path} cannot be used: {state.reason}", key, split, cache_dir, "rebuild")
    try:
        embeddings, labels, attrs, inner = _read(path, views, features)
    except Missing as exc:
        raise CacheUnusable(exc.problem, key, split, cache_dir, "extract", **{exc.option: exc.missing}) from None
    except CorruptCache as exc:
        raise CacheUnusable(str(exc), key, split, cache_dir, "rebuild") from None
    checked = [(f"{view} view", rows) for view, rows in embeddings.items()]
    checked += [(f"{view} view, feature {feature}", rows)
                for feature, held in inner.items() for view, rows in held.items()]
    for what, rows in checked:
        count, first = non_finite(rows)
        if count:
            raise CacheUnusable(f"{split} cache {path} holds {count} NaN/Inf values ({what}, first in row "
                                f"{first})", key, split, cache_dir, "verify")
    names = class_names(attrs)
    count, first = labels_outside(labels, len(names))
    if count:
        raise CacheUnusable(f"{split} cache {path} holds {count} labels outside [0, {len(names)}) (first in row "
                            f"{first}: {labels[first]})", key, split, cache_dir, "verify")
    return Features(embeddings, labels, names, inner), {"path": str(path), "fingerprint": attrs["source_fingerprint"],
                                                 "engine": attrs["engine"], "rows": int(attrs["rows"]),
                                                 "network": str(attrs.get("calibration", ""))}


def load_splits(key: CacheKey, cache_dir, train_views, test_views, features=()) -> list[tuple[Features, dict]]:
    """Both splits (load_features, with the inner-layer `features`), checked to come from one network: an int8
    cache's splits from the same quantization (a split made on another CPU class, or under another oneDNN cap, may
    differ)."""
    splits = [load_features(key, "train", cache_dir, train_views, features),
              load_features(key, "test", cache_dir, test_views, features)]
    (_, train_info), (_, test_info) = splits
    if train_info["network"] != test_info["network"]:
        raise CacheUnusable(f"the train and test caches were made by differently quantized networks "
                            f"({train_info['network']!r} vs {test_info['network']!r})", key, "test", cache_dir,
                            "rebuild")
    return splits
