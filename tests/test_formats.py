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
from featcache.cache.layout import CacheKey
from featcache.errors import UserError
from featcache.extract import pipeline
from featcache.extract.sources import cifar, encoded, folder, parquet, webdataset
from conftest import make_key, run_cli, run_dirs

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


def write_folder(root, split, files, labels):
    """files/labels as class folders ROOT/<split>/<class>/<n>.png."""
    for n, (data, label) in enumerate(zip(files, labels)):
        path = root / split / CLASSES[label] / f"{n:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def write_three_ways(base, train=15, test=9):
    """The same pictures as class folders, tars (classes.txt) and Parquet files (ClassLabel names, column img)."""
    roots = {"folder": base / "folder", "webdataset": base / "tars", "parquet": base / "parquet"}
    for split, count, seed in (("train", train, 0), ("test", test, 1)):
        files, labels = _pictures(count, seed)
        write_folder(roots["folder"], split, files, labels)
        write_tars(roots["webdataset"], split, files, labels)
        write_parquets(roots["parquet"], split, files, labels, image="img")  # found by its Image feature
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
        key = _key(tiny_model, dataset, root)
        result = _extract(key, root, tmp_path / "cache", split="test", chunk_size=4)
        assert result.rows == 9 and result.skipped == []
        assert read.class_names(read.attributes(result.path)) == CLASSES
        assert CacheKey.from_attrs(read.attributes(result.path)) == key  # what --list and stage 2 find it by
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


# --- WebDataset tar shards ----------------------------------------------------------------------------------------


def test_tar_samples_are_grouped_by_key_and_read_in_order_as_the_folder_decoder_reads_them(tmp_path):
    files, labels = _pictures(7)
    write_tars(tmp_path, "train", files, labels, shards=3, label_kind="json")
    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\n")
    split = webdataset.TarSplit(tmp_path, "train")
    assert split.class_names == CLASSES and split.rows == 7 and split.labels.tolist() == labels
    assert split.shard_of.tolist() == [0, 0, 1, 1, 2, 2, 2] and split.files[2] == "train-000001.tar:000002.png"
    chunks = list(split.chunks(3, start=1, stop=6))  # cut at multiples of 3, as the whole split is
    assert [c.items.tolist() for c in chunks] == [[1, 2], [3, 4, 5]] and [c.stop for c in chunks] == [3, 6]
    for chunk in chunks:
        for image, item in zip(chunk.images, chunk.items):
            np.testing.assert_array_equal(image, encoded.decode_bytes(files[item])[0])
        assert chunk.labels.tolist() == [labels[i] for i in chunk.items]
    assert split.image_shape == (24, 24)
    limited = webdataset.TarSplit(tmp_path, "train", limit=4)
    assert limited.rows == 4 and set(limited.files) < set(split.files)
    assert limited.files == sorted(limited.files)  # a sample of the samples, in their order


def test_a_chunk_ends_at_the_byte_budget_of_decoded_images(tmp_path, monkeypatch):
    files, labels = _pictures(6, sizes=((24, 24),))
    write_tars(tmp_path, "train", files, labels, shards=2)
    monkeypatch.setattr(encoded, "MAX_CHUNK_BYTES", 2 * 24 * 24 * 3)
    chunks = list(webdataset.TarSplit(tmp_path, "train").chunks(100, start=1))
    assert [c.items.tolist() for c in chunks] == [[1, 2], [3, 4], [5]] and [c.stop for c in chunks] == [3, 5, 6]


def test_without_classes_txt_the_classes_are_the_label_numbers_of_both_splits(tmp_path):
    files, _ = _pictures(4)
    write_tars(tmp_path / "train", "train", files, [0, 1, 1, 0], shards=1)  # in D/train/: any name
    write_tars(tmp_path / "test", "shard", files[:2], [3, 0], shards=1)
    train, test = webdataset.TarSplit(tmp_path, "train"), webdataset.TarSplit(tmp_path, "test")
    assert train.class_names == test.class_names == ("0", "1", "2", "3")
    assert train.files[0] == "train/train-000000.tar:000000.png"


