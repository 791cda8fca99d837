import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_cli, run_dirs


@pytest.fixture(scope="module")
def extracted(tiny_model, cifar_archive, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    common = ["--data-dir", cifar_archive, "--model", tiny_model, "--image-size", "48", "--cache-dir", cache,
              "--engine", "tensorflow"]
    done = run_cli("extract.py", *common, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("done: ") == 2 and "images/s" in done.stdout
    return cache, common


def test_rerun_reports_up_to_date(extracted):
    again = run_cli("extract.py", *extracted[1], "--split", "test", "--quiet")
    assert again.returncode == 0 and "up to date" in again.stdout and "0 images processed" in again.stdout


def test_train_head_records_a_run(extracted, tiny_model, tmp_path):
    cache, _ = extracted
    runs = tmp_path / "runs"
    out = run_cli("train_head.py", "--model", tiny_model, "--image-size", "48", "--cache-dir", cache,
                  "--runs-dir", runs, "--epochs", "2", "--val-split", "0.2", "--seed", "5")
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout and "val accuracy" in out.stdout
    (run_dir,) = run_dirs(runs)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("test_accuracy", "test_loss", "fit_seconds", "epochs", "rows", "val_accuracy"):
        assert name in metrics
    config = json.loads((run_dir / "config.json").read_text())
    labels = next(Path(config["test_cache"]["path"]).parent.glob("test.h5"))
    with h5py.File(labels, "r") as f:
        truth = f["labels"][:]
    assert metrics["epochs"] == 2
    assert metrics["test_accuracy"] == np.mean(np.load(run_dir / "test_probs.npy").argmax(1) == truth)
    assert config["head"]["seed"] == 5 and config["cache"]["image_size"] == 48
    assert (run_dir / "head.keras").stat().st_size > 0 and (run_dir / "test_probs.npy").exists()


@pytest.mark.parametrize("args, message", [
    (["--split", "validation"], "Invalid value for '--split'"),
    (["--chunk-size", "0"], "Invalid value for '--chunk-size'"),
    (["--batch-size", "-3"], "Invalid value for '--batch-size'"),
    (["--limit", "ten"], "Invalid value for '--limit'"),
    (["--data-dir", "/nonexistent/cifar"], "Error: data path /nonexistent/cifar does not exist"),
    (["--image-size", "0"], "Invalid value for '--image-size'"),
    (["--chunk-size", "-1"], "Invalid value for '--chunk-size'"),
    (["--batch-size", "x"], "Invalid value for '--batch-size'"),
    (["--limit", "0"], "Invalid value for '--limit'"),
    (["--engine", "cuda"], "Invalid value for '--engine'"),
])
def test_extract_bad_input_exits_2_with_one_line(args, message):
    out = run_cli("extract.py", *args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr + out.stdout


def test_extract_unreachable_model_names_offline_options(cifar_root, tmp_path):
    out = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", "https://hub.invalid/m/1",
                  "--cache-dir", tmp_path, env={"TFHUB_CACHE_DIR": str(tmp_path / "empty_hub")})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "TFHUB_CACHE_DIR" in out.stderr and "--model PATH" in out.stderr
    missing = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", tmp_path / "nothing",
                      "--cache-dir", tmp_path)
    assert missing.returncode == 2 and missing.stderr == (f"Error: model folder {tmp_path / 'nothing'} does not exist "
                                                          "(--model takes a TF Hub URL or a SavedModel folder)\n")


def test_train_head_without_cache_names_the_extract_command(tmp_path):
    out = run_cli("train_head.py", "--cache-dir", tmp_path, "--runs-dir", tmp_path / "runs")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no train cache" in out.stderr and "python extract.py --split all" in out.stderr  # neither split exists
    assert len(out.stderr.strip().splitlines()) == 1


def test_train_head_with_only_train_cache_names_test_extract(extracted, tiny_model, tmp_path):
    cache, _ = extracted
    test_file = next(cache.rglob("test.h5"))
    hidden = test_file.with_name("test.h5.bak")
    test_file.rename(hidden)
    try:
        out = run_cli("train_head.py", "--model", tiny_model, "--image-size", "48", "--cache-dir", cache,
                      "--runs-dir", tmp_path)
    finally:
        hidden.rename(test_file)
    assert out.returncode == 2 and "no test cache" in out.stderr and "--split test" in out.stderr


def test_train_head_refuses_incomplete_cache(extracted, tiny_model, tmp_path):
    import h5py
    cache, _ = extracted
    test_file = next(cache.rglob("test.h5"))
    backup = test_file.read_bytes()
    try:
        with h5py.File(test_file, "r+") as f:
            f.attrs.modify("complete", False)
        out = run_cli("train_head.py", "--model", tiny_model, "--image-size", "48", "--cache-dir", cache,
                      "--runs-dir", tmp_path)
    finally:
        test_file.write_bytes(backup)
    assert out.returncode == 2 and "incomplete" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be a whole number in [1, 2147483647], got 0"),
    (["--val-split", "1.5"], "--val-split must be in [0, 1)"),
])
def test_train_head_bad_options(extracted, tiny_model, tmp_path, args, message):
    cache, _ = extracted
    out = run_cli("train_head.py", "--model", tiny_model, "--image-size", "48", "--cache-dir", cache,
                  "--runs-dir", tmp_path, *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_train_head_sweep_and_list(extracted, tiny_model, tmp_path):
    cache, _ = extracted
    runs = tmp_path / "runs"
    common = ["--model", tiny_model, "--image-size", "48", "--cache-dir", cache, "--runs-dir", runs]
    out = run_cli("train_head.py", *common, "--epochs", "1", "--sweep", "l2", "--val-split", "0.25")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("val accuracy") >= 8 and "best l2" in out.stdout and "test accuracy" in out.stdout
    (run_dir,) = run_dirs(runs)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["sweep"]) == 7 and "val_loss" in metrics
    config = json.loads((run_dir / "config.json").read_text())
    assert config["head"]["l2"] in [row["l2"] for row in metrics["sweep"]] and config["head"]["val_split"] == 0.0
    assert (run_dir / "curves.png").stat().st_size > 1000 and (run_dir / "confusion.png").stat().st_size > 1000
    listed = run_cli("train_head.py", "--runs-dir", runs, "--list")
    assert listed.returncode == 0 and run_dir.name in listed.stdout and listed.stdout.startswith("run ")


