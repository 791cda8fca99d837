"""Fault injection: SIGKILL writers at seeded kill points; every cache must come out exact.

A kill point is a method of the cache writer and the call of it at which the process kills itself
(before the call runs): its creation of the file, a dataset's write of a commit (the first view written,
the next not yet), an fsync before or after the `rows_done` update, the final publish. Each one is
reached, so each kill is certain and the tests need no timing. Two levels:
- the HDF5 writer alone (no TensorFlow, so a kill cycle takes a fraction of a second): 60 kills;
- extract.py end to end on the fixture data and model.
"""

import os
import random
import signal
import subprocess
import sys

import h5py
import numpy as np

from featcache.cache import layout, read, write
from conftest import KILL_POINT, ROOT, SYNTHETIC_CLASSES, synthetic_attrs

ROWS, DIM, CHUNK = 2400, 64, 8
WRITER = KILL_POINT + f"""
import numpy as np
from featcache.cache import layout
path = __import__("pathlib").Path(sys.argv[1])
attrs = dict(tool=layout.TOOL, format_version=layout.FORMAT_VERSION, dataset="synthetic", split="train",
             model="m", image_size=1, resize="r", views="flip", limit=0, rows={ROWS}, source_fingerprint="f",
             engine="e", class_names={SYNTHETIC_CLASSES!r})
with write.locked(path), write.CacheWriter(path, attrs, {DIM}, ("plain", "flip")) as w:
    for lo in range(w.rows_done, {ROWS}, {CHUNK}):
        rows = np.arange(lo, min(lo + {CHUNK}, {ROWS}))
        emb = (rows[:, None] * 1.5 + np.arange({DIM})[None]).astype("f4")
        w.write(lo, {{"plain": emb, "flip": -emb}}, rows % 10)
    w.finish()
"""


def expected_rows():
    rows = np.arange(ROWS)
    emb = (rows[:, None] * 1.5 + np.arange(DIM)[None]).astype("f4")
    return {"embeddings": emb, "embeddings_flip": -emb, "labels": rows % 10}


def check_partial_consistent(path, want):
    """Whatever the kill did, committed rows are exact and nothing claims to be complete."""
    partial = layout.partial_path(path)
    assert not path.exists(), "a killed writer left a file under the final name"
    if not partial.exists():
        return 0
    with h5py.File(partial, "r") as f:
        done = int(f.attrs["rows_done"])
        assert not f.attrs["complete"]
        for name, values in want.items():
            # Whole chunks of committed rows pass their checksum; the chunk holding `done` may have
            # been torn by the kill (its committed rows intact, its checksum not): read it as stored.
            whole = done - done % f[name].chunks[0]
            np.testing.assert_array_equal(f[name][:whole], values[:whole])
            np.testing.assert_array_equal(layout.stored_rows(f[name], whole, done - whole), values[whole:done])
    return done


def run_killed(args, method: str, at: int) -> int:
    """Run a KILL_POINT script killed at call `at` of CacheWriter.`method`; its exit code (-9 when killed)."""
    return subprocess.run([args[0], "-c", args[1], method, str(at), *args[2:]], capture_output=True).returncode


