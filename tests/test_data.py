import pickle
import tarfile

import numpy as np
import pytest

from featcache.errors import UserError
from featcache.extract.sources import cifar
from conftest import TEST_ROWS, TRAIN_PER_BATCH, write_batches


def test_folder_parent_and_archive_read_the_same_images(cifar_root, cifar_archive):
    variants = [cifar_root / "cifar-10-batches-py", cifar_root, cifar_archive]
    splits = [cifar.load_split(cifar.resolve_source(v), "train") for v in variants]
    readers = [cifar.SplitSource(cifar.resolve_source(v), "train") for v in variants]
    assert len({r.fingerprint for r in readers}) == 1 and readers[0].rows == 5 * TRAIN_PER_BATCH
    for s in splits:
        assert s.images.shape == (5 * TRAIN_PER_BATCH, 32, 32, 3) and s.images.dtype == np.uint8
        assert s.labels.shape == (5 * TRAIN_PER_BATCH,)
    np.testing.assert_array_equal(splits[0].images, splits[2].images)


def test_pixels_are_decoded_channel_last_in_file_order(tmp_path):
    written = write_batches(tmp_path / "cifar-10-batches-py", train_per_batch=3, test_rows=4)
    test = cifar.load_split(cifar.resolve_source(tmp_path), "test")
    raw, labels = written["test_batch"]
    # Row layout is 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert test.images[2, 5, 7, 1] == raw[2, 1024 + 5 * 32 + 7]
    assert test.labels.tolist() == labels
    train = cifar.load_split(cifar.resolve_source(tmp_path), "train")
    np.testing.assert_array_equal(train.images[3:6].reshape(3, -1),
                                  written["data_batch_2"][0].reshape(3, 3, 32, 32).transpose(0, 2, 3, 1).reshape(3, -1))


def test_env_var_is_used_when_no_path_is_given(cifar_root, monkeypatch):
    monkeypatch.setenv(cifar.CIFAR10.env, str(cifar_root))
    assert cifar.resolve_source(None) == cifar_root / "cifar-10-batches-py"


def test_limit_and_fingerprint(cifar_root):
    source = cifar.resolve_source(cifar_root)
    full = cifar.load_split(source, "test")
    first = cifar.load_split(source, "test", limit=7)
    assert len(first.labels) == 7
    np.testing.assert_array_equal(first.images, full.images[:7])
    assert cifar.SplitSource(source, "test", 7).fingerprint != cifar.SplitSource(source, "test").fingerprint
    assert len(full.labels) == TEST_ROWS


@pytest.mark.parametrize("chunk, start, limit", [(7, 0, None), (24, 0, None), (50, 13, None), (5, 118, None),
                                                  (4, 3, 30), (1000, 0, None)])
def test_chunks_cover_exactly_the_rows_from_start(cifar_archive, chunk, start, limit):
    whole = cifar.load_split(cifar_archive, "train", limit)
    got = list(cifar.SplitSource(cifar_archive, "train", limit).chunks(chunk, start))
    assert all(len(c.labels) == chunk for c in got[:-1])
    assert [int(c.items[0]) for c in got] == list(range(start, len(whole.labels), chunk))
    np.testing.assert_array_equal(np.concatenate([c.items for c in got]), np.arange(start, len(whole.labels)))
    np.testing.assert_array_equal(np.concatenate([c.images for c in got]), whole.images[start:])
    np.testing.assert_array_equal(np.concatenate([c.labels for c in got]), whole.labels[start:])


def test_archive_with_batches_out_of_order_is_read_in_order(cifar_root, tmp_path):
    archive = tmp_path / "shuffled.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("data_batch_4", "test_batch", "data_batch_1", "data_batch_5", "data_batch_3", "data_batch_2"):
            tar.add(cifar_root / "cifar-10-batches-py" / name, arcname=f"cifar-10-batches-py/{name}")
    np.testing.assert_array_equal(cifar.load_split(archive, "train").images,
                                  cifar.load_split(cifar_root / "cifar-10-batches-py", "train").images)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no CIFAR-10 batches"),
    ("not_tar", "is not a tar archive"),
    ("wrong_shape", "expected [N, 3072] uint8"),
    ("bad_labels", "labels outside 0..9"),
    ("not_pickle", "is not a readable CIFAR-10 batch"),
    ("missing_batch", "missing CIFAR-10 batch file"),
])
def test_bad_sources_give_one_clear_error(tmp_path, case, message):
    folder = tmp_path / "cifar-10-batches-py"
    target = tmp_path
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "empty":
        pass
    elif case == "not_tar":
        target = tmp_path / "x.tar.gz"
        target.write_bytes(b"not an archive at all")
    else:
        write_batches(folder, train_per_batch=2, test_rows=2)
        batch = folder / "test_batch"
        if case == "wrong_shape":
            batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
        elif case == "bad_labels":
            batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
        elif case == "not_pickle":
            batch.write_bytes(b"\x00garbage")
        elif case == "missing_batch":
            batch.unlink()
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        cifar.load_split(cifar.resolve_source(target), "test")
