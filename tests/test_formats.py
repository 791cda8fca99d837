"""WebDataset tar shards and Parquet files as stage-1 sources: the same pictures give the same rows as a class
folder, every bad input is one line naming its file, and both resume, fingerprint cheaply and map onto shards."""

from __future__ import annotations

import io
import json
import os
import tarfile

import h5py
import numpy as np
import pytest

from featcache.cache import read, write
from featcache.errors import UserError
from featcache.extract import pipeline
from featcache.extract.sources import cifar, folder, parquet, webdataset
from conftest import make_key, run_cli

CLASSES = ("cat", "dog", "emu")


def _png(image: np.ndarray) -> bytes:
    import tensorflow as tf

    return tf.io.encode_png(image).numpy()


def _pictures(count: int, seed: int = 0, sizes=((24, 24), (17, 30))) -> tuple[list[bytes], list[int]]:
    """PNG files and labels: class c's pictures are biased towards colour channel c."""
    rng = np.random.default_rng(seed)
    files, labels = [], []
    for n in range(count):
        label = n % len(CLASSES)
        h, w = sizes[n % len(sizes)]
        image = rng.integers(0, 128, (h, w, 3), dtype=np.uint8)
        image[..., label] += 120
        files.append(_png(image))
        labels.append(label)
    return files, labels


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_tars(root, split, files, labels, shards=2, label_kind="cls", extra=None):
    """files/labels as `shards` WebDataset tars ROOT/<split>-00000N.tar; `extra(tar, n)` may add members."""
    root.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(files), shards + 1).astype(int)
    paths = []
    for shard in range(shards):
        path = root / f"{split}-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for n in range(bounds[shard], bounds[shard + 1]):
                _add(tar, f"{n:06d}.png", files[n])
                if label_kind == "cls":
                    _add(tar, f"{n:06d}.cls", str(labels[n]).encode())
                else:
                    _add(tar, f"{n:06d}.json", json.dumps({"label": labels[n], "url": "x"}).encode())
                _add(tar, f"{n:06d}.txt", b"a caption, ignored")
            if extra:
                extra(tar, shard)
        paths.append(path)
    return paths


def hf_metadata(image="image", label="label", names=CLASSES) -> dict:
    features = {image: {"_type": "Image"}, label: {"names": list(names), "_type": "ClassLabel"}}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_parquets(root, split, files, labels, parts=2, image="image", label="label", struct=True, names=CLASSES,
                   row_group_size=4):
    """files/labels as `parts` Parquet files ROOT/data/<split>-0000n-of-0000N.parquet, as the Hub lays them out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(files), parts + 1).astype(int)
    paths = []
    for part in range(parts):
        chunk = files[bounds[part]:bounds[part + 1]]
        cells = (pa.array([{"bytes": f, "path": None} for f in chunk],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])) if struct
                 else pa.array(chunk, pa.binary()))
        table = pa.table({image: cells, label: pa.array(labels[bounds[part]:bounds[part + 1]], pa.int64())})
        if names is not None:
            table = table.replace_schema_metadata(hf_metadata(image, label, names))
        path = root / "data" / f"{split}-{part:05d}-of-{parts:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_three_ways(base, train=15, test=9):
    """The same pictures as class folders, tars (classes.txt) and Parquet files (ClassLabel names)."""
    roots = {"folder": base / "folder", "webdataset": base / "tars", "parquet": base / "parquet"}
    for split, count, seed in (("train", train, 0), ("test", test, 1)):
        files, labels = _pictures(count, seed)
        for n, (data, label) in enumerate(zip(files, labels)):
            path = roots["folder"] / split / CLASSES[label] / f"{n:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        write_tars(roots["webdataset"], split, files, labels)
        write_parquets(roots["parquet"], split, files, labels)
    (roots["webdataset"] / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return roots


def _key(model, dataset, root, **kw):
    return make_key(model, 32, "bilinear", dataset=dataset, data_dir=root, **kw)


def _extract(key, root, cache, split="train", **kw):
    kw.setdefault("engine", "tensorflow")
    return pipeline.extract(key, split, data_dir=root, cache_dir=cache, progress=False, log=lambda _: None, **kw)


# --- the same pictures, the same rows ---------------------------------------------------------------------------


def test_the_same_pictures_give_bit_identical_rows_as_folders_tars_and_parquet(tiny_model, tmp_path):
    roots = write_three_ways(tmp_path)
    rows, files = {}, {}
    for dataset, root in roots.items():
        result = _extract(_key(tiny_model, dataset, root), root, tmp_path / "cache", split="test", chunk_size=4)
        assert result.rows == 9 and result.skipped == []
        assert read.class_names(read.attributes(result.path)) == CLASSES
        with h5py.File(result.path, "r") as f:
            assert f["source_index"][:].tolist() == list(range(9))
            rows[dataset] = f["embeddings"][:], f["labels"][:]
            files[dataset] = [name.decode() for name in f["source_files"][:]]
    assert files["webdataset"][:2] == ["test-000000.tar:000000.png", "test-000000.tar:000001.png"]
    assert files["parquet"][:2] == ["data/test-00000-of-00002.parquet:0", "data/test-00000-of-00002.parquet:1"]
    assert files["parquet"][4] == "data/test-00001-of-00002.parquet:0"
    for got, want in zip(rows["parquet"], rows["webdataset"]):  # both in picture order: picture n is row n
        np.testing.assert_array_equal(got, want)
    by_picture = [int(name.rsplit("/", 1)[-1].split(".")[0]) for name in files["folder"]]  # sorted by class
    assert sorted(by_picture) == list(range(9))
    for got, want in zip(rows["folder"], rows["webdataset"]):
        np.testing.assert_array_equal(got, want[by_picture])
