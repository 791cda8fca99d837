"""Every script in bench/ runs on the fixtures' tiny model and a few images, and prints its table: a benchmark
that nothing runs stops working unnoticed. The figures themselves are not checked (they are timings); the
tables' shape and the values that do not depend on speed are."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner

from featcache import api
from featcache.extract import ov_engine
from featcache.settings import DEFAULT_MODEL
from conftest import save_tiny_model


def bench(name: str, *args, env=None) -> str:
    """Run bench/<name>.py's click command in this process; its stdout (it must exit 0)."""
    module = importlib.import_module(f"bench.{name}")
    with mock.patch.dict(os.environ, env or {}):
        result = CliRunner().invoke(module.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def table_rows(out: str) -> list[list[str]]:
    """The Markdown table's body rows, as cells."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.fixture(scope="module")
def default_caches(cifar_root, tmp_path_factory) -> tuple[Path, dict]:
    """(cache folder, env): full caches of the fixture's CIFAR-10 under the default settings, the default TF Hub
    handle resolved (through TFHUB_CACHE_DIR in env) to the tiny model, as the benches that read the default
    caches expect them."""
    base = tmp_path_factory.mktemp("default_caches")
    save_tiny_model(base / "hub" / hashlib.sha1(DEFAULT_MODEL.encode()).hexdigest())
    env = {"TFHUB_CACHE_DIR": str(base / "hub"), "CIFAR10_DATA_DIR": str(cifar_root)}
    with mock.patch.dict(os.environ, env):
        for split in ("train", "test"):
            api.extract(split, cache_dir=base / "cache", engine="tensorflow", progress=False, log=lambda *_: None)
    return base / "cache", env


def test_cache_checks():
    out = bench("cache_checks", "--rows", 300, "--repeats", 1)
    assert "300 rows x 1280 x 2 views (3 MB), median of 1 writes and 3 reads:" in out
    assert re.search(r"write without checksums +[\d.]+ s +with Fletcher-32", out)
    assert "NaN/Inf check of both views" in out


def test_extract_speed_reports_each_method_and_a_failing_one_in_its_row(tiny_model, cifar_root, tmp_path):
    methods = ["tensorflow", "bogus"] + (["openvino", "openvino-int8"] if ov_engine.available() else [])
    with mock.patch.dict("bench.extract_speed.METHODS", bogus="a method whose worker fails"):
        out = bench("extract_speed", "--images", 6, "--reps", 1, "--model", tiny_model, "--data-dir", cifar_root,
                    "--methods", ",".join(methods), "--cache-dir", tmp_path)
    rows = {row[0]: row for row in table_rows(out)}
    assert len(rows) == len(methods)
    assert rows["a method whose worker fails"][1].startswith("failed: ")
    tensorflow = rows["featcache --engine tensorflow (in-graph bicubic resize, batch 16)"]
    assert float(tensorflow[1]) > 0 and tensorflow[6] == "0"  # its own vectors: no difference
    if ov_engine.available():
        f32 = next(row for name, row in rows.items() if name.startswith("featcache --engine openvino"))
        int8 = next(row for name, row in rows.items() if name.startswith("featcache --precision int8"))
        assert f32[7] == "0 / 0.0000" and float(int8[1]) > 0  # int8 calibrates for the images' size and runs
        assert int8[8].startswith("- (no full caches")


def test_head_speed(default_caches):
    cache, _ = default_caches
    out = bench("head_speed", "--runs", 1, "--cache-dir", cache, "--setting", "epochs=2")
    test_accuracy = api.run_head(cache_dir=cache, epochs=2).metrics["test_accuracy"]
    assert f"test {test_accuracy:.4f}" in out  # the child's fit is the one train_head.py makes
    assert "settings {'epochs': 2}; medians of 1 runs:" in out


def test_grid_bound(default_caches):
    cache, _ = default_caches
    out = bench("grid_bound", "--rounds", 1, "--cache-dir", cache, "--", "--epochs", "2")
    assert re.search(r"wall [\d.]+ s, bound [\d.]+ s \((met|MISSED)\); import [\d.]+ s, 4 fits", out)
    assert re.search(r"met [01]/1; rest \(wall - import - fits\) -?[\d.]+ s", out.splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("PIL") is None,
                    reason="needs the optional Ray runner (requirements-ray.txt) and Pillow")
def test_shard_speed(tiny_model, tmp_path):
    out = bench("shard_speed", "--tree", tmp_path / "photos", "--images", 16, "--width", 64, "--height", 48,
                "--port", 6491, "--chunk-size", 4, "--model", tiny_model, "--image-size", 32, "--assembly-gb", 0.01)
    rows = {row[0]: row for row in table_rows(out)}
    assert set(rows) == {"local", "ray, 1 worker", "ray, 2 workers"}, out
    assert rows["ray, 1 worker"][6] == rows["ray, 2 workers"][6] == "True"  # the same cache as the local runner's
    assert all(float(row[1]) > 0 for row in rows.values())
    assert re.search(r"assembly: [\d.]+ GB in 4 shards joined at [\d.]+ GB/s", out)


def test_deploy_check(small_run, cifar_root):
    base, run_dir = small_run
    pytest.importorskip("onnxruntime", reason="needs requirements-deploy.txt")
    out = bench("deploy_check", "--run", run_dir.name, "--runs-dir", base / "runs", "--data-dir", cifar_root,
                "--images", 8, "--timed", 4, "--passes", 1)
    rows = {row[0]: row for row in table_rows(out)}
    assert set(rows) == {"predict.py (TensorFlow)", "litert f32", "litert int8", "onnx f32"}
    assert float(rows["litert int8"][1]) > 0 and 0 <= float(rows["litert int8"][4]) <= 1  # MB, test accuracy
    for name in ("litert f32", "onnx f32"):
        assert rows[name][2] == "100.0000%"  # top-1 agrees with predict.py on every image
        assert float(rows[name][3]) < 1e-4  # probabilities



def test_deploy_check_on_photos_of_other_sizes(tiny_model, small_run, cifar_root, tmp_path):
    """Photos of several sizes: the f32 files at their default size agree with predict.py on a run with the
    default test-time views."""
    base, _ = small_run
    pytest.importorskip("onnxruntime", reason="needs requirements-deploy.txt")
    from conftest import run_cli, run_dirs

    runs = tmp_path / "runs"
    done = run_cli("train_head.py", "--model", tiny_model, "--image-size", "40", "--cache-dir", base / "cache",
                   "--runs-dir", runs, "--epochs", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_dirs(runs)
    out = bench("deploy_check", "--run", run_dir.name, "--runs-dir", runs, "--data-dir", cifar_root, "--images", 6,
                "--photo-sizes", "50x40,640x480,1000x300")
    assert "as photos of 50x40,640x480,1000x300" in out
    rows = {row[0]: row for row in table_rows(out)}
    for name in ("litert f32", "onnx f32"):
        assert rows[name][2] == "100.0000%" and float(rows[name][3]) < 1e-4 and rows[name][5] == "-"


def test_predict_check(small_run, cifar_root):
    base, run_dir = small_run
    out = bench("predict_check", "--run", run_dir.name, "--runs-dir", base / "runs", "--data-dir", cifar_root,
                "--images", 5)
    assert "predict.py vs the run's recorded predictions: top-1 agrees on 5/5" in out
    assert "exported SavedModel (fresh Python, TensorFlow only): top-1 same as predict.py on 5/5" in out


def test_folder_tree_writes_cifar_as_folders_and_compares_their_caches(tiny_model, cifar_root, tmp_path):
    tree = tmp_path / "tree"
    out = bench("folder_tree", "write", tree, "--data-dir", cifar_root)
    assert "train: 120 png files" in out and "test: 40 png files" in out
    common = dict(cache_dir=tmp_path / "cache", model=tiny_model, image_size=40, engine="tensorflow",
                  progress=False, log=lambda *_: None)
    folder = api.extract("test", dataset="folder", data_dir=tree, **common).path
    pickled = api.extract("test", data_dir=cifar_root, **common).path
    out = bench("folder_tree", "compare", "--folder-cache", folder, "--pickle-cache", pickled)
    assert "40 folder rows, 40 pickle rows" in out and "labels agree: True" in out
    diffs = [float(v) for v in re.findall(r"max abs diff (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5  # PNG is lossless: the same pixels, the same vectors


def test_events_cost_times_both_records(default_caches):
    cache, env = default_caches
    out = bench("events_cost", "--repeats", 1, "--cache-dir", cache, "--setting", "epochs=2", env=env)
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["first in its process (train_head.py)", "second (a --grid's later runs)"]
    assert all(0 < float(row[1]) < float(row[2]) for row in rows)


def test_formats_check_writes_three_trees_whose_caches_agree(tiny_model, cifar_root, tmp_path):
    out = bench("formats_check", "--data-dir", cifar_root, "--out", tmp_path, "--train", 120, "--test", 40,
                "--model", tiny_model, "--image-size", 40, "--epochs", 2)
    assert "test: 40 images as PNG class folders, 4 tars, 2 Parquet files" in out
    rows = table_rows(out)
    assert [row[:2] for row in rows] == [["train", "folder vs webdataset"], ["train", "folder vs parquet"],
                                         ["test", "folder vs webdataset"], ["test", "folder vs parquet"]]
    assert all(row[2] in ("120 / 120", "40 / 40") and row[3] == "True" and row[4].startswith("2 of 2") for row in rows)
    assert "same: True" in out


@pytest.mark.parametrize("dataset", ["folder", "webdataset"])
def test_source_speed_times_the_index_the_source_and_the_extraction_s_wait(tiny_model, tmp_path, dataset):
    from test_formats import write_three_ways

    root = write_three_ways(tmp_path, train=6, test=5)[dataset]
    out = bench("source_speed", "--dataset", dataset, "--data-dir", root, "--model", tiny_model, "--image-size", 32,
                "--engine", "tensorflow")
    assert f"{dataset} test split of {root}: 5 items, 5 images read" in out
    assert [row[0].split(" (")[0] for row in table_rows(out)] == [
        "reader opened", "data-folder stamp", "source alone, pass 1", "source alone, pass 2", "extraction, tensorflow",
        "of which waiting for chunks"]


def test_features_memory_prints_each_stage():
    out = bench("features_memory", "--rows", 300, "--dims", "16,64", "--views", 2)
    assert "300 rows x 80 values (16+64) x 2 views:" in out
    assert [row[0] for row in table_rows(out)] == ["before", "loaded", "joined side by side", "training rows made"]


def test_head_ensemble_holds_out_the_split_train_head_makes(default_caches, tmp_path):
    cache, _ = default_caches
    probs = tmp_path / "probs.npz"
    args = ["--cache-dir", cache, "--val-split", 0.25, "--split-seed", 3, "--member", "epochs=2 seed=3",
            "--member", "epochs=2 seed=4 l2=0.01", "--ensemble", "0+1", "--probs", probs]
    out = bench("head_ensemble", *args)
    rows = {row[0]: row for row in table_rows(out)}
    assert list(rows) == ["member 0: epochs=2 seed=3", "member 1: epochs=2 seed=4 l2=0.01", "mean of 0+1"]
    assert all(row[5] == "-" for row in rows.values())  # no test figure unless asked
    assert rows["member 0: epochs=2 seed=3"][3] == "0 / 0"
    assert "30 validation images (--val-split 0.25, --split-seed 3)" in out
    run = api.run_head(cache_dir=cache, epochs=2, seed=3, val_split=0.25)  # the run train_head.py makes
    assert rows["member 0: epochs=2 seed=3"][1] == f"{run.metrics['val_accuracy']:.4f}"
    again = bench("head_ensemble", *args, "--test", "0+1")  # read back from --probs, not trained again
    assert "member 0 (" not in again
    test = {row[0]: row for row in table_rows(again)}["mean of 0+1"]
    assert test[:5] == rows["mean of 0+1"][:5] and 0 <= float(test[5]) <= 1
    folds = bench("head_ensemble", "--cache-dir", cache, "--folds", 3, "--member", "epochs=2")
    assert "3 folds covering all 120 train images" in folds


def test_head_ensemble_refuses_a_member_setting_the_split(default_caches):
    cache, _ = default_caches
    module = importlib.import_module("bench.head_ensemble")
    result = CliRunner().invoke(module.main, ["--cache-dir", str(cache), "--member", "val_split=0.2"])
    assert result.exit_code == 2 and "the split is the script's" in result.output