def test_a_grid_records_every_combination_and_prints_them_by_validation_accuracy(extracted, tiny_model, tmp_path):
    cache, _ = extracted
    runs = tmp_path / "runs"
    out = run_cli("train_head.py", "--model", tiny_model, "--image-size", "48", "--cache-dir", cache,
                  "--runs-dir", runs, "--epochs", "1", "--val-split", "0.2",
                  "--grid", "hidden=0,8", "--grid", "lr=1e-3,1e-2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    header = lines.index(next(line for line in lines if line.split()[:2] == ["hidden", "lr"]))
    table = [line.split() for line in lines[header + 1 : header + 5]]
    assert sorted((row[0], row[1]) for row in table) == [("0", "0.001"), ("0", "0.01"), ("8", "0.001"), ("8", "0.01")]
    val = [float(row[2]) for row in table]
    assert val == sorted(val, reverse=True)
    assert len(run_dirs(runs)) == 4 and "4 runs recorded" in lines[-1]
    conflict = run_cli("train_head.py", "--sweep", "l2", "--grid", "lr=1e-3")
    assert conflict.returncode == 2 and "use one of --sweep and --grid" in conflict.stderr


@pytest.mark.parametrize("grid, message", [
    ("hidden=abc", "Error: --grid: hidden must be a whole number, got 'abc'"),
    ("lr=1e-3,x", "Error: --grid: lr must be a number, got 'x'"),
    ("hidden=-1", "Error: --grid: hidden must be a whole number in [0, 2147483647], got -1"),
])
def test_a_bad_grid_value_is_one_line_naming_the_option_and_the_value(extracted, tiny_model, tmp_path, grid,
                                                                       message):
    cache, _ = extracted
    out = run_cli("train_head.py", "--model", tiny_model, "--image-size", "48", "--cache-dir", cache,
                  "--runs-dir", tmp_path, "--grid", grid)
    assert out.returncode == 2 and out.stderr.splitlines() == [message], out.stderr
    if "abc" in grid:  # refused before any cache is looked for
        out = run_cli("train_head.py", "--cache-dir", tmp_path / "none", "--grid", grid)
        assert out.returncode == 2 and out.stderr.splitlines() == [message], out.stderr


def test_one_of_anything_is_said_in_the_singular(extracted, tiny_model, tmp_path):
    cache, _ = extracted
    common = ["--model", tiny_model, "--image-size", "48", "--cache-dir", cache]
    out = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "grid", "--epochs", "1", "--grid", "lr=1e-3")
    assert out.returncode == 0 and out.stdout.splitlines()[-1].startswith("1 run recorded in "), out.stdout
    out = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "one", "--epochs", "1")
    assert out.returncode == 0 and ", 1 epoch of batch " in out.stdout, out.stdout
    for events in (tmp_path / "one").rglob("events.out.tfevents.*"):
        events.unlink()
    out = run_cli("train_head.py", "--runs-dir", tmp_path / "one", "--backfill-events")
    assert out.returncode == 0 and "written for 1 of 1 run;" in out.stdout, out.stdout


