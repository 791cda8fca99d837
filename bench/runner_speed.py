#!/usr/bin/env python
"""Benchmark the Ray runner against the local runner: same images, same session, alternating runs.

Each round runs `extract.py --split train --limit N --views plain --force` once with the local
runner and once with `--runner ray --workers W` (a Ray started for the run, unless --ray-address),
each under /usr/bin/time for the driver's peak RSS; the Ray summary gives each worker's peak RSS.
images/s is the summary's own figure (after the model is loaded); wall is the whole command.
Prints medians and the Ray/local ratio. On a machine with no spare cores this measures overhead.

    python bench/runner_speed.py --data-dir ../shared/data/cifar-10-python.tar.gz --images 5000 --rounds 3
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcache import cpu  # noqa: E402

RUN_TIMEOUT = 900  # seconds: a run that hangs fails the bench instead of stopping it


def run(args: list[str]) -> dict:
    """One extract.py run: images/s, wall seconds, driver peak RSS (GB), workers' peak RSS (GB)."""
    started = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, str(ROOT / "extract.py"), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=RUN_TIMEOUT)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"extract.py failed: {out.stderr[-2000:]}")
    speed = float(re.search(r"\(([\d.]+) images/s", out.stdout).group(1))
    driver = int(re.search(r"maxrss_kb=(\d+)", out.stderr).group(1)) / 1e6
    workers = [float(v) for v in re.findall(r"peak RSS ([\d.]+) GB", out.stdout)]
    return {"speed": speed, "wall": wall, "driver": driver, "workers": workers, "stdout": out.stdout}


@click.command()
@click.option("--data-dir", required=True, help="CIFAR-10 (folder or .tar.gz).")
@click.option("--images", default=5000, show_default=True, help="Train images per run (--limit).")
@click.option("--rounds", default=3, show_default=True, help="Runs of each runner, alternating (medians reported).")
@click.option("--workers", default=2, show_default=True, help="Ray workers.")
@click.option("--ray-address", default=None, help="Join this cluster instead of starting a Ray per run.")
def main(data_dir, images, rounds, workers, ray_address):
    common = ["--split", "train", "--limit", str(images), "--views", "plain", "--force", "--quiet",
              "--data-dir", data_dir]
    ray = ["--runner", "ray", "--workers", str(workers)] + (["--ray-address", ray_address] if ray_address else [])
    results = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in results:  # a first run per runner records the model's input size in its cache dir
            run(common + ["--cache-dir", f"{tmp}/{name}", "--limit", "8"] + (ray if name == "ray" else []))
        for round_ in range(rounds):
            for name, extra in (("local", []), ("ray", ray)):
                result = run(common + ["--cache-dir", f"{tmp}/{name}"] + extra)
                results[name].append(result)
                print(f"round {round_ + 1} {name}: {result['speed']:.1f} images/s, wall {result['wall']:.1f} s, "
                      f"driver peak RSS {result['driver']:.2f} GB, workers {result['workers']}", flush=True)
    print(f"\nCPU: {cpu.name()} ({cpu.noted_flags()}); {images} train images, plain view, {rounds} rounds, medians")
    print("| runner | images/s | wall s | driver peak RSS GB | worker peak RSS GB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        worker_rss = max((max(r["workers"]) for r in runs if r["workers"]), default=0.0)
        print(f"| {name} | {statistics.median(r['speed'] for r in runs):.1f} | "
              f"{statistics.median(r['wall'] for r in runs):.1f} | "
              f"{statistics.median(r['driver'] for r in runs):.2f} | {worker_rss or '-'} |")
    speeds = {name: statistics.median(r["speed"] for r in runs) for name, runs in results.items()}
    ratio = speeds["ray"] / speeds["local"]
    print(f"ray / local images/s: {ratio:.3f} (overhead {100 * (1 - ratio):.1f}%)")


if __name__ == "__main__":
    main()
