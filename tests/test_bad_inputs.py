"""Bad input never gives a traceback or a cache that looks complete, and never harms a good cache."""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile

import h5py
import numpy as np
import pytest

from featcache.cache import layout

from conftest import ROOT, make_key, run_cli, save_tiny_model


@pytest.fixture(scope="module")
def good(tiny_model, cifar_root, tmp_path_factory):
    """A complete test-split cache made by the CLI, and the options that select it."""
    cache = tmp_path_factory.mktemp("good_cache")
    opts = ["--data-dir", cifar_root, "--model", tiny_model, "--image-size", "40", "--cache-dir", cache,
            "--engine", "tensorflow", "--quiet"]
    for split in ("train", "test"):
        done = run_cli("extract.py", "--split", split, *opts)
        assert done.returncode == 0, done.stderr
    (path,) = cache.rglob("test.h5")
    return path, opts


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fails_cleanly(out, *fragments, code=2):
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr


def _damaged_copy(good, tmp_path, damage):
    """A copy of the good cache folder with test.h5 damaged; returns (path, options for it)."""
    path, opts = good
    cache = tmp_path / "cache"
    shutil.copytree(path.parents[3], cache)
    (copy,) = cache.rglob("test.h5")
    damage(copy)
    new_opts = list(opts)
    new_opts[new_opts.index("--cache-dir") + 1] = cache
    return copy, new_opts


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _corrupt_superblock(path):
    with open(path, "r+b") as fh:
        fh.write(b"\x00" * 64)


def _other_tool(path):
    path.unlink()
    with h5py.File(path, "w") as f:
        f["embeddings"] = [[0.0]]
        f.attrs["creator"] = "someone else"


def _other_settings(path):
    with h5py.File(path, "r+") as f:
        f.attrs["image_size"] = 999


DAMAGES = {"truncated": (_truncate, "not a readable HDF5 file"),
           "corrupted": (_corrupt_superblock, "not a readable HDF5 file"),
           "other tool": (_other_tool, "not made by featcache"),
           "other settings": (_other_settings, "made with other image_size")}


@pytest.mark.parametrize("case", DAMAGES)
def test_extract_reports_a_bad_cache_and_offers_force(good, tmp_path, case):
    damage, message = DAMAGES[case]
    copy, opts = _damaged_copy(good, tmp_path, damage)
    before = _digest(copy)
    out = run_cli("extract.py", "--split", "test", *opts)
    _fails_cleanly(out, message, "--force")
    assert _digest(copy) == before
    rebuilt = run_cli("extract.py", "--split", "test", *opts, "--force")
    assert rebuilt.returncode == 0 and "done: " in rebuilt.stdout


@pytest.mark.parametrize("case", DAMAGES)
def test_train_head_refuses_a_bad_cache(good, tmp_path, case):
    damage, message = DAMAGES[case]
    copy, opts = _damaged_copy(good, tmp_path, damage)
    cache = opts[opts.index("--cache-dir") + 1]
    out = run_cli("train_head.py", "--model", opts[opts.index("--model") + 1], "--image-size", "40",
                  "--cache-dir", cache, "--runs-dir", tmp_path / "runs")
    _fails_cleanly(out, "test cache", message)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _drop(name):
    def damage(f):
        del f[name]
    return damage


def _replace(name, make):
    """Replace dataset `name` with make(rows)."""
    def damage(f):
        rows = int(f.attrs["rows"])
        del f[name]
        f[name] = make(rows)
    return damage


def _set_attr(name, value):
    def damage(f):
        if value is None:
            del f.attrs[name]
        else:
            f.attrs[name] = value
    return damage


