#!/usr/bin/env python
"""What the cache's safety checks cost: Fletcher-32 chunk checksums (write, read) and the NaN/Inf check.

Writes a cache of the default CIFAR-10 train cache's shape (50,000 rows x 1280, plain and flip
views, in 1,024-row commits as extract.py makes them) with and without checksums, reads each back
as train_head.py does, and times the finite check on what was read. The values are random (the
cost of a checksum does not depend on them), or those of a real cache (--from-cache). Runs alternate,
and medians are printed (reads: 3 per file and repeat).

    python bench/cache_checks.py [--rows 50000] [--repeats 3] [--from-cache cache/.../train.h5]
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from featcache.cache import layout  # noqa: E402
from featcache.cache import read as cache_read  # noqa: E402
from featcache.cache import write as cache_write  # noqa: E402

DIM, COMMIT = 1280, 1024


def write(path: Path, rows: int, checksums: bool, views: dict) -> float:
    attrs = dict(tool=layout.TOOL, format_version=layout.FORMAT_VERSION, dataset="bench", split="train", model="m",
                 image_size=224, resize="bicubic", limit=0, rows=rows, source_fingerprint="f", engine="bench",
                 class_names=json.dumps([str(c) for c in range(10)]))
    started = time.perf_counter()
    with cache_write.locked(path), cache_write.CacheWriter(path, attrs, DIM, ("plain", "flip"), checksums=checksums) as w:
        for lo in range(0, rows, COMMIT):
            hi = min(lo + COMMIT, rows)
            w.write(lo, {v: x[lo:hi] for v, x in views.items()}, np.arange(lo, hi) % 10)
        w.finish()
    return time.perf_counter() - started


def read(path: Path) -> tuple[float, float, dict]:
    started = time.perf_counter()
    embeddings, _, _ = cache_read.read(path, {}, ("plain", "flip"))
    loaded = time.perf_counter()
    for rows in embeddings.values():
        assert cache_read.non_finite(rows)[0] == 0
    return loaded - started, time.perf_counter() - loaded, embeddings


@click.command()
@click.option("--rows", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--from-cache", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Use the rows of this real flip-view cache (e.g. the default train.h5) instead of random ones.")
def main(rows, repeats, from_cache):
    if from_cache:
        loaded, _, _ = cache_read.read(Path(from_cache), {}, ("plain", "flip"))
        views = {v: x[:rows] for v, x in loaded.items()}
        rows = len(views["plain"])
    else:
        rng = np.random.default_rng(0)
        views = {v: np.clip(rng.gamma(1.0, 0.5, (rows, DIM)), 0, 6).astype(np.float32) for v in ("plain", "flip")}
    times = {(c, what): [] for c in (False, True) for what in ("write", "read", "finite")}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        paths = {}
        for i in range(repeats):
            for checksums in (False, True):
                paths[checksums] = Path(tmp) / f"{checksums}-{i}" / "train.h5"
                times[checksums, "write"].append(write(paths[checksums], rows, checksums, views))
            for checksums in (False, True) * 3:  # reads alternate; the files are in the page cache
                read_s, finite_s, got = read(paths[checksums])
                assert np.array_equal(got["flip"], views["flip"])
                times[checksums, "read"].append(read_s)
                times[checksums, "finite"].append(finite_s)
                del got
            for path in paths.values():
                path.unlink()
    mb = 2 * rows * DIM * 4 / 1e6
    print(f"{rows} rows x {DIM} x 2 views ({mb:.0f} MB), median of {repeats} writes and {3 * repeats} reads:")
    for what in ("write", "read"):
        plain, summed = (statistics.median(times[c, what]) for c in (False, True))
        print(f"  {what:5s} without checksums {plain:6.3f} s   with Fletcher-32 {summed:6.3f} s   "
              f"(+{summed - plain:.3f} s, {summed / plain:.2f}x)")
    print(f"  NaN/Inf check of both views: {statistics.median(times[True, 'finite']):.3f} s")


if __name__ == "__main__":
    main()
