"""NaN/Inf and bit rot never reach a result: extract refuses them, train_head refuses them, loudly."""

import json
import shutil
from dataclasses import asdict, replace

import h5py
import numpy as np
import pytest

from featcache.extract import pipeline
from featcache.cache import layout, read, write
from featcache.cache.layout import CacheKey
from featcache.errors import UserError
from featcache.cache.read import Features
from featcache.head.training import train
from featcache.settings import HeadConfig
from featcache.head.records import ledger
from featcache.head.runs import run_experiment
from conftest import TINY_DIM, make_key, run_cli, run_dirs, save_tiny_model, synthetic_attrs, write_batches

COMMON = ["--image-size", "32", "--train-views", "plain", "--tta-views", "plain"]  # the views of the caches below


def _key(model):
    return make_key(str(model), 32, "bicubic", None)


@pytest.fixture(scope="module")
def caches(tiny_model, cifar_root, tmp_path_factory):
    """A valid plain-view train and test cache of the fixture data, made once (copy before changing)."""
    cache = tmp_path_factory.mktemp("valid_cache")
    for split in ("train", "test"):
        pipeline.extract(_key(tiny_model), split, data_dir=cifar_root, cache_dir=cache, views="plain",
                         engine="tensorflow", progress=False)
    return cache


def _train_head(tiny_model, cache, runs, *extra):
    return run_cli("train_head.py", "--model", tiny_model, *COMMON, "--cache-dir", cache, "--runs-dir", runs,
                   "--epochs", "1", *extra)


