"""extract.py --runner ray on a local Ray cluster: one shard per worker call, the same cache as the local runner,
through faults (a worker killed mid-shard, the driver killed, two drivers, an unreachable or a fully held cluster).

The cluster is started once by this module's fixture (ray.init in the test process) and ended by its own handle
(ray.shutdown); runs connect to it by address, as `--ray-address` does on a real one. Its workers load
tests/ray_hooks.py, which kills a worker mid-shard when a test arms it: no test waits on time.
"""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cache import write
from featcache.errors import UserError
from featcache.extract import pipeline
from featcache.extract.runners import LocalRunner
from conftest import ROOT, make_key, run_cli

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-ray.txt)")
from featcache.extract import ray_runner  # noqa: E402 - needs Ray
from featcache.extract.ray_runner import RayRunner  # noqa: E402 - needs Ray

CPUS = 2
IMAGE_SIZE = 48
# Runs extract.py with RayRunner._finished (the driver counting a finished shard) patched to send this process
# SIGKILL (or $KILL_SIGNAL) at its <argv[1]>-th call.
DRIVER_KILL = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from featcache.extract import ray_runner
at, calls, original = int(sys.argv.pop(1)), [0], ray_runner.RayRunner._finished
def counted(*args):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
    return original(*args)
ray_runner.RayRunner._finished = staticmethod(counted)
import runpy; runpy.run_path({str(ROOT / 'extract.py')!r}, run_name='__main__')
"""


@dataclass
class Cluster:
    address: str
    kill_file: Path  # armed (created) by a test: a worker then kills itself mid-shard, once


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-CPU local Ray cluster for this module whose workers load tests/ray_hooks.py."""
    kill_file = tmp_path_factory.mktemp("kill") / "armed"
    env = {"FEATCACHE_TEST_KILL_FILE": str(kill_file), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False, logging_level="error",
             runtime_env={"env_vars": env, "worker_process_setup_hook": "ray_hooks.install"})
    try:
        yield Cluster(ray.get_runtime_context().gcs_address, kill_file)
    finally:
        ray.shutdown()


def _key(model):
    return make_key(str(model), IMAGE_SIZE, "bilinear")


def _rows(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}, dict(f.attrs)


def _same(path, reference):
    rows, _ = _rows(path)
    assert set(rows) == set(reference[0])
    for name, values in reference[0].items():
        np.testing.assert_array_equal(rows[name], values, err_msg=name)


def _extract(model, root, cache, runner, **kw):
    options = dict(data_dir=root, cache_dir=cache, chunk_size=8, batch_size=4, engine="tensorflow", progress=False,
                   log=lambda _: None)
    return pipeline.extract(_key(model), "train", runner=runner, **dict(options, **kw))


def _wait_for_free_cpus(timeout=60):
    """A job's workers are gone once their CPUs are free again (Ray frees them asynchronously)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < CPUS:
        assert time.monotonic() < deadline, f"workers still hold CPUs: {ray.available_resources()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(tiny_model, cifar_root, tmp_path_factory):
    """The local runner's cache of the fixture's train split."""
    result = _extract(tiny_model, cifar_root, tmp_path_factory.mktemp("local"), LocalRunner())
    return _rows(result.path)


def test_a_ray_runner_used_without_with_stops_the_ray_it_started(tiny_model, cifar_root, reference, tmp_path):
    """First in this module: before the module's cluster is started, no Ray runs in this process."""
    assert not ray.is_initialized()
    result = _extract(tiny_model, cifar_root, tmp_path, RayRunner(workers=1), num_shards=2)
    assert not ray.is_initialized()  # its runs and the assembly's task are done: the Ray it started is ended
    _same(result.path, reference)


def test_ray_runner_writes_the_local_runners_cache(cluster, tiny_model, cifar_root, reference, tmp_path):
    lines = []
    result = _extract(tiny_model, cifar_root, tmp_path, RayRunner(workers=2), log=lines.append)
    _same(result.path, reference)
    _, attrs = _rows(result.path)
    for name in ("engine", "batch_size", "dim", "rows", "source_fingerprint", "tensorflow_version", "ray_version"):
        assert attrs[name] == reference[1][name], name
    assert "plan: 4 shards of 24 to 32 items" in lines[0] and "assembling 4 shards" in lines[-2], lines
    workers = [line for line in result.report if line.startswith("worker ")]
    assert len(workers) == 2 and all(" 0 shards" not in line for line in workers), result.report
    per_node = re.findall(r"\): (\d+)", result.report[-1])
    assert result.report[-1].startswith("images per node") and sum(map(int, per_node)) == 120
    assert not list(tmp_path.rglob("train.shards"))
    _wait_for_free_cpus()