def _one_tar(root, members, split="train"):
    """ROOT/<split>-000000.tar holding (name, bytes) members, and a good test split beside it."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
        for name, data in members:
            _add(tar, name, data)
    return root / f"{split}-000000.tar"


def _cut(path, at):
    path.write_bytes(path.read_bytes()[:at])


def _good_members(n=3):
    files, labels = _pictures(n)
    return [m for i in range(n) for m in ((f"{i:06d}.png", files[i]), (f"{i:06d}.cls", str(labels[i]).encode()))]


@pytest.mark.parametrize("make, message", [
    (lambda root: _cut(_one_tar(root, _good_members()), 1000), r"train-000000.tar is truncated: member 000000.png"),
    (lambda root: _cut(_one_tar(root, _good_members()), 2560), r"train-000000.tar is truncated: no end-of-archive"),
    (lambda root: _one_tar(root, _good_members()[:-1]), r"train-000000.tar: 000002.png has no label \(000002.cls"),
    (lambda root: _one_tar(root, _good_members() + [("000009.cls", b"1")]),
     r"train-000000.tar: sample 000009 has no image .*only its label: 000009.cls"),
    (lambda root: _one_tar(root, _good_members() + [("000009.png", b"x"), ("000009.cls", b"3")]),
     r"train-000000.tar: 000009.png's label 3 is outside the 3 classes of .*classes.txt"),
    (lambda root: _one_tar(root, _good_members() + [("000009.png", b"x"), ("000009.cls", b"cat")]),
     r"train-000000.tar: 000009.cls: label 'cat' is not a class number"),
    (lambda root: _one_tar(root, _good_members() + [("000009.png", b"x"), ("000009.json", b"{\"label\": -1}")]),
     r"train-000000.tar: 000009.json: label '-1' is not a class number"),
    (lambda root: _one_tar(root, _good_members() + [("000000.jpg", b"x")]), r"sample 000000 has two images"),
    (lambda root: _one_tar(root, [("README", b"no samples here")]), r"the train shards in .* hold no samples"),
    (lambda root: _one_tar(root, _good_members(), split="other"), r"no train shards in .*: expected train-\*.tar"),
    (lambda root: (root / "train-0.tar.gz").write_bytes(b"x"), r"no train shards .*train-0.tar.gz is compressed: gunzip"),
    (lambda root: (root / "train-000000.tar").write_bytes(__import__("gzip").compress(b"\0" * 2048)),
     r"train-000000.tar is not a readable uncompressed tar file"),
])
def test_unusable_tars_are_one_line_errors_naming_the_file(tmp_path, make, message):
    root = tmp_path / "shards"
    root.mkdir()
    (root / "classes.txt").write_text("cat\ndog\nemu\n")
    make(root)
    with pytest.raises(UserError, match=message) as error:
        webdataset.TarSplit(root, "train")
    assert "\n" not in str(error.value)


def test_non_image_bytes_are_skipped_and_named_or_stop_a_strict_run(tmp_path):
    members = _good_members(4)
    members[2] = ("000001.png", b"this is not a picture")
    _one_tar(tmp_path, members)
    chunks = list(webdataset.TarSplit(tmp_path, "train").chunks(10))
    assert chunks[0].items.tolist() == [0, 2, 3] and chunks[0].skipped[0][0] == 1
    assert chunks[0].skipped[0][1].startswith("not a decodable image")
    with pytest.raises(UserError, match=r"cannot read .*train-000000.tar:000001.png: not a decodable image.*strict"):
        list(webdataset.TarSplit(tmp_path, "train", strict=True).chunks(10))


def test_a_tar_fingerprint_needs_no_image_and_follows_any_change(tmp_path):
    files, labels = _pictures(4)
    write_tars(tmp_path, "train", files, labels, shards=1)
    _assert_fingerprint_follows(lambda: webdataset.TarSplit(tmp_path, "train").fingerprint, (
        lambda: write_tars(tmp_path, "train", files, [1, 1, 2, 0], shards=1),  # labels only
        lambda: os.utime(tmp_path / "train-000000.tar", ns=(0, 10**18)),
        lambda: write_tars(tmp_path, "train", files[::-1], [1, 1, 2, 0], shards=1)))


def _assert_fingerprint_follows(fingerprint, changes) -> str:
    """`fingerprint()` is stable while nothing changes, and new after each of `changes`; the last one."""
    now = fingerprint()
    assert fingerprint() == now
    seen = {now}
    for change in changes:
        change()
        now = fingerprint()
        assert now not in seen
        seen.add(now)
    return now


# --- Parquet ----------------------------------------------------------------------------------------------------


def test_parquet_rows_class_names_and_row_groups_as_the_hub_lays_them_out(tmp_path):
    files, labels = _pictures(11)
    write_parquets(tmp_path, "train", files, labels, parts=2, image="img", row_group_size=4)
    split = parquet.ParquetSplit(tmp_path, "train")
    assert split.image_column == "img" and split.label_column == "label"  # the only Image feature
    assert split.class_names == CLASSES and split.rows == 11 and split.labels.tolist() == labels
    assert split.group_of.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1] and split.files[5] == \
        "data/train-00001-of-00002.parquet:0"
    chunks = list(split.chunks(4, start=3, stop=10))  # cut at multiples of 4, as the whole split is
    assert [c.items.tolist() for c in chunks] == [[3], [4, 5, 6, 7], [8, 9]]
    for chunk in chunks:
        for image, item in zip(chunk.images, chunk.items):
            np.testing.assert_array_equal(image, encoded.decode_bytes(files[item])[0])
    limited = parquet.ParquetSplit(tmp_path, "train", limit=5)
    assert limited.rows == 5
    assert [split.decode(i)[0].shape for i in (0, 9)] == [(24, 24, 3), (17, 30, 3)]


def test_plain_binary_columns_without_metadata_name_classes_by_number_over_both_splits(tmp_path):
    files, _ = _pictures(4)
    write_parquets(tmp_path / "train", "x", files, [0, 1, 0, 1], parts=1, struct=False, names=None,
                   image="png", label="y")
    (tmp_path / "train" / "data" / "x-00000-of-00001.parquet").rename(tmp_path / "train" / "a.parquet")
    write_parquets(tmp_path, "test", files[:2], [4, 1], parts=1, struct=False, names=None, image="png", label="y")
    split = parquet.ParquetSplit(tmp_path, "train", image_column="png", label_column="y")
    assert split.class_names == ("0", "1", "2", "3", "4") and split.files[0] == "train/a.parquet:0"
    assert list(split.chunks(10))[0].items.tolist() == [0, 1, 2, 3]


def _table(root, columns: dict, metadata=None, split="train"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")


def _image_cells(n=3):
    import pyarrow as pa

    files, _ = _pictures(n)
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.array([{"bytes": f, "path": None} for f in files], kind)


@pytest.mark.parametrize("make, message", [
    (lambda root: _table(root, {"picture": _image_cells(), "label": [0, 1, 2]}),
     r"train-00000-of-00001.parquet has no column 'image' for the images \(its columns: picture, label\); name it "
     r"with image_column=NAME"),
    (lambda root: _table(root, {"image": _image_cells(), "target": [0, 1, 2]}),
     r"train-00000-of-00001.parquet has no column 'label' for the labels"),
    (lambda root: _table(root, {"image": _image_cells(), "label": ["cat", "dog", "emu"]}),
     r"train-00000-of-00001.parquet: column 'label' is string, not integer class numbers"),
    (lambda root: _table(root, {"image": [1, 2, 3], "label": [0, 1, 2]}),
     r"train-00000-of-00001.parquet: column 'image' is int64, not encoded images"),
    (lambda root: _table(root, {"image": _image_cells(), "label": [0, None, 2]}),
     r"train-00000-of-00001.parquet: row 1 has no label"),
    (lambda root: _table(root, {"image": _image_cells(), "label": [0, -1, 2]}),
     r"train-00000-of-00001.parquet: row 1 has label -1 \(a negative label: an unlabelled row\?\)"),
    (lambda root: _table(root, {"image": _image_cells(), "label": [0, 1, 3]}, hf_metadata()),
     r"train-00000-of-00001.parquet: row 2 has label 3, outside the 3 ClassLabel names of column 'label'"),
    (lambda root: _table(root, {"image": _image_cells(0), "label": np.zeros(0, np.int64)}),
     r"the train Parquet files in .* hold no rows \(data/train-00000-of-00001.parquet\)"),
    (lambda root: _table(root, {"image": _image_cells(), "label": [0, 1, 2]}, split="validation"),
     r"no train Parquet files in .*: expected data/train-\*.parquet"),
    (lambda root: (root / "train.parquet").write_bytes(b"PAR1 but not really"),
     r"train.parquet is not a readable Parquet file"),
    (lambda root: _table(root, {"a": _image_cells(), "b": [0, 1, 2], "c": [1, 1, 1]},
                         {b"huggingface": json.dumps({"info": {"features": {
                             "a": {"_type": "Image"}, "b": {"_type": "ClassLabel", "names": ["x", "y", "z"]},
                             "c": {"_type": "ClassLabel", "names": ["x", "y"]}}}}).encode()}),
     r"train-00000-of-00001.parquet has several ClassLabel columns \(b, c\) and none named 'label'"),
])
def test_unusable_parquet_files_are_one_line_errors_naming_the_file(tmp_path, make, message):
    root = tmp_path / "hub"
    root.mkdir()
    make(root)
    with pytest.raises(UserError, match=message) as error:
        parquet.ParquetSplit(root, "train")
    assert "\n" not in str(error.value)


def test_parquet_cells_without_image_bytes_are_skipped_with_the_reason(tmp_path):
    import pyarrow as pa

    files, _ = _pictures(3)
    cells = pa.array([{"bytes": files[0], "path": None}, {"bytes": None, "path": "elsewhere/1.jpg"},
                      {"bytes": b"not a picture", "path": None}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    _table(tmp_path, {"image": cells, "label": [0, 1, 2]})
    (chunk,) = parquet.ParquetSplit(tmp_path, "train").chunks(10)
    assert chunk.items.tolist() == [0] and chunk.skipped[0] == (1, "no image bytes (only a path: elsewhere/1.jpg)")
    assert chunk.skipped[1][1].startswith("not a decodable image")
    with pytest.raises(UserError, match=r"cannot read .*train-00000-of-00001.parquet: row 1: no image bytes"):
        list(parquet.ParquetSplit(tmp_path, "train", strict=True).chunks(10))


def test_without_pyarrow_parquet_is_refused_in_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UserError, match=r"^reading Parquet needs pyarrow, which is not installed: pip install -r "
                                        r"requirements-parquet.txt$"):
        parquet.ParquetSplit(tmp_path, "train")


def test_a_parquet_fingerprint_needs_no_image_and_follows_any_change(tmp_path):
    files, labels = _pictures(4)
    write_parquets(tmp_path, "train", files, labels, parts=1)
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    now = _assert_fingerprint_follows(lambda: parquet.ParquetSplit(tmp_path, "train").fingerprint, (
        lambda: write_parquets(tmp_path, "train", files, [1, 1, 2, 0], parts=1),
        lambda: os.utime(path, ns=(0, 10**18)),
        lambda: write_parquets(tmp_path, "train", files, [1, 1, 2, 0], parts=1, row_group_size=2)))
    assert parquet.ParquetSplit(tmp_path, "train", label_column="label").fingerprint == now


def test_a_parquet_file_written_by_the_datasets_library_is_read_with_its_class_names(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets library is not installed (only this check uses it)")
    from PIL import Image

    rng = np.random.default_rng(4)
    pixels = [rng.integers(0, 255, (9 + n, 12, 3), dtype=np.uint8) for n in range(6)]
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["ant", "bee"])})
    table = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "fine_label": [0, 1, 1, 0, 1, 0]},
                                       features=features)
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    split = parquet.ParquetSplit(tmp_path, "train")
    assert (split.image_column, split.label_column, split.class_names) == ("img", "fine_label", ("ant", "bee"))
    (chunk,) = split.chunks(10)
    assert chunk.labels.tolist() == [0, 1, 1, 0, 1, 0] and chunk.skipped == []
    for image, want in zip(chunk.images, pixels):  # PNG, as datasets encodes arrays: the same pixels
        np.testing.assert_array_equal(image, want)


# --- every source: item ranges -----------------------------------------------------------------------------------


def test_cifar_and_folder_sources_read_item_ranges(cifar_root, tmp_path):
    reader = cifar.SplitSource(cifar.resolve_source(cifar_root), "train")
    chunks = list(reader.chunks(10, start=20, stop=50))
    assert [c.items.tolist() for c in chunks] == [list(range(20, 30)), list(range(30, 40)), list(range(40, 50))]
    roots = write_three_ways(tmp_path, train=15, test=9)
    tree = folder.FolderSplit(roots["folder"], "train")
    assert [c.items.tolist() for c in tree.chunks(4, start=3, stop=9)] == [[3], [4, 5, 6, 7], [8]]  # at multiples of 4


def test_the_webp_header_size_is_the_decoded_size():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (13, 21, 3), dtype=np.uint8))
    for options in ({"lossless": False}, {"lossless": True}, {"lossless": False, "exif": b"Exif\0\0x"}):
        data = io.BytesIO()
        image.save(data, "WEBP", **options)
        assert encoded.header_size(data.getvalue()) == (21, 13)
        assert encoded.decode_bytes(data.getvalue())[0].shape == (13, 21, 3)


# --- through the pipeline and the command line ----------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["folder", "webdataset", "parquet"])
def test_a_resume_after_a_crash_gives_the_rows_of_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch, dataset):
    files, labels = _pictures(14)
    files[3], files[8] = b"", b"broken"  # in the first two chunks of 3 items, and after them (also as class folders)
    root = tmp_path / dataset
    if dataset == "folder":
        write_folder(root, "train", files, labels)
        write_folder(root, "test", *_pictures(3, seed=1))
    elif dataset == "webdataset":
        write_tars(root, "train", files, labels, shards=3)
    else:
        write_parquets(root, "train", files, labels, parts=2, row_group_size=3)
    key = _key(tiny_model, dataset, root)
    real_write, calls = write.CacheWriter.write, {"n": 0}

    def failing_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, *args)

    monkeypatch.setattr(write.CacheWriter, "write", failing_write)
    with pytest.raises(UserError, match="committed rows are kept"):
        _extract(key, root, tmp_path / "cache", chunk_size=3)
    monkeypatch.setattr(write.CacheWriter, "write", real_write)
    resumed = _extract(key, root, tmp_path / "cache", chunk_size=3)
    assert resumed.processed == 14 - 6 - 1  # the first two chunks were not read again; one item after is unreadable
    clean = _extract(key, root, tmp_path / "clean", chunk_size=3)
    assert resumed.rows == clean.rows == 12 and resumed.skipped == clean.skipped
    assert [reason.split(" (")[0].split(":")[0] for _, reason in clean.skipped] == ["empty file", "not a decodable image"]
    with h5py.File(resumed.path, "r") as a, h5py.File(clean.path, "r") as b:
        for name in ("embeddings", "embeddings_flip", "labels", "source_index"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
    assert pipeline.verify(key, "train", root, tmp_path / "cache")[1] == []


def test_cli_parquet_end_to_end_with_named_columns_and_one_line_errors(tiny_model, tmp_path):
    for split, (count, seed) in {"train": (12, 0), "test": (6, 1)}.items():
        files, labels = _pictures(count, seed)
        write_parquets(tmp_path / "hub", split, files, labels, image="picture", label="kind")
    common = ["--dataset", "parquet", "--data-dir", tmp_path / "hub", "--model", tiny_model, "--image-size", "32",
              "--cache-dir", tmp_path / "cache"]
    bad = run_cli("extract.py", *common, "--image-column", "photo", "--engine", "tensorflow", "--quiet")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "has no column 'photo' for the images (its columns: picture, kind); name it with --image-column NAME" \
        in bad.stderr
    named = ["--image-column", "picture", "--label-column", "kind"]
    out = run_cli("extract.py", *common, *named, "--views", "plain", "--engine", "tensorflow", "--quiet")
    assert out.returncode == 0, out.stderr
    missing = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs")  # the defaults: another cache
    assert missing.returncode == 2 and "--image-column picture --label-column kind" in missing.stderr
    out = run_cli("train_head.py", *common, *named, "--runs-dir", tmp_path / "runs", "--epochs", "2")
    assert out.returncode == 0, out.stderr
    (run,) = run_dirs(tmp_path / "runs")
    assert json.loads((run / "config.json").read_text())["class_names"] == list(CLASSES)
    wrong = run_cli("extract.py", "--dataset", "webdataset", "--data-dir", tmp_path / "hub", "--image-column", "x")
    assert wrong.returncode == 2 and "--image-column applies to --dataset parquet only" in wrong.stderr


def test_cli_webdataset_lists_skipped_members(tiny_model, tmp_path):
    for split, (count, seed) in {"train": (9, 0), "test": (6, 1)}.items():
        files, labels = _pictures(count, seed)
        files[1] = b"not an image"
        write_tars(tmp_path / "tars", split, files, labels, shards=2)
    common = ["--dataset", "webdataset", "--data-dir", tmp_path / "tars", "--model", tiny_model, "--image-size", "32",
              "--cache-dir", tmp_path / "cache", "--views", "plain", "--engine", "tensorflow", "--quiet"]
    out = run_cli("extract.py", *common, "--split", "test")
    assert out.returncode == 0, out.stderr
    assert "1 unreadable file skipped" in out.stdout
    assert "skipped test-000000.tar:000001.png: not a decodable" in out.stdout
    strict = run_cli("extract.py", *common, "--split", "train", "--strict")
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1 and "train-000000.tar:000001.png" in strict.stderr
    assert "--strict" in strict.stderr


@pytest.mark.parametrize("dataset, only_train, option, message", [
    ("webdataset", True, [], "Error: no test shards in "),
    ("parquet", True, [], "Error: no test Parquet files in "),
    ("parquet", False, ["--label-column", "nope"], "Error: "),
])
def test_a_layout_error_comes_before_the_model_loads_and_before_any_split_is_built(tiny_model, tmp_path, monkeypatch,
                                                                                   dataset, only_train, option,
                                                                                   message):
    """No tars or Parquet files for a split, or a missing column: one line, with no model loaded (nor the train
    split extracted before the test split's layout is found wanting)."""
    import tensorflow_hub as hub

    root = tmp_path / "data"
    for split in ("train",) if only_train else ("train", "test"):
        files, labels = _pictures(6)
        (write_tars if dataset == "webdataset" else write_parquets)(root, split, files, labels)
    loads, load = [], hub.load
    monkeypatch.setattr(hub, "load", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs))
    out = run_cli("extract.py", "--dataset", dataset, "--data-dir", root, "--model", tiny_model, "--cache-dir",
                  tmp_path / "cache", "--engine", "tensorflow", *option)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(message) and loads == [] and not list(tmp_path.glob("cache/**/*.h5"))
    if option:
        assert "nope" in out.stderr