@pytest.mark.parametrize("split, value", [("train", np.nan), ("test", np.inf)])
def test_non_finite_value_in_a_cache_stops_train_head_without_a_run(tiny_model, caches, tmp_path, split, value):
    cache = tmp_path / "cache"
    shutil.copytree(caches, cache)
    path = _key(tiny_model).path(cache, split)
    with h5py.File(path, "r+") as f:
        f["embeddings"][3, 7] = value
    out = _train_head(tiny_model, cache, tmp_path / "runs")
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("Error: ") and str(path) in line and "1 NaN/Inf values" in line
    assert "first in row 3" in line and "--force" in line and "--verify" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _flip_a_byte_inside_a_chunk(path, dataset="embeddings"):
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_in_a_checksummed_cache_is_a_one_line_error(tiny_model, caches, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(caches, cache)
    path = _key(tiny_model).path(cache, "train")
    with h5py.File(path, "r") as f:
        assert f["embeddings"].fletcher32 and f["labels"].fletcher32
    _flip_a_byte_inside_a_chunk(path)
    out = _train_head(tiny_model, cache, tmp_path / "runs")
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "Fletcher-32 checksum" in line and str(path) in line and "--force" in line


def test_verify_reports_a_checksum_failure(tiny_model, caches, cifar_root, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(caches, cache)
    _flip_a_byte_inside_a_chunk(_key(tiny_model).path(cache, "test"))
    path, problems = pipeline.verify(_key(tiny_model), "test", data_dir=cifar_root, cache_dir=cache)
    assert any("fails its checksum" in p for p in problems), problems


def test_cache_without_checksums_stays_readable(tiny_model, cifar_root, tmp_path):
    """Caches written before checksums existed are read as they are."""
    path = tmp_path / "old" / "train.h5"
    attrs = dict(_key(tiny_model).attrs("train"), rows=5, source_fingerprint="f", engine="tensorflow",
                 class_names=json.dumps([str(i) for i in range(10)]))
    with write.locked(path), write.CacheWriter(path, attrs, 4, ("plain",), checksums=False) as writer:
        writer.write(0, {"plain": np.ones((5, 4), np.float32)}, np.arange(5))
        writer.finish()
    with h5py.File(path, "r") as f:
        assert not f["embeddings"].fletcher32
    views, labels, _ = read.read(path, attrs, ("plain",))
    assert views["plain"].shape == (5, 4) and labels.tolist() == [0, 1, 2, 3, 4]


def test_a_model_that_emits_nan_stops_extract_at_that_chunk_and_the_fixed_model_is_a_new_cache(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_batches(data)
    batch = data / "data_batch_1"
    import pickle

    content = pickle.loads(batch.read_bytes())
    content[b"data"][20] = 255  # train row 20 is all white: the faulty model gives NaN for it
    batch.write_bytes(pickle.dumps(content))
    model = save_tiny_model(tmp_path / "model", output="nan_if_white")
    key, cache = _key(model), tmp_path / "cache"
    with pytest.raises(UserError) as failure:
        pipeline.extract(key, "train", data_dir=data, cache_dir=cache, chunk_size=8, engine="tensorflow",
                         progress=False)
    message = str(failure.value)
    assert "train rows 16:24" in message and "first in row 20" in message and str(model) in message
    assert "16 committed rows are kept" in message and "\n" not in message
    path = key.path(cache, "train")
    assert not path.exists()
    with h5py.File(layout.partial_path(path), "r") as f:
        assert int(f.attrs["rows_done"]) == 16

    shutil.rmtree(model)
    save_tiny_model(model)  # the fixed model in the same folder: another model, by its contents
    with pytest.raises(UserError, match="holds other files here than where the job started"):
        pipeline.extract(key, "train", data_dir=data, cache_dir=cache, chunk_size=8, engine="tensorflow",
                         progress=False)  # the old key names the faulty model: its rows never mix with the fixed one's
    fixed = pipeline.extract(_key(model), "train", data_dir=data, cache_dir=cache, chunk_size=8, engine="tensorflow",
                             progress=False)
    assert fixed.path != path and fixed.processed == fixed.rows
    clean = pipeline.extract(_key(model), "train", data_dir=data, cache_dir=tmp_path / "clean", engine="tensorflow",
                             progress=False)
    with h5py.File(fixed.path, "r") as a, h5py.File(clean.path, "r") as b:
        assert a["embeddings"].shape == (fixed.rows, TINY_DIM)
        np.testing.assert_allclose(a["embeddings"][:], b["embeddings"][:], atol=1e-6, rtol=0)


def test_a_diverging_fit_records_no_run(tiny_model, caches, tmp_path):
    runs = tmp_path / "runs"
    config = HeadConfig(epochs=3, lr=1e30, train_views="plain", tta_views="plain", batch_size=16)
    with pytest.raises(UserError, match="training diverged: the loss became NaN/Inf"):
        run_experiment(_key(tiny_model), caches, runs, config)
    assert not runs.exists() or not any(runs.iterdir())
    run_dir, _ = run_experiment(_key(tiny_model), caches, runs, HeadConfig(epochs=1, train_views="plain", tta_views="plain"))
    assert run_dirs(runs) == [run_dir]  # the same call with a sane rate records its run


def test_lr_1e6_is_refused_by_the_cli_and_records_no_run(tiny_model, caches, tmp_path):
    out = _train_head(tiny_model, caches, tmp_path / "runs", "--lr", "1e6", "--epochs", "3")
    assert out.returncode == 2, out.stderr
    assert "training diverged" in out.stderr and "nothing was recorded" in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_finite_fit_far_worse_than_guessing_is_refused():
    """Finite but diverged: learnable data, a huge rate; the same data at a sane rate is accepted."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    x = rng.normal(size=(2000, 32)).astype(np.float32) + 3 * np.eye(10, 32, dtype=np.float32)[labels]
    features = Features({"plain": x}, labels, tuple("abcdefghij"))
    config = HeadConfig(epochs=3, lr=1e6, train_views="plain", tta_views="plain", batch_size=256)
    with pytest.raises(UserError, match=r"training cross-entropy ended at .* \(twice that of the untrained head"):
        train(features, None, config)
    sane = train(features, None, replace(config, lr=1e-2))  # accepted: it learns
    entropy = sane.history["cross_entropy"]
    assert entropy[-1] < entropy[0] and np.isfinite(sane.history["loss"]).all()


def test_ledger_never_offers_a_run_with_non_finite_metrics(tmp_path):
    """No run with NaN metrics is ever recorded; a record that holds them was damaged, and is skipped, said once."""
    for name, loss in (("good", 0.5), ("diverged", float("nan"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"test_accuracy": 0.1, "test_loss": loss}))
        head = {"epochs": 5, "hidden": 0, "l2": 1e-4, "lr": 1e-3, "solver": "adam", "train_views": "plain,flip", "tta_views": "plain,flip"}
        (tmp_path / name / "config.json").write_text(json.dumps({"head": head, "cache": asdict(CacheKey())}))
    warnings = []
    assert [row["run"] for row in ledger(tmp_path, warn=warnings.append)] == ["good"]
    assert warnings == ["warning: skipping run diverged: its record is damaged or half-written "
                        "(ValueError: its metrics are not finite numbers)"]


def test_a_torn_chunk_after_a_kill_does_not_block_the_resume(tmp_path):
    """A kill mid-write can leave the chunk holding `rows_done` with a wrong checksum; resuming rewrites it whole."""
    rows, dim = 600, 8
    path = tmp_path / "train.h5"
    attrs = synthetic_attrs(rows)
    values = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
    with write.locked(path), write.CacheWriter(path, attrs, dim, ("plain",)) as writer:
        writer.write(0, {"plain": values[:300]}, np.arange(300) % 10)
    partial = layout.partial_path(path)
    with h5py.File(partial, "r") as f:
        info = f["embeddings"].id.get_chunk_info(1)  # rows 256..511: 44 committed, the rest not
    with open(partial, "r+b") as fh:  # damage an uncommitted row of that chunk, as a torn write would
        fh.seek(info.byte_offset + 100 * dim * 4)
        fh.write(b"\x12\x34" * 8)  # not 0xff: Fletcher-32 cannot tell 0xffff from 0
    with h5py.File(partial, "r") as f, pytest.raises(OSError):
        f["embeddings"][256:300]
    with write.locked(path), write.CacheWriter(path, attrs, dim, ("plain",)) as writer:
        assert writer.resumed and writer.rows_done == 300
        for lo in range(300, rows, 77):
            writer.write(lo, {"plain": values[lo : lo + 77]}, np.arange(lo, min(lo + 77, rows)) % 10)
        writer.finish()
    views, labels, _ = read.read(path, attrs, ("plain",))
    np.testing.assert_array_equal(views["plain"], values)
    np.testing.assert_array_equal(labels, np.arange(rows) % 10)
