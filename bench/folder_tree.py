#!/usr/bin/env python
"""The real CIFAR-10 as a class-folder image tree, and the check that the folder path matches the pickle path.

    python bench/folder_tree.py write /tmp/cifar-png --data-dir ../shared/data/cifar-10-python.tar.gz
    python bench/folder_tree.py write /tmp/cifar-jpg --format jpeg --damage --data-dir ...
    python bench/folder_tree.py compare --folder-cache cache/folder-.../test.h5 --pickle-cache cache/cifar10/.../test.h5

`write` makes ROOT/train/<class>/<row>.png and ROOT/test/<class>/<row>.png (row: the image's
row in its CIFAR-10 split, so a folder cache's rows map back to the pickle cache's). The tree is
generated data: never commit it. With --damage (JPEG trees) it also overwrites 20 test files with
random bytes, truncates 5, empties 3 and adds a notes.txt, and prints what it did.
`compare` prints the max abs difference of every view between matching rows, and the labels' agreement.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.group()
def main():
    pass


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--data-dir", type=click.Path(exists=True), default=None, help="CIFAR-10 copy (as extract.py takes it).")
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg"]), default="png", show_default=True)
@click.option("--quality", type=int, default=95, show_default=True, help="JPEG quality.")
@click.option("--limit", type=int, default=None, help="Only the first N images of each split.")
@click.option("--damage", is_flag=True,
              help="Break 28 test files (20 random bytes, 5 truncated, 3 empty), add notes.txt.")
def write(out, data_dir, fmt, quality, limit, damage):
    import tensorflow as tf

    from featcache.extract.sources import cifar

    source = cifar.resolve_source(data_dir)
    out = Path(out)
    suffix = "png" if fmt == "png" else "jpg"
    for split in ("train", "test"):
        row = 0
        for images, labels in cifar.SplitSource(source, split, limit).batches():
            for image, label in zip(images, labels):
                (out / split / cifar.CIFAR10_CLASS_NAMES[label]).mkdir(parents=True, exist_ok=True)  # no empty class
                data = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image, quality=quality)
                (out / split / cifar.CIFAR10_CLASS_NAMES[label] / f"{row:05d}.{suffix}").write_bytes(data.numpy())
                row += 1
        print(f"{split}: {row} {fmt} files under {out / split}")
    if damage:
        files = sorted((out / "test").rglob(f"*.{suffix}"))
        picked = np.random.default_rng(0).choice(len(files), 28, replace=False)
        rng = np.random.default_rng(1)
        for n, index in enumerate(picked):
            path = files[index]
            if n < 20:
                path.write_bytes(rng.integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())
                what = "random bytes"
            elif n < 25:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                what = "truncated to half"
            else:
                path.write_bytes(b"")
                what = "emptied"
            print(f"damaged {path.relative_to(out)}: {what}")
        (out / "test" / files[0].parent.name / "notes.txt").write_text("not an image\n")
        print("added notes.txt")


@main.command()
@click.option("--folder-cache", type=click.Path(exists=True), required=True)
@click.option("--pickle-cache", type=click.Path(exists=True), required=True)
def compare(folder_cache, pickle_cache):
    import h5py

    with h5py.File(folder_cache, "r") as folder, h5py.File(pickle_cache, "r") as pickled:
        files = [f.decode() for f in folder["source_files"][:]]
        rows = np.array([int(Path(files[i]).stem) for i in folder["source_index"][:]])
        print(f"{len(rows)} folder rows, {pickled['labels'].shape[0]} pickle rows")
        print(f"labels agree: {np.array_equal(folder['labels'][:], pickled['labels'][:][rows])}")
        for name in (n for n in folder if n.startswith("embeddings")):
            diff = np.abs(folder[name][:] - pickled[name][:][rows]).max()
            print(f"{name}: max abs diff {diff:.3g}")


if __name__ == "__main__":
    main()