def kill_point(rng, rows_left: int, chunk: int, fresh: bool) -> tuple[str, int]:
    """A seeded kill point that the run is sure to reach, given the rows it has left to write."""
    commits = -(-rows_left // chunk)
    points = [("_write_whole_chunks", 3 * commits), ("_sync", 2 * commits), ("finish", 1)] + \
        ([("_create", 1)] if fresh else [])
    method, calls = rng.choice([(method, calls) for method, calls in points if calls])
    return method, rng.randint(1, calls)


def test_writer_killed_at_60_seeded_points_always_resumes_exactly(tmp_path):
    rng = random.Random(20261127)
    want = expected_rows()
    methods = []
    for cycle in range(30):
        path = tmp_path / f"c{cycle}" / "train.h5"
        # A first run killed at a seeded point, then the resumed run killed at another.
        for attempt in range(2):
            done = check_partial_consistent(path, want) if attempt else 0
            method, at = kill_point(rng, ROWS - done, CHUNK, fresh=attempt == 0 or done == 0 and
                                    not layout.partial_path(path).exists())
            assert run_killed([sys.executable, WRITER, str(path)], method, at) == -9
            methods.append(method)
            check_partial_consistent(path, want)
        finished = subprocess.run([sys.executable, "-c", WRITER, "finish", "0", str(path)], capture_output=True,
                                  text=True)
        assert finished.returncode == 0, finished.stderr
        with h5py.File(path, "r") as f:
            assert f.attrs["complete"] and f.attrs["rows_done"] == ROWS
            for name, values in want.items():
                np.testing.assert_array_equal(f[name][:], values)
    assert set(methods) == {"_create", "_write_whole_chunks", "_sync", "finish"}


def _extract_args(tiny_model, cifar_root, cache):
    return [sys.executable, str(ROOT / "extract.py"), "--split", "train", "--data-dir", str(cifar_root),
            "--model", str(tiny_model), "--image-size", "32", "--chunk-size", "1", "--batch-size", "1",
            "--engine", "tensorflow", "--quiet", "--cache-dir", str(cache)]


def test_extract_killed_at_seeded_points_gives_the_uninterrupted_cache(tiny_model, cifar_root, tmp_path):
    reference = subprocess.run(_extract_args(tiny_model, cifar_root, tmp_path / "ref"), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    (ref_path,) = (tmp_path / "ref").rglob("train.h5")
    with h5py.File(ref_path, "r") as f:
        want = {name: f[name][:] for name in f}
    cache = tmp_path / "killed"
    script = KILL_POINT + f"import runpy; runpy.run_path({str(ROOT / 'extract.py')!r}, run_name='__main__')"
    # extract.py commits each of the 120 images (--chunk-size 1): kill it at its 1st commit, then resumed runs
    # at the 40th, 80th and 117th image's commit, and as it publishes the finished file.
    for method, at in (("write", 1), ("write", 40), ("write", 41), ("write", 38), ("finish", 1)):
        args = _extract_args(tiny_model, cifar_root, cache)
        assert run_killed([args[0], script, *args[2:]], method, at) == -9
        (partial,) = cache.rglob("train.partial.h5")
        check_partial_consistent(partial.with_name("train.h5"), want)
    finished = subprocess.run(_extract_args(tiny_model, cifar_root, cache), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    (path,) = cache.rglob("train.h5")
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and f.attrs["rows_done"] == 120
        for name, values in want.items():
            np.testing.assert_array_equal(f[name][:], values)

def test_a_forked_child_holding_our_files_blocks_neither_this_writer_nor_the_next(tmp_path):
    """Libraries fork children that inherit every open file (OpenVINO's telemetry does, for up to 3 s).

    Such a child must not make HDF5 refuse this process's own files, nor keep the next writer out.
    """
    path = tmp_path / "cache" / "train.h5"
    attrs = synthetic_attrs(4)
    with write.locked(path), write.CacheWriter(path, attrs, DIM, ("plain",)) as writer:
        child = os.fork()
        if child == 0:  # holds copies of the lock file's and the partial file's descriptors
            signal.pause()  # until the test kills it
            os._exit(0)
        try:
            writer.write(0, {"plain": np.ones((4, DIM), np.float32)}, np.arange(4))
            writer.finish()
        except BaseException:
            os.kill(child, signal.SIGKILL)
            raise
    try:
        views, labels, _ = read.read(path, attrs, ("plain",))
        assert labels.tolist() == [0, 1, 2, 3] and views["plain"].shape == (4, DIM)
        take_lock = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from featcache.cache import layout, read, write\n" \
                    f"with write.locked(__import__('pathlib').Path({str(path)!r})): print('locked')"
        second = subprocess.run([sys.executable, "-c", take_lock], capture_output=True, text=True, timeout=60)
        assert second.stdout.strip() == "locked", second.stderr
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_partial_cache_of_another_engine_is_restarted_with_a_reason(tmp_path):
    """Installing OpenVINO between a crash and the rerun changes the engine: say so, never silently."""
    path = tmp_path / "train.h5"
    attrs = synthetic_attrs(8, engine="tensorflow")
    with write.locked(path), write.CacheWriter(path, attrs, DIM, ("plain",)) as writer:
        writer.write(0, {"plain": np.ones((4, DIM), np.float32)}, np.arange(4))
    with write.locked(path), write.CacheWriter(path, dict(attrs, engine="openvino"), DIM, ("plain",)) as writer:
        assert not writer.resumed and writer.rows_done == 0
        assert writer.discarded == "4 rows of it are not reused: it was made with other engine"
    with write.locked(path), write.CacheWriter(path, dict(attrs, engine="openvino"), DIM, ("plain",)) as writer:
        assert writer.resumed and not writer.discarded


def test_the_cache_lock_holds_against_another_thread_of_this_process(tmp_path):
    import threading

    import pytest

    from featcache.errors import UserError

    path = tmp_path / "train.h5"
    held, release = threading.Event(), threading.Event()

    def holder():
        with write.locked(path):
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(timeout=60)
        with pytest.raises(UserError, match="is busy"):
            with write.locked(path):
                pass
    finally:
        release.set()
        thread.join()
    with write.locked(path):  # free again once the holder is done
        pass
