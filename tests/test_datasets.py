"""Other datasets and models through the same cache: CIFAR-100 with 100 classes, a model with a fixed input size."""

import json

import h5py
import numpy as np
import pytest

from featcache.cache import read
from featcache.errors import UserError
from featcache.extract.sources import cifar
from conftest import make_key, run_cli, run_dirs, save_tiny_model, write_cifar100


def test_cifar100_end_to_end_gives_100_way_outputs_with_the_stored_names(tiny_model, tmp_path):
    import tensorflow as tf

    names = write_cifar100(tmp_path / "cifar-100-python")
    common = ["--dataset", "cifar100", "--data-dir", tmp_path, "--model", tiny_model, "--image-size", "32",
              "--cache-dir", tmp_path / "cache"]
    out = run_cli("extract.py", *common, "--views", "plain", "--engine", "tensorflow", "--quiet")
    assert out.returncode == 0, out.stderr
    key = make_key(tiny_model, 32, "bicubic", dataset="cifar100")
    assert key.path(tmp_path / "cache", "train").parts[-4] == "cifar100"
    attrs = read.attributes(key.path(tmp_path / "cache", "test"))
    assert read.class_names(attrs) == names and attrs["rows"] == 60
    out = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs", "--epochs", "2")
    assert out.returncode == 0, out.stderr
    (run,) = run_dirs(tmp_path / "runs")
    assert np.load(run / "test_probs.npy").shape == (60, 100)
    test = cifar.load_split(cifar.resolve_source(tmp_path, cifar.CIFAR100), "test", layout=cifar.CIFAR100)
    png = tmp_path / "one.png"
    png.write_bytes(tf.io.encode_png(test.images[0]).numpy())
    out = run_cli("predict.py", "--runs-dir", tmp_path / "runs", "--json", "--top-k", "150", png)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout)
    assert len(line["probabilities"]) == 100 and len(line["top"]) == 100  # --top-k is bounded by the classes
    assert {top["class"] for top in line["top"]} == set(names)
    out = run_cli("export.py", "--runs-dir", tmp_path / "runs", tmp_path / "export")
    assert out.returncode == 0 and "probabilities [N,100]" in out.stdout, out.stderr
    exported = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
    result = exported(images=tf.constant(test.images[:3]))
    assert result["probabilities"].shape == (3, 100)
    assert [n.decode() for n in result["class_names"].numpy()] == list(names)
    np.testing.assert_allclose(result["probabilities"].numpy()[0], line["probabilities"], atol=1e-5)


def test_cifar100_labels_are_the_fine_labels(tmp_path):
    write_cifar100(tmp_path / "cifar-100-python")
    split = cifar.load_split(cifar.resolve_source(tmp_path, cifar.CIFAR100), "train", layout=cifar.CIFAR100)
    import pickle

    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes(), encoding="bytes")
    np.testing.assert_array_equal(split.labels, raw[b"fine_labels"])
    assert split.images.shape == (150, 32, 32, 3)


def test_a_model_with_a_fixed_input_size_needs_no_image_size(cifar_root, tmp_path):
    model = save_tiny_model(tmp_path / "fixed96", dim=64, size=96)
    cache = tmp_path / "cache"
    common = ["--model", model, "--data-dir", cifar_root, "--views", "plain", "--cache-dir", cache, "--limit", "20"]
    out = run_cli("extract.py", *common, "--split", "test", "--engine", "tensorflow", "--quiet")
    assert out.returncode == 0, out.stderr
    (path,) = cache.rglob("test.h5")
    assert path.parent.name.startswith("96px-")
    with h5py.File(path, "r") as f:
        assert f["embeddings"].shape == (20, 64)
    bad = run_cli("extract.py", *common, "--split", "test", "--image-size", "128")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "takes 96x96 images; --image-size 128 contradicts it" in bad.stderr
    before = make_key(model, None, "bicubic", 20)
    save_tiny_model(model, dim=64, size=96, seed=7)  # other weights, same folder: replaced in place
    after = make_key(model, None, "bicubic", 20)
    assert before.model == after.model and before.model_sha256 != after.model_sha256
    assert after.path(cache, "test") != path
    out = run_cli("extract.py", *common, "--split", "test", "--engine", "tensorflow", "--quiet")
    assert out.returncode == 0 and str(after.path(cache, "test")) in out.stdout, out.stderr
    with h5py.File(path, "r") as old, h5py.File(after.path(cache, "test"), "r") as new:
        assert not np.allclose(old["embeddings"][:], new["embeddings"][:])


def test_a_model_folder_without_a_saved_model_is_one_line(tmp_path):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(UserError, match="holds no SavedModel"):
        make_key(tmp_path / "empty_model", None, "bicubic")


def test_a_failed_download_says_why(tmp_path, monkeypatch):
    """Keras wraps a network error in a bare Exception; its cause reaches the message, not just "(Exception)"."""
    import keras

    def offline(*_args, **_kwargs):
        raise Exception(f"URL fetch failure on {cifar.CIFAR10.url}: None -- [Errno -3] Temporary failure in name "
                        "resolution")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv(cifar.CIFAR10.env, raising=False)
    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(UserError) as caught:
        cifar.resolve_source(None)
    assert str(caught.value) == (f"could not download CIFAR-10 from {cifar.CIFAR10.url} ([Errno -3] Temporary "
                                 "failure in name resolution); pass data_dir=PATH (or set CIFAR10_DATA_DIR) to read "
                                 "a local copy")
