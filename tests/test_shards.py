"""Stage 1 as shards: the plan, one shard per process (a job array), assembly, provenance, kills."""

import json
import os
import signal
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

from featcache.cache.layout import partial_path
from featcache.cache.write import locked
from featcache.errors import UserError
from featcache.extract import extractor, pipeline, plan, runners, shard
from conftest import KILL_POINT, ROOT, make_key, run_cli
from test_folder import write_tree

SHARDS = 4


def _rows(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}, dict(f.attrs)


def _same(path, reference):
    rows, _ = _rows(path)
    want, _ = reference
    assert set(rows) == set(want)
    for name, values in want.items():
        np.testing.assert_array_equal(rows[name], values, err_msg=name)


def _options(model, root, cache, *extra):
    return ["--split", "train", "--data-dir", root, "--model", model, "--image-size", "48", "--resize", "bilinear",
            "--chunk-size", "8", "--batch-size", "4", "--engine", "tensorflow", "--quiet", "--cache-dir", cache, *extra]


@pytest.fixture(scope="module")
def reference(tiny_model, cifar_root, tmp_path_factory):
    """The local runner's cache of the fixture's train split (one shard: the cache itself)."""
    cache = tmp_path_factory.mktemp("local")
    done = run_cli("extract.py", *_options(tiny_model, cifar_root, cache))
    assert done.returncode == 0, done.stderr
    (path,) = cache.rglob("train.h5")
    return _rows(path)


def test_plan_edges_are_chunk_multiples():
    made = plan.make(120, 4, 8, "f", {})
    assert made.shards == ((0, 24), (24, 56), (56, 88), (88, 120)) and plan.sizes(made) == "24 to 32 items"
    assert plan.make(121, 2, 8, "f", {}).shards == ((0, 64), (64, 121))
    assert plan.sizes(plan.make(300, 2, 128, "f", {})) == "128 to 172 items"
    assert plan.sizes(plan.make(128, 2, 8, "f", {})) == "64 items each"
    with pytest.raises(UserError, match=r"^num_shards 5 is more than the split.s 4 chunks of chunk_size=8"):
        plan.make(30, 5, 8, "f", {})


def test_four_shard_processes_then_assembly_equal_the_local_cache(tiny_model, cifar_root, reference, tmp_path):
    for index in range(SHARDS):
        done = run_cli("extract.py", *_options(tiny_model, cifar_root, tmp_path, "--num-shards", SHARDS,
                                              "--shard-index", index))
        assert done.returncode == 0, done.stderr
        assert f"shard {index} of {SHARDS} done:" in done.stdout, done.stdout
    (recorded,) = tmp_path.rglob("train.plan.json")
    assert json.loads(recorded.read_text())["shards"] == [[0, 24], [24, 56], [56, 88], [88, 120]]
    assert len(list(tmp_path.rglob("train.shards/*-of-00004.h5"))) == SHARDS and not list(tmp_path.rglob("train.h5"))
    joined = run_cli("extract.py", *_options(tiny_model, cifar_root, tmp_path))
    assert joined.returncode == 0, joined.stderr
    assert "4 of 4 shards" in joined.stdout and "assembling 4 shards" in joined.stdout, joined.stdout
    (path,) = tmp_path.rglob("train.h5")
    _same(path, reference)
    _, attrs = _rows(path)
    for name in ("openvino_version", "nncf_version", "ray_version", "tensorflow_version", "engine", "batch_size"):
        assert name in attrs, name
    assert attrs["rows"] == attrs["rows_done"] == 120 and "shard" not in attrs
    assert not list(tmp_path.rglob("train.shards"))  # removed once joined


def test_a_folder_in_shards_keeps_its_items_and_skipped_files(tiny_model, tmp_path):
    tree = write_tree(tmp_path / "images", per_class=(9, 2))
    (tree / "train" / "dog" / "004.png").write_bytes(b"not a png")  # item 13 of 27: skipped in shard 1
    key = make_key(str(tiny_model), 32, "bilinear", dataset="folder", data_dir=tree)
    options = dict(data_dir=tree, chunk_size=4, batch_size=2, engine="tensorflow", progress=False, log=lambda _: None)
    local = pipeline.extract(key, "train", cache_dir=tmp_path / "local", **options)
    assert local.processed == 26  # the images embedded: not the unreadable one
    tasks = [pipeline.extract(key, "train", cache_dir=tmp_path / "sharded", num_shards=3, shard_index=index, **options)
             for index in range(3)]
    assert [task.processed for task in tasks] == [8, 7, 11]  # shards (0, 8), (8, 16), (16, 27): item 13 unreadable
    joined = pipeline.extract(key, "train", cache_dir=tmp_path / "sharded", **options)
    _same(joined.path, _rows(local.path))
    assert joined.rows == local.rows == 26 and joined.skipped == local.skipped and len(joined.skipped) == 1
    summary = joined.summary()  # an assembly alone: no engine, no model load, no image embedded
    assert summary.startswith("assembled: 26 rows from 3 shards, 0.000 GB in ") and "GB/s), no image embedded; " \
        f"1 unreadable file skipped -> {joined.path}" in summary and "model load" not in summary, summary


