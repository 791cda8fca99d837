"""Class-folder datasets: any image size and format, broken files skipped and listed, a cheap fingerprint."""

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.extract import ov_engine, pipeline, sources
from featcache.cache import read
from featcache.errors import UserError
from featcache.extract.extractor import Extractor
from featcache.extract.models import load_model
from featcache.extract.sources import encoded, folder
from conftest import TINY_DIM, make_key, run_cli, run_dirs

CLASSES = ("cat", "dog", "emu")
GIF_1X1 = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
           b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")  # the classic one-pixel GIF


def _encode(image: np.ndarray, fmt: str) -> bytes:
    import tensorflow as tf

    if fmt == "png":
        return tf.io.encode_png(image).numpy()
    if fmt == "jpg":
        return tf.io.encode_jpeg(image, quality=95).numpy()
    if fmt == "bmp":  # 24-bit BMP, rows bottom-up, BGR, padded to 4 bytes
        h, w = image.shape[:2]
        row = (w * 3 + 3) // 4 * 4
        pixels = b"".join(image[y, :, ::-1].tobytes().ljust(row, b"\0") for y in range(h - 1, -1, -1))
        header = b"BM" + (54 + len(pixels)).to_bytes(4, "little") + b"\0" * 4 + (54).to_bytes(4, "little")
        info = (40).to_bytes(4, "little") + w.to_bytes(4, "little") + h.to_bytes(4, "little")
        info += (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + b"\0" * 4 + len(pixels).to_bytes(4, "little") + b"\0" * 16
        return header + info + pixels
    raise ValueError(fmt)


def write_tree(root, per_class=(5, 3), sizes=((24, 24),), seed=0, nested=True):
    """ROOT/{train,test}/<class>/<n>.png (or ROOT/<class>/... when not nested), random pixels.

    Class c's pictures are biased towards colour channel c, so a head can learn them."""
    rng = np.random.default_rng(seed)
    splits = (("train", per_class[0]), ("test", per_class[1])) if nested else (("", sum(per_class)),)
    for split, count in splits:
        for label, name in enumerate(CLASSES):
            folder_path = root / split / name if split else root / name
            folder_path.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                h, w = sizes[n % len(sizes)]
                image = rng.integers(0, 128, (h, w, 3), dtype=np.uint8)
                image[..., label] += 120
                (folder_path / f"{n:03d}.png").write_bytes(_encode(image, "png"))
    return root


@pytest.fixture()
def tree(tmp_path):
    return write_tree(tmp_path / "images")


def _key(model, root, **kw):
    return make_key(model, 32, "bilinear", dataset="folder", data_dir=root, **kw)


def _extract(key, root, cache, split="train", **kw):
    kw.setdefault("engine", "tensorflow")
    return pipeline.extract(key, split, data_dir=root, cache_dir=cache, progress=False, log=lambda _: None, **kw)


def test_class_names_are_the_sorted_folders_and_junk_is_ignored(tree):
    (tree / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    (tree / "train" / "cat" / "notes.txt").write_text("not an image")
    (tree / "train" / "cat" / "sub").mkdir()
    (tree / "train" / "cat" / "sub" / "deep.PNG").write_bytes((tree / "train" / "cat" / "000.png").read_bytes())
    split = folder.FolderSplit(tree, "train")
    assert split.class_names == CLASSES
    assert split.rows == 16 and "train/cat/sub/deep.PNG" in split.files
    assert not any("notes" in f or ".hidden" in f for f in split.files)
    np.testing.assert_array_equal(np.bincount(split.labels), [6, 5, 5])


def test_every_row_is_its_own_files_embedding_with_mixed_sizes_and_formats(tiny_model, tmp_path):
    """Rows trace to files; gray, RGBA, BMP, GIF and JPEG files of different sizes in one chunk."""
    import tensorflow as tf

    root = write_tree(tmp_path / "images", sizes=((24, 24), (17, 40), (64, 31)))
    cat = root / "train" / "cat"
    rng = np.random.default_rng(5)
    (cat / "gray.png").write_bytes(tf.io.encode_png(rng.integers(0, 255, (20, 22, 1), dtype=np.uint8)).numpy())
    (cat / "rgba.png").write_bytes(tf.io.encode_png(rng.integers(0, 255, (30, 18, 4), dtype=np.uint8)).numpy())
    (cat / "photo.jpg").write_bytes(_encode(rng.integers(0, 255, (45, 33, 3), dtype=np.uint8), "jpg"))
    (cat / "pic.bmp").write_bytes(_encode(rng.integers(0, 255, (13, 21, 3), dtype=np.uint8), "bmp"))
    (cat / "dot.gif").write_bytes(GIF_1X1)
    key = _key(tiny_model, root)
    result = _extract(key, root, tmp_path / "cache", chunk_size=6, batch_size=4)
    with h5py.File(result.path, "r") as f:
        files = [name.decode() for name in f["source_files"][:]]
        rows, items, labels = f["embeddings"][:], f["source_index"][:], f["labels"][:]
        assert read.class_names(dict(f.attrs)) == CLASSES
    assert result.rows == len(files) == 20 and sorted(items) == list(range(20))
    extractor = Extractor(load_model(str(tiny_model)), image_size=32, resize="bilinear", engine="tensorflow")
    for row, item in enumerate(items):
        image, _ = folder.decode_file(root / files[item])
        np.testing.assert_allclose(rows[row], extractor.embed(image[None])["plain"][0], atol=1e-5)
        assert labels[row] == CLASSES.index(files[item].split("/")[1])


@pytest.mark.skipif(not ov_engine.available(), reason="openvino is not installed (optional engine)")
def test_mixed_sizes_give_the_same_vectors_on_both_engines(tiny_model, tmp_path):
    root = write_tree(tmp_path / "images", sizes=((24, 24), (17, 40), (64, 31)))
    key = _key(tiny_model, root)
    by_engine = {}
    for engine in ("tensorflow", "openvino"):
        result = _extract(key, root, tmp_path / engine, engine=engine, chunk_size=5)
        with h5py.File(result.path, "r") as f:
            by_engine[engine] = f["embeddings"][:]
            assert f.attrs["engine"] == engine
    np.testing.assert_allclose(by_engine["openvino"], by_engine["tensorflow"], atol=1e-4)


def _break_files(root):
    """Three kinds of broken file in train/dog: random bytes, a truncated PNG, an empty file."""
    dog = root / "train" / "dog"
    (dog / "001.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    good = (dog / "002.png").read_bytes()
    (dog / "002.png").write_bytes(good[: len(good) // 2])
    (dog / "003.png").write_bytes(b"")
    return {"train/dog/001.png", "train/dog/002.png", "train/dog/003.png"}


def test_broken_files_are_skipped_listed_and_the_rest_is_cached(tiny_model, tree, tmp_path):
    broken = _break_files(tree)
    key = _key(tiny_model, tree)
    result = _extract(key, tree, tmp_path / "cache", chunk_size=4)
    assert result.rows == 12 and {file for file, _ in result.skipped} == broken
    assert "3 unreadable files skipped" in result.summary().splitlines()[0]
    reasons = dict(result.skipped)
    assert "empty file" in reasons["train/dog/003.png"] and "not a decodable image" in reasons["train/dog/001.png"]
    assert read.skipped_files(result.path) == result.skipped
    with h5py.File(result.path, "r") as f:
        files = [name.decode() for name in f["source_files"][:]]
        assert f["embeddings"].shape == (12, TINY_DIM) and f.attrs["rows"] == 12 and f.attrs["skipped"] == 3
        assert not broken & {files[i] for i in f["source_index"][:]}
    again = _extract(key, tree, tmp_path / "cache")
    assert again.up_to_date and again.skipped == result.skipped
    assert pipeline.verify(key, "train", tree, tmp_path / "cache")[1] == []


def test_strict_stops_at_the_first_broken_file(tiny_model, tree, tmp_path):
    _break_files(tree)
    with pytest.raises(UserError, match=r"cannot read .*train/dog/001.png: not a decodable image.*strict=True"):
        _extract(_key(tiny_model, tree), tree, tmp_path / "cache", strict=True)


def test_any_change_to_the_files_changes_the_fingerprint(tree):
    before = folder.FolderSplit(tree, "train").fingerprint
    target = tree / "train" / "cat" / "001.png"
    changes = [
        lambda: os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9)),
        lambda: target.write_bytes(target.read_bytes() + b"\0"),
        lambda: target.rename(target.with_name("renamed.png")),
        lambda: shutil.copy(tree / "train" / "dog" / "000.png", tree / "train" / "dog" / "new.png"),
    ]
    seen = {before}
    for change in changes:
        change()
        now = folder.FolderSplit(tree, "train").fingerprint
        assert now not in seen
        seen.add(now)
    assert folder.FolderSplit(tree, "train").fingerprint == now  # and it is stable when nothing changes


def test_a_one_level_folder_is_split_by_a_seeded_hash_that_adding_files_does_not_disturb(tmp_path):
    root = write_tree(tmp_path / "flat", per_class=(20, 10), nested=False)
    train, test = (folder.FolderSplit(root, split, test_fraction=0.3) for split in ("train", "test"))
    assert not set(train.files) & set(test.files) and train.rows + test.rows == 90
    assert 15 <= test.rows <= 40
    shutil.copy(root / "cat" / "000.png", root / "cat" / "999.png")
    after = folder.FolderSplit(root, "test", test_fraction=0.3)
    assert set(test.files) <= set(after.files)


def test_two_folders_never_share_a_cache_and_fractions_differ(tiny_model, tmp_path):
    a, b = write_tree(tmp_path / "a" / "images"), write_tree(tmp_path / "b" / "images")
    flat = write_tree(tmp_path / "flat", nested=False)
    paths = {_key(tiny_model, a).path("c", "train"), _key(tiny_model, b).path("c", "train"),
             _key(tiny_model, flat).path("c", "train"), _key(tiny_model, flat, test_fraction=0.5).path("c", "train")}
    assert len(paths) == 4


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "no class folders in"),
    (lambda root: [(root / name).mkdir(parents=True) for name in ("cat", "dog")], "class folder .*cat has no images"),
    (lambda root: (root / "cat").mkdir(parents=True), r"holds one class folder \(cat\); a classifier needs at least 2"),
    (lambda root: None, "does not exist or is not a folder"),
])
def test_unusable_folders_are_one_line_errors(tiny_model, tmp_path, make, message):
    root = tmp_path / "images"
    make(root)
    with pytest.raises(UserError, match=message):
        folder.FolderSplit(sources.check_root("folder", root)[0], "train")