# Damages inside a cache file whose checksums are intact (another tool, a hand edit): (damage, the reason given,
# or (load's, verify's) where verify, knowing the source, says more).
CACHE_CONTENT_DAMAGES = {
    "embeddings removed": (_drop("embeddings"), "its embeddings dataset is missing or not"),
    "embeddings of ints": (_replace("embeddings", lambda n: np.zeros((n, 8), np.int32)), "not {rows} rows of floats"),
    "embeddings of strings": (_replace("embeddings", lambda n: np.array([b"x"] * n)), "not {rows} rows of floats"),
    "embeddings one row short": (_replace("embeddings", lambda n: np.zeros((n - 1, 8), np.float32)),
                                 "not {rows} rows of floats"),
    "labels removed": (_drop("labels"), "its labels dataset is missing or not {rows} whole numbers"),
    "labels of floats": (_replace("labels", lambda n: np.zeros(n, np.float32)), "not {rows} whole numbers"),
    "labels two columns": (_replace("labels", lambda n: np.zeros((n, 2), np.int64)), "not {rows} whole numbers"),
    "rows a string": (_set_attr("rows", "many"), ("it is incomplete", "it was made with other rows")),
    "rows too many": (_set_attr("rows", 10**6), ("it is incomplete", "it was made with other rows")),
    "complete flag removed": (_set_attr("complete", None), "it is incomplete"),
    "views not JSON": (_set_attr("views", "sideways"), "its views attribute is missing or not a list"),
    "views unknown": (_set_attr("views", '["plain", "upside-down"]'), "its views attribute is missing or not a list"),
    "views removed": (_set_attr("views", None), "its views attribute is missing or not a list"),
    "class names not JSON": (_set_attr("class_names", "{cat"), "its class_names attribute is missing or not a list"),
    "class names a string": (_set_attr("class_names", '"cat"'), "its class_names attribute is missing or not a list"),
    "class names empty": (_set_attr("class_names", "[]"), "its class_names attribute is missing or not a list"),
    "format version 99": (_set_attr("format_version", 99), "it was made with other format_version"),
    "dim contradicted": (_set_attr("dim", 1000),
                         "its embeddings rows have 16 values, its dim or features attribute says 1000"),
    "fingerprint removed": (_set_attr("source_fingerprint", None), "its source_fingerprint attribute is missing"),
    "engine removed": (_set_attr("engine", None), "its engine attribute is missing"),
}


@pytest.mark.parametrize("case", CACHE_CONTENT_DAMAGES)
def test_a_damaged_cache_content_is_one_reason_for_load_and_verify(good, cifar_root, tmp_path, case):
    from featcache import api
    from featcache.errors import UserError

    damage, reason = CACHE_CONTENT_DAMAGES[case]
    copy, opts = _damaged_copy(good, tmp_path, lambda path: None)
    with h5py.File(copy, "r+") as f:
        rows = int(f.attrs["rows"])
        damage(f)
    reason, verify_reason = (r.format(rows=rows) for r in (reason if isinstance(reason, tuple) else (reason, reason)))
    selection = dict(cache_dir=tmp_path / "cache", model=opts[opts.index("--model") + 1], image_size=40)
    with pytest.raises(UserError, match=f"test cache .* cannot be used: .*{reason}"):
        api.load_cache("test", **selection)
    path, problems = api.verify("test", data_dir=cifar_root, **selection)
    assert path == copy and problems and verify_reason in problems[0], problems


@pytest.mark.parametrize("make, message", [
    ("empty_dir", "no CIFAR-10 batches"),
    ("truncated_archive", "cannot read archive"),
    ("not_cifar_archive", "has no CIFAR-10 batch"),
])
def test_extract_bad_data_sources(good, tmp_path, cifar_archive, make, message):
    path, opts = good
    target = tmp_path / "data"
    if make == "empty_dir":
        target.mkdir()
    elif make == "truncated_archive":
        target = tmp_path / "cifar-10-python.tar.gz"
        target.write_bytes(cifar_archive.read_bytes()[:5000])
    else:
        target = tmp_path / "other.tar.gz"
        (tmp_path / "notes.txt").write_text("hello")
        with tarfile.open(target, "w:gz") as tar:
            tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    before = _digest(path)
    out = run_cli("extract.py", "--split", "test", *opts[2:], "--data-dir", target)
    _fails_cleanly(out, message)
    assert _digest(path) == before