def test_train_head_says_it_reads_a_large_cache_before_it_does(extracted, tiny_model, tmp_path, monkeypatch):
    from featcache.head import runs

    cache, _ = extracted
    monkeypatch.setattr(runs, "ANNOUNCED_BYTES", 1000)  # the tiny caches count as large
    common = ["--model", tiny_model, "--image-size", "48", "--cache-dir", cache, "--runs-dir", tmp_path,
              "--epochs", "1"]
    out = run_cli("train_head.py", *common)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("reading the train and test caches in ") and first.endswith(" GB) ..."), out.stdout
    quiet = run_cli("train_head.py", *common, "--quiet")
    assert quiet.returncode == 0 and "reading" not in quiet.stdout
    monkeypatch.setattr(runs, "ANNOUNCED_BYTES", 10**12)
    assert "reading" not in run_cli("train_head.py", *common).stdout  # small: read in a moment, no line


def test_extract_list_and_a_missing_cache_name_the_caches_present(extracted, tiny_model, tmp_path):
    cache, _ = extracted
    listed = run_cli("extract.py", "--list", "--cache-dir", cache)
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if "--image-size 48" in line]
    assert f"--model {tiny_model}" in line and "train 120 rows complete" in line and "test 40 rows complete" in line
    missing = run_cli("train_head.py", "--model", tiny_model, "--image-size", "48", "--limit", "5",
                      "--cache-dir", cache, "--runs-dir", tmp_path / "runs")
    assert missing.returncode == 2
    (error,) = missing.stderr.strip().splitlines()
    assert "--limit 5" in error and "Caches present" in error and "--image-size 48: " in error
    empty = run_cli("extract.py", "--list", "--cache-dir", tmp_path / "none")
    assert empty.stdout.strip() == f"no caches in {tmp_path / 'none'}"


def test_extract_list_names_damaged_and_unreadable_cache_files(extracted, tmp_path):
    import shutil

    import h5py

    from featcache.cli import list_caches_lines

    cache, _ = extracted
    shutil.copytree(cache, tmp_path / "cache")
    (train,) = [p for p in (tmp_path / "cache").rglob("train.h5") if "48px" in str(p)]
    (test,) = [p for p in (tmp_path / "cache").rglob("test.h5") if "48px" in str(p)]
    with h5py.File(test, "r+") as f:
        del f.attrs["views"]
    train.write_bytes(train.read_bytes()[:4000])
    lines = list_caches_lines(tmp_path / "cache")
    (line,) = [line for line in lines if "--image-size 48" in line]
    assert re.search(r"test 40 rows damaged \(its views attribute is missing or not a list of known views\) "
                     r"[1-9]\d* kB, views none$", line), line  # a small cache's size is not "0 MB"
    assert f"{train}: not a readable featcache file (4 kB)" in lines


