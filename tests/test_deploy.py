"""LiteRT and ONNX exports, checked by their own runtimes against predict.py's classifier on the same images."""

import json

import numpy as np
import pytest

from featcache.extract.sources import cifar
from conftest import run_cli, run_dirs

pytest.importorskip("ai_edge_litert", reason="LiteRT is not installed (pip install -r requirements-deploy.txt)")
pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install -r requirements-deploy.txt)")
pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install -r requirements-deploy.txt)")


@pytest.fixture(scope="module")
def run(small_run, cifar_root, tmp_path_factory):
    """A small run with a hidden layer and TTA, its test images, and predict.py's probabilities for them."""
    from featcache.serve.classifier import build_classifier

    _, run_dir = small_run
    base = tmp_path_factory.mktemp("deploy")
    (base / "runs").symlink_to(run_dir.parent)  # the run, read-only; exports go to `base`
    images = cifar.load_split(cifar.resolve_source(cifar_root), "test").images
    classifier = build_classifier(run_dir)  # kept: its tf.function holds the module only weakly
    want = classifier.classify(images)["probabilities"].numpy()
    return base, run_dir, images, want


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_an_export_run_by_its_own_runtime_gives_predicts_probabilities(run, fmt):
    from featcache.serve.runtimes import open_exported

    base, run_dir, images, want = run
    out = run_cli("export.py", base / f"model-{fmt}", "--format", fmt, "--input-size", 32, "--runs-dir", base / "runs")
    assert out.returncode == 0, out.stderr
    path = base / f"model-{fmt}.{fmt}"
    assert f"exported run {run_dir.name} to {path}" in out.stdout
    model = open_exported(path)
    assert model.format == fmt and model.input_size == 32 and model.class_names == cifar.CIFAR10_CLASS_NAMES
    got = model.probabilities(images)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_predict_classifies_image_files_with_an_exported_file(run, tmp_path):
    import tensorflow as tf

    base, run_dir, images, want = run
    path = tmp_path / "model.onnx"
    out = run_cli("export.py", path, "--format", "onnx", "--input-size", 32, "--runs-dir", base / "runs")
    assert out.returncode == 0, out.stderr
    for i in range(3):
        tf.io.write_file(str(tmp_path / f"{i}.png"), tf.io.encode_png(images[i]))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = run_cli("predict.py", "--model", path, "--json", *[tmp_path / f"{i}.png" for i in range(3)],
                  tmp_path / "broken.png")
    assert out.returncode == 1  # one image failed
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    np.testing.assert_allclose([line["probabilities"] for line in lines[:3]], want[:3], atol=1e-4)
    assert lines[3]["file"] == str(tmp_path / "broken.png") and lines[3]["error"].startswith("cannot read image")


@pytest.mark.parametrize("args, message", [
    (["--input-size", "64"],
     "Error: --input-size is for --format tflite or onnx (a SavedModel takes images of any size)"),
    (["--format", "pdf"], "Invalid value for '--format'"),
    (["--format", "tflite", "--input-size", "5000"], "Error: --input-size 5000 is above 1024"),
    (["--format", "onnx", "--quantize", "int8"], "Error: --quantize int8 is for --format tflite only, not onnx"),
    (["--quantize", "int8"], "Error: --quantize int8 is for --format tflite only, not saved_model"),
    (["--format", "tflite", "--quantize", "int4"], "Invalid value for '--quantize'"),
])
def test_bad_export_options_are_one_line(run, tmp_path, args, message):
    base, _, _, _ = run
    out = run_cli("export.py", tmp_path / "out", *args, "--runs-dir", base / "runs")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_without_force_and_replaced_whole_with_it(run, tmp_path):
    base, _, _, _ = run
    path = tmp_path / "model.tflite"
    path.write_bytes(b"an older file")
    out = run_cli("export.py", path, "--format", "tflite", "--runs-dir", base / "runs")
    assert out.returncode == 2 and f"Error: {path} exists already" in out.stderr and "--force" in out.stderr
    assert path.read_bytes() == b"an older file"
    out = run_cli("export.py", path, "--format", "tflite", "--runs-dir", base / "runs", "--force")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.labels.txt", "model.tflite"]
    assert path.read_bytes()[4:8] == b"TFL3"