def test_extract_image_size_the_model_cannot_take(cifar_root, tmp_path):
    fixed = save_tiny_model(tmp_path / "fixed64", size=64)
    out = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", fixed, "--image-size", "48",
                  "--cache-dir", tmp_path / "c", "--engine", "tensorflow")
    _fails_cleanly(out, "takes 64x64 images; --image-size 48 contradicts it")
    assert not list((tmp_path / "c").rglob("*.h5"))


@pytest.mark.parametrize("options, message", [
    (["--workers", "2"], "--workers applies to --runner ray only"),
    (["--ray-address", "auto", "--workers", "2"], "--ray-address and --workers apply to --runner ray only"),
])
def test_ray_options_without_the_ray_runner(cifar_root, tiny_model, tmp_path, options, message):
    out = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", tiny_model,
                  "--cache-dir", tmp_path, *options)
    _fails_cleanly(out, message)
    assert not list(tmp_path.rglob("*.h5"))


# Option values of each kind a sweep tried (zero, negative, huge, NaN/Inf, empty, wrong type) that the options
# types alone did not refuse: each is one line, exit 2, before anything is written. Others (zero, negative, wrong
# type, out-of-range fractions) are in test_cli.py and test_head.py.
HUGE = "99999999999999999999"  # beyond int64: HDF5 attributes and TensorFlow tracebacks before
OPTION_SWEEP = [
    ("extract.py", ["--chunk-size", HUGE],
     f"Invalid value for '--chunk-size': {HUGE} is not in the range 1<=x<=2147483647"),
    ("extract.py", ["--batch-size", HUGE], f"Invalid value for '--batch-size': {HUGE} is not in the range"),
    ("extract.py", ["--limit", HUGE], f"Invalid value for '--limit': {HUGE} is not in the range"),
    ("extract.py", ["--cache-dir", ""],
     "Invalid value for '--cache-dir': is empty (leave the option out for its default)"),
    ("extract.py", ["--data-dir", " "], "Invalid value for '--data-dir': is empty"),
    ("extract.py", ["--model", ""], "Invalid value for '--model': is empty"),
    ("extract.py", ["--runner", "ray", "--ray-address", ""], "Invalid value for '--ray-address': is empty"),
    ("train_head.py", ["--batch-size", HUGE], "Error: --batch-size must be a whole number in [1, 2147483647], got "),
    ("train_head.py", ["--epochs", HUGE], "Error: --epochs must be a whole number in [1, 2147483647], got "),
    ("train_head.py", ["--l2", "inf"], "Error: --l2 must be >= 0 and finite, got inf"),
    ("train_head.py", ["--lr", "inf"], "Error: --lr must be positive and finite, got inf"),
    ("train_head.py", ["--runs-dir", ""], "Invalid value for '--runs-dir': is empty"),
    ("predict.py", ["photo.png", "--run", ""], "Invalid value for '--run': is empty"),
    ("predict.py", [""], "Invalid value for 'IMAGES...': is empty"),
    ("predict.py", ["photo.png", "--model", ""], "Invalid value for '--model': is empty"),
    ("export.py", [""], "Invalid value for 'OUT': is empty"),
    ("export.py", ["out", "--runs-dir", " "], "Invalid value for '--runs-dir': is empty"),
]


@pytest.mark.parametrize("script, options, message", OPTION_SWEEP,
                         ids=[f"{script} {' '.join(options)}" for script, options, _ in OPTION_SWEEP])