def test_cli_folder_end_to_end_and_a_changed_source_is_named(tiny_model, tree, tmp_path):
    """extract.py and train_head.py select the folder's cache with the same options; a changed file is noticed."""
    _break_files(tree)
    photo = _encode(np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8), "jpg")
    (tree / "train" / "emu" / "cut.jpg").write_bytes(photo[: len(photo) // 2])
    common = ["--dataset", "folder", "--data-dir", tree, "--model", tiny_model, "--image-size", "32",
              "--cache-dir", tmp_path / "cache"]
    out = run_cli("extract.py", *common, "--views", "plain", "--engine", "tensorflow", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "4 unreadable files skipped" in out.stdout and "skipped train/emu/cut.jpg: " in out.stdout
    strict = run_cli("extract.py", *common, "--force", "--strict", "--split", "train", "--engine", "tensorflow",
                     "--quiet")
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1 and "--strict" in strict.stderr
    assert "[Op:" not in strict.stderr
    out = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs", "--epochs", "3", "--projector", "4")
    assert out.returncode == 0, out.stderr
    (run,) = run_dirs(tmp_path / "runs")
    assert '"emu"' in (run / "config.json").read_text()
    # the Projector's sprite: thumbnails of the sampled rows' own files (a test row's file, by its cached index)
    from PIL import Image

    from featcache.cache.read import row_files
    from featcache.head.thumbnails import SIDE

    rows = [int(line.split("\t")[3]) for line in (run / "projector" / "labels.tsv").read_text().splitlines()[1:]]
    config = json.loads((run / "config.json").read_text())
    files = row_files(Path(config["test_cache"]["path"]), np.array(rows))
    sprite = np.asarray(Image.open(run / "projector" / "sprite.png"))
    assert len(rows) == 4 and sprite.shape == (2 * SIDE, 2 * SIDE, 3)
    for i, file in enumerate(files):
        expected = np.asarray(Image.open(tree / file).convert("RGB").resize((SIDE, SIDE), Image.BILINEAR))
        r, c = divmod(i, 2)
        np.testing.assert_array_equal(sprite[r * SIDE : (r + 1) * SIDE, c * SIDE : (c + 1) * SIDE], expected)
    target = tree / "test" / "cat" / "000.png"
    target.write_bytes(target.read_bytes() + b"\0")
    again = run_cli("extract.py", *common, "--split", "test", "--engine", "tensorflow")
    assert again.returncode == 2 and "source changed since it was made" in again.stderr


def test_openvino_conversion_failure_under_auto_falls_back_to_tensorflow(tiny_model, tree, tmp_path, monkeypatch):
    if not ov_engine.available():
        pytest.skip("openvino is not installed (optional engine)")

    def cannot_convert(*args, **kwargs):
        raise RuntimeError("Cannot create Foo layer: unsupported operation")

    monkeypatch.setattr(ov_engine, "OpenVinoNetwork", cannot_convert)
    said = []
    result = pipeline.extract(_key(tiny_model, tree), "train", data_dir=tree, cache_dir=tmp_path, progress=False,
                              engine="auto", log=said.append)
    assert result.engine == "tensorflow" and read.attributes(result.path)["engine"] == "tensorflow"
    assert len(said) == 1 and "OpenVINO cannot convert this model" in said[0] and "using TensorFlow" in said[0]
    with pytest.raises(UserError, match="OpenVINO cannot convert model"):
        pipeline.extract(_key(tiny_model, tree), "test", data_dir=tree, cache_dir=tmp_path, progress=False,
                         engine="openvino")

    def our_own_bug(*args, **kwargs):
        raise TypeError("an argument this code passed wrongly")

    monkeypatch.setattr(ov_engine, "OpenVinoNetwork", our_own_bug)  # not a conversion failure: no fall-back
    with pytest.raises(TypeError, match="passed wrongly"):
        pipeline.extract(_key(tiny_model, tree), "test", data_dir=tree, cache_dir=tmp_path / "other", progress=False,
                         engine="auto")


def test_mixed_sizes_are_embedded_in_groups_with_the_same_result(tiny_model):
    rng = np.random.default_rng(2)
    sizes = ((20, 30), (31, 17), (8, 8), (40, 22), (9, 50))
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    extractor = Extractor(load_model(str(tiny_model)), image_size=32, resize="bilinear", views=("plain", "flip"),
                          engine="tensorflow", batch_size=2)
    grouped = extractor._embed_mixed(images, group=3)
    for view in ("plain", "flip"):
        alone = np.concatenate([extractor.embed(image[None])[view] for image in images])
        np.testing.assert_allclose(grouped[view], alone, atol=1e-5)


def test_a_split_without_one_readable_image_is_one_error(tiny_model, tree, tmp_path):
    for path in (tree / "test").rglob("*.png"):
        path.write_bytes(b"")
    with pytest.raises(UserError, match=r"none of the 9 test images .* read \(the first, test/cat/000.png: empty"):
        _extract(_key(tiny_model, tree), tree, tmp_path / "cache", split="test")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header states width x height, with (almost) no pixel data: what a decompression bomb declares."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp"])
def test_the_header_size_is_the_decoded_size(fmt):
    image = np.random.default_rng(0).integers(0, 255, (13, 21, 3), dtype=np.uint8)
    assert encoded.header_size(_encode(image, fmt)) == (21, 13)
    assert encoded.header_size(GIF_1X1) == (1, 1) and encoded.header_size(b"\xff\xd8\xff\xe0 cut") is None


def test_an_image_beyond_the_pixel_limit_is_skipped_before_decoding(tmp_path):
    side = int(encoded.MAX_IMAGE_PIXELS**0.5) + 1
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(side, side))
    assert folder.decode_file(bomb) == (None, f"image too large (its header states more than "
                                              f"{encoded.MAX_IMAGE_PIXELS:,} pixels, the most decoded)")
    bomb.write_bytes(_png_header(side, 1))  # within the limit: the decoder itself says what is wrong
    assert folder.decode_file(bomb)[1].startswith("not a decodable image: ")