def test_a_size_reads_in_the_unit_that_suits_it():
    from featcache.cache.read import size_label

    assert [size_label(mb) for mb in (0.0004, 0.0451, 0.9996, 3.21, 412.4, 1600)] == [
        "400 bytes", "45 kB", "1000 kB", "3.2 MB", "412 MB", "1.6 GB"]


def test_train_head_prints_its_progress_per_epoch_and_quiet_silences_it(extracted, tiny_model, tmp_path):
    cache, _ = extracted
    common = ["--model", tiny_model, "--image-size", "48", "--cache-dir", cache, "--runs-dir", tmp_path / "runs",
              "--epochs", "2"]
    out = run_cli("train_head.py", *common)
    assert out.returncode == 0, out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines()[:2]] == ["epoch 1/2", "epoch 2/2"]
    assert "loss " in out.stdout.splitlines()[0]
    quiet = run_cli("train_head.py", *common, "--quiet")
    assert quiet.returncode == 0 and "epoch 1/2" not in quiet.stdout
    assert quiet.stdout.splitlines()[-1].startswith("test accuracy")
    grid = run_cli("train_head.py", *common, "--grid", "hidden=0,8")
    assert grid.returncode == 0 and "run 2/2: epoch 2/2: loss " in grid.stdout


@pytest.mark.parametrize("args, kept", [
    ([], "the run in progress was not recorded"),
    (["--grid", "lr=1e-3,1e-2"], "the run in progress was not recorded (those finished before it were)"),
])
def test_ctrl_c_during_a_fit_stops_between_steps_with_one_line_and_exit_130(extracted, tiny_model, tmp_path,
                                                                          monkeypatch, args, kept):
    """Ctrl-C (here raised where Python gets control between two steps of the fit) ends train_head.py as it ends
    extract.py: one line, exit code 130, no run folder left behind."""
    from featcache.head import fit

    cache, _ = extracted
    calls, original = [], fit.Fitter.run_steps

    def interrupted(self, *args):
        calls.append(args[:3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(fit, "WORK_PER_CALL", 1.0)  # a step per call, as a wide hidden layer gets
    monkeypatch.setattr(fit.Fitter, "run_steps", interrupted)
    runs = tmp_path / "runs"
    out = run_cli("train_head.py", "--model", tiny_model, "--image-size", "48", "--cache-dir", cache,
                  "--runs-dir", runs, "--hidden", "8", "--epochs", "3", *args)
    assert out.returncode == 130, out.stderr
    assert out.stderr == f"Stopped (Ctrl-C): {kept}\n"
    assert calls == [(0, 0, 1), (0, 1, 2), (0, 2, 3)]
    assert not list(runs.glob("*/*"))


@pytest.mark.parametrize("script, patched", [
    ("extract.py", "featcache.selection.select"),  # Ctrl-C while the cache key is resolved (the model loaded)
    ("train_head.py", "featcache.selection.select_cached"),
    ("predict.py", "resolve_run"),
    ("export.py", "resolve_run"),
])
def test_ctrl_c_at_any_moment_of_any_cli_is_one_line_and_exit_130(monkeypatch, tmp_path, script, patched):
    import conftest

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    if patched.startswith("featcache."):
        monkeypatch.setattr(patched, interrupt)
    else:
        monkeypatch.setattr(conftest._script_module(script), patched, interrupt)
    tmp_path.joinpath("a.png").write_bytes(b"")
    args = {"predict.py": [tmp_path / "a.png"], "export.py": [tmp_path / "out"]}.get(script, [])
    out = run_cli(script, *args, "--runs-dir" if script in ("predict.py", "export.py") else "--cache-dir", tmp_path)
    assert (out.returncode, out.stderr, out.stdout) == (130, "Stopped (Ctrl-C)\n", "")


def test_extract_all_loads_the_model_once_and_says_what_its_first_seconds_do(tiny_model, cifar_root, tmp_path,
                                                                             monkeypatch):
    import tensorflow_hub as hub

    from featcache.extract import extractor

    builds, original = [], extractor.ExtractorSettings.build
    loads, load = [], hub.load
    monkeypatch.setattr(hub, "load", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs))

    def counted(self, *args, **kwargs):
        builds.append(self.views)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(extractor.ExtractorSettings, "build", counted)
    common = ["--data-dir", cifar_root, "--model", tiny_model, "--cache-dir", tmp_path / "cache", "--engine",
              "tensorflow", "--limit", "30"]
    out = run_cli("extract.py", *common)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("done: ") == 2 and builds == [("plain", "flip")]  # one load serves both splits
    said = [line for line in out.stderr.splitlines() if line.startswith("loading model")]
    assert said == [f"loading model {tiny_model} to learn its input size ...", f"loading model {tiny_model} ..."]
    assert len(loads) == 1  # the model loaded to learn its size is the one that extracts
    quiet = run_cli("extract.py", *common, "--cache-dir", tmp_path / "other", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and len(builds) == 2


def test_a_suggested_extract_command_selects_the_same_cache_with_the_data_folder_given(cifar_root, tmp_path):
    """A CIFAR copy is not part of the cache key, yet the command must read the same one (no download)."""
    out = run_cli("train_head.py", "--data-dir", cifar_root, "--limit", "7", "--cache-dir", tmp_path / "cache",
                  "--runs-dir", tmp_path / "runs")
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert (f"run: python extract.py --split all --data-dir {cifar_root} --limit 7 --cache-dir {tmp_path / 'cache'}"
            in line), line


def test_the_grid_runs_the_possible_combinations_and_names_those_it_skips(extracted, tiny_model, tmp_path):
    cache, _ = extracted
    common = ["--model", tiny_model, "--image-size", "48", "--cache-dir", cache, "--epochs", "1"]
    out = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs", "--val-split", "0.2",
                  "--grid", "solver=adam,lbfgs", "--grid", "hidden=0,8")
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["note: --grid skips 1 of 4 combinations, which no head can take: "
                                       "solver=lbfgs hidden=8 (--solver lbfgs fits a linear head: it takes no "
                                       "--hidden, --dropout or --label-smoothing)"]
    assert len(run_dirs(tmp_path / "runs")) == 3 and "3 runs recorded" in out.stdout.splitlines()[-1]
    table = out.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:2] == ["solver", "hidden"])
    assert sorted(tuple(line.split()[:2]) for line in table[header + 1 : header + 4]) == [
        ("adam", "0"), ("adam", "8"), ("lbfgs", "0")]
    none = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "none", "--hidden", "8", "--grid",
                   "solver=lbfgs", "--grid", "lr=0.1,0.2")
    assert none.returncode == 2 and none.stderr.splitlines() == [
        "Error: --grid: no combination can be trained: --solver lbfgs fits a linear head: it takes no --hidden, "
        "--dropout or --label-smoothing"], none.stderr
    assert not (tmp_path / "none").exists()


def test_an_unreadable_image_under_strict_is_one_line_without_nested_parentheses(tiny_model, tmp_path):
    import io

    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    data = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data, "BMP")
    (tmp_path / "data" / "cat" / "short.bmp").write_bytes(data.getvalue()[:-10])  # its decoder's message: (...)
    out = run_cli("extract.py", "--dataset", "folder", "--data-dir", tmp_path / "data", "--model", tiny_model,
                  "--image-size", "16", "--cache-dir", tmp_path / "cache", "--engine", "tensorflow", "--strict",
                  "--quiet")
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert re.fullmatch(r"Error: cannot read \S+short\.bmp: not a decodable image: [^()]*\([^()]*\)[^()]*; --strict "
                        r"stops at the first unreadable image", line), line


def test_list_and_verify_together_are_refused_in_one_line(tmp_path):
    out = run_cli("extract.py", "--list", "--verify", "--cache-dir", tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "Error: --list shows what the caches' attributes say, --verify reads their data: pass one")