def test_option_values_of_every_kind_are_one_line(good, tmp_path, script, options, message):
    path, opts = good
    before = _digest(path)
    selection = [] if script in ("predict.py", "export.py") else [o for o in opts if o != "--quiet"]
    if script == "train_head.py":
        engine = opts.index("--engine")
        selection = [o for i, o in enumerate(opts) if i not in (engine, engine + 1) and o != "--quiet"]
        selection += ["--runs-dir", tmp_path / "runs"]
    out = run_cli(script, *selection, *options)
    _fails_cleanly(out, message)
    assert not (tmp_path / "runs").exists() and _digest(path) == before


def test_second_writer_is_told_the_cache_is_busy(tiny_model, cifar_root, tmp_path):
    """Another process holds the cache's lock (it says so, then waits for us): extract.py is turned away
    in one line and writes nothing; once the lock is free, the same command builds the cache."""
    args = ["--split", "train", "--data-dir", cifar_root, "--model", tiny_model, "--image-size", "32",
            "--engine", "tensorflow", "--quiet", "--cache-dir", tmp_path]
    path = make_key(str(tiny_model), 32, "bicubic", None).path(tmp_path, "train")
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                               "from featcache.cache.write import locked\n"
                               f"with locked(__import__('pathlib').Path({str(path)!r})):\n"
                               "    print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _fails_cleanly(run_cli("extract.py", *args), f"cache {path} is busy: another writer (an extract.py run, or a thread) holds it")
        assert not path.exists() and not layout.partial_path(path).exists()
    finally:
        holder.communicate("", timeout=60)
    done = run_cli("extract.py", *args)
    assert done.returncode == 0, done.stderr
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and f.attrs["rows_done"] == f.attrs["rows"] == 120


def test_unwritable_cache_folder(cifar_root, tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", tiny_model,
                  "--image-size", "32", "--cache-dir", blocker / "cache", "--engine", "tensorflow")
    _fails_cleanly(out, "cannot write cache folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_cache_folder(cifar_root, tiny_model, tmp_path):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        out = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", tiny_model,
                      "--image-size", "32", "--cache-dir", cache, "--engine", "tensorflow")
    finally:
        cache.chmod(0o755)
    _fails_cleanly(out, "cannot write cache folder")


def test_unwritable_runs_folder(good, tmp_path):
    path, opts = good
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = run_cli("train_head.py", "--model", opts[opts.index("--model") + 1], "--image-size", "40",
                  "--cache-dir", opts[opts.index("--cache-dir") + 1], "--runs-dir", blocker / "runs")
    _fails_cleanly(out, "cannot write runs folder")


@pytest.mark.integration  # a whole process
def test_a_real_failed_write_of_the_cache_file_is_one_line(tiny_model, cifar_root, tmp_path):
    """HDF5's own error for a file that cannot grow (a file-size limit: EFBIG, as a full disk gives ENOSPC), in
    whatever words h5py puts it, becomes the one-line error; the next run, without the limit, makes the cache."""
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import make_key
from featcache.errors import UserError
from featcache.extract import pipeline
key = make_key({str(tiny_model)!r}, 32, "bilinear", None)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    pipeline.extract(key, "train", data_dir={str(cifar_root)!r}, cache_dir={str(tmp_path)!r}, views="plain",
                     engine="tensorflow", progress=False)
except UserError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("writing ") and out.stdout.endswith(
        " failed (File too large); 0 committed rows are kept and the next run resumes from there\n"), out.stdout
    from featcache.extract import pipeline

    key = make_key(str(tiny_model), 32, "bilinear", None)
    done = pipeline.extract(key, "train", data_dir=cifar_root, cache_dir=tmp_path, views="plain",
                            engine="tensorflow", progress=False)
    assert done.rows == 120 and done.processed == 120


