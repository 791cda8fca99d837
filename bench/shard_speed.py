#!/usr/bin/env python
"""Benchmark stage 1's shards on a local two-node Ray cluster: images/s for 1 and 2 workers, the driver's CPU seconds
and read bytes, whether the Ray cache equals the local one bit for bit, and the assembly rate in GB/s.

Writes (once) a class folder of photo-size JPEGs under --tree (all in train/, a few in test/), starts a Ray head on
--port with its own temp dir and a second node with another (--cpus-per-node CPUs each), both as `ray start --block`
processes that this script stops by their handles, which stops their nodes. Then one local run (the reference) and
one `--runner ray --ray-address` run per worker count, each driver under a launcher that records its own
/proc/self/io rchar and CPU seconds at exit. Last, assembly alone: --assembly-gb of synthetic shards joined by
cache/assemble.py. Each extract.py run uses --image-size (so no driver loads the model to learn its size).

    python bench/shard_speed.py --tree /tmp/photos --images 2000 --port 6391
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcache import cpu  # noqa: E402
from featcache.cache import assemble, write  # noqa: E402

RUN_TIMEOUT = 1800  # seconds: a run that hangs fails the bench instead of stopping it
ENV = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))  # Ray 2.60's cluster token, sent by all
CLASSES = ("alpha", "beta", "gamma", "delta")
LAUNCH = """
import atexit, resource, runpy, sys
out, script = sys.argv.pop(1), sys.argv[1]
def record():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    open(out, "w").write(f"{io['rchar']} {usage.ru_utime + usage.ru_stime}")
atexit.register(record)
sys.argv.pop(0)
runpy.run_path(script, run_name="__main__")
"""


def write_photos(tree: Path, count: int, width: int, height: int, seed: int = 0) -> int:
    """`count` JPEGs (quality 90) of smooth colour fields with grain, about a phone photo's bytes per pixel, in
    train/<class>/ (and 4 per class in test/); the total bytes of train's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", -(-count // len(CLASSES))), ("test", 4)):
        for label, name in enumerate(CLASSES):
            folder = tree / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class if split == "test" else min(per_class, count - label * per_class)):
                coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
                field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
                pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n:05d}.jpg", quality=90)
    return sum(path.stat().st_size for path in (tree / "train").rglob("*.jpg"))