@pytest.mark.parametrize("dataset", ["webdataset", "parquet"])
def test_the_selection_s_index_serves_the_extraction_unless_a_file_changed_meanwhile(tiny_model, tmp_path,
                                                                                     monkeypatch, dataset):
    """Tars and Parquet files are indexed once per run: the layout check's readers go on to the extraction."""
    from featcache.extract import sources
    from featcache.selection import select

    root = write_three_ways(tmp_path, train=6, test=3)[dataset]
    indexed = []
    owner, name = (webdataset, "index_tar") if dataset == "webdataset" else (parquet.ParquetSplit, "_index")
    index = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args: indexed.append(args) or index(*args))  # each file indexed
    cache = tmp_path / "cache"
    key = select(cache, splits=("train", "test"), dataset=dataset, data_dir=root, model=tiny_model, image_size=32,
                 resize="bilinear")
    assert len(indexed) == 4  # 2 files a split
    assert _extract(key, root, cache).rows == 6 and len(indexed) == 4
    test_file = sorted(root.rglob("test*.tar" if dataset == "webdataset" else "test*.parquet"))[0]
    os.utime(test_file, ns=(0, 10**18))  # changed after the layout check: indexed again
    assert _extract(key, root, cache, split="test").rows == 3 and len(indexed) == 6
    assert sources.open_split(key, "train") is not sources.open_split(key, "train")  # nothing kept any more
    assert len(indexed) == 10


def test_a_reader_the_selection_kept_goes_when_the_api_call_that_kept_it_is_refused(tiny_model, tmp_path):
    """api.extract keeps the layout check's reader for its own extraction only: a call refused after the selection
    leaves nothing kept (a long-lived Python process would hold the index and stamp the folder on every open)."""
    from featcache import api
    from featcache.extract import sources

    root = write_three_ways(tmp_path, train=6, test=3)["webdataset"]
    with pytest.raises(UserError, match="chunk_size"):
        api.extract("train", cache_dir=tmp_path / "cache", dataset="webdataset", data_dir=root, model=tiny_model,
                    image_size=32, chunk_size=0)
    assert sources._kept == {}


def test_a_key_of_an_unknown_dataset_is_refused_in_one_line():
    """Keys read back from a run's record reach open_split without the selection: an unknown dataset is named, not
    read as Parquet files."""
    from featcache.extract import sources

    with pytest.raises(UserError, match="^unknown dataset 'imagenet'$"):
        sources.open_split(CacheKey(dataset="imagenet", data_dir="/nowhere"), "train")
