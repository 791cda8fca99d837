"""extract.py --runner ray on a local Ray cluster: same cache as the local runner, through faults.

The cluster is started once by this module's fixture (ray.init in the test process) and ended by
its own handle (ray.shutdown); runs connect to it by address, as `--ray-address` does on a real one.
"""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import h5py
import numpy as np
import pytest

from featcache.extract import pipeline, sources
from featcache.errors import UserError
from featcache.extract.extractor import ExtractorSettings
from featcache.extract.runners import LocalRunner
from conftest import KILL_POINT, ROOT, make_key

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-ray.txt)")
from featcache.extract.ray_runner import RayRunner  # noqa: E402 - needs Ray

CPUS = 2
IMAGE_SIZE = 48


@pytest.fixture(scope="module")
def cluster():
    """A two-CPU local Ray cluster for this module; yields its address."""
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False, logging_level="error")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _key(model):
    return make_key(str(model), IMAGE_SIZE, "bilinear")


def _rows(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}, dict(f.attrs)


def _extract(model, root, cache, runner, **kw):
    options = dict(data_dir=root, cache_dir=cache, chunk_size=8, batch_size=4, engine="tensorflow", progress=False)
    return pipeline.extract(_key(model), "train", runner=runner, **dict(options, **kw))


def _wait_for_free_cpus(timeout=60):
    """A job's workers are gone once their CPUs are free again."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < CPUS:
        assert time.monotonic() < deadline, f"workers still hold CPUs: {ray.available_resources()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(tiny_model, cifar_root, tmp_path_factory):
    """The local runner's cache of the fixture's train split."""
    result = _extract(tiny_model, cifar_root, tmp_path_factory.mktemp("local"), LocalRunner())
    return _rows(result.path)


def test_ray_runner_writes_the_local_runners_cache(cluster, tiny_model, cifar_root, reference, tmp_path):
    result = _extract(tiny_model, cifar_root, tmp_path, RayRunner(workers=2))
    rows, attrs = _rows(result.path)
    want, want_attrs = reference
    for name, values in want.items():
        np.testing.assert_array_equal(rows[name], values)
    for name in ("engine", "batch_size", "dim", "rows", "source_fingerprint", "tensorflow_version"):
        assert attrs[name] == want_attrs[name], name
    workers = [line for line in result.report if line.startswith("worker ")]
    assert len(workers) == 2 and all(" 0 rows" not in line for line in workers)  # both did work
    per_node = re.findall(r"\): (\d+)", result.report[-1])
    assert result.report[-1].startswith("rows per node") and sum(map(int, per_node)) == len(want["labels"])
    _wait_for_free_cpus()


def test_a_killed_worker_is_restarted_and_the_cache_is_still_exact(cluster, tiny_model, cifar_root, reference,
                                                                   tmp_path, monkeypatch):
    runner = RayRunner(workers=2)
    real_open_split = sources.open_split

    def open_split(*args, **kwargs):
        reader = real_open_split(*args, **kwargs)
        chunks = reader.chunks

        def killing_chunks(size, start=0):
            for number, chunk in enumerate(chunks(size, start)):
                if number == 4:  # the workers hold chunks 0-3 now: kill one mid-chunk
                    os.kill(runner._mapper.workers[0].pids[-1], signal.SIGKILL)
                yield chunk

        reader.chunks = killing_chunks
        return reader

    monkeypatch.setattr(sources, "open_split", open_split)
    result = _extract(tiny_model, cifar_root, tmp_path, runner)
    rows, _ = _rows(result.path)
    for name, values in reference[0].items():
        np.testing.assert_array_equal(rows[name], values)
    assert "restarted 1x" in result.report[0], result.report
    _wait_for_free_cpus()


def _cli(model, root, cache, address, *extra):
    return [sys.executable, str(ROOT / "extract.py"), "--split", "train", "--data-dir", str(root), "--model",
            str(model), "--image-size", "160", "--resize", "bilinear", "--chunk-size", "4", "--batch-size", "1",
            "--engine", "tensorflow", "--cache-dir", str(cache), "--runner", "ray", "--ray-address", address,
            "--workers", "2", *extra]


def test_a_killed_driver_resumes_from_its_committed_rows(cluster, tiny_model, cifar_root, tmp_path):
    reference = subprocess.run(_cli(tiny_model, cifar_root, tmp_path / "ref", cluster, "--quiet"),
                               capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert reference.returncode == 0, reference.stderr
    (ref_path,) = (tmp_path / "ref").rglob("train.h5")
    want, _ = _rows(ref_path)

    cache = tmp_path / "killed"
    args = _cli(tiny_model, cifar_root, cache, cluster, "--quiet")
    script = KILL_POINT + f"import runpy; runpy.run_path({args[1]!r}, run_name='__main__')"
    killed = subprocess.run([args[0], "-c", script, "write", "5", *args[2:]], capture_output=True, cwd=ROOT,
                            timeout=300)  # the driver dies as it commits its 5th chunk of 4 images
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (partial,) = cache.rglob("train.partial.h5")
    with h5py.File(partial, "r") as f:
        committed = int(f.attrs["rows_done"])
    assert committed == 16
    _wait_for_free_cpus()  # the dead driver's workers went with it

    rerun = subprocess.run(_cli(tiny_model, cifar_root, cache, cluster, "--quiet"), capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"at row {committed} " in rerun.stdout, rerun.stdout
    assert f"done: {len(want['labels'])} rows, {len(want['labels']) - committed} images" in rerun.stdout
    rows, _ = _rows(partial.with_name("train.h5"))
    for name, values in want.items():
        np.testing.assert_array_equal(rows[name], values)
    _wait_for_free_cpus()


@pytest.mark.parametrize("signal_name, said", [("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM")])
def test_ctrl_c_stops_the_workers_it_started(cluster, tiny_model, cifar_root, tmp_path, signal_name, said):
    """Ctrl-C or SIGTERM at commit 3 (ray.init makes SIGTERM a bare exit: the job puts its own handler back)."""
    args = _cli(tiny_model, cifar_root, tmp_path, cluster, "--quiet")
    script = KILL_POINT + f"import runpy; runpy.run_path({args[1]!r}, run_name='__main__')"
    interrupted = subprocess.run([args[0], "-c", script, "write", "3", *args[2:]], capture_output=True, cwd=ROOT,
                                 timeout=300, env=dict(os.environ, KILL_SIGNAL=signal_name), text=True)
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.strip().splitlines()[-1].startswith(f"Stopped ({said}): the rows committed so far")
    _wait_for_free_cpus(timeout=20)
    assert not list(tmp_path.rglob("train.h5")) and list(tmp_path.rglob("train.partial.h5"))


def test_a_worker_that_cannot_load_the_model_fails_in_one_line_naming_its_node(cluster, cifar_root, tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    with pytest.raises(UserError) as error:
        _extract(broken, cifar_root, tmp_path / "cache", RayRunner(workers=2))
    message = str(error.value)
    assert re.match(r"ray worker \d on node [0-9a-f]{8} \(.+\): cannot load the SavedModel in ", message), message
    assert "\n" not in message
    _wait_for_free_cpus()


def test_one_job_keeps_its_workers_for_both_splits(cluster, tiny_model):
    """extract.py's two splits: the model is loaded once per worker unless the settings change."""
    settings = ExtractorSettings(str(tiny_model), image_size=IMAGE_SIZE, engine="tensorflow", input_shape=(32, 32))
    with RayRunner(workers=2) as runner:
        with runner.open(settings) as first:
            pids = [worker.pids[-1] for worker in first.workers]
        with runner.open(replace(settings, input_shape=(40, 50))) as second:  # a folder's other split
            assert second is first and [worker.pids[-1] for worker in second.workers] == pids
        with runner.open(replace(settings, image_size=IMAGE_SIZE + 8)) as third:
            assert third is not first
    _wait_for_free_cpus()


def test_more_workers_than_the_cluster_has_cpus_is_an_error_not_a_hang(cluster, tiny_model, cifar_root, tmp_path):
    with pytest.raises(UserError, match=f"^workers {CPUS + 1} needs one CPU each; the Ray cluster has {CPUS}"):
        _extract(tiny_model, cifar_root, tmp_path, RayRunner(workers=CPUS + 1))
    assert not list(tmp_path.rglob("*.h5"))


def test_without_ray_the_runner_is_a_one_line_error(tiny_model, cifar_root, tmp_path):
    hidden = tmp_path / "no_ray" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = dict(os.environ, PYTHONPATH=f"{hidden.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = _cli(tiny_model, cifar_root, tmp_path / "cache", "auto")
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("Error: --runner ray needs Ray, which is not installed: "
                                     "pip install -r requirements-ray.txt"), result.stderr
    assert not list((tmp_path / "cache").rglob("*.h5"))
