"""The trained classifier as one TensorFlow module: uint8 images of any size in, class probabilities out.

Inside: the same preprocessing the cache was made with, the frozen TF Hub extractor, the
run's standardisation and its head (plus flip averaging when the run used TTA). predict.py
calls it directly and export.py saves it as a SavedModel, so both give the same numbers,
and the export loads with `tf.saved_model.load` alone (no featcache, no tensorflow_hub).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import runs
from .data import CLASS_NAMES
from .errors import UserError
from .extractor import load_model, preprocess


def resolve_run(runs_dir, run_id: str | None) -> tuple[Path, str]:
    """(run folder, why it was chosen): the named run, or else among the runs on the default cache
    settings (all runs if none is) the best by validation accuracy, or else the latest.

    A quick `--limit 1000` run with a validation split thus never outranks the full default run.
    """
    runs_dir = Path(runs_dir)
    if run_id:
        run_dir = runs_dir / run_id if not Path(run_id).is_dir() else Path(run_id)
        if not (run_dir / "head.keras").exists():
            raise UserError(f"no run {run_id!r} with a head.keras in {runs_dir}")
        return run_dir, "as asked"
    rows = [r for r in runs.ledger(runs_dir) if (runs_dir / r["run"] / "head.keras").exists()]
    if not rows:
        raise UserError(f"no runs in {runs_dir}; train one with: python train_head.py")
    on_default = [r for r in rows if r["key"] == runs.default_key()]
    pool, where = (on_default, "on the default cache settings") if on_default else (rows, "(none is on the default cache settings)")
    with_val = [r for r in pool if r["val_acc"] is not None]
    if with_val:
        return runs_dir / with_val[0]["run"], f"best validation accuracy among runs {where}"
    return runs_dir / max(r["run"] for r in pool), f"latest run {where}"


def head_weights(keras_path: Path) -> dict:
    """Standardisation statistics and dense weights of a saved head, as numpy arrays."""
    import keras

    model = keras.models.load_model(keras_path, compile=False)
    norm = model.get_layer("standardize")
    weights = {"mean": np.asarray(norm.mean).reshape(-1), "variance": np.asarray(norm.variance).reshape(-1)}
    layer_names = {layer.name for layer in model.layers}
    for name in ("hidden", "classes"):
        if name in layer_names:
            kernel, bias = model.get_layer(name).get_weights()
            weights[name] = (kernel, bias)
    return weights


def build_classifier(run_dir: Path):
    """A tf.Module for one run: `classify(uint8 [N,H,W,3]) -> {probabilities, top_class, class_names}`."""
    import tensorflow as tf

    config = json.loads((Path(run_dir) / "config.json").read_text())
    cache, head = config["cache"], config["head"]
    weights = head_weights(Path(run_dir) / "head.keras")

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__(name="cifar10_classifier")
            self.extractor = load_model(cache["model"])
            self.image_size, self.resize, self.tta = int(cache["image_size"]), cache["resize"], bool(head["tta"])
            self.mean = tf.constant(weights["mean"], tf.float32)
            # Keras' Normalization divides by max(sqrt(variance), epsilon).
            self.std = tf.constant(np.maximum(np.sqrt(weights["variance"]), 1e-7), tf.float32)
            self.dense = [tuple(tf.constant(w, tf.float32) for w in weights[name])
                          for name in ("hidden", "classes") if name in weights]
            self.class_names = tf.constant(CLASS_NAMES)

        def _probabilities(self, x):
            features = tf.cast(self.extractor(x, training=False), tf.float32)
            h = (features - self.mean) / self.std
            for kernel, bias in self.dense[:-1]:
                h = tf.nn.relu(tf.matmul(h, kernel) + bias)
            kernel, bias = self.dense[-1]
            return tf.nn.softmax(tf.matmul(h, kernel) + bias)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def classify(self, images):
            x = preprocess(images, self.image_size, self.resize)
            probs = self._probabilities(x)
            if self.tta:
                probs = (probs + self._probabilities(tf.image.flip_left_right(x))) / 2.0
            return {"probabilities": probs, "top_class": tf.gather(self.class_names, tf.argmax(probs, axis=1)),
                    "class_names": self.class_names}

    return Classifier()


def decode_image(path: Path) -> np.ndarray:
    """PNG/JPEG/BMP/GIF of any size and mode (gray, RGB, RGBA) -> uint8 [H, W, 3]."""
    import tensorflow as tf

    try:
        return tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False).numpy()
    except (tf.errors.OpError, ValueError) as exc:
        message = getattr(exc, "message", str(exc)).strip().splitlines()
        raise UserError(f"cannot read image ({message[0][:100] if message else type(exc).__name__})") from None


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def expand_paths(paths) -> list[Path]:
    """Files as given; folders become their image files, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def export(classifier, out_dir: Path):
    import tensorflow as tf

    tf.saved_model.save(classifier, str(out_dir), signatures={"serving_default": classifier.classify})
