"""Views: their pixels, their names, and adding them to a complete cache (old bytes kept, resumable)."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

from featcache.extract import pipeline
from featcache.cache.read import cached_views
from featcache.errors import UserError
from featcache.extract.preprocess import view_images
from featcache.settings import VIEW_SETS, VIEWS, HeadConfig, parse_views, views_label, views_union
from conftest import KILL_POINT, ROOT, make_key, run_cli


def test_crop_views_are_the_classic_windows_of_seven_eighths():
    images = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3)
    expected = {"crop-tl": images[:, 0:28, 0:28], "crop-tr": images[:, 0:28, 4:32], "crop-bl": images[:, 4:32, 0:28],
                "crop-br": images[:, 4:32, 4:32], "crop-c": images[:, 2:30, 2:30],
                "crop-c-flip": images[:, 2:30, 2:30][:, :, ::-1], "flip": images[:, :, ::-1], "plain": images}
    for view, window in expected.items():
        np.testing.assert_array_equal(view_images(images, view), window)


def test_views_cut_the_same_pixels_from_numpy_and_from_a_tensor_of_unknown_shape():
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (2, 33, 47, 3), dtype=np.uint8)  # odd sides round
    for view in VIEWS:
        cut = tf.function(lambda x, view=view: view_images(x, view),
                          input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        np.testing.assert_array_equal(cut(images).numpy(), view_images(images, view))
    assert view_images(images, "crop-br").shape == (2, 29, 41, 3)


def test_views_are_named_singly_or_by_set_in_catalogue_order():
    assert parse_views("crop-c,plain") == ("plain", "crop-c")
    assert parse_views("plain+flip+crops") == parse_views(["crops", "flip", "plain"]) == (
        "plain", "flip", "crop-tl", "crop-tr", "crop-bl", "crop-br", "crop-c")
    assert views_label(("plain", "flip", "crop-tl", "crop-tr", "crop-bl", "crop-br", "crop-c")) == "plain+flip+crops"
    for bad, message in (("plain,mirror", "unknown view 'mirror' in views"), (" , ", "views names no view"),
                         (3, "views must be view names")):
        with pytest.raises(UserError, match=message):
            parse_views(bad)


def test_the_api_refuses_parameters_it_does_not_take_in_one_line(tmp_path):
    from featcache import api

    for call, name in ((lambda: api.load_cache(cache_dir=tmp_path, limt=3), "load_cache"),
                       (lambda: api.verify(cache_dir=tmp_path, views="crops"), "verify")):
        with pytest.raises(UserError, match=f"^{name}\\(\\) takes no parameter"):
            call()


def test_a_head_left_to_its_default_views_takes_those_the_cache_holds():
    assert HeadConfig().for_cached_views(("plain",)).train_views == "plain"
    asked = HeadConfig(train_views="crops,plain", tta_views="plain,crop-c")
    served = asked.for_cached_views(("plain",))  # asked-for views stay: reading the cache names them
    assert (served.train_views, served.tta_views) == ("plain,crop-tl,crop-tr,crop-bl,crop-br,crop-c", "plain,crop-c")


def _extract(model, cifar_root, cache, views, limit=None, **kw):
    return pipeline.extract(make_key(str(model), 32, "bilinear", limit), "train", data_dir=cifar_root,
                            cache_dir=cache, views=views, engine="tensorflow", progress=False, **kw)


def _datasets(path):
    """Every dataset's values, and each view dataset's stored chunks as bytes."""
    with h5py.File(path, "r") as f:
        values = {name: f[name][:] for name in f}
        stored = {name: [f[name].id.read_direct_chunk((lo, 0))[1] for lo in range(0, f[name].shape[0], f[name].chunks[0])]
                  for name in f if name.startswith("embeddings")}
        return values, stored, dict(f.attrs)


def test_adding_views_computes_only_the_new_ones_and_keeps_the_old_bytes(tiny_model, cifar_root, tmp_path):
    first = _extract(tiny_model, cifar_root, tmp_path / "cache", "plain,flip", chunk_size=16)
    before, stored_before, _ = _datasets(first.path)
    added = _extract(tiny_model, cifar_root, tmp_path / "cache", "crops", chunk_size=16)
    assert added.path == first.path and added.processed == 120 and not added.up_to_date
    after, stored_after, attrs = _datasets(added.path)
    assert cached_views(attrs) == parse_views("plain,flip,crops")
    for name in ("embeddings", "embeddings_flip"):
        assert stored_after[name] == stored_before[name]  # the same stored chunks, checksums included
    np.testing.assert_array_equal(after["labels"], before["labels"])
    whole = _extract(tiny_model, cifar_root, tmp_path / "fresh", "plain,flip,crops")
    fresh, _, _ = _datasets(whole.path)
    assert set(fresh) == set(after)
    for name, values in fresh.items():
        np.testing.assert_allclose(after[name], values, atol=1e-5, rtol=0)
    again = _extract(tiny_model, cifar_root, tmp_path / "cache", "crop-c,flip")
    assert again.up_to_date
    rebuilt = _extract(tiny_model, cifar_root, tmp_path / "cache", "plain", force=True)
    assert rebuilt.processed == 120 and cached_views(_datasets(rebuilt.path)[2]) == parse_views("plain,flip,crops")


@pytest.mark.integration  # a whole process
def test_a_killed_view_adding_run_resumes_to_the_uninterrupted_result(tiny_model, cifar_root, tmp_path):
    cache = tmp_path / "cache"
    args = ["--split", "train", "--data-dir", str(cifar_root), "--model", str(tiny_model), "--image-size", "32",
            "--resize", "bilinear", "--chunk-size", "8", "--engine", "tensorflow", "--quiet", "--cache-dir", str(cache)]
    first = _extract(tiny_model, cifar_root, cache, "plain")
    _, stored_old, _ = _datasets(first.path)
    script = KILL_POINT + f"import runpy; runpy.run_path({str(ROOT / 'extract.py')!r}, run_name='__main__')"
    for at, committed in ((3, 16), (4, 40)):  # 120 images in chunks of 8: killed at the 3rd commit, then the 4th
        killed = subprocess.run([sys.executable, "-c", script, "write", str(at), *args, "--views", "flip"],
                                capture_output=True, text=True)
        assert killed.returncode == -9, killed.stderr
        assert first.path.exists()  # the complete cache stays usable meanwhile
        with h5py.File(first.path.with_name("train.partial.h5"), "r") as f:
            assert f.attrs["rows_done"] == committed
    done = run_cli("extract.py", *args, "--views", "flip")
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and "adding flip" in done.stdout
    after, stored_after, _ = _datasets(first.path)
    assert stored_after["embeddings"] == stored_old["embeddings"]
    reference = _extract(tiny_model, cifar_root, tmp_path / "ref", "plain,flip")
    np.testing.assert_allclose(after["embeddings_flip"], _datasets(reference.path)[0]["embeddings_flip"],
                               atol=1e-5, rtol=0)


def test_a_head_asking_for_views_the_cache_lacks_gets_the_command_that_adds_them(tiny_model, cifar_root, tmp_path):
    cache = tmp_path / "cache"
    for split in ("train", "test"):
        pipeline.extract(make_key(str(tiny_model), 32, "bilinear"), split, data_dir=cifar_root, cache_dir=cache,
                         views="plain", engine="tensorflow", progress=False)
    out = run_cli("train_head.py", "--model", tiny_model, "--image-size", "32", "--resize", "bilinear",
                  "--cache-dir", cache, "--runs-dir", tmp_path / "runs", "--train-views", "plain,crop-c", "--epochs", "1")
    assert out.returncode == 2
    assert "holds no crop-c view (it holds plain); run: python extract.py --split all" in out.stderr
    assert "--views crop-c" in out.stderr
    default = run_cli("train_head.py", "--model", tiny_model, "--image-size", "32", "--resize", "bilinear",
                      "--cache-dir", cache, "--runs-dir", tmp_path / "runs", "--epochs", "1")
    assert default.returncode == 0, default.stderr
    assert default.stderr == "note: the caches hold no flip view, so the head trains on and averages plain\n"
    for asked in ("plain,flip", "flip+plain"):  # asked for, even if it is the default list: never shrunk
        explicit = run_cli("train_head.py", "--model", tiny_model, "--image-size", "32", "--resize", "bilinear",
                           "--cache-dir", cache, "--runs-dir", tmp_path / "runs", "--tta-views", asked)
        assert explicit.returncode == 2 and "holds no flip view (it holds plain)" in explicit.stderr


def test_an_interrupted_view_adding_partial_is_removed_by_a_run_that_finds_the_cache_up_to_date(
        tiny_model, cifar_root, tmp_path, monkeypatch):
    from featcache.cache import write

    cache = tmp_path / "cache"
    first = _extract(tiny_model, cifar_root, cache, "plain")
    real_write, calls = write.CacheWriter.write, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(self, *args)

    monkeypatch.setattr(write.CacheWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_model, cifar_root, cache, "crops", chunk_size=16)
    monkeypatch.setattr(write.CacheWriter, "write", real_write)
    partial = first.path.with_name("train.partial.h5")
    assert partial.exists()  # a full copy of the cache, plus some crop rows
    lines = []
    again = _extract(tiny_model, cifar_root, cache, "plain", log=lines.append)
    assert again.up_to_date and not partial.exists()
    assert lines == [f"removed {partial}: the unfinished copy of an interrupted run computing crop-tl, crop-tr, "
                     "crop-bl, crop-br, crop-c, not needed here"]


def test_bad_views_are_refused_before_a_model_is_loaded_for_its_input_size(tiny_model, tmp_path, monkeypatch):
    from featcache import api
    from featcache.extract import models

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded to learn its input size")

    monkeypatch.setattr(models, "input_size", loaded)  # a first use: no input size recorded in cache/models/ yet
    out = run_cli("extract.py", "--model", tiny_model, "--cache-dir", tmp_path / "cache", "--views", "plain,mirror")
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "Error: unknown view 'mirror' in --views; choose from " + ", ".join(VIEWS + tuple(VIEW_SETS))], out.stderr
    with pytest.raises(UserError, match="^unknown view 'mirror' in views"):
        api.extract(model=str(tiny_model), cache_dir=tmp_path / "cache", views="plain,mirror")


def test_a_view_named_twice_is_refused_in_any_container_and_merged_lists_give_each_once():
    for views in ("flip,flip", ["flip", "flip"], ("flip", "flip"), "crops,crop-c", "plain+flip,flip"):
        with pytest.raises(UserError, match="^views names (flip|crop-c) twice; name each once$"):
            parse_views(views)
    assert views_union(("plain", "flip"), ("flip",), ()) == ("plain", "flip")
