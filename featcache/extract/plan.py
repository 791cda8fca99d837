"""The plan of one split's extraction: its shards, item ranges [start, stop) of the split, made from the source's
listing alone (no image decoded) and recorded beside the cache as `<split>.plan.json`.

A shard is the unit of work of every runner: one read -> embed -> write loop into one crash-safe file. Its edges are
multiples of the chunk size, so that a shard of equal-size images (CIFAR) is cut into the very chunks and network
batches one uninterrupted pass makes (a folder's, tar's or Parquet chunk may end early at its byte budget; each image
is still embedded alone on OpenVINO's batch of 1). `make` can also cut at a source's natural units (`units()`: tar
files, row groups); the pipeline does not ask it to yet, since such edges cut chunks differently from one pass. A plan of one shard writes the cache itself;
a plan of several writes `<split>.shards/<index>-of-<count>.h5`, each a cache of its items, joined at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    shards: tuple  # ((start, stop), ...) in item order, covering [0, items)
    items: int
    fingerprint: str  # the source's, when the plan was made
    selection: dict  # the cache key's attributes for this split
    chunk_size: int

    def matches(self, fingerprint: str, selection: dict, chunk_size: int) -> bool:
        return (self.fingerprint == fingerprint and self.selection == _plain(selection)
                and self.chunk_size == chunk_size)

    def save(self, path: Path):
        """Write atomically (a temporary file renamed): a plan file is always whole."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # job-array tasks may save it at once
        tmp.write_text(json.dumps(dict(asdict(self), version=PLAN_VERSION), indent=1))
        os.replace(tmp, path)


def plan_path(cache_path: Path) -> Path:
    return cache_path.with_name(f"{cache_path.stem}.plan.json")


def shards_dir(cache_path: Path) -> Path:
    return cache_path.with_name(f"{cache_path.stem}.shards")


def shard_path(cache_path: Path, index: int, count: int) -> Path:
    """Where shard `index` of `count` is built: the cache itself when there is one shard."""
    return cache_path if count == 1 else shards_dir(cache_path) / f"{index:05d}-of-{count:05d}.h5"


def load(path: Path) -> Plan | None:
    """The recorded plan, or None when there is none (or it cannot be read: it is then made again)."""
    try:
        data = json.loads(path.read_text())
        if data.pop("version") != PLAN_VERSION:
            return None
        return Plan(tuple(tuple(shard) for shard in data.pop("shards")), **data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make(items: int, count: int, chunk_size: int, fingerprint: str, selection: dict, units=None) -> Plan:
    """`count` shards of near-equal numbers of pieces, a piece being a unit of the source (`units`: item counts) or
    a chunk."""
    sizes = list(units) if units else [chunk_size] * (items // chunk_size) + ([items % chunk_size] if items % chunk_size
                                                                             else [])
    if count > len(sizes):
        what = "units" if units else f"chunks of `chunk_size={chunk_size}`"
        raise UserError(f"`num_shards` {count} is more than the split's {len(sizes)} {what} (its {items} items)")
    edges = [0]
    for size in sizes:
        edges.append(edges[-1] + size)
    cuts = [edges[len(sizes) * i // count] for i in range(count + 1)]
    return Plan(tuple(zip(cuts[:-1], cuts[1:])), items, fingerprint, _plain(selection), chunk_size)


def _plain(selection: dict) -> dict:
    """As JSON gives it back (a float stays a float, a tuple becomes a list)."""
    return json.loads(json.dumps(selection))