@pytest.mark.parametrize("where, target, name, call, error, kept", [
    # A full disk at each moment of a cache's life after its creation (provoked for real above): writing rows,
    # the fsync of a commit, the rename that publishes it.
    ("writing rows", "h5py.Dataset", "__setitem__", 5, OSError(28, "No space left on device"), 20),
    ("a commit's fsync", "os", "fsync", 9, OSError(28, "No space left on device"), 30),
    ("publishing", "os", "replace", 4, OSError(28, "No space left on device"), 120),
])
def test_disk_full_at_any_moment_is_one_line_keeps_committed_rows_and_resumes(
        tiny_model, cifar_root, tmp_path, monkeypatch, where, target, name, call, error, kept):
    import importlib

    from featcache.extract import pipeline
    from featcache.errors import UserError

    key = make_key(str(tiny_model), 32, "bilinear", None)
    options = dict(data_dir=cifar_root, views="plain", chunk_size=10, engine="tensorflow", progress=False,
                   log=lambda *_: None)
    reference = pipeline.extract(key, "train", cache_dir=tmp_path / "reference", **options).path
    module, _, cls = target.partition(".")
    owner = getattr(importlib.import_module(module), cls) if cls else importlib.import_module(module)
    real, calls = getattr(owner, name), [0]

    def full_disk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, full_disk)
    with pytest.raises(UserError) as failure:
        pipeline.extract(key, "train", cache_dir=tmp_path / "cache", **options)
    monkeypatch.setattr(owner, name, real)
    message = str(failure.value)
    assert message.startswith("writing ") and "failed (No space left on device)" in message, message
    assert f"; {kept} committed rows are kept and the next run resumes from there" in message
    assert "\n" not in message and not key.path(tmp_path / "cache", "train").exists()
    assert [p.name for p in (tmp_path / "cache").rglob("*.tmp")] == []
    resumed = pipeline.extract(key, "train", cache_dir=tmp_path / "cache", **options)
    assert resumed.processed == 120 - kept and resumed.rows == 120
    with h5py.File(resumed.path, "r") as got, h5py.File(reference, "r") as want:
        for dataset in ("embeddings", "labels"):
            assert got[dataset][:].tobytes() == want[dataset][:].tobytes()


def test_verify_reports_each_problem(good, tmp_path):
    path, opts = good
    ok = run_cli("extract.py", "--split", "test", *opts, "--verify")
    assert ok.returncode == 0 and "ok" in ok.stdout

    def poison(copy):
        with h5py.File(copy, "r+") as f:
            f["embeddings"][3, 0] = float("nan")
            f["labels"][5] = (f["labels"][5] + 1) % 10
            f.attrs.modify("complete", False)

    copy, bad_opts = _damaged_copy(good, tmp_path, poison)
    out = run_cli("extract.py", "--split", "test", *bad_opts, "--verify")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    for fragment in ("incomplete", "NaN or Inf", "labels differ"):
        assert fragment in out.stdout, out.stdout


def test_labels_outside_the_classes_are_refused_on_reading_and_listed_by_verify(good, tmp_path):
    """A cache with valid checksums but a label no class has (another tool wrote it, or it was damaged before
    its checksum was computed): refused before any run folder exists, and named by --verify."""
    def relabel(copy):
        with h5py.File(copy, "r+") as f:
            f["labels"][7] = 99

    copy, opts = _damaged_copy(good, tmp_path, relabel)
    runs = tmp_path / "runs"
    out = run_cli("train_head.py", *[o for o in opts if o not in ("--engine", "tensorflow", "--quiet")],
                  "--runs-dir", runs)
    _fails_cleanly(out, f"test cache {copy} holds 1 labels outside [0, 10) (first in row 7: 99); check it with "
                        "python extract.py --split test")
    assert "--verify, rebuild it with" in out.stderr and not runs.exists()
    verify = run_cli("extract.py", "--split", "test", *opts, "--verify")
    assert verify.returncode == 1 and "1 labels outside [0, 10) in rows 0:40 (first in row 7)" in verify.stdout
    assert verify.stdout.splitlines()[0].endswith(": 1 problem"), verify.stdout


