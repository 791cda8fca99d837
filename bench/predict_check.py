#!/usr/bin/env python
"""Check predict.py and the exported SavedModel on real CIFAR-10 test images written out as PNG.

Writes the first N test images as PNG files, runs `predict.py --json` on them, compares
with the run's recorded test predictions, exports the run, loads the export in a fresh
Python with TensorFlow alone, and times one-image latency and batch-64 throughput.

    python bench/predict_check.py --run RUN_ID --data-dir ../shared/data/cifar-10-python.tar.gz
"""

from __future__ import annotations

import json
import os
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

FRESH = """
import json, sys, time, statistics
from pathlib import Path
import numpy as np, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
pngs = sorted(Path(sys.argv[2]).glob("*.png"))
images = tf.stack([tf.io.decode_png(tf.io.read_file(str(p)), channels=3) for p in pngs])
top = [t.decode() for t in serve(images=images)["top_class"].numpy()]
batch = tf.concat([images] * (64 // len(pngs) + 1), 0)[:64]
serve(images=batch)
times = []
for _ in range(5):
    t = time.perf_counter(); serve(images=batch); times.append(time.perf_counter() - t)
assert "featcache" not in sys.modules and "tensorflow_hub" not in sys.modules
print(json.dumps({"top": top, "batch64_images_per_s": 64 / statistics.median(times)}))
"""


@click.command()
@click.option("--run", "run_id", required=True)
@click.option("--runs-dir", default=str(ROOT / "runs"), show_default=True)
@click.option("--data-dir", default=str(ROOT.parent / "shared/data/cifar-10-python.tar.gz"), show_default=True)
@click.option("--images", default=100, show_default=True)
def main(run_id, runs_dir, data_dir, images):
    import tensorflow as tf

    from featcache.extract.sources import cifar
    from featcache.serve.classifier import build_classifier
    from featcache.serve.images import decode_image

    run_dir = Path(runs_dir) / run_id
    test = cifar.load_split(cifar.resolve_source(data_dir), "test", images)
    recorded = np.load(run_dir / "test_probs.npy")[:images]
    with tempfile.TemporaryDirectory() as tmp:
        pngs = Path(tmp) / "pngs"
        pngs.mkdir()
        for i, image in enumerate(test.images):
            tf.io.write_file(str(pngs / f"{i:05d}.png"), tf.io.encode_png(image))
        started = time.perf_counter()
        out = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(pngs), "--run", run_id,
                              "--runs-dir", runs_dir, "--json"], capture_output=True, text=True, check=True)
        command_seconds = time.perf_counter() - started
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        predicted = np.array([line["probabilities"] for line in lines]).argmax(1)
        agree = int(np.sum(predicted == recorded.argmax(1)))
        print(f"predict.py vs the run's recorded predictions: top-1 agrees on {agree}/{images}; "
              f"max prob diff {np.abs(np.array([l['probabilities'] for l in lines]) - recorded).max():.2g}")
        print(f"accuracy of those predictions on the true labels: {np.mean(predicted == test.labels):.3f}")
        print(f"predict.py command on {images} files: {command_seconds:.1f} s (model load included)")

        classifier = build_classifier(run_dir)
        one = decode_image(pngs / "00000.png")[None]
        classifier.classify(one)
        latencies = []
        for _ in range(20):
            t = time.perf_counter()
            classifier.classify(one)
            latencies.append(time.perf_counter() - t)
        print(f"one-image latency (decode excluded, warm): median {1000 * statistics.median(latencies):.1f} ms")

        exported = Path(tmp) / "exported"
        subprocess.run([sys.executable, str(ROOT / "export.py"), str(exported), "--run", run_id,
                        "--runs-dir", runs_dir], capture_output=True, text=True, check=True)
        fresh = subprocess.run([sys.executable, "-c", FRESH, str(exported), str(pngs)], capture_output=True,
                               text=True, check=True, cwd=tmp)
        result = json.loads(fresh.stdout.strip().splitlines()[-1])
        names = list(cifar.CIFAR10_CLASS_NAMES)
        same = sum(names[p] == t for p, t in zip(predicted, result["top"]))
        print(f"exported SavedModel (fresh Python, TensorFlow only): top-1 same as predict.py on {same}/{images}")
        print(f"exported SavedModel throughput at batch 64: {result['batch64_images_per_s']:.1f} images/s")


if __name__ == "__main__":
    main()
