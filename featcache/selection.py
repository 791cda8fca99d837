"""From the settings a user asked for to the cache they select (a CacheKey; CacheKey.chosen is the way back).

Stage 1 (`select`) may load the model once to learn the input size its signature fixes; stage 2 and the API
(`select_cached`) never load a network. `check_split` checks a split named through the API; `changed_since_cached`
tells stage 2 whether a class folder changed under its caches.
"""

from __future__ import annotations

from dataclasses import replace

from .cache.layout import CacheKey
from .cache.read import CacheUnusable, attributes, list_caches
from .errors import UserError
from .extract import models, sources
from .settings import (
    CROPS, DATASETS, DEFAULT_CROP, DEFAULT_DATASET, DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, DEFAULT_PRECISION,
    DEFAULT_RESIZE, PRECISIONS, RESIZE_METHODS, SPLITS, check_count, check_image_size,
)

# The selection parameters, in the order the command line lists them.
SELECTION_NAMES = ("cache_dir", "dataset", "data_dir", "test_fraction", "image_column", "label_column", "model",
                   "image_size", "resize", "crop", "limit", "precision")


def _key(size_of, model: str = DEFAULT_MODEL, image_size: int | None = None, resize: str = DEFAULT_RESIZE,
         limit: int | None = None, precision: str = DEFAULT_PRECISION,
         dataset: str = DEFAULT_DATASET, data_dir=None, crop: str = DEFAULT_CROP,
         test_fraction: float | None = None, image_column: str | None = None,
         label_column: str | None = None) -> CacheKey:
    """The key these settings name; `size_of(key without a size)` gives the image size when none is asked."""
    for name, value, choices in (("dataset", dataset, DATASETS), ("crop", crop, CROPS),
                                 ("resize", resize, RESIZE_METHODS),
                                 ("precision", precision, PRECISIONS)):
        if value not in choices:
            raise UserError(f"unknown `{name}` {value!r}; choose one of {', '.join(choices)}")
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        check_image_size(image_size)  # its own, lower limit first
    if image_size is not None:
        check_count("image_size", image_size)
    if limit is not None:
        check_count("limit", limit, minimum=0)  # 0: the whole split, as CacheKey records it
    root, fraction = "", 0.0
    if dataset in sources.FOLDER_HOLDS:
        path, fraction = sources.check_root(dataset, data_dir, test_fraction if dataset == "folder" else None)
        root = str(path)
    if test_fraction is not None and dataset != "folder":
        raise UserError("`test_fraction` applies to `dataset='folder'` only")
    for name, value in (("image_column", image_column), ("label_column", label_column)):
        if value is not None and dataset != "parquet":
            raise UserError(f"`{name}` applies to `dataset='parquet'` only")
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UserError(f"`{name}` must name a column, got {value!r}")
    model, sha256 = models.identity(model)
    key = CacheKey(model, 0, resize, limit or 0, dataset, precision, crop, root, fraction, sha256, image_column or "",
                   label_column or "")
    return replace(key, image_size=size_of(key, image_size))


def check_split(split: str):
    """A split named by the caller of the API (the command line offers only these)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def select(cache_dir, announce=None, splits=(), **settings) -> CacheKey:
    """Stage 1's key: the model's own input size when its signature fixes one (loaded once, then recorded
    under `<cache_dir>/models/`; `announce` gets a line before that load), else `image_size`, else the default.
    Tars and Parquet files are first opened for each of `splits`, so that a layout error (no files for a split,
    a missing column) comes before any model load or extraction; their readers are kept for the extraction."""
    def size_of(key, asked):
        sources.forget_kept()
        if key.dataset in sources.INDEXED:
            for split in splits:
                sources.open_split(key, split, keep=True)
        return models.input_size(key.model, key.model_sha256, asked, DEFAULT_IMAGE_SIZE, cache_dir, announce)

    return _key(size_of, **settings)


def select_cached(cache_dir, **settings) -> CacheKey:
    """Stage 2's key, found without loading any network: `image_size` when asked, else the size of the
    caches present for the other settings (an error when they hold several), else the model's record,
    else the default (whose absence the reader then reports with the caches that are present)."""
    def size_of(key, asked):
        if asked:
            return asked
        sizes = sorted({entry["key"].image_size for entry in list_caches(cache_dir) if entry["key"] is not None
                        and entry["key"] == replace(key, image_size=entry["key"].image_size)})
        if len(sizes) > 1:
            raise UserError(f"caches of {', '.join(map(str, sizes))} px exist for these settings; choose one "
                            "with `image_size`")
        if sizes:
            return sizes[0]
        _, fixed = models.recorded_input_size(key.model, key.model_sha256, cache_dir)
        return fixed or DEFAULT_IMAGE_SIZE

    return _key(size_of, **settings)


def changed_since_cached(key: CacheKey, cache_dir) -> list[CacheUnusable]:
    """For a class folder, each split whose cache records another fingerprint than the folder has now (files
    added, removed or changed since it was made): the problem and its remedy (cheap, no image is read). Other
    sources are not looked at; a missing or unreadable cache is left to whatever reads it."""
    if key.dataset != "folder":
        return []
    changed = []
    for split in SPLITS:
        path = key.path(cache_dir, split)
        try:
            recorded = attributes(path).get("source_fingerprint")
        except (OSError, KeyError, ValueError):
            continue
        if recorded != sources.open_split(key, split).fingerprint:
            changed.append(CacheUnusable(f"{key.data_dir} has changed since its {split} cache was made (files added, "
                                         "removed or modified); the head trains on the images cached then",
                                         key, split, cache_dir, "rebuild"))
    return changed
