"""The real MobileNetV2 and the real CIFAR-10 from ../shared (present in CI; skipped elsewhere)."""

import numpy as np

from featcache.extract import pipeline
from featcache.cache import read
from conftest import REAL_DATA, REAL_MODEL, make_key, requires_shared


@requires_shared()
def test_real_model_on_256_real_images_gives_useful_features(tmp_path):
    key = make_key(str(REAL_MODEL), 224, "bicubic", 256)
    rows = {}
    for split in ("train", "test"):
        result = pipeline.extract(key, split, data_dir=REAL_DATA, cache_dir=tmp_path, progress=False)
        embeddings, labels, _ = read.read(result.path, key.attrs(split), ("plain",))
        rows[split] = embeddings["plain"], labels
    x, y = rows["train"]
    assert x.shape == (256, 1280) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 6.0  # ReLU6 features after average pooling
    centroids = np.stack([x[y == c].mean(0) for c in range(10)])
    tx, ty = rows["test"]
    predicted = np.argmin(((tx[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float(np.mean(predicted == ty))
    assert accuracy > 0.5, f"nearest-centroid accuracy {accuracy:.3f} (chance is 0.1)"


@requires_shared()
def test_real_models_f32_exports_give_the_runs_result_on_photos_of_several_sizes(tmp_path):
    """The real MobileNetV2's run exported as LiteRT and ONNX f32 files: predict.py on each file agrees with
    predict.py on the run, photos of several sizes (CIFAR test images made bigger and smaller)."""
    import json

    import pytest
    import tensorflow as tf

    pytest.importorskip("ai_edge_litert", reason="LiteRT is not installed (pip install -r requirements-deploy.txt)")
    pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install -r requirements-deploy.txt)")
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install -r requirements-deploy.txt)")
    from conftest import run_cli, run_dirs
    from featcache.extract.sources import cifar

    common = ["--model", REAL_MODEL, "--cache-dir", tmp_path / "cache", "--limit", "40"]
    done = run_cli("extract.py", "--data-dir", REAL_DATA, "--engine", "tensorflow", "--quiet", *common)
    assert done.returncode == 0, done.stderr
    done = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs", "--quiet")
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_dirs(tmp_path / "runs")
    images = cifar.load_split(cifar.resolve_source(REAL_DATA), "test").images[100:112]
    photos = []
    for i, image in enumerate(images):
        height, width = [(40, 50), (480, 640), (300, 1000), (224, 224)][i % 4]
        photo = tf.cast(tf.clip_by_value(tf.image.resize(image, (height, width), "bicubic"), 0, 255), tf.uint8)
        photos.append(tmp_path / f"{i}-{width}x{height}.png")
        tf.io.write_file(str(photos[-1]), tf.io.encode_png(photo))
    by_run = run_cli("predict.py", "--run", run_dir, "--json", *photos)
    assert by_run.returncode == 0, by_run.stderr
    want = np.array([json.loads(line)["probabilities"] for line in by_run.stdout.splitlines()])
    for fmt in ("tflite", "onnx"):
        assert run_cli("export.py", tmp_path / "m", "--format", fmt, "--run", run_dir).returncode == 0
        by_file = run_cli("predict.py", "--model", tmp_path / f"m.{fmt}", "--json", *photos)
        assert by_file.returncode == 0, by_file.stderr
        got = np.array([json.loads(line)["probabilities"] for line in by_file.stdout.splitlines()])
        assert got.argmax(1).tolist() == want.argmax(1).tolist(), fmt
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=fmt)