def test_a_chunk_of_large_images_ends_at_the_byte_budget(tree, monkeypatch):
    """Chunks end once their decoded images reach MAX_CHUNK_BYTES (checked every DECODE_GROUP files)."""
    reader = folder.FolderSplit(tree, "train")
    whole = list(reader.chunks(100))
    monkeypatch.setattr(encoded, "MAX_CHUNK_BYTES", 2 * 24 * 24 * 3)
    small = list(reader.chunks(100, start=1))
    assert [len(c.items) for c in small] == [2] * 7 and [c.stop for c in small] == list(range(3, 16, 2))
    np.testing.assert_array_equal(np.concatenate([c.images for c in small]), whole[0].images[1:])
    np.testing.assert_array_equal(np.concatenate([c.items for c in small]), np.arange(1, 15))
    broken = _break_files(tree)  # train/dog/001-003: items 6-8, skipped without counting towards the budget
    small = list(folder.FolderSplit(tree, "train").chunks(100, start=5))
    assert [c.items.tolist() for c in small] == [[5, 9], [10, 11], [12, 13], [14]] and small[0].stop == 10
    assert [(item, reason[:5]) for item, reason in small[0].skipped] == [(6, "not a"), (7, "not a"), (8, "empty")]
    assert len(broken) == 3


