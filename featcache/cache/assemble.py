"""Joining complete shard files (each a cache of an item range of one split) into the split's one cache file.

A copy through the crash-safe writer, block by block, so a killed assembly resumes where it stopped; each block is
read through its checksum, so a damaged shard stops the copy. (HDF5 virtual datasets would read a missing source as
fill values, silently.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from .layout import CHUNK_ROWS, open_h5, view_dataset
from .read import attributes, cached_features, cached_views, skipped_files
from .write import CacheWriteError, CacheWriter

BLOCK_ROWS = 64 * CHUNK_ROWS  # rows copied (and committed) at a time: 84 MB a view of 1,280 floats
# What made a shard's rows: shards that differ in any of these are never joined into one cache.
PROVENANCE = ("engine", "precision", "batch_size", "dim", "views", "tensorflow_version", "tensorflow_hub_version",
              "features", "openvino_version", "nncf_version", "ray_version", "quantized_model", "calibration_sha256")
SHARD_ONLY = ("shard", "rows_done", "complete", "created", "skipped", "views", "computing", "dim", "features")


def refuse_mixed(shards: list[Path], path: Path):
    """One line when the shards were made by different versions or settings."""
    made = [attributes(shard) for shard in shards]
    for name in PROVENANCE:
        values = {}
        for index, attrs in enumerate(made):
            values.setdefault(str(attrs.get(name, "")), []).append(index)
        if len(values) > 1:
            told = "; ".join(f"{value or '(none)'} in shards {_span(indices)}" for value, indices in values.items())
            raise UserError(f"the shards of {path} were made with different {name} ({told}); one cache never mixes "
                            f"them: remove the odd shards' files (or all of {shards[0].parent}) to build them again")


def _span(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:6])) + (f" (and {len(indices) - 6} more)" if len(indices) > 6 else "")


def assemble(path: Path, shards: list[Path], starts: list[int], files: list[str] | None = None) -> list:
    """Copy the shards' rows, in order, into the cache at `path` and publish it; (file, reason) of the skipped files.

    `starts`: each shard's first item, which its own `source_index` counts from; `files`: a folder split's files.
    The caller holds the cache's lock."""
    first = attributes(shards[0])
    rows = [int(attributes(shard)["rows"]) for shard in shards]
    # assembled_from: a partial file of this cache left by a one-pass run (another plan) is never resumed here
    attrs = dict({k: v for k, v in first.items() if k not in SHARD_ONLY}, rows=np.int64(sum(rows)),
                 assembled_from=np.int64(len(shards)))
    views = cached_views(first)
    skipped = [pair for shard in shards for pair in skipped_files(shard)] if files is not None else []
    with CacheWriter(path, attrs, int(first["dim"]), views, files=files, features=cached_features(first)) as writer:
        offset = 0
        for shard, count, start in zip(shards, rows, starts):
            if offset + count > writer.rows_done:
                _copy(shard, writer, offset, max(writer.rows_done - offset, 0), count, start, files is not None)
            offset += count
        writer.finish(skipped)
    return skipped


def _copy(shard: Path, writer: CacheWriter, offset: int, lo: int, count: int, start: int, indexed: bool):
    try:
        with open_h5(shard, "r") as f:
            for a in range(lo, count, BLOCK_ROWS):
                b = min(a + BLOCK_ROWS, count)
                vectors = {key: f[view_dataset(key)][a:b] for key in writer.computing}
                items = f["source_index"][a:b] + start if indexed else None
                writer.write(offset + a, vectors, f["labels"][a:b], items)
    except CacheWriteError:
        raise
    except (OSError, RuntimeError, KeyError) as exc:  # a checksum that fails, a truncated file
        raise UserError(f"shard {shard} is damaged ({first_line(exc, 100)}); remove it and run again to build it "
                        "again") from None
