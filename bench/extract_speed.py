#!/usr/bin/env python
"""Benchmark stage 1 on the same real CIFAR-10 images: the seed's method vs our two engines.

Each method runs in its own subprocess (so its peak RSS is its own), embeds the same
images `--reps` times, and reports the median images/s, peak RSS, and the max abs
difference of its vectors from our TensorFlow engine's. Prints a Markdown table.

    python bench/extract_speed.py --images 256 --data-dir ../shared/data/cifar-10-python.tar.gz
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHODS = {
    "seed": "seed: PIL LANCZOS resize of the whole array + Keras hub.KerasLayer predict",
    "tensorflow": "featcache --engine tensorflow (in-graph bicubic resize, batch 16)",
    "openvino": "featcache --engine openvino (f32; whole uint8 graph, static batch 1, async queue)",
}


def _images(data_dir, n):
    from featcache import data

    return data.load_split(data.resolve_source(data_dir), "test", n).images


def _peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _seed_method(model, batch_size):
    """What the tutorial did: resize everything with PIL first, then predict through Keras."""
    import tensorflow_hub as hub
    import tf_keras
    from PIL import Image

    extractor = tf_keras.Sequential([hub.KerasLayer(model, input_shape=(224, 224, 3), trainable=False)])
    batch_size = batch_size or 32

    def embed(images):
        resized = np.array([np.array(Image.fromarray(img).resize((224, 224), Image.LANCZOS)) for img in images])
        return extractor.predict(resized / 255.0, batch_size=batch_size, verbose=0)

    return embed


def _our_engine(model, engine, batch_size):
    from featcache.extractor import Extractor, load_model

    extractor = Extractor(load_model(model), views=("plain",), batch_size=batch_size, engine=engine)
    return lambda images: extractor.embed(images)["plain"]


def worker(method, model, data_dir, n, reps, batch_size, out):
    images = _images(data_dir, n)
    embed = _seed_method(model, batch_size) if method == "seed" else _our_engine(model, method, batch_size)
    embed(images[:64])  # warm-up: tracing, compilation
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        vectors = embed(images)
        rates.append(len(images) / (time.perf_counter() - started))
    np.save(out, np.asarray(vectors, np.float32))
    print(json.dumps({"rates": rates, "peak_rss_mb": _peak_rss_mb()}))


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


@click.command()
@click.option("--images", default=256, show_default=True, help="Real test images embedded per run.")
@click.option("--reps", default=3, show_default=True, help="Timed runs per method (median reported).")
@click.option("--batch-size", type=int, default=None,
              help="Default: Keras' predict default (32) for the seed, each engine's own default for ours.")
@click.option("--model", default=str(ROOT.parent / "shared/models/mobilenet_v2_100_224_feature_vector"),
              show_default=True)
@click.option("--data-dir", default=str(ROOT.parent / "shared/data/cifar-10-python.tar.gz"), show_default=True)
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--worker", "worker_method", default=None, hidden=True)
@click.option("--out", default=None, hidden=True)
def main(images, reps, batch_size, model, data_dir, methods, worker_method, out):
    if worker_method:
        return worker(worker_method, model, data_dir, images, reps, batch_size, out)
    from featcache import ov_engine

    chosen = [m for m in methods.split(",") if m != "openvino" or ov_engine.available()]
    results, vectors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in chosen:
            out_file = Path(tmp) / f"{method}.npy"
            proc = subprocess.run([sys.executable, __file__, "--worker", method, "--out", out_file,
                                   "--images", str(images), "--reps", str(reps), "--model", model,
                                   "--data-dir", data_dir] + (["--batch-size", str(batch_size)] if batch_size else []), capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} failed:\n{proc.stderr[-2000:]}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            vectors[method] = np.load(out_file)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {images} real CIFAR-10 test images, "
          f"batch {batch_size or 'default'}, median of {reps} runs")
    print("| method | images/s | vs seed | vs tensorflow engine | peak RSS (MB) | max abs diff vs tensorflow engine |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rates = {method: statistics.median(results[method]["rates"]) for method in chosen}
    base, ours = rates[chosen[0]], rates.get("tensorflow", float("nan"))
    for method in chosen:
        diff = np.abs(vectors[method] - vectors["tensorflow"]).max() if "tensorflow" in vectors else float("nan")
        print(f"| {METHODS[method]} | {rates[method]:.1f} | {rates[method] / base:.2f}x | {rates[method] / ours:.2f}x "
              f"| {results[method]['peak_rss_mb']:.0f} | {diff:.2g} |")


if __name__ == "__main__":
    main()
