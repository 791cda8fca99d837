import signal
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

from featcache.extract import ov_engine, pipeline, shard
from featcache.cache import layout
from featcache.errors import UserError
from featcache.extract.extractor import Extractor
from featcache.extract.models import load_model
from featcache.extract.sources import cifar
from conftest import KILL_POINT, ROOT, TINY_DIM, make_key


def _key(model, **kw):
    settings = dict(image_size=48, resize="bilinear", limit=None)
    settings.update(kw)
    return make_key(str(model), settings.pop("image_size"), settings.pop("resize"), settings.pop("limit"), **settings)


def _rows(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}, dict(f.attrs)


@pytest.mark.parametrize("engine", ["tensorflow", pytest.param("openvino", marks=pytest.mark.skipif(
    not ov_engine.available(), reason="openvino is not installed (optional engine)"))])
def test_chunked_cache_equals_one_pass_over_everything(tiny_model, cifar_root, tmp_path, engine):
    key = _key(tiny_model)
    result = pipeline.extract(key, "train", data_dir=cifar_root, cache_dir=tmp_path, chunk_size=7,
                              batch_size=3, engine=engine, progress=False)
    rows, attrs = _rows(result.path)
    split = cifar.load_split(cifar.resolve_source(cifar_root), "train")
    ex = Extractor(load_model(str(tiny_model)), image_size=48, resize="bilinear", views=("plain", "flip"),
                   batch_size=len(split.labels), engine="tensorflow")
    whole = ex.embed(split.images)
    tolerance = 1e-5 if engine == "tensorflow" else 1e-3  # the engines' agreement bound
    np.testing.assert_allclose(rows["embeddings"], whole["plain"], atol=tolerance, rtol=0)
    np.testing.assert_allclose(rows["embeddings_flip"], whole["flip"], atol=tolerance, rtol=0)
    np.testing.assert_array_equal(rows["labels"], split.labels)
    assert attrs["complete"] and attrs["rows_done"] == attrs["rows"] == len(split.labels)
    assert attrs["source_fingerprint"] == cifar.SplitSource(cifar.resolve_source(cifar_root), "train").fingerprint
    assert attrs["dim"] == TINY_DIM
    for name in ("model", "image_size", "resize", "dataset", "split", "tool_version", "tensorflow_version",
                 "tensorflow_hub_version", "created"):
        assert name in attrs
    assert attrs["engine"] == engine and attrs["batch_size"] == 3


def test_up_to_date_cache_sends_no_image_through_the_model(tiny_model, cifar_root, tmp_path, monkeypatch):
    key = _key(tiny_model)
    first = pipeline.extract(key, "test", data_dir=cifar_root, cache_dir=tmp_path, engine="tensorflow", progress=False)
    before = first.path.stat().st_mtime_ns

    def no_model(*_):
        raise AssertionError("the model was loaded for an up-to-date cache")

    monkeypatch.setattr("featcache.extract.extractor.load_model", no_model)
    again = pipeline.extract(key, "test", data_dir=cifar_root, cache_dir=tmp_path, engine="tensorflow", progress=False)
    assert again.up_to_date and again.processed == 0 and "up to date" in again.summary()
    assert first.path.stat().st_mtime_ns == before


def test_other_settings_make_other_caches(tiny_model, cifar_root, tmp_path):
    paths = set()
    for kw in ({}, {"image_size": 40}, {"resize": "bicubic"}, {"limit": 9}, {"crop": "center"}):
        result = pipeline.extract(_key(tiny_model, **kw), "test", data_dir=cifar_root, cache_dir=tmp_path,
                                  engine="tensorflow", progress=False)
        assert not result.up_to_date
        paths.add(result.path)
    assert len(paths) == 5
    rows, attrs = _rows(_key(tiny_model, limit=9).path(tmp_path, "test"))
    assert len(rows["labels"]) == 9 and attrs["limit"] == 9