def test_an_image_size_beyond_the_limit_is_refused_before_anything_is_allocated(tiny_model, cifar_root, tmp_path):
    for size in ("100000", "2240"):
        out = run_cli("extract.py", "--data-dir", cifar_root, "--model", tiny_model, "--image-size", size,
                      "--cache-dir", tmp_path)
        _fails_cleanly(out, f"Error: --image-size {size} is above 1024, the largest accepted: memory per image grows "
                            "with its square")
    assert not list(tmp_path.rglob("*.h5"))


def test_an_unreachable_ray_address_fails_at_once_in_one_line(cifar_root, tiny_model, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-ray.txt)")
    import socket

    from featcache.extract.ray_runner import check_reachable

    with socket.socket() as listening:  # an address where something answers
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
    out = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", tiny_model,
                  "--cache-dir", tmp_path, "--runner", "ray", "--ray-address", "127.0.0.1:1")
    _fails_cleanly(out, "Error: cannot join the Ray cluster at 127.0.0.1:1: nothing answers there (Connection refused)")
    out = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", tiny_model,
                  "--cache-dir", tmp_path, "--runner", "ray", "--ray-address", "nowhere")
    _fails_cleanly(out, "Error: --ray-address 'nowhere' is not host:port, ray://host:port or auto")


def test_a_source_that_fails_while_read_is_one_line_and_keeps_committed_rows(tiny_model, cifar_root, tmp_path,
                                                                            monkeypatch):
    import errno

    from featcache.extract import pipeline
    from featcache.errors import UserError
    from featcache.extract.sources import cifar

    key = make_key(str(tiny_model), 32, "bilinear", None)
    real_chunks = cifar.SplitSource.chunks

    def failing_chunks(self, chunk_size, start=0, stop=None):
        for number, chunk in enumerate(real_chunks(self, chunk_size, start, stop)):
            if number == 3:
                raise OSError(errno.EIO, "Input/output error")
            yield chunk

    monkeypatch.setattr(cifar.SplitSource, "chunks", failing_chunks)
    with pytest.raises(UserError) as failure:
        pipeline.extract(key, "train", data_dir=cifar_root, cache_dir=tmp_path, chunk_size=10, engine="tensorflow",
                         progress=False, log=lambda *_: None)
    assert str(failure.value) == (f"reading the train split at {cifar_root / 'cifar-10-batches-py'} failed "
                                  "(Input/output error); 30 committed rows are kept and the next run resumes from there")


def test_a_models_record_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from featcache.extract import models

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models.os, "replace", full_disk)
    models.record_input_size(96, "https://hub.invalid/m/1", "", tmp_path)  # only a shortcut: no error
    assert [p.name for p in (tmp_path / "models").iterdir()] == []


MODEL_RECORD_DAMAGES = {
    "cut short": lambda record: record.write_text(record.read_text()[:20]),
    "emptied": lambda record: record.write_text(""),
    "not an object": lambda record: record.write_text("[48]"),
    "key missing": lambda record: record.write_text('{"model": "m"}'),
    "size a string": lambda record: record.write_text('{"fixed_input_size": "48"}'),
    "size zero": lambda record: record.write_text('{"fixed_input_size": 0}'),
    "size negative": lambda record: record.write_text('{"fixed_input_size": -48}'),
    "size a fraction": lambda record: record.write_text('{"fixed_input_size": 47.5}'),
    "size true": lambda record: record.write_text('{"fixed_input_size": true}'),
}


@pytest.mark.parametrize("damage", MODEL_RECORD_DAMAGES.values(), ids=MODEL_RECORD_DAMAGES)
def test_a_damaged_model_record_is_read_again_from_the_model(tmp_path, damage):
    """The record under <cache_dir>/models/ only saves loading the model: damaged, it counts as absent."""
    from featcache.extract import models

    model = save_tiny_model(tmp_path / "fixed", size=48)
    handle, sha = models.identity(model)
    assert models.input_size(handle, sha, None, 224, tmp_path / "cache") == 48
    (record,) = (tmp_path / "cache" / "models").iterdir()
    good = record.read_text()
    damage(record)
    assert models.input_size(handle, sha, None, 224, tmp_path / "cache") == 48
    assert record.read_text() == good


