#!/usr/bin/env python
"""What reading a split costs beside the network: indexing, the source alone, and an extraction's wait for chunks.

    python bench/folder_tree.py write /tmp/cifar-png --data-dir ../shared/data/cifar-10-python.tar.gz --limit 2000
    TFHUB_CACHE_DIR=/work/shared/tfhub_cache flock /tmp/cpu.lock python bench/source_speed.py \\
        --dataset folder --data-dir /tmp/cifar-png --split test

Prints a Markdown table: the reader opened (for tars and Parquet files, every header and label indexed; nothing
decoded), the data-folder stamp that decides whether the selection's readers are handed on to the extraction, two
passes of the source alone (read and decode every image, as the extraction's chunk-reader thread does), then one
extraction of the plain view into a fresh cache folder and the time its loop waited for chunks from that thread:
when the wait is about the first chunk alone, reading is not what bounds the extraction.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.command()
@click.option("--dataset", type=click.Choice(["folder", "webdataset", "parquet"]), default="folder",
              show_default=True)
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--model", default=None, help="Model handle or folder (default: extract.py's).")
@click.option("--image-size", type=int, default=None, help="As extract.py takes it.")
@click.option("--engine", default="auto", show_default=True, help="As extract.py takes it.")
def main(dataset, data_dir, split, model, image_size, engine):
    from featcache import api, cpu
    from featcache.extract import shard, sources
    from featcache.selection import select

    with tempfile.TemporaryDirectory(prefix="source-speed-") as cache:
        chosen = {"dataset": dataset, "data_dir": data_dir, "image_size": image_size,
                  **({"model": model} if model else {})}
        key = select(cache, **chosen)
        started = time.perf_counter()
        reader = sources.open_split(key, split)
        opened = time.perf_counter() - started
        started = time.perf_counter()
        sources._stamp(Path(key.data_dir))
        stamp = time.perf_counter() - started
        passes = []
        for _ in range(2):
            started = time.perf_counter()
            count = sum(len(chunk.items) for chunk in reader.chunks(1024))
            passes.append(time.perf_counter() - started)

        waits, prefetched = [], shard.prefetched

        def timed(items, depth=1):
            chunks = prefetched(items, depth)
            while True:
                started = time.perf_counter()
                chunk = next(chunks, None)
                if chunk is None:
                    return
                waits.append(time.perf_counter() - started)
                yield chunk

        shard.prefetched = timed
        try:
            result = api.extract(split, cache_dir=cache, views="plain", engine=engine, progress=False, **chosen)
        finally:
            shard.prefetched = prefetched
    print(f"CPU: {cpu.name()} ({cpu.noted_flags()}), {os.cpu_count()} cores; {dataset} {split} split of {data_dir}: {reader.rows} items, {count} images read")
    print()
    print("| step | seconds | images/s |")
    print("| --- | ---: | ---: |")
    print(f"| reader opened (indexed, nothing decoded) | {opened:.3f} | {reader.rows / opened:,.0f} |")
    print(f"| data-folder stamp | {stamp:.4f} | |")
    for n, seconds in enumerate(passes, 1):
        print(f"| source alone, pass {n} (read + decode) | {seconds:.2f} | {count / seconds:,.0f} |")
    print(f"| extraction, {result.engine} (model loaded first: {result.load_seconds:.1f} s) | {result.seconds:.2f} | "
          f"{result.images_per_second:,.0f} |")
    print(f"| of which waiting for chunks ({len(waits)} chunks; the first {waits[0]:.2f} s) | {sum(waits):.2f} | |")


if __name__ == "__main__":
    main()