def test_cache_from_other_source_data_is_not_silently_reused(tiny_model, cifar_root, tmp_path):
    key = _key(tiny_model, limit=5)
    pipeline.extract(key, "test", data_dir=cifar_root, cache_dir=tmp_path, engine="tensorflow", progress=False)
    other = tmp_path / "other"
    from conftest import write_batches
    write_batches(other / "cifar-10-batches-py", seed=7)
    with pytest.raises(UserError, match="source changed since it was made.*force=True to rebuild"):
        pipeline.extract(key, "test", data_dir=other, cache_dir=tmp_path, engine="tensorflow", progress=False)
    rebuilt = pipeline.extract(key, "test", data_dir=other, cache_dir=tmp_path, engine="tensorflow",
                               progress=False, force=True)
    assert rebuilt.processed == 5


def _committed_rows(partial):
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f.attrs["rows_done"])
    except (OSError, KeyError):
        return -1


@pytest.mark.integration  # a whole process
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_cache(tiny_model, cifar_root, tmp_path):
    args = [sys.executable, str(ROOT / "extract.py"), "--split", "train", "--data-dir", str(cifar_root),
            "--model", str(tiny_model), "--image-size", "96", "--resize", "bilinear", "--chunk-size", "4",
            "--batch-size", "2", "--engine", "tensorflow", "--quiet"]
    reference = subprocess.run(args + ["--cache-dir", str(tmp_path / "ref")], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    ref_path = _key(tiny_model, image_size=96, resize="bilinear").path(tmp_path / "ref", "train")

    cache = tmp_path / "killed"
    path = _key(tiny_model, image_size=96, resize="bilinear").path(cache, "train")
    script = KILL_POINT + f"import runpy; runpy.run_path({args[1]!r}, run_name='__main__')"
    killed = subprocess.run([args[0], "-c", script, "write", "3", *args[2:], "--cache-dir", str(cache)],
                            capture_output=True)  # SIGKILLed as it commits its third chunk of 4 images
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = _committed_rows(layout.partial_path(path))
    assert committed == 8 and not path.exists()

    resumed = subprocess.run(args + ["--cache-dir", str(cache)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at row {committed}" in resumed.stdout
    assert f"{120 - committed} images" in resumed.stdout
    got, attrs = _rows(path)
    want, _ = _rows(ref_path)
    assert attrs["complete"]
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_prefetched_keeps_order_and_raises_the_readers_error_in_the_caller():
    assert list(shard.prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise UserError("batch file is damaged")

    got = []
    with pytest.raises(UserError, match="damaged"):
        for item in shard.prefetched(failing()):
            got.append(item)
    assert got == [1]


def test_prefetched_reader_thread_ends_when_the_consumer_stops_early():
    items = shard.prefetched(iter(range(1000)))
    for item in items:
        if item == 3:
            break  # as an extractor error would
    items.close()  # what leaving the loop does to the generator in extract
    assert not any(t.name.startswith("chunk-reader") for t in threading.enumerate())


@pytest.mark.integration  # a whole process
@pytest.mark.parametrize("signal_name, said", [("SIGTERM", "SIGTERM"), ("SIGINT", "Ctrl-C")])
def test_sigterm_stops_an_extraction_as_ctrl_c_does_and_the_rerun_resumes(tiny_model, cifar_root, tmp_path,
                                                                          signal_name, said):
    """SIGTERM (or Ctrl-C) as the third chunk is committed: that commit finishes (the writer waits for it), the
    process ends with one line, and the rerun resumes from the 12 committed rows."""
    import os

    args = [sys.executable, str(ROOT / "extract.py"), "--split", "train", "--data-dir", str(cifar_root),
            "--model", str(tiny_model), "--image-size", "32", "--chunk-size", "4", "--engine", "tensorflow",
            "--quiet", "--cache-dir", str(tmp_path)]
    script = KILL_POINT + f"import runpy; runpy.run_path({args[1]!r}, run_name='__main__')"
    stopped = subprocess.run([args[0], "-c", script, "write", "3", *args[2:]], capture_output=True, text=True,
                             env=dict(os.environ, KILL_SIGNAL=signal_name), timeout=300)
    path = _key(tiny_model, image_size=32, resize="bicubic").path(tmp_path, "train")
    assert stopped.returncode == 130 and stopped.stderr.strip().splitlines()[-1] == (
        f"Stopped ({said}): the rows committed so far are kept in {layout.partial_path(path)}; rerun the same command "
        "to resume"), stopped.stderr
    assert _committed_rows(layout.partial_path(path)) == 12  # the commit in flight finishes: the writer waits for it
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