def test_a_shard_killed_mid_chunk_resumes_inside_the_shard(tiny_model, cifar_root, reference, tmp_path):
    args = [sys.executable, str(ROOT / "extract.py"), *map(str, _options(tiny_model, cifar_root, tmp_path,
                                                                       "--num-shards", SHARDS, "--shard-index", 1))]
    script = KILL_POINT + f"import runpy; runpy.run_path({args[1]!r}, run_name='__main__')"
    killed = subprocess.run([args[0], "-c", script, "_write_whole_chunks", "5", *args[2:]], capture_output=True,
                            cwd=ROOT, timeout=300)  # the 2nd commit of shard 1 (3 datasets a commit): mid-chunk
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (partial,) = tmp_path.rglob("00001-of-00004.partial.h5")
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["rows_done"]) == 8
    rerun = subprocess.run(args[:1] + args[1:], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "at row 8 (item 32 of 56)" in rerun.stdout and "24 images" in rerun.stdout, rerun.stdout
    for index in (0, 2, 3):
        assert run_cli("extract.py", *_options(tiny_model, cifar_root, tmp_path, "--num-shards", SHARDS,
                                               "--shard-index", index)).returncode == 0
    assert run_cli("extract.py", *_options(tiny_model, cifar_root, tmp_path)).returncode == 0
    (path,) = tmp_path.rglob("train.h5")
    _same(path, reference)


def _shard(tiny_model, cifar_root, cache, index, **kw):
    key = make_key(str(tiny_model), 48, "bilinear")
    kw.setdefault("log", lambda _: None)
    return pipeline.extract(key, "train", data_dir=cifar_root, cache_dir=cache, chunk_size=8, batch_size=4,
                            engine="tensorflow", progress=False, num_shards=SHARDS, shard_index=index, **kw)


def test_assembly_refuses_shards_of_other_versions_in_one_line(tiny_model, cifar_root, tmp_path, monkeypatch):
    for index in range(SHARDS - 1):
        _shard(tiny_model, cifar_root, tmp_path, index)
    real = extractor.library_versions
    monkeypatch.setattr(extractor, "library_versions", lambda: dict(real(), openvino_version="2023.0.0"))
    _shard(tiny_model, cifar_root, tmp_path, SHARDS - 1)
    monkeypatch.setattr(extractor, "library_versions", real)
    with pytest.raises(UserError) as error:
        pipeline.extract(make_key(str(tiny_model), 48, "bilinear"), "train", data_dir=cifar_root, cache_dir=tmp_path,
                         chunk_size=8, batch_size=4, engine="tensorflow", progress=False, log=lambda _: None)
    message = str(error.value)
    assert "\n" not in message and "were made with different openvino_version" in message, message
    assert "2023.0.0 in shards 3" in message and not list(tmp_path.rglob("train.h5"))


def test_a_partial_shard_of_other_versions_is_restarted_saying_so(tiny_model, cifar_root, tmp_path, monkeypatch):
    args = [sys.executable, str(ROOT / "extract.py"), *map(str, _options(tiny_model, cifar_root, tmp_path,
                                                                       "--num-shards", SHARDS, "--shard-index", 0))]
    script = KILL_POINT + f"import runpy; runpy.run_path({args[1]!r}, run_name='__main__')"
    killed = subprocess.run([args[0], "-c", script, "write", "2", *args[2:]], capture_output=True, cwd=ROOT,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL
    real = extractor.library_versions
    monkeypatch.setattr(extractor, "library_versions", lambda: dict(real(), tensorflow_version="2.0.0"))
    lines = []
    _shard(tiny_model, cifar_root, tmp_path, 0, log=lines.append)
    assert any(line.startswith("restarting") and line.endswith("8 rows of it are not reused: it was made with "
                                                                "other tensorflow_version") for line in lines), lines


def test_a_damaged_shard_is_refused_at_assembly(tiny_model, cifar_root, tmp_path):
    for index in range(SHARDS):
        _shard(tiny_model, cifar_root, tmp_path, index)
    (shard,) = tmp_path.rglob("00002-of-00004.h5")
    with h5py.File(shard, "r") as f:
        offset = f["embeddings"].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as fh:  # bit rot inside the first stored chunk of its embeddings
        fh.seek(offset + 100)
        byte = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match=f"^shard {shard} is damaged .*; remove it and run again"):
        pipeline.extract(make_key(str(tiny_model), 48, "bilinear"), "train", data_dir=cifar_root, cache_dir=tmp_path,
                         chunk_size=8, batch_size=4, engine="tensorflow", progress=False, log=lambda _: None)
    assert not list(tmp_path.rglob("train.h5"))


def test_another_shard_count_than_the_plan_under_way_is_one_line(tiny_model, cifar_root, tmp_path):
    _shard(tiny_model, cifar_root, tmp_path, 0)
    with pytest.raises(UserError, match=r"is being built in 4 shards \(plan .*\); pass num_shards=4, or "
                                        r"force=True to start again in 2$"):
        pipeline.extract(make_key(str(tiny_model), 48, "bilinear"), "train", data_dir=cifar_root, cache_dir=tmp_path,
                         num_shards=2, shard_index=1, chunk_size=8, engine="tensorflow", progress=False)


def test_the_join_takes_the_chunk_size_of_the_plan_under_way(tiny_model, cifar_root, reference, tmp_path):
    for index in range(2):  # shards of chunks of 16; the join is run without the chunk size
        pipeline.extract(make_key(str(tiny_model), 48, "bilinear"), "train", data_dir=cifar_root, cache_dir=tmp_path,
                         chunk_size=16, batch_size=4, engine="tensorflow", progress=False, num_shards=2,
                         shard_index=index, log=lambda _: None)
    lines = []
    joined = _extract(tiny_model, cifar_root, tmp_path, chunk_size=None, log=lines.append)
    assert joined.processed == 0 and joined.assembled.startswith("2 shards, ") and "2 of 2 shards" in lines[0], lines
    assert _rows(joined.path)[1]["chunk_size"] == 16
    _same(joined.path, reference)


def test_another_chunk_size_than_the_plan_under_way_is_one_line(tiny_model, cifar_root, tmp_path):
    _shard(tiny_model, cifar_root, tmp_path, 0)
    with pytest.raises(UserError, match=r"is being built in chunks of 8 \(plan .*\); pass chunk_size=8, or "
                                        r"force=True to start again in chunks of 16$"):
        _extract(tiny_model, cifar_root, tmp_path, chunk_size=16)


def test_force_in_another_chunk_size_starts_the_partial_file_again(tiny_model, cifar_root, reference, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(shard.CacheWriter, "finish", _killed)  # every row committed in chunks of 8, not published
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_model, cifar_root, tmp_path)
    monkeypatch.undo()
    lines = []
    again = _extract(tiny_model, cifar_root, tmp_path, chunk_size=16, force=True, log=lines.append)
    assert again.processed == 120 and _rows(again.path)[1]["chunk_size"] == 16
    assert lines[0].startswith("restarting ") and lines[0].endswith("other chunk_size"), lines
    _same(again.path, reference)


def test_a_plan_no_longer_under_way_is_made_again(tiny_model, cifar_root, reference, tmp_path):
    for index in range(SHARDS):
        _shard(tiny_model, cifar_root, tmp_path, index)
    assert _extract(tiny_model, cifar_root, tmp_path).assembled.startswith("4 shards, ")
    lines = []  # the cache published: a rebuild plans anew (the local runner: one shard), not in the old 4 shards
    again = _extract(tiny_model, cifar_root, tmp_path, force=True, log=lines.append)
    assert again.processed == 120 and not again.assembled and not any("shards" in line for line in lines), lines
    (recorded,) = tmp_path.rglob("train.plan.json")
    assert json.loads(recorded.read_text())["shards"] == [[0, 120]]
    _same(again.path, reference)


def test_force_does_not_remove_a_shard_another_process_is_building(tiny_model, cifar_root, tmp_path):
    for index in range(2):
        _shard(tiny_model, cifar_root, tmp_path, index)
    (folder,) = tmp_path.rglob("train.shards")
    building = folder / "00002-of-00004.h5"  # its writer (a job array's task) at work: its partial file, its lock
    partial_path(building).write_bytes(b"")
    with locked(building), pytest.raises(UserError, match=f"^cache {building} is busy: another writer"):
        _extract(tiny_model, cifar_root, tmp_path, num_shards=2, force=True)
    assert len(list(folder.glob("*.h5"))) == 3


def test_the_job_names_its_files_by_absolute_paths(tiny_model, cifar_root, tmp_path, monkeypatch):
    """A Ray worker opens the source and writes the shards by the job's paths, in its own folder and environment."""
    class Seen(runners.LocalRunner):
        def run(self, job, indices, log, progress, reader):
            self.job = job
            return super().run(job, indices, log, progress, reader)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(cifar_root))
    runner = Seen()
    pipeline.extract(make_key(str(tiny_model), 48, "bilinear"), "train", cache_dir="cache", chunk_size=8,
                     batch_size=4, engine="tensorflow", progress=False, log=lambda _: None, runner=runner)
    assert runner.job.data_dir == str(cifar_root / "cifar-10-batches-py") and runner.job.path.is_absolute()
    assert runner.job.cache_dir == str(tmp_path / "cache")


