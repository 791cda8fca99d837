#!/usr/bin/env python
"""Each deployment format against predict.py's classifier on the CIFAR-10 test images.

Exports the run as LiteRT (f32 and int8) and ONNX files of 32 px (in a temporary folder), runs each with its own
runtime (the LiteRT interpreter, ONNX Runtime) and predict.py's TensorFlow classifier on the first N test
images, and prints per format: file size, top-1 agreement with predict.py, the largest probability
difference, test accuracy, and images/s at batch 1 and batch 32 (medians of a few timed passes).

    python bench/deploy_check.py --run RUN_ID --runs-dir runs --data-dir ../shared/data/cifar-10-python.tar.gz

With `--photo-sizes 50x40,640x480,...`, each test image is first brought to one of these sizes in turn (bicubic, as
photos of other sizes), the files are exported at their default input size (the network's) and given each photo as
`predict.py --model` gives it; no speed is measured then.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FORMATS = (("litert f32", "tflite", None), ("litert int8", "tflite", "int8"), ("onnx f32", "onnx", None))


def images_per_second(probabilities, images: np.ndarray, batch: int, passes: int) -> float:
    """Median images/s over `passes` timed passes over `images` in batches (after one untimed batch)."""
    probabilities(images[:batch])
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        for lo in range(0, len(images), batch):
            probabilities(images[lo : lo + batch])
        rates.append(len(images) / (time.perf_counter() - started))
    return statistics.median(rates)


def as_photos(images: np.ndarray, sizes: str) -> list[np.ndarray]:
    """Each image resized (bicubic, rounded to uint8) to the next of `sizes` ("WxH,WxH,..."), in turn."""
    import tensorflow as tf

    shapes = [tuple(int(side) for side in size.split("x"))[::-1] for size in sizes.split(",")]
    return [tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, shapes[i % len(shapes)], "bicubic")), 0, 255),
                    tf.uint8).numpy() for i, image in enumerate(images)]


def batched(probabilities, images: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([probabilities(images[lo : lo + batch]) for lo in range(0, len(images), batch)])


@click.command()
@click.option("--run", "run_id", default=None, help="Run id (default: as predict.py chooses).")
@click.option("--runs-dir", default=str(ROOT / "runs"), show_default=True)
@click.option("--data-dir", default=None, help="CIFAR-10 copy (default: as extract.py finds it).")
@click.option("--images", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--timed", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per timed pass.")
@click.option("--passes", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--photo-sizes", default=None, help="WxH,WxH,...: the test images as photos of these sizes.")
def main(run_id, runs_dir, data_dir, images, timed, passes, photo_sizes):
    from featcache import cpu
    from featcache.serve.classifier import build_classifier
    from featcache.serve.export import export_run
    from featcache.serve.run import resolve_run
    from featcache.serve.runtimes import open_exported
    from featcache.extract.sources import cifar

    run_dir, _ = resolve_run(runs_dir, run_id)
    test = cifar.load_split(cifar.resolve_source(data_dir), "test")
    pixels, labels = test.images[:images], test.labels[:images]
    classifier = build_classifier(run_dir)  # kept: its tf.function holds the module only weakly

    def reference(batch):
        return classifier.classify(batch)["probabilities"].numpy()

    photos = as_photos(pixels, photo_sizes) if photo_sizes else None
    speeds = (lambda call: (None, None)) if photos else (lambda call: (
        images_per_second(call, pixels[:timed], 1, passes), images_per_second(call, pixels[:timed], 32, passes)))
    run_all = (lambda call: np.concatenate([call(photo[None]) for photo in photos])) if photos else (
        lambda call: batched(call, pixels))
    rows = []
    want = run_all(reference)
    rows.append(("predict.py (TensorFlow)", "-", 1.0, 0.0, np.mean(want.argmax(1) == labels), *speeds(reference)))
    with tempfile.TemporaryDirectory() as folder:
        for name, fmt, quantize in FORMATS:
            try:
                # CIFAR images: files of their own 32 px, as the figures in the README were measured; photos: the
                # default input size (the network's)
                path = export_run(run_dir, Path(folder) / name.replace(" ", "-"), fmt,
                                  input_size=None if photos else cifar.IMAGE_SHAPE[0], quantize=quantize)
                model = open_exported(path)
                got = run_all(model.probabilities)
                rows.append((name, f"{path.stat().st_size / 1e6:.2f}", np.mean(got.argmax(1) == want.argmax(1)),
                             float(np.abs(got - want).max()), np.mean(got.argmax(1) == labels),
                             *speeds(model.probabilities)))
            except Exception as exc:  # noqa: BLE001 - one failing format is reported in its row, not hiding the rest
                rows.append((name, f"failed: {str(exc).splitlines()[0][:80]}", None, None, None, None, None))
    what = f"as photos of {photo_sizes}" if photos else "32 px, files of 32 px"
    print(f"run {run_dir.name}, {len(pixels)} CIFAR-10 test images ({what}); {cpu.name()} ({cpu.noted_flags()}), "
          f"{os.cpu_count()} cores")
    print("| format | MB | top-1 agrees with predict.py | max prob diff | test accuracy | images/s batch 1 | batch 32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, size, agree, diff, accuracy, one, many in rows:
        if agree is None:
            print(f"| {name} | {size} | | | | | |")
        else:
            speed = f"{one:.1f} | {many:.1f}" if one is not None else "- | -"
            print(f"| {name} | {size} | {agree:.4%} | {diff:.1e} | {accuracy:.4f} | {speed} |")


if __name__ == "__main__":
    main()
