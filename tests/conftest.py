"""Fixtures: tiny CIFAR-format batches and a tiny TF Hub-style SavedModel, made on the fly.

Tests go through the same loading code as real runs (pickle batches, tar.gz, hub.load),
so they need neither the internet nor ../shared.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Whole modules of integration tests: processes killed and resumed, Ray clusters, bench smoke runs, LiteRT/ONNX
# conversions, OpenVINO int8 calibration, the real model. Single ones elsewhere carry @pytest.mark.integration.
INTEGRATION_MODULES = ("test_bench.py", "test_deploy.py", "test_faults.py", "test_precision.py", "test_quiet.py",
                       "test_ray.py", "test_real.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: slow tests of whole processes and conversions (the second "
                                       "tier: `-m integration`; `-m 'not integration'` is the fast one)")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REAL_MODEL = SHARED / "models" / "mobilenet_v2_100_224_feature_vector"
REAL_DATA = SHARED / "data" / "cifar-10-python.tar.gz"
TRAIN_PER_BATCH = 24
TEST_ROWS = 40
TINY_DIM = 16

# Patches CacheWriter.<argv[1]> to send this process SIGKILL (or $KILL_SIGNAL) at its <argv[2]>-th call,
# then the script goes on.
KILL_POINT = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from featcache.cache import write
method, at = sys.argv.pop(1), int(sys.argv.pop(1))
original, calls = getattr(write.CacheWriter, method), [0]
def counted(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
    return original(*args, **kwargs)
setattr(write.CacheWriter, method, counted)
"""


def write_batches(folder: Path, train_per_batch=TRAIN_PER_BATCH, test_rows=TEST_ROWS, seed=0) -> dict:
    """Write data_batch_1..5, test_batch and batches.meta like the official python layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    names = [(f"data_batch_{i}", train_per_batch) for i in range(1, 6)] + [("test_batch", test_rows)]
    for name, n in names:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, fh)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, fh)  # not read: CIFAR-10 names are fixed
    return written


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A parent folder holding cifar-10-batches-py/ (read-only use: copy before changing)."""
    root = tmp_path_factory.mktemp("cifar")
    write_batches(root / "cifar-10-batches-py")
    return root


@pytest.fixture(scope="session")
def cifar_archive(cifar_root, tmp_path_factory) -> Path:
    archive = tmp_path_factory.mktemp("cifar_tgz") / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def save_tiny_model(path: Path, dim=TINY_DIM, with_training_arg=True, output="vector", size=None, seed=1) -> Path:
    """A SavedModel with the TF Hub image feature-vector convention: [0,1] floats in, [N, D] out.

    A fixed random conv + global average pooling, so it accepts any image size and its
    features depend on the picture (including left/right layout, via a position ramp).
    """
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(seed)
            self.kernel = tf.Variable(rng.normal(size=(3, 3, 3, dim)).astype(np.float32))
            if output == "deep":
                self.inner = [tf.Variable(rng.normal(size=(3, 3, dim, dim)).astype(np.float32) / dim)
                              for _ in range(2)]

        def features(self, images):
            x = tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides=2, padding="SAME"))
            if output == "deep":  # inner layers to read (extract/layers.py): Relu, then Relu6 and a residual add
                x = tf.nn.relu6(tf.nn.conv2d(x, self.inner[0], strides=2, padding="SAME"))
                x = x + tf.nn.conv2d(x, self.inner[1], strides=1, padding="SAME")
            width = tf.shape(x)[2]
            ramp = tf.reshape(tf.linspace(0.0, 1.0, width), [1, 1, -1, 1])
            if output == "map":
                return x
            vectors = tf.reduce_mean(x, axis=[1, 2]) + tf.reduce_mean(x * ramp, axis=[1, 2])
            if output == "nan_if_white":  # a faulty model: NaN features for (nearly) all-white images
                white = tf.reduce_mean(images, axis=[1, 2, 3]) > 0.99
                vectors += tf.where(white, np.nan, 0.0)[:, None]
            return vectors

    module = Tiny()
    spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    if with_training_arg:
        call = tf.function(lambda images, training=False: module.features(images))
        call.get_concrete_function(spec, training=False)
        call.get_concrete_function(spec, training=True)
    else:
        call = tf.function(lambda images: module.features(images), input_signature=[spec])
    module.__call__ = call
    tf.saved_model.save(module, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def deep_model(tmp_path_factory) -> Path:
    """The tiny model with inner layers: Relu (S/2 px), Relu6 and add (S/4 px), 16 channels each."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "deep", output="deep")


@pytest.fixture(scope="session")
def small_run(tiny_model, cifar_root, tmp_path_factory) -> tuple[Path, Path]:
    """(folder, run folder): the fixture's caches at 40 px and one run on them (3 epochs, an 8-unit hidden layer,
    TTA over the plain, flipped and top-left crop views), made with the CLIs. Read-only use: copy a run before
    changing it."""
    base = tmp_path_factory.mktemp("small_run")
    common = ["--model", tiny_model, "--image-size", "40", "--cache-dir", base / "cache"]
    done = run_cli("extract.py", "--data-dir", cifar_root, "--engine", "tensorflow", "--quiet", "--views",
                   "plain,flip,crop-tl", *common)
    assert done.returncode == 0, done.stderr
    done = run_cli("train_head.py", *common, "--runs-dir", base / "runs", "--epochs", "3", "--hidden", "8",
                   "--tta-views", "plain,flip,crop-tl")
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_dirs(base / "runs")
    return base, run_dir


def write_cifar100(folder: Path, train_rows=150, test_rows=60, seed=0) -> tuple[str, ...]:
    """train, test and meta pickles in CIFAR-100's python layout (fine and coarse labels); returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = tuple(f"class_{i:02d}" for i in range(100))
    for name, n in (("train", train_rows), ("test", test_rows)):
        fine = rng.integers(0, 100, n)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": fine.tolist(),
                         b"coarse_labels": (fine // 5).tolist()}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [n.encode() for n in names],
                     b"coarse_label_names": [f"group_{i}".encode() for i in range(20)]}, fh)
    return names


