#!/usr/bin/env python
"""Benchmark stage 1 on the same real CIFAR-10 images: the seed's method vs our engines and precisions.

Each method runs in its own subprocess (so its peak RSS is its own), embeds the same
images `--reps` times, and reports the median images/s, peak RSS, the max abs difference of
its vectors from our TensorFlow engine's, and the max abs and mean cosine distance from the
OpenVINO f32 engine's. For each precision whose full default caches exist in `--cache-dir`
(made by `extract.py --precision P`), it also trains the default head on them and reports
its test accuracy. Prints a Markdown table.

    python bench/extract_speed.py --images 512 --data-dir ../shared/data/cifar-10-python.tar.gz
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from featcache import cpu  # noqa: E402

METHODS = {
    "seed": "seed: PIL LANCZOS resize of the whole array + Keras hub.KerasLayer predict",
    "tensorflow": "featcache --engine tensorflow (in-graph bicubic resize, batch 16)",
    "openvino": "featcache --engine openvino (f32; whole uint8 graph, static batch 1, async queue)",
    "openvino-bf16": "featcache --precision bf16 (OpenVINO, native bf16)",
    "openvino-int8": "featcache --precision int8 (OpenVINO, NNCF post-training INT8, 300 train images)",
}
PRECISION_OF = {"openvino": "f32", "openvino-bf16": "bf16", "openvino-int8": "int8"}
CIFAR_SHAPE = (32, 32)  # the images' shape, as extract.py tells the extractor (int8 calibrates for it)


def _images(data_dir, n):
    from featcache.extract.sources import cifar

    return cifar.load_split(cifar.resolve_source(data_dir), "test", n).images


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


def _our_engine(model, method, batch_size, data_dir, scratch):
    from featcache.extract.extractor import Extractor
    from featcache.extract.models import load_model
    from featcache.extract.sources import cifar
    from featcache.extract.quantize import Int8Quantizer

    engine, precision = method.split("-")[0], PRECISION_OF.get(method, "f32")
    train = cifar.SplitSource(cifar.resolve_source(data_dir), "train")
    quantizer = Int8Quantizer(train, scratch) if precision == "int8" else None
    extractor = Extractor(load_model(model), views=("plain",), batch_size=batch_size, engine=engine,
                          precision=precision, quantizer=quantizer,
                          input_shape=CIFAR_SHAPE)  # int8: calibration happens here, untimed
    return lambda images: extractor.embed(images)["plain"]


def worker(method, model, data_dir, n, reps, batch_size, out):
    images = _images(data_dir, n)
    embed = (_seed_method(model, batch_size) if method == "seed"
             else _our_engine(model, method, batch_size, data_dir, Path(out).parent / f"{method}-model"))
    embed(images[:64])  # warm-up: tracing, compilation
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        vectors = embed(images)
        rates.append(len(images) / (time.perf_counter() - started))
    np.save(out, np.asarray(vectors, np.float32))
    print(json.dumps({"rates": rates, "peak_rss_mb": _peak_rss_mb()}))


@click.command()
@click.option("--images", default=256, show_default=True, help="Real test images embedded per run.")
@click.option("--reps", default=3, show_default=True, help="Timed runs per method (median reported).")
@click.option("--batch-size", type=int, default=None,
              help="Default: Keras' predict default (32) for the seed, each engine's own default for ours.")
@click.option("--model", default=str(ROOT.parent / "shared/models/mobilenet_v2_100_224_feature_vector"),
              show_default=True)
@click.option("--data-dir", default=str(ROOT.parent / "shared/data/cifar-10-python.tar.gz"), show_default=True)
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--cache-dir", default=str(ROOT / "cache"), show_default=True,
              help="Where to look for full default caches per precision (for the head's test accuracy).")
@click.option("--worker", "worker_method", default=None, hidden=True)
@click.option("--out", default=None, hidden=True)
def main(images, reps, batch_size, model, data_dir, methods, cache_dir, worker_method, out):
    if worker_method:
        return worker(worker_method, model, data_dir, images, reps, batch_size, out)
    from featcache.extract import ov_engine

    unknown = [m for m in methods.split(",") if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}",
                                 param_hint="--methods")
    chosen = [m for m in methods.split(",") if not m.startswith("openvino") or ov_engine.available()]
    results, vectors, failures = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in chosen:
            out_file = Path(tmp) / f"{method}.npy"
            proc = subprocess.run([sys.executable, __file__, "--worker", method, "--out", out_file,
                                   "--images", str(images), "--reps", str(reps), "--model", model,
                                   "--data-dir", data_dir] + (["--batch-size", str(batch_size)] if batch_size else []),
                                  capture_output=True, text=True)
            if proc.returncode != 0:  # reported in its row; the other methods still get theirs
                last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                failures[method] = last.replace("|", "/")[:120]
                continue
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            vectors[method] = np.load(out_file)
    print(f"CPU: {cpu.name()} ({cpu.noted_flags()}), {os.cpu_count()} cores; {images} real CIFAR-10 test images, "
          f"batch {batch_size or 'default'}, median of {reps} runs")
    print("| method | images/s | vs seed | vs tensorflow engine | vs openvino f32 | peak RSS (MB) "
          "| max abs diff vs tensorflow engine | max abs / mean cosine distance vs openvino f32 "
          "| default head test acc (full caches) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rates = {method: statistics.median(results[method]["rates"]) for method in results}
    nan = float("nan")
    base, ours, f32 = rates.get(chosen[0], nan), rates.get("tensorflow", nan), rates.get("openvino", nan)
    for method in chosen:
        if method in failures:
            print(f"| {METHODS[method]} | failed: {failures[method]} | | | | | | | |")
            continue
        diff = np.abs(vectors[method] - vectors["tensorflow"]).max() if "tensorflow" in vectors else nan
        versus_f32 = "-"
        if "openvino" in vectors:
            a, b = vectors[method], vectors["openvino"]
            cosine = 1 - (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            versus_f32 = f"{np.abs(a - b).max():.2g} / {max(cosine.mean(), 0.0):.4f}"
        accuracy = head_accuracy(cache_dir, PRECISION_OF[method]) if method in PRECISION_OF else "-"
        print(f"| {METHODS[method]} | {rates[method]:.1f} | {rates[method] / base:.2f}x | {rates[method] / ours:.2f}x "
              f"| {rates[method] / f32:.2f}x | {results[method]['peak_rss_mb']:.0f} | {diff:.2g} | {versus_f32} "
              f"| {accuracy} |")


def head_accuracy(cache_dir, precision) -> str:
    """The default head's test accuracy on the default full caches of one precision, if they exist."""
    from featcache.errors import UserError
    from featcache.head.training import train
    from featcache.settings import HeadConfig
    from featcache.cache.read import load_features
    from featcache.cache.layout import CacheKey

    key, config = replace(CacheKey(), precision=precision), HeadConfig()
    try:
        train_features, _ = load_features(key, "train", cache_dir, config.views_needed())
        test_features, _ = load_features(key, "test", cache_dir, config.views_needed())
    except UserError:
        return f"- (no full caches: extract.py --precision {precision})"
    return f"{train(train_features, test_features, config).metrics['test_accuracy']:.4f}"


if __name__ == "__main__":
    main()
