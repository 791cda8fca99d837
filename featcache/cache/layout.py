"""Where a cache lives and what it says about itself: the cache key, the file layout, the attributes.

Layout: `<cache_dir>/<dataset>/<model-slug>-<hash>/<settings>/<split>.h5`, so other settings always
make another file and vectors never mix (a folder dataset's `<dataset>` names the folder and a hash
of its path). Each file holds one float32 [N, D] dataset per view (`embeddings` for the plain view,
`embeddings_<view>` for the others, view_dataset; the `views` attribute lists them, as a
JSON list, and later runs may add views) and `labels` (int64 [N]), plus attributes naming its
settings (the key's fields), class names, the source fingerprint, the versions that made it,
`rows_done` and `complete`. A folder dataset's cache also holds
`source_files` (every file of the split, relative to the data folder), `source_index` (int64 [N]:
each row's file) and `skipped_files` ([K, 2] strings: each file that could not be decoded, and why).

Every HDF5 chunk carries a Fletcher-32 checksum (its last CHECKSUM_BYTES bytes); write.py says why
the file survives a crash at any moment.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..settings import (
    DEFAULT_CROP, DEFAULT_DATASET, DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, DEFAULT_PRECISION, DEFAULT_RESIZE,
    DEFAULT_TEST_FRACTION,
)

FORMAT_VERSION = 2  # 2: views are added to a file, no longer part of its key
TOOL = "featcache"
TOOL_VERSION = __version__  # recorded in every cache file it writes (`tool_version`)
CHUNK_ROWS = 256
CHECKSUM_BYTES = 4  # Fletcher-32 appends this much to every stored chunk
# Attributes that decide whether a file is the cache asked for.
IDENTITY = ("tool", "format_version", "dataset", "split", "model", "image_size", "resize", "limit", "precision", "crop",
            "data_dir", "test_fraction", "model_sha256", "rows", "source_fingerprint", "shard")
# A partial file is only resumed by the same engine, batch size, library versions (and int8 model), so one file
# never mixes them; an assembly's only by an assembly; a run's only in the chunks its plan cuts.
RESUME_IDENTITY = IDENTITY + ("engine", "dim", "quantized_model", "calibration_sha256", "views", "computing",
                              "batch_size", "tensorflow_version", "tensorflow_hub_version", "openvino_version",
                              "nncf_version", "ray_version", "features", "assembled_from", "chunk_size")


@dataclass(frozen=True)
class CacheKey:
    """The settings that select one cache file (limit 0 means the whole split).

    Build it with `selection.select` or `select_cached` (they resolve paths, the model's input size and
    content hash).
    """

    model: str = DEFAULT_MODEL
    image_size: int = DEFAULT_IMAGE_SIZE
    resize: str = DEFAULT_RESIZE
    limit: int = 0
    dataset: str = DEFAULT_DATASET
    precision: str = DEFAULT_PRECISION
    crop: str = DEFAULT_CROP
    data_dir: str = ""  # a folder dataset's root; CIFAR copies are told apart by their fingerprint alone
    test_fraction: float = 0.0  # a one-level folder's split rule
    model_sha256: str = ""  # a local model folder's contents; a TF Hub handle names fixed contents
    image_column: str = ""  # a Parquet dataset's columns, when named ("": the defaults)
    label_column: str = ""

    @classmethod
    def from_attrs(cls, attrs: dict) -> "CacheKey":
        """The key a cache's attributes (or a run record's "cache" entry) name."""
        return cls(attrs["model"], int(attrs["image_size"]), attrs["resize"], int(attrs["limit"]),
                   attrs["dataset"], attrs["precision"], attrs["crop"], attrs["data_dir"],
                   float(attrs["test_fraction"]), attrs["model_sha256"], str(attrs.get("image_column", "")),
                   str(attrs.get("label_column", "")))

    def model_dir(self, cache_dir: str | os.PathLike) -> Path:
        """`<cache_dir>/<dataset>/<model-slug>-<hash>`: every cache of this model, and its quantized versions."""
        return Path(cache_dir) / self.dataset_name() / model_slug(self.model, self.model_sha256)

    def dataset_name(self) -> str:
        """`cifar10`, `cifar100`, or `<dataset>-<name>-<hash of its path and split rule (and named columns)>`."""
        if not self.data_dir:
            return self.dataset
        columns = f"|{self.image_column}|{self.label_column}" if self.image_column or self.label_column else ""
        digest = hashlib.sha1(f"{self.data_dir}|{self.test_fraction}{columns}".encode()).hexdigest()[:8]
        return f"{self.dataset}-{_slug(Path(self.data_dir).name)}-{digest}"

    def path(self, cache_dir: str | os.PathLike, split: str) -> Path:
        return self.model_dir(cache_dir) / self.settings_name() / f"{split}.h5"

    def settings_name(self) -> str:
        """`<size>px-<resize>[-center][-<precision>][-limitN]`; default crop and precision add nothing."""
        name = f"{self.image_size}px-{self.resize}"
        if self.crop != DEFAULT_CROP:
            name += f"-{self.crop}"
        if self.precision != DEFAULT_PRECISION:
            name += f"-{self.precision}"
        if self.limit:
            name += f"-limit{self.limit}"
        return name

    def chosen(self) -> dict:
        """The settings that differ from the defaults: what a user passes to select this key's cache."""
        default, chosen = CacheKey(), {}
        for name in ("dataset", "data_dir", "test_fraction", "image_column", "label_column", "model", "image_size",
                     "resize", "crop", "precision", "limit"):
            if getattr(self, name) != getattr(default, name):
                chosen[name] = getattr(self, name)
        if self.test_fraction == DEFAULT_TEST_FRACTION:
            chosen.pop("test_fraction")  # the folder split's default
        return chosen

    def attrs(self, split: str) -> dict:
        return {"tool": TOOL, "format_version": FORMAT_VERSION, "split": split, **asdict(self)}


def model_slug(model: str, sha256: str = "") -> str:
    """A readable, unique folder name for a model: its last path part and a hash of handle (and contents)."""
    readable = model.split("://", 1)[-1].split("/", 1)[-1] if "://" in model else Path(model).name
    digest = hashlib.sha1((model + (f"|{sha256}" if sha256 else "")).encode()).hexdigest()[:8]
    return f"{_slug(readable)[:48]}-{digest}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def view_dataset(key: str) -> str:
    """The HDF5 dataset holding a view's embeddings (`key`: the view) or, for `<view>@<feature>`, that view's pooled
    inner-layer feature (float32 [N, dim])."""
    view, at, feature = key.partition("@")
    return ("embeddings" if view == "plain" else f"embeddings_{view}") + at + feature


def feature_dataset(view: str, feature: str) -> str:
    """The HDF5 dataset holding a view's pooled inner-layer feature."""
    return view_dataset(f"{view}@{feature}")


def partial_path(path: Path) -> Path:
    """Where the cache at `path` is built until it is complete."""
    return path.with_name(path.stem + ".partial.h5")


def mismatches(attrs, expected: dict, names) -> list[str]:
    """The attributes among `names` whose stored value differs from `expected`'s."""
    return [name for name in names if name in expected and plain(attrs.get(name)) != plain(expected[name])]


def plain(value):
    """An attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_h5(path, mode: str) -> h5py.File:
    """Open without HDF5's own flock: write.locked() already keeps writers apart, readers only open
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
