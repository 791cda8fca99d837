"""The Python API: cached arrays without TensorFlow, one head experiment, a cache read with h5py alone."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

from featcache.extract import pipeline
from conftest import ROOT, make_key

SELECTION = dict(image_size=32)


@pytest.fixture(scope="module")
def cache(tiny_model, cifar_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api_cache")
    key = make_key(str(tiny_model), 32, "bicubic", None)
    for split in ("train", "test"):
        pipeline.extract(key, split, data_dir=cifar_root, cache_dir=folder, engine="tensorflow", progress=False)
    return folder


@pytest.mark.integration  # a whole process
def test_load_cache_returns_numpy_and_never_imports_tensorflow(cache, tiny_model):
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from featcache.api import load_cache
split = load_cache("train", cache_dir={str(cache)!r}, model={str(tiny_model)!r}, image_size=32)
print(type(split.views["plain"]).__name__, split.views["plain"].shape, len(split.labels), split.class_names[0],
      split.attrs["split"], "tensorflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ndarray", "(120,", "16)", "120", "airplane", "train", "False"]


def test_run_head_returns_metrics_and_a_model(cache, tiny_model):
    from featcache.api import load_cache, run_head

    result = run_head(cache_dir=cache, model=str(tiny_model), epochs=2, tta_views="plain", **SELECTION)
    test = load_cache("test", cache_dir=cache, model=str(tiny_model), **SELECTION)
    assert len(result.history["loss"]) == 2
    probs = np.asarray(result.model(test.views["plain"]))
    np.testing.assert_allclose(probs, result.test_probs, atol=1e-5)  # the returned model is the scored one
    assert result.metrics["test_accuracy"] == np.mean(result.test_probs.argmax(1) == test.labels)


def test_a_cache_reads_with_h5py_alone(cache, tiny_model):
    (path,) = [p for p in cache.rglob("train.h5")]
    with h5py.File(path, "r") as f:
        x, y = f["embeddings"][:], f["labels"][:]
        assert f.attrs["complete"] and x.shape == (f.attrs["rows"], f.attrs["dim"]) and len(y) == len(x)


def test_a_model_folder_may_be_a_path_object(tiny_model):
    from featcache.selection import select

    assert select(None, model=tiny_model, image_size=32) == select(None, model=str(tiny_model), image_size=32)


def test_limit_zero_is_the_whole_split_as_the_cache_layout_says(cache, tiny_model, cifar_root):
    from featcache.api import load_cache, verify

    whole = load_cache("train", cache_dir=cache, model=str(tiny_model), **SELECTION)
    zero = load_cache("train", cache_dir=cache, model=str(tiny_model), limit=0, **SELECTION)
    assert zero.path == whole.path and len(zero.labels) == 120
    assert verify("train", cache_dir=cache, model=str(tiny_model), limit=0, data_dir=cifar_root, **SELECTION) == (
        whole.path, [])
