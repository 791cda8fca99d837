import json
import subprocess
import sys

import numpy as np
import pytest

from featcache.extract.sources import cifar
from conftest import run_cli, run_dirs


@pytest.fixture(scope="module")
def trained_run(small_run, cifar_root):
    """Fixture caches, one trained run, and the CIFAR test images written out as PNG files."""
    import tensorflow as tf

    base, run_dir = small_run
    test = cifar.load_split(cifar.resolve_source(cifar_root), "test")
    pngs = base / "pngs"
    pngs.mkdir()
    for i, image in enumerate(test.images[:12]):
        tf.io.write_file(str(pngs / f"{i:03d}.png"), tf.io.encode_png(image))
    return base, run_dir, pngs


def _predict(base, *args):
    out = run_cli("predict.py", "--runs-dir", base / "runs", "--json", *args)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    return out, lines


def test_predictions_on_png_files_match_the_runs_recorded_predictions(trained_run):
    base, run_dir, pngs = trained_run
    out, lines = _predict(base, pngs)
    assert out.returncode == 0, out.stderr
    recorded = np.load(run_dir / "test_probs.npy")[:12]
    got = np.array([line["probabilities"] for line in lines])
    assert got.shape == (12, 10)
    np.testing.assert_array_equal(got.argmax(1), recorded.argmax(1))
    np.testing.assert_allclose(got, recorded, atol=1e-4)