MODEL_DAMAGES = {
    "saved_model.pb cut short": lambda m: (m / "saved_model.pb").write_bytes((m / "saved_model.pb").read_bytes()[:200]),
    "saved_model.pb replaced": lambda m: (m / "saved_model.pb").write_bytes(b"not a protobuf"),
    "variables missing": lambda m: shutil.rmtree(m / "variables"),
    "variables index emptied": lambda m: (m / "variables" / "variables.index").write_bytes(b""),
}


@pytest.mark.parametrize("damage", MODEL_DAMAGES.values(), ids=MODEL_DAMAGES)
def test_a_damaged_model_folder_is_one_line_naming_it(tiny_model, cifar_root, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    damage(model)
    out = run_cli("extract.py", "--split", "test", "--data-dir", cifar_root, "--model", model, "--engine", "tensorflow",
                  "--cache-dir", tmp_path / "cache")
    _fails_cleanly(out, f"Error: cannot load the SavedModel in {model} (", "the folder is damaged, incomplete, or not loadable by this TensorFlow")
    assert not list((tmp_path / "cache").rglob("*.h5"))


IR_DAMAGES = {
    "xml cut short": lambda xml: xml.write_bytes(xml.read_bytes()[:100]),
    "xml replaced": lambda xml: xml.write_bytes(b"\0not xml"),
    "weights emptied": lambda xml: xml.with_suffix(".bin").write_bytes(b""),
}


@pytest.fixture(scope="module")
def int8_cache(tiny_model, cifar_root, tmp_path_factory):
    """A cache folder with an int8 train split (and its saved quantized network), and the test split's vectors."""
    pytest.importorskip("nncf", reason="int8 needs requirements-openvino.txt")
    cache = tmp_path_factory.mktemp("int8")
    args = ["--data-dir", cifar_root, "--model", tiny_model, "--image-size", "32", "--precision", "int8", "--quiet"]
    assert run_cli("extract.py", "--split", "train", "--cache-dir", cache, *args).returncode == 0
    reference = tmp_path_factory.mktemp("int8_reference")
    shutil.copytree(cache, reference, dirs_exist_ok=True)
    assert run_cli("extract.py", "--split", "test", "--cache-dir", reference, *args).returncode == 0
    (test,) = reference.rglob("test.h5")
    with h5py.File(test, "r") as f:
        return cache, args, f["embeddings"][:]


@pytest.mark.parametrize("damage", IR_DAMAGES.values(), ids=IR_DAMAGES)
def test_a_damaged_quantized_network_is_built_again_never_replaced_by_f32(int8_cache, tmp_path, damage):
    """Before, OpenVINO's read error counted as a conversion failure: the int8 cache's rows came from TensorFlow."""
    cache, args, want = int8_cache
    shutil.copytree(cache, tmp_path / "cache")
    (xml,) = (tmp_path / "cache").rglob("*.xml")
    weights = xml.with_suffix(".bin").read_bytes()
    damage(xml)
    out = run_cli("extract.py", "--split", "test", "--cache-dir", tmp_path / "cache", *args)
    assert out.returncode == 0, out.stderr
    assert f"note: the saved int8 network {xml} cannot be read (" in out.stdout and "calibrating it again" in out.stdout
    (test,) = (tmp_path / "cache").rglob("test.h5")
    with h5py.File(test, "r") as f:
        assert f.attrs["engine"] == "openvino" and f.attrs["precision"] == "int8"
        np.testing.assert_array_equal(f["embeddings"][:], want)
    assert xml.with_suffix(".bin").read_bytes() == weights  # calibrated again to the same network