def test_an_assembly_ends_well_when_another_run_removed_the_shards(tiny_model, cifar_root, reference, tmp_path,
                                                                  monkeypatch):
    for index in range(SHARDS):
        _shard(tiny_model, cifar_root, tmp_path, index)
    real = shard.shutil.rmtree

    def raced(folder):  # a second run removes the shards of the published cache first
        real(folder)
        real(folder)

    monkeypatch.setattr(shard.shutil, "rmtree", raced)
    _same(_extract(tiny_model, cifar_root, tmp_path).path, reference)


def test_shard_options_are_checked_in_one_line(tiny_model, cifar_root, tmp_path):
    out = run_cli("extract.py", *_options(tiny_model, cifar_root, tmp_path, "--shard-index", 1))
    assert out.returncode == 2 and out.stderr.strip() == "Error: --shard-index needs --num-shards, and must be below it"


def _extract(tiny_model, cifar_root, cache, **kw):
    options = dict(chunk_size=8, batch_size=4, engine="tensorflow", progress=False, log=lambda _: None)
    return pipeline.extract(make_key(str(tiny_model), 48, "bilinear"), "train", data_dir=cifar_root, cache_dir=cache,
                            **dict(options, **kw))


def test_the_plan_line_gives_the_shards_real_sizes(tiny_model, cifar_root, tmp_path):
    lines = []
    _shard(tiny_model, cifar_root, tmp_path, 0, log=lines.append)
    assert lines[0].startswith("plan: 4 shards of 24 to 32 items -> "), lines