def test_a_worker_killed_mid_shard_is_restarted_and_its_shard_resumes(cluster, tiny_model, cifar_root, reference,
                                                                      tmp_path):
    cluster.kill_file.touch()
    result = _extract(tiny_model, cifar_root, tmp_path, RayRunner(workers=2))
    assert not cluster.kill_file.exists() and cluster.kill_file.with_name("armed.fired").exists()  # it fired
    _same(result.path, reference)
    assert sum("restarted 1x" in line for line in result.report) == 1, result.report
    assert result.processed <= 120 - 8  # the killed shard resumed from its committed rows
    _wait_for_free_cpus()


def _cli(model, root, cache, address, *extra):
    return ["--split", "train", "--data-dir", str(root), "--model", str(model), "--image-size", str(IMAGE_SIZE),
            "--resize", "bilinear", "--chunk-size", "8", "--batch-size", "4", "--engine", "tensorflow",
            "--cache-dir", str(cache), "--runner", "ray", "--ray-address", address, "--workers", "2", "--quiet",
            *extra]


def test_a_killed_driver_is_rerun_and_skips_the_finished_shards(cluster, tiny_model, cifar_root, reference,
                                                                 tmp_path):
    args = _cli(tiny_model, cifar_root, tmp_path, cluster.address)
    killed = subprocess.run([sys.executable, "-c", DRIVER_KILL, "2", *args], capture_output=True, cwd=ROOT,
                            timeout=300)  # the driver dies as it counts its 2nd finished shard
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = [int(path.name[:5]) for path in tmp_path.rglob("train.shards/*.h5") if "partial" not in path.name]
    assert len(done) >= 2 and not list(tmp_path.rglob("train.h5"))
    _wait_for_free_cpus()  # the dead driver's workers went with it
    rerun = subprocess.run([sys.executable, str(ROOT / "extract.py"), *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} of 4 shards" in rerun.stdout and "assembling 4 shards" in rerun.stdout, rerun.stdout
    processed = int(re.search(r"done: 120 rows, (\d+) images", rerun.stdout).group(1))
    sizes = [24, 32, 32, 32]  # the plan's shards: (0, 24), (24, 56), (56, 88), (88, 120)
    assert processed <= 120 - sum(sizes[index] for index in done), rerun.stdout  # finished shards are not redone
    (path,) = tmp_path.rglob("train.h5")
    _same(path, reference)
    _wait_for_free_cpus()


@pytest.mark.parametrize("signal_name, said", [("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM")])
def test_ctrl_c_stops_the_workers_it_started(cluster, tiny_model, cifar_root, tmp_path, signal_name, said):
    """Ctrl-C or SIGTERM as the first shard finishes (ray.init makes SIGTERM a bare exit: the job puts its own
    handler back)."""
    args = _cli(tiny_model, cifar_root, tmp_path, cluster.address)
    interrupted = subprocess.run([sys.executable, "-c", DRIVER_KILL, "1", *args], capture_output=True, cwd=ROOT,
                                 timeout=300, env=dict(os.environ, KILL_SIGNAL=signal_name), text=True)
    assert interrupted.returncode == 130, interrupted.stderr
    last = interrupted.stderr.strip().splitlines()[-1]
    assert re.match(rf"Stopped \({said}\): the rows committed so far are kept in .*train\.shards; rerun", last), last
    _wait_for_free_cpus(timeout=20)
    assert not list(tmp_path.rglob("train.h5"))


def test_two_drivers_on_one_plan_is_one_line(cluster, tiny_model, cifar_root, tmp_path):
    path = _key(tiny_model).path(tmp_path, "train")
    with write.locked(path):  # the first driver holds the cache for its whole run
        with pytest.raises(UserError, match=f"^cache {path} is busy: another writer"):
            _extract(tiny_model, cifar_root, tmp_path, RayRunner(workers=2))
    _wait_for_free_cpus()


def test_a_cluster_whose_cpus_are_all_held_is_one_line_not_a_hang(cluster, tiny_model, cifar_root, tmp_path):
    @ray.remote(num_cpus=CPUS)
    class OtherJob:
        def ready(self):
            return True

    other = OtherJob.remote()
    try:
        assert ray.get(other.ready.remote(), timeout=60)
        with pytest.raises(UserError, match=f"^the Ray cluster has no free CPU: all {CPUS} are held by other jobs"):
            _extract(tiny_model, cifar_root, tmp_path, RayRunner())
    finally:
        ray.kill(other)
    assert not list(tmp_path.rglob("*.h5"))
    _wait_for_free_cpus()


def test_an_unreachable_cluster_is_one_line(tiny_model, cifar_root, tmp_path):
    out = run_cli("extract.py", *_cli(tiny_model, cifar_root, tmp_path, "127.0.0.1:9"), in_process=False)
    assert out.returncode == 2
    assert re.fullmatch(r"Error: cannot join the Ray cluster at 127\.0\.0\.1:9: nothing answers there \(.+\)",
                        out.stderr.strip()), out.stderr


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


def test_one_job_keeps_its_workers_for_both_splits(cluster, tiny_model, cifar_root, tmp_path):
    """extract.py's two splits: the model is loaded once per worker unless the settings change."""
    with RayRunner(workers=2) as runner:
        _extract(tiny_model, cifar_root, tmp_path, runner)
        pids = [worker.pids[-1] for worker in runner._pool]
        pipeline.extract(_key(tiny_model), "test", data_dir=cifar_root, cache_dir=tmp_path, chunk_size=8,
                         batch_size=4, engine="tensorflow", progress=False, log=lambda _: None, runner=runner)
        assert [worker.pids[-1] for worker in runner._pool] == pids
        _extract(tiny_model, cifar_root, tmp_path / "other", runner, batch_size=2)
        assert [worker.pids[-1] for worker in runner._pool] != pids
    _wait_for_free_cpus()


def _killed(*_):
    raise KeyboardInterrupt


def test_the_bar_starts_at_the_rows_a_killed_run_committed(cluster, tiny_model, cifar_root, tmp_path, monkeypatch):
    """As the local bar does; before, a resumed shard's rows were counted only when the shard ended."""
    writes, original = [], write.CacheWriter.write
    monkeypatch.setattr(write.CacheWriter, "write", lambda *args: _killed() if writes.append(1) or len(writes) == 3
                        else original(*args))  # shard 0 (24 items) interrupted at its third chunk: two committed
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_model, cifar_root, tmp_path, LocalRunner(), num_shards=4)
    monkeypatch.undo()
    bars, real = [], ray_runner.progress_bar
    monkeypatch.setattr(ray_runner, "progress_bar", lambda *args: bars.append(real(*args)) or bars[-1])
    resumed = _extract(tiny_model, cifar_root, tmp_path, RayRunner(workers=2), progress=True)
    (bar,) = bars
    assert (bar.initial, bar.n, resumed.processed) == (16, 120, 104)
    _wait_for_free_cpus()