class TwoNodes:
    """A Ray head and a second node on this machine, each its own `ray start --block` process and temp dir."""

    def __init__(self, port: int, cpus: int, temp: Path):
        self.address = f"127.0.0.1:{port}"
        self.nodes = []
        for index in range(2):
            base = port + 20 * (index + 1)
            node = ["ray", "start", "--block", "--num-cpus", str(cpus), "--temp-dir", str(temp / f"node{index}"),
                    "--node-manager-port", str(base), "--object-manager-port", str(base + 1),
                    "--dashboard-agent-listen-port", str(base + 2), "--dashboard-agent-grpc-port", str(base + 3),
                    "--metrics-export-port", str(base + 4), "--runtime-env-agent-port", str(base + 5),
                    "--min-worker-port", str(port + 100 + 100 * index), "--max-worker-port",
                    str(port + 199 + 100 * index), "--disable-usage-stats"]
            node += (["--head", "--port", str(port), "--include-dashboard", "false", "--ray-client-server-port",
                      str(port + 1)] if index == 0 else ["--address", self.address])
            self.nodes.append(subprocess.Popen(node, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV))
            self._wait_for_nodes(index + 1)

    def _wait_for_nodes(self, count: int, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = subprocess.run(["ray", "status", "--address", self.address], capture_output=True, text=True,
                                    env=ENV)
            if status.returncode == 0 and len(re.findall(r"^ \d+ node_", status.stdout, re.M)) >= count:
                return
            time.sleep(1)
        self.stop()
        raise SystemExit(f"the Ray cluster at {self.address} did not reach {count} node(s) in {timeout:.0f} s")

    def stop(self):
        for node in reversed(self.nodes):  # SIGTERM to `ray start --block` stops the processes it started
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()


def extract(args: list[str], record: Path) -> dict:
    """One extract.py run under the launcher: images/s, wall s, the driver's rchar bytes and CPU seconds."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LAUNCH, str(record), str(ROOT / "extract.py"), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=RUN_TIMEOUT, env=ENV)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"extract.py failed: {out.stderr[-2000:]}")
    found = re.search(r"done: (\d+) rows, (\d+) images in [\d.]+ s \(([\d.]+) images/s", out.stdout)
    rchar, cpu_seconds = record.read_text().split()
    return {"rows": int(found.group(1)), "speed": float(found.group(3)), "wall": wall, "rchar": int(rchar),
            "cpu": float(cpu_seconds), "stdout": out.stdout}


def same_datasets(one: Path, other: Path) -> bool:
    with h5py.File(one, "r") as a, h5py.File(other, "r") as b:
        return set(a) == set(b) and all(np.array_equal(a[name][()], b[name][()]) for name in a)


def assembly_rate(folder: Path, gigabytes: float, shards: int = 4, dim: int = 1280) -> tuple[float, float]:
    """(GB copied, GB/s): synthetic shards of float32 rows joined by cache/assemble.py, from a cold start of the
    copy (the shards were just written: they may sit in the page cache, as on a node that just wrote them)."""
    rows = int(gigabytes * 1e9 / (dim * 4) / shards)
    paths = []
    for index in range(shards):
        path = folder / f"{index:05d}-of-{shards:05d}.h5"
        attrs = dict(tool="featcache", format_version=2, dataset="synthetic", split="train", model="m", image_size=1,
                     resize="r", limit=0, rows=rows, source_fingerprint="f", engine="e", class_names='["a", "b"]')
        with write.locked(path), write.CacheWriter(path, attrs, dim, ("plain",)) as writer:
            for lo in range(0, rows, assemble.BLOCK_ROWS):
                hi = min(lo + assemble.BLOCK_ROWS, rows)
                writer.write(lo, {"plain": np.full((hi - lo, dim), index, np.float32)}, np.zeros(hi - lo, np.int64))
            writer.finish()
        paths.append(path)
    target = folder / "train.h5"
    started = time.perf_counter()
    with write.locked(target):
        assemble.assemble(target, paths, [index * rows for index in range(shards)])
    seconds = time.perf_counter() - started
    size = target.stat().st_size / 1e9
    return size, size / seconds


@click.command()
@click.option("--tree", type=click.Path(path_type=Path), required=True, help="The photo folder (written if absent).")
@click.option("--images", default=2000, show_default=True, help="Train images to write.")
@click.option("--width", default=640, show_default=True)
@click.option("--height", default=480, show_default=True)
@click.option("--port", default=6391, show_default=True, help="The Ray head's port (others follow it).")
@click.option("--cpus-per-node", default=1, show_default=True)
@click.option("--workers", default="1,2", show_default=True, help="Worker counts to run, comma-separated.")
@click.option("--chunk-size", default=256, show_default=True)
@click.option("--model", default=None, help="Default: extract.py's.")
@click.option("--image-size", default=224, show_default=True)
@click.option("--assembly-gb", default=1.0, show_default=True, help="Synthetic shards' size for the assembly rate.")
def main(tree, images, width, height, port, cpus_per_node, workers, chunk_size, model, image_size, assembly_gb):
    if not (tree / "train").is_dir():
        write_photos(tree, images, width, height)
    image_bytes = sum(path.stat().st_size for path in (tree / "train").rglob("*.jpg"))
    count = len(list((tree / "train").rglob("*.jpg")))
    print(f"{count} train JPEGs of {width}x{height}, {image_bytes / 1e6:.1f} MB", flush=True)
    common = ["--dataset", "folder", "--data-dir", str(tree), "--split", "train", "--views", "plain", "--chunk-size",
              str(chunk_size), "--image-size", str(image_size), "--quiet"] + (["--model", model] if model else [])
    results = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        results["local"] = extract(common + ["--cache-dir", str(tmp / "local")], tmp / "local.io")
        print(f"local: {results['local']['speed']:.1f} images/s", flush=True)
        (local,) = (tmp / "local").rglob("train.h5")
        cluster = TwoNodes(port, cpus_per_node, tmp / "ray")
        try:
            for count_ in map(int, workers.split(",")):
                name = f"ray, {count_} worker{'s' if count_ > 1 else ''}"
                cache = tmp / f"ray{count_}"
                result = extract(common + ["--cache-dir", str(cache), "--runner", "ray", "--ray-address",
                                           cluster.address, "--workers", str(count_)], tmp / f"ray{count_}.io")
                (made,) = cache.rglob("train.h5")
                result["same"] = same_datasets(made, local)
                results[name] = result
                print(f"{name}: {result['speed']:.1f} images/s, driver read {result['rchar'] / 1e6:.1f} MB, "
                      f"same cache as local: {result['same']}", flush=True)
                print("\n".join(f"  {line}" for line in result["stdout"].splitlines()[1:]), flush=True)
        finally:
            cluster.stop()
        gigabytes, rate = assembly_rate(tmp, assembly_gb)
    print(f"\nCPU: {cpu.name()} ({cpu.noted_flags()}); {count} JPEGs {width}x{height} ({image_bytes / 1e6:.1f} MB), "
          f"plain view, --chunk-size {chunk_size}; Ray: 2 nodes of {cpus_per_node} CPU on this machine")
    print("| runner | images/s | wall s | driver CPU s | driver read MB | read / image bytes | same as local |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['speed']:.1f} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rchar'] / 1e6:.1f} | "
              f"{100 * r['rchar'] / image_bytes:.1f}% | {r.get('same', '-')} |")
    print(f"assembly: {gigabytes:.2f} GB in 4 shards joined at {rate:.2f} GB/s")


if __name__ == "__main__":
    main()