def test_force_resumes_the_shards_built_since_the_cache_and_removes_older_ones_saying_so(
        tiny_model, cifar_root, reference, tmp_path, monkeypatch):
    for index in range(SHARDS - 1):  # a job array's tasks, each with --force
        _shard(tiny_model, cifar_root, tmp_path, index, force=True)
    lines = []
    forced = _extract(tiny_model, cifar_root, tmp_path, force=True, log=lines.append)  # the same command, joining
    assert "3 of 4 shards of " in lines[0] and lines[0].endswith(" are done; 1 left"), lines
    assert forced.processed == 32 and forced.assembled.startswith("4 shards, ")  # shard 3 alone embedded
    _same(forced.path, reference)
    # the shards of that cache, left by an assembly killed once it was published: --force embeds them all again
    for index in range(SHARDS):
        _shard(tiny_model, cifar_root, tmp_path, index, force=True)
    monkeypatch.setattr(shard.shutil, "rmtree", _killed)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_model, cifar_root, tmp_path, force=True)
    monkeypatch.undo()
    assert len(list(tmp_path.rglob("train.shards/*.h5"))) == SHARDS
    lines = []
    again = _extract(tiny_model, cifar_root, tmp_path, force=True, log=lines.append)
    assert lines[0].startswith(f"`force=True` rebuilds {again.path}: removed 4 files older than train.h5 "
                               "(00000-of-00004.h5, 00001-of-00004.h5, 00002-of-00004.h5 and 1 more; "), lines
    assert again.processed == 120
    _same(again.path, reference)


def _killed(*_):
    raise KeyboardInterrupt


def test_the_shards_of_a_published_cache_are_removed_by_the_next_run(tiny_model, cifar_root, reference, tmp_path,
                                                                     monkeypatch):
    for index in range(SHARDS):
        _shard(tiny_model, cifar_root, tmp_path, index)
    monkeypatch.setattr(shard.shutil, "rmtree", _killed)  # killed between publishing train.h5 and removing the shards
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_model, cifar_root, tmp_path)
    monkeypatch.undo()
    (path,) = tmp_path.rglob("train.h5")
    assert len(list(tmp_path.rglob("train.shards/*.h5"))) == SHARDS
    lines = []
    again = _extract(tiny_model, cifar_root, tmp_path, num_shards=SHARDS, log=lines.append)
    assert again.up_to_date and len(lines) == 1 and lines[0].startswith("removed 4 files older than train.h5 ("), lines
    assert lines[0].endswith(" GB), not needed by the complete cache") and not list(tmp_path.rglob("train.shards"))
    _same(path, reference)