def test_more_workers_than_the_cluster_has_cpus_is_an_error_not_a_hang(cluster, tiny_model, cifar_root, tmp_path):
    with pytest.raises(UserError, match=f"^workers {CPUS + 1} needs one CPU each; the Ray cluster has {CPUS} free"):
        _extract(tiny_model, cifar_root, tmp_path, RayRunner(workers=CPUS + 1))
    assert not list(tmp_path.rglob("*.h5"))


def test_without_ray_the_runner_is_a_one_line_error(tiny_model, cifar_root, tmp_path):
    hidden = tmp_path / "no_ray" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = dict(os.environ, PYTHONPATH=f"{hidden.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = [sys.executable, str(ROOT / "extract.py"), *_cli(tiny_model, cifar_root, tmp_path / "cache", "auto")]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("Error: --runner ray needs Ray, which is not installed: "
                                     "pip install -r requirements-ray.txt"), result.stderr
    assert not list((tmp_path / "cache").rglob("*.h5"))


def test_a_new_plan_counts_the_cpus_the_jobs_own_workers_hold(monkeypatch):
    """Between splits the job's workers stay up, holding their CPUs: the next split's plan still gives each worker
    SHARDS_PER_WORKER shards."""
    runner = RayRunner()
    monkeypatch.setattr(RayRunner, "_free_slots", lambda self, ray: (0, "CPU"))  # all held by the pool below
    runner._pool = [object()] * 8
    assert runner.shards(120_000, 1024) == 16  # 8 workers x 2; by size alone 12
    runner._kind = "GPU"  # 4 GPU workers: the free CPUs (no GPU is free) are not theirs
    runner._pool = [object()] * 4
    monkeypatch.setattr(RayRunner, "_free_slots", lambda self, ray: (28, "CPU"))
    assert runner.shards(120_000, 1024) == 12