def make_key(model, image_size, resize, limit=None, precision="f32", **selection):
    """The cache key the CLIs' options select (selection.select), as tests name it."""
    from featcache.selection import select

    return select(None, model=str(model), image_size=image_size, resize=resize, limit=limit,
                  precision=precision, **selection)


SYNTHETIC_CLASSES = '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'


def synthetic_attrs(rows: int, **changes) -> dict:
    """The attributes of a cache written directly with CacheWriter (no source, no model behind it): ten classes."""
    from featcache.cache import layout

    return dict(tool=layout.TOOL, format_version=layout.FORMAT_VERSION, dataset="synthetic", split="train", model="m",
                image_size=1, resize="r", limit=0, rows=rows, source_fingerprint="f", engine="e",
                class_names=SYNTHETIC_CLASSES) | changes


def run_cli(script: str, *args, env=None, timeout=300, in_process=True) -> subprocess.CompletedProcess:
    """Run extract.py, train_head.py, predict.py or export.py as a user would: its click command with these
    arguments, in this process (click's CliRunner, without the process setup of setup_process), or with
    `in_process=False` in a fresh interpreter (for what only a whole process shows: log lines, exit, kills).

    Either way the result has the exit code, stdout and stderr; an unexpected exception's traceback ends
    up in stderr, as it would in a terminal."""
    if not in_process:
        full_env = dict(os.environ, **(env or {}))
        return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                              text=True, env=full_env, timeout=timeout, cwd=ROOT)
    import traceback
    from unittest import mock

    from click.testing import CliRunner

    module = _script_module(script)
    with mock.patch.dict(os.environ, env or {}), mock.patch.object(module, "setup_process", lambda verbose: None):
        result = CliRunner().invoke(module.main, [str(a) for a in args], catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess([script, *map(str, args)], result.exit_code, result.stdout, stderr)


def _script_module(script: str):
    """A top-level script imported once as a module (its click command is `main`)."""
    import importlib.util

    name = f"featcache_script_{Path(script).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def run_dirs(runs) -> list[Path]:
    """The run folders in a runs folder (beside them: TensorBoard's experiment config file)."""
    return sorted(path for path in Path(runs).iterdir() if path.is_dir())


def requires_shared():
    return pytest.mark.skipif(not (REAL_MODEL.exists() and REAL_DATA.exists()),
                              reason=f"real model/data not found under {SHARED} (they are in CI, not on a fresh machine)")


FEATURES = ("Relu", "Relu@2x2")  # the tiny model's inner layer, averaged, and in 2x2 cells (extract/layers.py)


@pytest.fixture(scope="session")
def features_caches(tiny_model, cifar_root, tmp_path_factory) -> tuple[Path, list]:
    """(folder, the CLI options selecting its caches): the fixture's caches at 40 px with the plain, flip and top-left
    crop views and the inner-layer FEATURES of each, made by extract.py."""
    base = tmp_path_factory.mktemp("features")
    common = ["--model", tiny_model, "--image-size", "40", "--cache-dir", base / "cache"]
    done = run_cli("extract.py", "--data-dir", cifar_root, "--engine", "tensorflow", "--quiet", "--views",
                   "plain,flip,crop-tl", "--layers", ",".join(FEATURES), *common)
    assert done.returncode == 0, done.stderr
    return base, common