def test_an_assembly_never_resumes_the_partial_file_of_a_one_pass_run(tiny_model, cifar_root, reference, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(shard.CacheWriter, "finish", _killed)  # every row committed, not published
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_model, cifar_root, tmp_path, chunk_size=16)  # one pass, chunks of 16: another plan
    monkeypatch.undo()
    (partial,) = tmp_path.rglob("train.partial.h5")
    with h5py.File(partial, "r+") as f:
        assert int(f.attrs["rows_done"]) == 120
        f["embeddings"][:] = 0  # rows an assembly of the 4 shards would not give
    for index in range(SHARDS):  # another plan than the one under way: started again with `force`
        _shard(tiny_model, cifar_root, tmp_path, index, force=True)
    joined = _extract(tiny_model, cifar_root, tmp_path)
    _same(joined.path, reference)


def test_older_work_whose_writer_holds_its_lock_is_kept(tmp_path):
    cache = tmp_path / "train.h5"
    done, running = plan.shard_path(cache, 0, 2), partial_path(plan.shard_path(cache, 1, 2))
    done.parent.mkdir()
    for file, seconds in ((done, 1), (running, 2), (cache, 3)):  # both shard files older than the cache
        file.write_bytes(b"rows")
        os.utime(file, ns=(seconds * 10**9, seconds * 10**9))
    with locked(plan.shard_path(cache, 1, 2)):  # shard 1's process is at work on its partial file
        removed = plan.remove_older_work(cache)
    assert removed.startswith("1 file older than train.h5 (00000-of-00002.h5; ") and not done.exists(), removed
    assert running.exists()
    assert plan.remove_older_work(cache).startswith("1 file older than train.h5 (00001-of-00002.partial.h5; ")
    assert not done.parent.exists()


def test_the_progress_bar_starts_at_the_rows_resumed(tiny_model, cifar_root, tmp_path, monkeypatch):
    writes, write = [], shard.CacheWriter.write
    monkeypatch.setattr(shard.CacheWriter, "write", lambda *args: _killed() if writes.append(1) or len(writes) == 3
                        else write(*args))  # interrupted at the third chunk: two committed
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_model, cifar_root, tmp_path)
    monkeypatch.undo()
    bars = []
    monkeypatch.setattr(runners, "progress_bar", lambda *args: bars.append(shard.progress_bar(*args)) or bars[-1])
    resumed = _extract(tiny_model, cifar_root, tmp_path, progress=True)
    (bar,) = bars
    assert (bar.initial, bar.n, resumed.processed) == (16, 120, 104)  # the rate counts only the rows embedded now


def test_a_join_says_assembled_once(tiny_model, cifar_root, tmp_path):
    for index in range(SHARDS):
        _shard(tiny_model, cifar_root, tmp_path, index)
    lines = []
    joined = _extract(tiny_model, cifar_root, tmp_path, log=lines.append)
    said = [line.split(":")[0] for line in lines + joined.summary().splitlines() if line.startswith("assembl")]
    assert said == [f"assembling 4 shards into {joined.path}", "assembled"], said


def test_the_local_bar_is_counted_in_one_thread(tiny_model, tmp_path, monkeypatch):
    """A chunk that gave no row is counted by the writer's thread too (it was the main thread's, racing the
    writer's counts of committed chunks without a lock)."""
    tree = write_tree(tmp_path / "images", per_class=(4, 2))
    for name in ("002.png", "003.png"):  # items 2 and 3: the second chunk of two gives no row
        (tree / "train" / "cat" / name).write_bytes(b"not a png")
    threads = []

    def recorded(*args):
        bar = shard.progress_bar(*args)
        update = bar.update
        bar.update = lambda n: threads.append(threading.current_thread()) or update(n)
        return bar

    monkeypatch.setattr(runners, "progress_bar", recorded)
    key = make_key(str(tiny_model), 32, "bilinear", dataset="folder", data_dir=tree)
    pipeline.extract(key, "train", data_dir=tree, cache_dir=tmp_path / "cache", chunk_size=2, engine="tensorflow",
                     log=lambda _: None)
    assert len(threads) == 6 and len(set(threads)) == 1 and threading.main_thread() not in threads, threads