def test_a_missing_converter_or_runtime_is_one_line_naming_its_requirements_file(run, tmp_path, monkeypatch):
    import sys

    base, _, _, _ = run
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import fails as if not installed
    out = run_cli("export.py", tmp_path / "m", "--format", "onnx", "--runs-dir", base / "runs")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "Error: format onnx needs tf2onnx, which is not installed: pip install -r requirements-deploy.txt")
    assert list(tmp_path.iterdir()) == []


def test_an_int8_litert_file_is_calibrated_on_train_images_and_smaller(run, cifar_root, monkeypatch):
    from featcache.serve import int8
    from featcache.serve.runtimes import open_exported

    base, _, images, want = run
    seen = []
    real = int8.train_samples
    monkeypatch.setattr(int8, "train_samples", lambda *args: seen.extend(real(*args)) or seen)
    out = run_cli("export.py", base / "int8", "--format", "tflite", "--quantize", "int8", "--input-size", 32,
                  "--runs-dir", base / "runs")
    assert out.returncode == 0, out.stderr
    train = cifar.load_split(cifar.resolve_source(cifar_root), "train").images
    assert len(seen) == 2  # calibration, and the head's correction
    for sample in seen:
        assert {image.tobytes() for image in sample} == {image.tobytes() for image in train}  # all 120: too few
        assert not {image.tobytes() for image in sample} & {image.tobytes() for image in images}
    path = base / "int8.tflite"
    model = open_exported(path)
    assert model.format == "tflite" and model.input_size == 32
    got = model.probabilities(images)
    assert got.shape == want.shape and np.allclose(got.sum(1), 1, atol=0.02)  # softmax in 1/256 steps
    details = __import__("ai_edge_litert.interpreter", fromlist=["Interpreter"]).Interpreter(
        model_path=str(path))._get_ops_details()
    assert "QUANTIZE" in {op["op_name"] for op in details}  # int8 for real (the tiny model is too small to shrink)


@pytest.mark.parametrize("rows", [400, 20])
def test_the_int8_heads_correction_is_a_least_squares_fit_put_in_front_of_any_head(run, rows):
    import keras

    from featcache.serve.int8 import MIN_SLOPE_ROWS, affine_fit, corrected

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 5))
    y = x * [2.0, 0.5, -1.0, 1.0, 9.0] + [1.0, -2.0, 0.0, 3.0, 0.0]
    x[:, 3] = 7.0  # constant: no slope to fit
    a, b = affine_fit(x, y)
    slopes = [2.0, 0.5, 1.0, 1.0, 2.0] if rows >= MIN_SLOPE_ROWS else [1.0] * 5  # 9 held to 2; too few rows: none
    np.testing.assert_allclose(a, slopes)
    np.testing.assert_allclose(b, y.mean(0) - a * x.mean(0), atol=1e-12)
    _, run_dir, _, _ = run
    head = keras.models.load_model(run_dir / "head.keras", compile=False)
    dim = head.input_shape[-1]
    custom = keras.Sequential([keras.Input((dim,)), keras.layers.Dense(3, activation="softmax")])  # no standardize
    a, b = rng.uniform(0.5, 2.0, dim), rng.normal(size=dim)
    features = rng.normal(size=(6, dim)).astype(np.float32)
    for one in (head, custom):
        np.testing.assert_allclose(corrected(one, a, b)(features).numpy(), one(features * a + b).numpy(), atol=1e-5)


def test_int8_export_of_train_images_unfit_for_calibration_advises_exporting_without_quantize(run, monkeypatch, tmp_path):
    from featcache.extract import quantize

    def mixed_sizes(*args, **kwargs):
        raise quantize.CalibrationUnusable("int8 needs train images of one size (it is calibrated per input size)")

    monkeypatch.setattr(quantize, "calibration_samples", mixed_sizes)
    base, _, _, _ = run
    out = run_cli("export.py", tmp_path / "q", "--format", "tflite", "--quantize", "int8", "--runs-dir", base / "runs")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "Error: int8 needs train images of one size (it is calibrated per input size); export this run without "
        "--quantize")
    assert list(tmp_path.iterdir()) == []