def test_bad_files_are_reported_one_per_line_and_the_rest_is_classified(trained_run, tmp_path):
    base, _, pngs = trained_run
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    out = run_cli("predict.py", "--runs-dir", base / "runs", pngs / "000.png", fake, tmp_path / "missing.jpg",
                  pngs / "001.png")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert len(out.stdout.splitlines()) == 2 and "000.png: " in out.stdout and "001.png: " in out.stdout
    errors = [line for line in out.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 2 and "fake.png: error: cannot read image" in errors[0] and "missing.jpg" in errors[1]


def test_any_size_and_mode_is_accepted(trained_run, tmp_path):
    import tensorflow as tf

    base, _, _ = trained_run
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (50, 70, 1), dtype=np.uint8)
    rgba = rng.integers(0, 256, (20, 33, 4), dtype=np.uint8)
    tf.io.write_file(str(tmp_path / "gray.png"), tf.io.encode_png(gray))
    tf.io.write_file(str(tmp_path / "rgba.png"), tf.io.encode_png(rgba))
    tf.io.write_file(str(tmp_path / "photo.jpg"), tf.io.encode_jpeg(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)))
    out, lines = _predict(base, tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(lines) == 3 and all(abs(sum(line["probabilities"]) - 1) < 1e-5 for line in lines)


@pytest.mark.integration  # a whole process
def test_exported_model_loads_with_tensorflow_alone_and_matches_predict(trained_run, tmp_path):
    base, _, pngs = trained_run
    exported = tmp_path / "exported"
    out = run_cli("export.py", exported, "--runs-dir", base / "runs")
    assert out.returncode == 0, out.stderr
    _, lines = _predict(base, pngs)
    want = np.array([line["probabilities"] for line in lines])
    script = f"""
import sys, json, numpy as np, tensorflow as tf
from pathlib import Path
model = tf.saved_model.load({str(exported)!r})
serve = model.signatures["serving_default"]
probs = []
for png in sorted(Path({str(pngs)!r}).glob("*.png")):
    image = tf.io.decode_png(tf.io.read_file(str(png)), channels=3)[None]
    out = serve(images=image)
    probs.append(out["probabilities"].numpy()[0].tolist())
names = [n.decode() for n in out["class_names"].numpy()]
assert "featcache" not in sys.modules and "tensorflow_hub" not in sys.modules
print(json.dumps({{"probs": probs, "names": names, "top": out["top_class"].numpy()[0].decode()}}))
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(result["probs"]), want, atol=1e-5)
    assert result["names"] == list(cifar.CIFAR10_CLASS_NAMES)
    assert result["top"] == cifar.CIFAR10_CLASS_NAMES[int(want[-1].argmax())]


def test_unknown_run_is_one_clear_error(trained_run):
    base, _, pngs = trained_run
    out = run_cli("predict.py", "--runs-dir", base / "runs", "--run", "nope", pngs)
    assert out.returncode == 2 and "no run 'nope'" in out.stderr and "Traceback" not in out.stderr


def test_a_folder_without_images_is_one_error_before_anything_loads(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    out = run_cli("predict.py", "--runs-dir", tmp_path / "no-runs-either", tmp_path / "empty")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    # said before looking for a run
    assert line == f"Error: no PNG/JPEG/BMP/GIF/WebP/JPEG XL files in {tmp_path / 'empty'}"



def test_a_path_that_does_not_exist_is_refused_before_anything_loads(tmp_path):
    out = run_cli("predict.py", "--runs-dir", tmp_path / "no-runs-either", tmp_path / "no" / "such.jpg")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"Error: no such file or folder: {tmp_path / 'no' / 'such.jpg'}"]

def test_a_head_with_other_layers_predicts_what_keras_predicts(trained_run, tiny_model, cifar_root, tmp_path):
    """predict/export use the saved head as it is: any layers, not a rebuild from layers found by name."""
    import shutil

    import keras

    from featcache.serve.classifier import build_classifier
    from featcache.extract.extractor import Extractor
    from featcache.extract.models import load_model
    from featcache.cache.layout import CacheKey
    from conftest import TINY_DIM

    _, run_dir, _ = trained_run
    custom = tmp_path / "custom"
    shutil.copytree(run_dir, custom)
    inputs = keras.Input((TINY_DIM,))
    x = keras.layers.Dense(12, activation="tanh")(inputs)
    x = keras.layers.LayerNormalization()(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    model.save(custom / "head.keras")
    images = cifar.load_split(cifar.resolve_source(cifar_root), "test").images[:8]
    classifier = build_classifier(custom)  # kept: its tf.function holds the module only weakly
    got = classifier.classify(images)["probabilities"].numpy()
    config = json.loads((custom / "config.json").read_text())
    key, tta = CacheKey.from_attrs(config["cache"]), config["head"]["tta_views"].split(",")
    assert tta == ["plain", "flip", "crop-tl"]  # the run's test-time views, a crop among them
    extractor = Extractor(load_model(str(tiny_model)), image_size=key.image_size, resize=key.resize,
                          views=tuple(tta), engine="tensorflow")
    views = extractor.embed(images)
    want = np.mean([model.predict(views[v], verbose=0) for v in tta], axis=0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_model_without_a_training_argument_goes_through_predict_and_export(cifar_root, tmp_path):
    """A plain SavedModel whose call takes images alone: the classifier calls it as extraction did."""
    import tensorflow as tf

    from conftest import save_tiny_model
    from featcache.serve.classifier import build_classifier
    from featcache.serve.files import save_model

    model = save_tiny_model(tmp_path / "no_training_arg", with_training_arg=False)
    common = ["--model", model, "--image-size", "40", "--cache-dir", tmp_path / "cache", "--limit", "30"]
    done = run_cli("extract.py", "--data-dir", cifar_root, "--engine", "tensorflow", "--quiet", *common)
    assert done.returncode == 0, done.stderr
    done = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs", "--epochs", "2")
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_dirs(tmp_path / "runs")
    images = cifar.load_split(cifar.resolve_source(cifar_root), "test").images[:30]
    classifier = build_classifier(run_dir)
    probs = classifier.classify(images)["probabilities"].numpy()
    np.testing.assert_allclose(probs, np.load(run_dir / "test_probs.npy"), atol=1e-5)
    save_model(classifier, tmp_path / "exported")
    served = tf.saved_model.load(str(tmp_path / "exported")).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), probs, atol=1e-6)


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "head.keras").write_bytes((run / "head.keras").read_bytes()[:200]),
     "its head.keras cannot be read"),
    (lambda run: (run / "head.keras").write_bytes(b"junk" * 100), "its head.keras cannot be read (not a complete .keras archive)"),
    (lambda run: (run / "head.keras").unlink(), "no run"),
    (lambda run: (run / "config.json").write_text('{"head": {'), "its config.json is damaged or half-written"),
    (lambda run: (run / "config.json").write_text(
        (run / "config.json").read_text().replace('"precision": "f32"', '"precision": "int8"')),
     "was trained on int8 embeddings (OpenVINO), but predict and export run the f32 TensorFlow network"),
])
def test_a_damaged_or_unservable_run_is_one_line_naming_it(trained_run, tmp_path, damage, message):
    import shutil

    base, run_dir, pngs = trained_run
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "copy")
    damage(runs / "copy")
    for script, target in (("predict.py", pngs / "000.png"), ("export.py", tmp_path / "out")):
        out = run_cli(script, "--runs-dir", runs, "--run", "copy", target)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        *chosen, line = out.stderr.strip().splitlines()  # "using run copy (as asked)", then the error
        loading = "loading run copy: its head and the model "  # predict.py's line, before the head is read
        assert chosen in ([], ["using run copy (as asked)"],
                          ["using run copy (as asked)", "loading run copy and its model"]) or (
            len(chosen) == 2 and chosen[0] == "using run copy (as asked)" and chosen[1].startswith(loading)), out.stderr
        assert line.startswith("Error: ") and message in line and "copy" in line, line
        assert not (tmp_path / "out").exists()


def test_a_runs_network_that_cannot_be_loaded_offline_names_the_one_remedy(monkeypatch):
    import tensorflow_hub as hub

    from featcache.errors import UserError
    from featcache.extract.models import load_model

    def offline(handle):
        raise OSError("no route to host")

    monkeypatch.setattr(hub, "load", offline)
    with pytest.raises(UserError) as run_error:
        load_model("https://tfhub.dev/m/1", run="r1")
    assert str(run_error.value) == ("cannot load model 'https://tfhub.dev/m/1' (no route to host). Offline, set "
                                    "TFHUB_CACHE_DIR to a TF Hub cache that holds it (run r1 was trained on it)")
    with pytest.raises(UserError, match=r"that holds it, or pass model=PATH to a local SavedModel folder$"):
        load_model("https://tfhub.dev/m/1")


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt("SIGTERM")])
def test_a_failed_replacement_of_a_saved_model_keeps_the_old_one_under_its_name(tmp_path, monkeypatch, failure):
    import os

    import tensorflow as tf

    from featcache.errors import UserError
    from featcache.serve import files

    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def classify(self, x):
            return {"y": x + 1}

    out = tmp_path / "exported"
    out.mkdir()
    (out / "old.txt").write_text("the old export")
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new export's rename into place
            raise failure
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", second_fails)
    with pytest.raises(UserError if isinstance(failure, OSError) else KeyboardInterrupt):
        files.save_model(Tiny(), out, force=True)
    assert (out / "old.txt").read_text() == "the old export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # nothing else left beside it
    monkeypatch.setattr(files.os, "replace", real)
    files.save_model(Tiny(), out, force=True)
    assert not (out / "old.txt").exists() and (out / "saved_model.pb").exists()


def test_an_exported_file_goes_into_folders_not_made_yet(tmp_path):
    from featcache.serve.files import labels_path, write_export

    path = tmp_path / "new" / "deeper" / "model.tflite"
    write_export(path, b"model bytes", ("cat", "dog"))
    assert path.read_bytes() == b"model bytes" and labels_path(path).read_text() == "cat\ndog\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.labels.txt", "model.tflite"]


def test_predict_says_what_it_loads_before_the_slow_seconds_and_quiet_silences_it(trained_run, tiny_model):
    base, run_dir, pngs = trained_run
    out = run_cli("predict.py", "--runs-dir", base / "runs", pngs / "000.png")
    assert out.returncode == 0, out.stderr
    using, *progress = out.stderr.splitlines()
    assert using.startswith(f"using run {run_dir.name} (the latest run; trained on cifar10 40px-bicubic")
    assert progress == [f"loading run {run_dir.name}: its head and the model {tiny_model} ...",
                        "classifying 1 image ..."]
    quiet = run_cli("predict.py", "--runs-dir", base / "runs", pngs / "000.png", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == out.stdout
    assert quiet.stderr.splitlines() == [using]  # which run: part of the result, not progress


def test_an_unreadable_image_is_said_without_nested_parentheses(trained_run, tmp_path):
    import io

    from PIL import Image

    base, _, _ = trained_run
    data = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data, "BMP")
    (tmp_path / "short.bmp").write_bytes(data.getvalue()[:-10])  # the decoder's own message holds parentheses
    out = run_cli("predict.py", "--runs-dir", base / "runs", tmp_path / "short.bmp", "--quiet")
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()[1:]
    assert line.startswith(f"{tmp_path / 'short.bmp'}: error: cannot read image: not a decodable image: "), line
    assert _max_depth(line) <= 1, line


def _max_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, depth)
    return deepest
