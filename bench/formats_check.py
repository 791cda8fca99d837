#!/usr/bin/env python
"""The same CIFAR-10 images as PNG class folders, WebDataset tars and Hub-layout Parquet files: the same rows?

    TFHUB_CACHE_DIR=/work/shared/tfhub_cache flock /tmp/cpu.lock python bench/formats_check.py \\
        --data-dir /work/shared/data/cifar-10-python.tar.gz --out /tmp/formats --train 2000 --test 2000

Writes the first N train and test images of CIFAR-10 (PNG, encoded once, the same bytes everywhere) as
OUT/folder/{train,test}/<class>/<row>.png, as --tars WebDataset tars per split (OUT/tars/<split>-00000k.tar with
<row>.png and <row>.cls members, and classes.txt) and as --parts Parquet files per split in the Hugging Face
Hub's layout (OUT/parquet/data/<split>-0000k-of-0000n.parquet: an image struct of bytes and path, an int64
label, ClassLabel names in the schema's metadata), the tars and Parquet files in the class folders' order (so
that a head trained on each sees its rows in the same order). Then extracts each tree whole (no limit) into
OUT/cache, maps every cache's rows back to CIFAR rows, and prints whether the embeddings (every view) and labels
are bit-identical between the formats, and the test accuracy of train_head.py's default head (api.run_head: the
head train_head.py trains, not recorded) on each. The trees are generated data: never commit them.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FORMATS = ("folder", "webdataset", "parquet")


@click.command()
@click.option("--data-dir", type=click.Path(exists=True), default=None, help="CIFAR-10 copy (as extract.py takes it).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Where the trees and caches go.")
@click.option("--train", "train_rows", type=int, default=2000, show_default=True, help="First N train images.")
@click.option("--test", "test_rows", type=int, default=2000, show_default=True, help="First N test images.")
@click.option("--tars", type=int, default=4, show_default=True, help="Tar files per split.")
@click.option("--parts", type=int, default=2, show_default=True, help="Parquet files per split.")
@click.option("--model", default=None, help="Model handle or folder (default: extract.py's).")
@click.option("--image-size", type=int, default=None, help="As extract.py takes it.")
@click.option("--engine", default="tensorflow", show_default=True, help="As extract.py takes it.")
@click.option("--epochs", type=int, default=None, help="Head epochs (default: train_head.py's).")
def main(data_dir, out, train_rows, test_rows, tars, parts, model, image_size, engine, epochs):
    from featcache import api
    from featcache.extract.sources import cifar

    out = Path(out)
    roots = {"folder": out / "folder", "webdataset": out / "tars", "parquet": out / "parquet"}
    source = cifar.resolve_source(data_dir)
    orders = {}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        batches = list(cifar.SplitSource(source, split, rows).batches())
        images, labels = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
        orders[split] = write_trees(roots, split, images, labels, tars, parts)
        print(f"{split}: {len(labels)} images as PNG class folders, {tars} tars, {parts} Parquet files under {out}")
    common = {"cache_dir": out / "cache", **({"model": model} if model else {}),
              **({"image_size": image_size} if image_size else {})}
    cached = {}
    for name, root in roots.items():
        speeds = []
        for split in ("train", "test"):
            result = api.extract(split, dataset=name, data_dir=root, engine=engine, progress=False,
                                 log=lambda *_: None, **common)
            speeds.append(result.images_per_second)
            cached[name, split] = by_cifar_row(result.path, orders[split])
        started = time.perf_counter()
        for split in ("train", "test"):  # up to date: the source is fingerprinted, no image decoded
            assert api.extract(split, dataset=name, data_dir=root, engine=engine, progress=False,
                               log=lambda *_: None, **common).up_to_date
        checked = time.perf_counter() - started
        head = api.run_head(dataset=name, data_dir=root, **common, **({"epochs": epochs} if epochs else {}))
        cached[name, "accuracy"] = head.metrics["test_accuracy"]
        print(f"{name}: {' / '.join(f'{s:.1f}' for s in speeds)} images/s (train / test; 0.0: up to date already), "
              f"up-to-date check of both splits {checked:.2f} s, test accuracy {head.metrics['test_accuracy']:.4f}")
    print("| split | formats | rows | labels equal | views bit-identical | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for split in ("train", "test"):
        for other in FORMATS[1:]:
            (views_a, labels_a), (views_b, labels_b) = cached["folder", split], cached[other, split]
            same = [v for v in views_a if np.array_equal(views_a[v], views_b[v])]
            diff = max(float(np.abs(views_a[v] - views_b[v]).max()) for v in views_a)
            print(f"| {split} | folder vs {other} | {len(labels_a)} / {len(labels_b)} | "
                  f"{np.array_equal(labels_a, labels_b)} | {len(same)} of {len(views_a)} ({', '.join(views_a)}) | "
                  f"{diff:.3g} |")
    accuracies = [cached[name, "accuracy"] for name in FORMATS]
    print(f"test accuracy: {', '.join(f'{n} {a:.4f}' for n, a in zip(FORMATS, accuracies))}; "
          f"same: {len(set(accuracies)) == 1}")


def write_trees(roots: dict, split: str, images: np.ndarray, labels: np.ndarray, tars: int, parts: int) -> np.ndarray:
    """The three trees of one split; the CIFAR rows in the order the tars and Parquet files hold them: a class
    folder's order (class, then row), so that all three caches have the same rows in the same order and a head
    trained on each sees the same batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    from featcache.extract.sources import cifar

    names = cifar.CIFAR10_CLASS_NAMES
    pngs = [tf.io.encode_png(image).numpy() for image in images]
    for row, (data, label) in enumerate(zip(pngs, labels)):
        path = roots["folder"] / split / names[label] / f"{row:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    roots["webdataset"].mkdir(parents=True, exist_ok=True)
    (roots["webdataset"] / "classes.txt").write_text("\n".join(names) + "\n")
    order = np.argsort(labels, kind="stable")
    bounds = np.linspace(0, len(pngs), tars + 1).astype(int)
    for shard in range(tars):
        with tarfile.open(roots["webdataset"] / f"{split}-{shard:06d}.tar", "w") as tar:
            for row in order[bounds[shard]:bounds[shard + 1]]:
                for member, data in ((f"{row:05d}.png", pngs[row]), (f"{row:05d}.cls", str(labels[row]).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (roots["parquet"] / "data").mkdir(parents=True, exist_ok=True)
    features = {"image": {"_type": "Image"}, "label": {"names": list(names), "_type": "ClassLabel"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    bounds = np.linspace(0, len(pngs), parts + 1).astype(int)
    for part in range(parts):
        rows = order[bounds[part]:bounds[part + 1]]
        table = pa.table({"image": pa.array([{"bytes": pngs[r], "path": f"{r:05d}.png"} for r in rows], image_type),
                          "label": pa.array([int(labels[r]) for r in rows], pa.int64())})
        pq.write_table(table.replace_schema_metadata(metadata),
                       roots["parquet"] / "data" / f"{split}-{part:05d}-of-{parts:05d}.parquet", row_group_size=100)
    return order


def by_cifar_row(path, order: np.ndarray) -> tuple[dict, np.ndarray]:
    """A cache's views and labels, rows put in CIFAR row order (a file or member names its CIFAR row; a Parquet
    row's place in the files is a place in `order`)."""
    import h5py
    import pyarrow.parquet as pq

    with h5py.File(path, "r") as f:
        files = [name.decode() for name in f["source_files"][:]]
        sources = [files[i] for i in f["source_index"][:]]
        first_rows, rows = {}, []
        for name in sources:
            if name.endswith(".png"):  # <split>/<class>/<row>.png, or <tar>:<row>.png
                rows.append(int(name.rsplit("/", 1)[-1].rsplit(":", 1)[-1][:-4]))
            else:  # data/<split>-0000k-of-0000n.parquet:<row in the file>
                part, row = name.rsplit(":", 1)
                if part not in first_rows:
                    earlier = sorted(p for p in {s.rsplit(":", 1)[0] for s in files} if p < part)
                    first_rows[part] = sum(pq.read_metadata(Path(f.attrs["source"]) / p).num_rows for p in earlier)
                rows.append(int(order[first_rows[part] + int(row)]))
        order = np.argsort(rows)
        assert np.array_equal(np.asarray(rows)[order], np.arange(len(rows))), "rows do not cover 0..N-1 once each"
        views = {name: f[name][:][order] for name in sorted(f) if name.startswith("embeddings")}
        return views, f["labels"][:][order]


if __name__ == "__main__":
    main()
