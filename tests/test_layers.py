"""Inner-layer features: the layers a model offers, their pooling, both engines, and adding them to a cache
(old bytes kept, resumable, verified)."""

import math
import subprocess
import sys

import h5py
import numpy as np
import pytest

from featcache.cache.layout import feature_dataset
from featcache.cache.read import cached_features, cached_views
from featcache.errors import UserError
from featcache.extract import layers, pipeline
from featcache.settings import parse_features
from conftest import KILL_POINT, REAL_MODEL, ROOT, make_key, requires_shared, run_cli

SIZE = 36  # the deep tiny model's maps: Relu 18 x 18, Relu6 and add 9 x 9 (odd: 2x2 cells share the middle row)
FEATURES = ("Relu6@2x2", "add")


def _numpy_pool(maps: np.ndarray, feature: str) -> np.ndarray:
    if "@" not in feature:
        return maps.mean(axis=(1, 2))
    cells = [(i * n // 2, math.ceil((i + 1) * n / 2)) for n in maps.shape[1:3] for i in range(2)]
    rows, cols = cells[:2], cells[2:]
    return np.concatenate([maps[:, t:b, l:r].mean(axis=(1, 2)) for t, b in rows for l, r in cols], axis=1)


def test_the_layers_of_a_model_and_their_pooled_values(deep_model):
    import tensorflow as tf
    import tensorflow_hub as hub

    model = hub.load(str(deep_model))
    offered = layers.list_layers(model, SIZE)
    assert [(i.name, i.height, i.width, i.channels) for i in offered] == [
        ("Relu", 18, 18, 16), ("Relu6", 9, 9, 16), ("add", 9, 9, 16)]
    assert [layers.feature_dim(offered, f) for f in ("Relu", "Relu6@2x2")] == [16, 64]
    images = np.random.default_rng(0).random((3, SIZE, SIZE, 3)).astype(np.float32)
    out = layers.feature_function(model, SIZE, ("Relu", "Relu6@2x2", "add", "add@2x2"))(tf.constant(images))
    np.testing.assert_allclose(out["final"].numpy(), model(images, training=False).numpy(), atol=1e-5)
    # the model's maps computed again from its weights
    relu = tf.nn.relu(tf.nn.conv2d(images, model.kernel, strides=2, padding="SAME"))
    relu6 = tf.nn.relu6(tf.nn.conv2d(relu, model.inner[0], strides=2, padding="SAME"))
    maps = {"Relu": relu.numpy(), "Relu6": relu6.numpy(),
            "add": (relu6 + tf.nn.conv2d(relu6, model.inner[1], strides=1, padding="SAME")).numpy()}
    for feature in ("Relu", "Relu6@2x2", "add", "add@2x2"):
        np.testing.assert_allclose(out[feature].numpy(), _numpy_pool(maps[feature.split("@")[0]], feature),
                                   atol=1e-5)
    # a 3 x 3 map: the cells are the four 2 x 2 windows, sharing the middle row and column
    assert layers.pool(tf.reshape(tf.range(9.0), [1, 3, 3, 1]), "x@2x2").numpy().tolist() == [[2.0, 3.0, 5.0, 6.0]]


def test_feature_names_are_checked_against_the_model_in_one_line():
    offered = [layers.LayerInfo("Relu", 18, 18, 16), layers.LayerInfo("block_1_add", 9, 9, 16)]
    layers.check_features(offered, ("Relu", "block_1_add@2x2"))
    with pytest.raises(UserError, match=r"^the model offers no layer 'block_2_add' in layers; extract.py with "
                                        r"list_layers=True"):
        layers.check_features(offered, ("block_2_add",))
    for bad in ("Relu@3x3", "a/b", " , "):
        with pytest.raises(UserError, match="list_layers=True"):
            layers.check_features(offered, parse_features(bad))


def test_engines_agree_on_inner_layers(deep_model):
    pytest.importorskip("openvino")
    from featcache.extract.extractor import ExtractorSettings

    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got = {}
    for engine in ("tensorflow", "openvino"):
        settings = ExtractorSettings(str(deep_model), image_size=SIZE, resize="bilinear", views=("plain", "flip"),
                                     engine=engine, features=FEATURES + ("Relu",))
        got[engine] = settings.build(log=lambda line: None)[0].embed(images)
    assert set(got["openvino"]) == {f"{view}{suffix}" for view in ("plain", "flip")
                                    for suffix in ("", "@Relu6@2x2", "@add", "@Relu")}
    for key, rows in got["tensorflow"].items():
        np.testing.assert_allclose(got["openvino"][key], rows, atol=1e-3, rtol=0)
    assert got["tensorflow"]["plain@Relu6@2x2"].shape == (5, 64)


def _extract(model, cifar_root, cache, views="plain", **kw):
    return pipeline.extract(make_key(str(model), SIZE, "bilinear"), "train", data_dir=cifar_root, cache_dir=cache,
                            views=views, engine="tensorflow", progress=False, **kw)


def _stored(path):
    """Every dataset's values, and its stored chunks as bytes (checksums included)."""
    with h5py.File(path, "r") as f:
        values = {name: f[name][:] for name in f}
        chunks = {name: [f[name].id.read_direct_chunk((lo,) + (0,) * (f[name].ndim - 1))[1]
                         for lo in range(0, f[name].shape[0], f[name].chunks[0])] for name in f}
        return values, chunks, dict(f.attrs)


def test_layers_are_added_to_a_complete_cache_keeping_its_bytes_and_follow_new_views(deep_model, cifar_root,
                                                                                       tmp_path):
    first = _extract(deep_model, cifar_root, tmp_path / "cache", "plain,flip", chunk_size=16)
    _, before, attrs = _stored(first.path)
    assert "features" not in attrs  # a cache without layers is as it always was
    added = _extract(deep_model, cifar_root, tmp_path / "cache", "plain", layers="add,Relu6@2x2", chunk_size=16)
    assert added.processed == 120 and not added.up_to_date
    values, after, attrs = _stored(added.path)
    assert cached_features(attrs) == {"add": 16, "Relu6@2x2": 64}
    for name in before:
        assert after[name] == before[name]
    assert values[feature_dataset("flip", "Relu6@2x2")].shape == (120, 64)
    fresh = _extract(deep_model, cifar_root, tmp_path / "fresh", "plain,flip", layers="add,Relu6@2x2")
    fresh_values, _, _ = _stored(fresh.path)
    assert set(fresh_values) == set(values)
    for name, rows in fresh_values.items():
        np.testing.assert_allclose(values[name], rows, atol=1e-5, rtol=0)
    assert _extract(deep_model, cifar_root, tmp_path / "cache", "flip", layers="add").up_to_date
    widened = _extract(deep_model, cifar_root, tmp_path / "cache", "crop-c")  # a new view gets the features too
    values, after_view, attrs = _stored(widened.path)
    assert cached_views(attrs) == ("plain", "flip", "crop-c") and after_view[feature_dataset("plain", "add")] == \
        after[feature_dataset("plain", "add")]
    assert values[feature_dataset("crop-c", "add")].shape == (120, 16)
    path, problems = pipeline.verify(make_key(str(deep_model), SIZE, "bilinear"), "train", cifar_root,
                                     tmp_path / "cache")
    assert problems == []
    with h5py.File(path, "r+") as f:
        f[feature_dataset("crop-c", "add")][3, 0] = np.nan
    _, problems = pipeline.verify(make_key(str(deep_model), SIZE, "bilinear"), "train", cifar_root,
                                  tmp_path / "cache")
    assert problems == ["embeddings_crop-c@add has NaN or Inf in rows 0:120"]


def test_the_cli_lists_layers_and_refuses_a_name_the_model_lacks(deep_model, cifar_root, tmp_path):
    common = ["--model", deep_model, "--image-size", SIZE, "--cache-dir", tmp_path / "cache"]
    listed = run_cli("extract.py", "--list-layers", "--quiet", *common)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1:] == ["  Relu   18 x 18 x 16", "  Relu6  9 x 9 x 16", "  add    9 x 9 x 16"]
    assert listed.stdout.startswith(f"3 layers of {deep_model.resolve()} at {SIZE} px")
    bad = run_cli("extract.py", "--data-dir", cifar_root, "--layers", "add,Relu7@2x2", "--quiet", *common)
    assert bad.returncode == 2
    assert bad.stderr == ("Error: the model offers no layer 'Relu7@2x2' in --layers; extract.py with --list-layers "
                          "lists its 3 layers\n")
    assert not (tmp_path / "cache" / "cifar10").exists() or not list((tmp_path / "cache").rglob("*.h5"))


@pytest.mark.integration  # a whole process
def test_a_killed_layer_adding_run_resumes_to_the_uninterrupted_result(deep_model, cifar_root, tmp_path):
    cache = tmp_path / "cache"
    args = ["--split", "train", "--data-dir", str(cifar_root), "--model", str(deep_model), "--image-size", str(SIZE),
            "--resize", "bilinear", "--chunk-size", "8", "--engine", "tensorflow", "--quiet", "--cache-dir", str(cache),
            "--views", "plain,flip", "--layers", "add,Relu6@2x2"]
    first = _extract(deep_model, cifar_root, cache, "plain,flip")
    _, stored_old, _ = _stored(first.path)
    script = KILL_POINT + f"import runpy; runpy.run_path({str(ROOT / 'extract.py')!r}, run_name='__main__')"
    for at, committed in ((3, 16), (4, 40)):  # 120 images in chunks of 8: killed at the 3rd commit, then the 4th
        killed = subprocess.run([sys.executable, "-c", script, "write", str(at), *args], capture_output=True,
                                text=True)
        assert killed.returncode == -9, killed.stderr
        assert first.path.exists()  # the complete cache stays usable meanwhile
        with h5py.File(first.path.with_name("train.partial.h5"), "r") as f:
            assert f.attrs["rows_done"] == committed
    done = run_cli("extract.py", *args)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and "adding plain@add" in done.stdout
    after, stored_after, _ = _stored(first.path)
    for name, chunks in stored_old.items():
        assert stored_after[name] == chunks
    reference = _extract(deep_model, cifar_root, tmp_path / "ref", "plain,flip", layers="add,Relu6@2x2")
    for name, rows in _stored(reference.path)[0].items():
        np.testing.assert_allclose(after[name], rows, atol=1e-5, rtol=0)


@pytest.mark.integration
@requires_shared()
def test_engines_agree_on_the_real_models_inner_layers():
    pytest.importorskip("openvino")
    from featcache.extract.extractor import ExtractorSettings

    features = ("block_6_expand_relu@2x2", "block_13_expand_relu", "block_16_project_BN", "out_relu", "out_relu@2x2")
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    got = {}
    for engine in ("tensorflow", "openvino"):
        settings = ExtractorSettings(str(REAL_MODEL), views=("plain",), engine=engine, features=features)
        got[engine] = settings.build(log=lambda line: None)[0].embed(images)
    for key, rows in got["tensorflow"].items():
        np.testing.assert_allclose(got["openvino"][key], rows, atol=1e-3, rtol=0)
    assert got["tensorflow"]["plain@out_relu@2x2"].shape == (3, 4 * 1280)
    np.testing.assert_allclose(got["tensorflow"]["plain@out_relu"], got["tensorflow"]["plain"], atol=1e-5)


def test_the_api_lists_layers_and_takes_them(deep_model, cifar_root, tmp_path):
    from featcache import api

    selection = dict(model=str(deep_model), image_size=SIZE, data_dir=cifar_root, cache_dir=tmp_path)
    assert [info.name for info in api.list_layers(**selection)] == ["Relu", "Relu6", "add"]
    with pytest.raises(UserError, match="^the model offers no layer 'Relu7' in layers; extract.py with list_layers=True lists"):
        api.extract("test", layers="Relu7", engine="tensorflow", progress=False, **selection)
    done = api.extract("test", layers=["Relu"], views="plain", engine="tensorflow", progress=False, **selection)
    assert cached_features(api.load_cache("test", **selection).attrs) == {"Relu": 16}
    assert done.rows == 40
