"""The plan of one split's extraction: its shards, item ranges [start, stop) of the split, made from the source's
listing alone (no image decoded) and recorded beside the cache as `<split>.plan.json`.

Shard edges are multiples of the chunk size, so that a shard is cut into the very chunks one uninterrupted pass makes.
A plan of one shard writes the cache itself; one of several writes `<split>.shards/<index>-of-<count>.h5`, joined at
the end. `remove_older_work` removes the partial and shard files a complete cache has made useless.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cache.layout import partial_path
from ..cache.write import locked
from ..errors import UserError, plural

PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    shards: tuple  # ((start, stop), ...) in item order, covering [0, items)
    items: int
    fingerprint: str  # the source's, when the plan was made
    selection: dict  # the cache key's attributes for this split
    chunk_size: int

    def matches(self, fingerprint: str, selection: dict) -> bool:
        return self.fingerprint == fingerprint and self.selection == _plain(selection)

    def save(self, path: Path):
        """Write atomically (a temporary file of its own renamed: job-array tasks, on any node, may save it at once):
        a plan file is always whole."""
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(dict(asdict(self), version=PLAN_VERSION), indent=1))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


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


def make(items: int, count: int, chunk_size: int, fingerprint: str, selection: dict) -> Plan:
    """`count` shards of near-equal numbers of chunks."""
    chunks = -(-items // chunk_size)
    if count > chunks:
        raise UserError(f"`num_shards` {count} is more than the split's {plural(chunks, 'chunk')} of "
                        f"`chunk_size={chunk_size}` (its {items} items)")
    cuts = [min(chunks * i // count * chunk_size, items) for i in range(count + 1)]
    return Plan(tuple(zip(cuts[:-1], cuts[1:])), items, fingerprint, _plain(selection), chunk_size)


def sizes(plan: Plan) -> str:
    """The shards' item counts in words: "30 items each", or "24 to 32 items"."""
    counts = [stop - start for start, stop in plan.shards]
    return f"{counts[0]} items each" if min(counts) == max(counts) else f"{min(counts)} to {max(counts)} items"


def remove_shards(cache_path: Path):
    """Remove the shards' folder of a plan given up; refused in one line while a shard's writer is at work (holds
    its lock)."""
    folder = shards_dir(cache_path)
    with contextlib.ExitStack() as held:
        for name in sorted({_final(file) for file in folder.glob("*.h5")}):
            held.enter_context(locked(name))
        shutil.rmtree(folder)


def remove_older_work(cache_path: Path, shard: Path | None = None) -> str:
    """Remove the cache's partial file and every shard file (with `shard`: that shard's file and its partial) not
    newer than the cache file: work of the build that made it (shards an assembly killed before removing them left)
    or of an older one, which a build made after it never needs. A file whose writer is at work (holds its lock) is
    kept; the shards' folder goes once it holds no shard. What was removed, in words ('' when nothing, or no cache
    file)."""
    if not cache_path.exists():
        return ""
    published, folder = cache_path.stat().st_mtime_ns, shards_dir(cache_path)
    files = ([partial_path(cache_path)] + sorted(folder.glob("*.h5")) if shard is None
             else [file for file in (shard, partial_path(shard)) if file != cache_path])
    older, size = [], 0
    for file in files:
        with contextlib.suppress(UserError), locked(_final(file)):
            if file.exists() and file.stat().st_mtime_ns <= published:  # its writer's lock held: looked at again
                size += file.stat().st_size
                file.unlink()
                older.append(file)
    if not older:
        return ""
    if folder.is_dir() and not list(folder.glob("*.h5")):
        shutil.rmtree(folder)
    names = ", ".join(file.name for file in older[:3]) + (f" and {len(older) - 3} more" if len(older) > 3 else "")
    return f"{plural(len(older), 'file')} older than {cache_path.name} ({names}; {size / 1e9:.3f} GB)"


def _final(file: Path) -> Path:
    """The file a partial file becomes (whose name its writer's lock takes)."""
    return file.with_name(file.name.replace(".partial.h5", ".h5"))


def _plain(selection: dict) -> dict:
    """As JSON gives it back (a float stays a float, a tuple becomes a list)."""
    return json.loads(json.dumps(selection))