def test_int8_export_of_a_run_whose_data_is_gone_says_so_in_one_line(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from featcache.cache import read
    from featcache.cache.layout import CacheKey
    from featcache.errors import UserError
    from featcache.serve import int8

    gone = tmp_path / "shards"
    monkeypatch.setattr(read, "attributes", lambda path: {"source": str(gone)})
    parts = SimpleNamespace(train_cache=tmp_path / "train.h5", key=CacheKey(dataset="webdataset", data_dir=str(gone)))
    with pytest.raises(UserError, match=(f"^int8 calibration reads the run's train images, but its data \\(the train "
                                         f"split at {gone}\\) is gone; put it back there, or export this run without "
                                         "quantize$")):
        int8.train_samples(parts, 32)


def test_int8_export_of_a_folder_run_with_photos_of_other_shapes_calibrates_on_them_resized(tiny_model, tmp_path,
                                                                                           monkeypatch):
    from featcache.serve import int8
    from featcache.serve.runtimes import open_exported
    from test_folder import write_tree

    tree = write_tree(tmp_path / "photos", per_class=(6, 2), sizes=((30, 44), (44, 30), (36, 36)))
    common = ["--dataset", "folder", "--data-dir", tree, "--model", tiny_model, "--image-size", "24",
              "--cache-dir", tmp_path / "cache"]
    assert run_cli("extract.py", *common, "--engine", "tensorflow", "--quiet").returncode == 0
    assert run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs", "--epochs", "1").returncode == 0
    seen = []
    real = int8.train_samples
    monkeypatch.setattr(int8, "train_samples", lambda *args: seen.extend(real(*args)) or seen)
    out = run_cli("export.py", tmp_path / "q", "--format", "tflite", "--quantize", "int8", "--runs-dir",
                  tmp_path / "runs")
    assert out.returncode == 0, out.stderr
    assert [sample.shape for sample in seen] == [(18, 24, 24, 3)] * 2  # every train photo, resized to the file's input
    assert open_exported(tmp_path / "q.tflite").input_size == 24


def test_the_int8_correction_brings_the_int8_networks_embeddings_towards_the_f32_ones(run, cifar_root, monkeypatch):
    import tensorflow as tf

    from featcache.serve import int8
    from featcache.serve.convert import portable_function
    from featcache.serve.run import load_run

    _, run_dir, _, _ = run
    parts = load_run(run_dir)
    train = cifar.load_split(cifar.resolve_source(cifar_root), "train").images  # 120 images, 3 views: slopes fitted
    quantized, real_call = [], int8.litert_call
    monkeypatch.setattr(int8, "litert_call", lambda interpreter: (
        lambda batch, call=real_call(interpreter): quantized.append(call(batch)) or quantized[-1]))
    head = int8.int8_head(parts, 32, train, train)
    q = np.concatenate(quantized)
    frozen = portable_function(parts, 32, embeddings=True)
    y = np.concatenate([frozen(tf.constant(train[i : i + 100], tf.float32))[0].numpy()
                        for i in range(0, len(train), 100)])
    fixed = head.get_layer("int8_correction")(q).numpy()
    raw_error, fixed_error = np.mean((q - y) ** 2), np.mean((fixed - y) ** 2)
    assert fixed_error < 0.9 * raw_error, (fixed_error, raw_error)  # a * int8 + b fits f32, not the other way round


@pytest.mark.parametrize("fmt, input_size", [("onnx", None), ("tflite", None), ("onnx", 32)])
def test_predict_with_an_exported_file_brings_photos_of_any_size_to_it_as_the_run_does(run, tmp_path, fmt,
                                                                                       input_size):
    """Photos of other sizes than the file's input (the network's 40 px by default, or CIFAR's 32) are brought to
    it with the run's own resize, and get the top class predict.py gives on the run, whose crop view makes the
    probabilities differ a little (the file cuts it from the resized photo)."""
    import tensorflow as tf

    base, run_dir, images, _ = run
    path = tmp_path / f"model.{fmt}"
    size = ["--input-size", input_size] if input_size else []
    assert run_cli("export.py", path, "--format", fmt, *size, "--runs-dir", base / "runs").returncode == 0
    photos, rng = [], np.random.default_rng(7)
    for i, (height, width) in enumerate([(32, 32), (40, 40), (64, 64), (75, 50), (24, 36), (128, 96)] * 2):
        coarse = rng.integers(0, 256, (1, 6, 6, 3)).astype(np.float32)  # smooth as photos are, unlike pixel noise
        photo = tf.image.resize(coarse, (height, width), method="bicubic", antialias=True)
        photos.append(tmp_path / f"photo{i}-{width}x{height}.png")
        tf.io.write_file(str(photos[-1]), tf.io.encode_png(tf.cast(tf.clip_by_value(photo[0], 0, 255), tf.uint8)))
    by_run = run_cli("predict.py", "--run", run_dir, "--json", *photos)
    by_file = run_cli("predict.py", "--model", path, "--json", *photos)
    assert by_run.returncode == 0 and by_file.returncode == 0, by_file.stderr
    want, got = ([json.loads(line)["probabilities"] for line in out.stdout.splitlines()] for out in (by_run, by_file))
    assert len(got) == 12 and np.argmax(got, 1).tolist() == np.argmax(want, 1).tolist()
    side = input_size or 40
    exact = [i for i, photo in enumerate(photos) if photo.name.endswith(f"-{side}x{side}.png")]
    np.testing.assert_allclose(np.take(got, exact, 0), np.take(want, exact, 0), atol=1e-4)  # no resize before the file
    np.testing.assert_allclose(got, want, atol=0.02)  # the others: resized twice, and the crop view cut after it


def test_an_export_without_the_runs_preprocessing_refuses_other_sizes_saying_what_to_do():
    from featcache.errors import UserError
    from featcache.serve.runtimes import Exported

    older = Exported("onnx", ("a", "b"), 32, lambda images: np.ones((len(images), 2)) / 2)
    assert older.probabilities(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 2)
    with pytest.raises(UserError) as caught:
        older.probabilities(np.zeros((1, 40, 30, 3), np.uint8))
    assert str(caught.value) == ("the image is 30x40, the exported model takes 32x32 (and records no resize to bring "
                                 "images to it: export the run again)")


@pytest.fixture(scope="module")
def default_views_run(small_run, tiny_model, tmp_path_factory):
    """A run on the small run's caches with the default test-time views (plain, flip)."""
    from conftest import run_dirs

    base, _ = small_run
    runs = tmp_path_factory.mktemp("default_views") / "runs"
    done = run_cli("train_head.py", "--model", tiny_model, "--image-size", "40", "--cache-dir", base / "cache",
                   "--runs-dir", runs, "--epochs", "3", "--hidden", "8", "--quiet")
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_dirs(runs)
    return run_dir


def write_photos(folder, sizes, seed=7) -> list:
    """Smooth random PNG photos of these (height, width)s (smooth as photos are, unlike pixel noise)."""
    import tensorflow as tf

    photos, rng = [], np.random.default_rng(seed)
    for i, (height, width) in enumerate(sizes):
        coarse = rng.integers(0, 256, (1, 6, 6, 3)).astype(np.float32)
        photo = tf.image.resize(coarse, (height, width), method="bicubic", antialias=True)
        photos.append(folder / f"photo{i}-{width}x{height}.png")
        tf.io.write_file(str(photos[-1]), tf.io.encode_png(tf.cast(tf.clip_by_value(photo[0], 0, 255), tf.uint8)))
    return photos


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_a_default_export_gives_the_runs_probabilities_on_photos_of_any_size(default_views_run, tmp_path, fmt):
    """At its default input size (the network's), an f32 file classifies photos of any size as predict.py does
    on the run: the photo brought to it by the run's own crop and resize, in float, and not resized again."""
    path = tmp_path / f"model.{fmt}"
    out = run_cli("export.py", path, "--format", fmt, "--run", default_views_run)
    assert out.returncode == 0, out.stderr
    assert [line.split(" ")[0] for line in out.stderr.splitlines()] == ["using", "loading", "converting"]
    sizes = [(40, 50), (480, 640), (300, 1000), (32, 32), (40, 40), (97, 61)]
    photos = write_photos(tmp_path, sizes)
    by_run = run_cli("predict.py", "--run", default_views_run, "--json", *photos)
    by_file = run_cli("predict.py", "--model", path, "--json", *photos)
    assert by_run.returncode == 0 and by_file.returncode == 0, by_file.stderr
    want, got = ([json.loads(line)["probabilities"] for line in out.stdout.splitlines()] for out in (by_run, by_file))
    assert len(got) == len(sizes) and np.argmax(got, 1).tolist() == np.argmax(want, 1).tolist()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_export_quiet_prints_no_step_lines(default_views_run, tmp_path):
    out = run_cli("export.py", tmp_path / "m", "--format", "onnx", "--quiet", "--run", default_views_run)
    assert out.returncode == 0 and out.stderr.splitlines() == [f"using run {default_views_run.name} (as asked)"]


def test_a_photo_reaches_a_file_unrounded_and_an_older_uint8_file_rounded():
    from featcache.serve.runtimes import Exported, fitted

    seen = []
    photo = np.random.default_rng(3).integers(0, 256, (1, 30, 50, 3), dtype=np.uint8)
    for dtype in (np.float32, np.uint8):
        Exported("onnx", ("a", "b"), 16, lambda images: seen.append(images) or np.ones((1, 2)),
                 {"resize": "bicubic", "crop": "none", "image_size": 16}, dtype).probabilities(photo)
    want = fitted(photo, 16, "bicubic", "none")
    assert seen[0].dtype == np.float32 and np.array_equal(seen[0], want) and not np.array_equal(want, np.round(want))
    assert seen[1].dtype == np.uint8 and np.array_equal(seen[1], np.round(want).astype(np.uint8))


@pytest.fixture(scope="module")
def features_run(features_caches, cifar_root, tmp_path_factory):
    """A run whose head reads inner layers (3 epochs, an 8-unit hidden layer, TTA over three views), its test images
    and predict.py's probabilities for them."""
    from featcache.serve.classifier import build_classifier

    _, common = features_caches
    base = tmp_path_factory.mktemp("deploy_features")
    done = run_cli("train_head.py", *common, "--runs-dir", base / "runs", "--epochs", "3", "--hidden", "8",
                   "--features", "Relu@2x2,final", "--tta-views", "plain,flip,crop-tl")
    assert done.returncode == 0, done.stderr
    images = cifar.load_split(cifar.resolve_source(cifar_root), "test").images
    classifier = build_classifier(run_dirs(base / "runs")[0])  # kept: its tf.function holds the module only weakly
    return base, images, classifier.classify(images)["probabilities"].numpy()


@pytest.mark.parametrize("fmt", ["saved_model", "tflite", "onnx"])
def test_every_export_of_a_run_on_inner_layers_computes_its_features(features_run, fmt):
    from featcache.serve.runtimes import open_exported

    base, images, want = features_run
    size = [] if fmt == "saved_model" else ["--input-size", "32"]  # the images' own size: crops cut as the run cuts
    out = run_cli("export.py", base / f"model-{fmt}", "--format", fmt, "--runs-dir", base / "runs", *size)
    assert out.returncode == 0, out.stderr
    got = open_exported(base / (f"model-{fmt}" + ("" if fmt == "saved_model" else f".{fmt}"))).probabilities(images)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_an_int8_export_of_a_run_on_inner_layers_is_quantized_and_close(features_run):
    from featcache.serve.runtimes import open_exported

    base, images, want = features_run
    out = run_cli("export.py", base / "int8", "--format", "tflite", "--quantize", "int8", "--runs-dir", base / "runs",
                  "--input-size", "32")
    assert out.returncode == 0, out.stderr
    got = open_exported(base / "int8.tflite").probabilities(images)
    assert got.shape == want.shape and np.allclose(got.sum(1), 1, atol=0.02)  # softmax in 1/256 steps
    assert np.abs(got - want).max() < 0.1 and (got.argmax(1) == want.argmax(1)).mean() >= 0.8