def test_large_images_are_resized_a_few_at_a_time_with_the_same_result(tiny_model, monkeypatch):
    from featcache.extract import extractor

    images = np.random.default_rng(1).integers(0, 255, (7, 30, 20, 3), dtype=np.uint8)
    ex = Extractor(load_model(tiny_model), image_size=32, views=("plain", "flip"), batch_size=4, engine="tensorflow")
    want = ex.embed(images)
    monkeypatch.setattr(extractor, "PREPROCESS_PIXELS", 2 * 30 * 20)
    sizes, preprocess = [], ex._preprocess
    monkeypatch.setattr(ex, "_preprocess", lambda batch: sizes.append(len(batch)) or preprocess(batch))
    got = ex.embed(images)
    assert sizes == [2, 2, 2, 1]  # batches of 4 and 3, resized two images at a time
    for view in ("plain", "flip"):
        np.testing.assert_array_equal(got[view], want[view])


@pytest.mark.parametrize("owner, name, when", [
    (os, "replace", lambda src, *_: str(src).endswith(".partial.h5")),  # the publishing rename
    (h5py.Group, "create_dataset", lambda self, name, *_, **__: name == "skipped_files"),  # after the cut to size
])
def test_an_interrupt_while_a_folder_cache_is_published_resumes_without_reading_again(tiny_model, tree, tmp_path,
                                                                                      monkeypatch, owner, name, when):
    broken = _break_files(tree)
    key = _key(tiny_model, tree)
    real = getattr(owner, name)

    def interrupted(*args, **kwargs):
        if when(*args, **kwargs):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        _extract(key, tree, tmp_path / "cache", chunk_size=4)
    monkeypatch.setattr(owner, name, real)
    lines = []
    resumed = pipeline.extract(key, "train", data_dir=tree, cache_dir=tmp_path / "cache", chunk_size=4,
                               engine="tensorflow", progress=False, log=lines.append)
    assert not any("restarting" in line for line in lines), lines
    assert resumed.rows == 12 and resumed.processed <= 3  # at most the broken files after the last row
    assert {file for file, _ in resumed.skipped} == broken
    clean = _extract(key, tree, tmp_path / "clean", chunk_size=4)
    with h5py.File(resumed.path, "r") as a, h5py.File(clean.path, "r") as b:
        for name in ("embeddings", "labels", "source_index", "skipped_files"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        assert a.attrs["rows"] == 12 and a.attrs["complete"]


def test_int8_calibration_decodes_only_the_sampled_files(tree, monkeypatch):
    from featcache.extract import quantize

    reader = folder.FolderSplit(tree, "train")
    assert reader.image_shape == (24, 24)  # found (by decoding the first file) before the memory check needs it
    decoded = []
    real_decode = folder.decode_file
    monkeypatch.setattr(folder, "decode_file", lambda path: decoded.append(path) or real_decode(path))
    (small, rows), (other, other_rows) = quantize.calibration_samples(reader, [(4, 0), (2, 1)])
    assert small.shape == (4, 24, 24, 3) and other.shape == (2, 24, 24, 3) and reader.rows == 15
    wanted = {tree / reader.files[i] for i in set(rows) | set(other_rows)}
    assert set(decoded) == wanted and len(decoded) == len(wanted)
    assert [real_decode(tree / reader.files[i])[0].tobytes() for i in rows] == [image.tobytes() for image in small]


def _webp(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="WEBP", lossless=True)
    return out.getvalue()


def test_webp_files_are_read_and_other_files_are_passed_over_by_name(tiny_model, tree, tmp_path):
    """Every format the decoder reads is an image (WebP included, as predict.py reads it); the other files in the
    class folders are counted and named in the summary instead of vanishing without a word."""
    from featcache.serve.images import expand_paths

    image = np.random.default_rng(4).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    (tree / "train" / "cat" / "photo.webp").write_bytes(_webp(image))
    (tree / "train" / "cat" / "notes.txt").write_text("not an image")
    (tree / "train" / "dog" / "clip.mp4").write_bytes(b"\0" * 8)
    (tree / "train" / "dog" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored, as Keras ignores it
    (tree / "test" / "emu" / "readme.md").write_text("# emus")
    split = folder.FolderSplit(tree, "train")
    assert "train/cat/photo.webp" in split.files and split.rows == 16
    assert split.passed_over == ["train/cat/notes.txt", "train/dog/clip.mp4"]
    np.testing.assert_array_equal(folder.decode_file(tree / "train" / "cat" / "photo.webp")[0], image)
    assert tree / "train" / "cat" / "photo.webp" in expand_paths([tree / "train" / "cat"])
    common = ["--dataset", "folder", "--data-dir", tree, "--model", tiny_model, "--image-size", "32", "--views",
              "plain", "--cache-dir", tmp_path / "cache", "--engine", "tensorflow", "--quiet"]
    for attempt in ("done", "up to date"):
        out = run_cli("extract.py", *common)
        assert out.returncode == 0, out.stderr
        train, test = out.stdout.split(f"{attempt}: ")[1:]
        assert "16 rows" in train and "; 2 files passed over as not images" in train
        assert train.splitlines()[1:] == ["  passed over train/cat/notes.txt: not an image file",
                                          "  passed over train/dog/clip.mp4: not an image file"]
        assert "1 file passed over as not images" in test and test.splitlines()[1:] == [
            "  passed over test/emu/readme.md: not an image file"]


def test_a_one_level_folders_other_files_are_each_named_in_one_split(tmp_path):
    root = write_tree(tmp_path / "images", nested=False)
    others = {f"{name}/notes{n}.txt" for name in CLASSES for n in range(6)}
    for relative in others:
        (root / relative).write_text("notes")
    train, test = (folder.FolderSplit(root, split).passed_over for split in ("train", "test"))
    assert set(train) | set(test) == others and not set(train) & set(test) and train and test


def _os2_bmp(width: int, height: int) -> bytes:
    """A 24-bit BMP with the OS/2 (BITMAPCOREHEADER) header: 12 bytes, width and height as 16-bit numbers."""
    row = (width * 3 + 3) // 4 * 4
    pixels = b"\x40" * row * height
    header = b"BM" + (26 + len(pixels)).to_bytes(4, "little") + b"\0" * 4 + (26).to_bytes(4, "little")
    core = (12).to_bytes(4, "little") + width.to_bytes(2, "little") + height.to_bytes(2, "little")
    return header + core + (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + pixels


def test_the_header_size_of_an_os2_bmp_is_read_right_and_the_image_is_not_refused_as_too_large(tmp_path):
    assert encoded.header_size(_os2_bmp(100, 50)) == (100, 50)
    path = tmp_path / "os2.bmp"
    path.write_bytes(_os2_bmp(100, 50))
    assert not folder.decode_file(path)[1].startswith("image too large")


def test_train_head_warns_when_the_folder_changed_since_its_cache_was_made(tiny_model, tree, tmp_path):
    """As extract.py and --verify see a changed folder, train_head.py says so (a warning: it still trains on the
    images cached then) and names the command that rebuilds the cache."""
    common = ["--dataset", "folder", "--data-dir", tree, "--model", tiny_model, "--image-size", "32",
              "--cache-dir", tmp_path / "cache"]
    assert run_cli("extract.py", *common, "--views", "plain", "--engine", "tensorflow", "--quiet").returncode == 0
    train = [*common, "--runs-dir", tmp_path / "runs", "--epochs", "1", "--quiet", "--train-views", "plain",
             "--tta-views", "plain"]
    out = run_cli("train_head.py", *train)
    assert out.returncode == 0 and out.stderr == ""
    (tree / "test" / "dog" / "new.png").write_bytes((tree / "test" / "dog" / "000.png").read_bytes())
    out = run_cli("train_head.py", *train)
    assert out.returncode == 0 and "test accuracy" in out.stdout
    root = tree.resolve()
    assert out.stderr.splitlines() == [
        f"warning: {root} has changed since its test cache was made (files added, removed or modified); the head "
        f"trains on the images cached then; rebuild it with python extract.py --split test --dataset folder "
        f"--data-dir {root} --model {tiny_model} --image-size 32 --cache-dir {tmp_path / 'cache'} --force"]


def test_a_damaged_cache_met_while_adding_views_is_named_not_the_source(tiny_model, tree, tmp_path):
    key = _key(tiny_model, tree)
    path = _extract(key, tree, tmp_path, views="plain").path
    with h5py.File(path, "r") as f:
        offset = f["source_index"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:  # bit rot inside the stored chunk of its rows' source files
        fh.seek(offset + 3)
        byte = fh.read(1)
        fh.seek(offset + 3)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match=f"^cache {path} is damaged: a chunk failed its Fletcher-32 checksum; "
                                        r"rebuild it with force=True$"):
        _extract(key, tree, tmp_path, views="plain,flip")
