"""The trained classifier as one TensorFlow module: uint8 images of any size in, class probabilities out.

Inside: the extractor's own preprocessing with the cache's settings, the frozen TF Hub
extractor, and the run's saved Keras head as it is (standardisation and whatever layers it
has), averaged over the run's test-time views. predict.py calls it directly and export.py
saves it as a SavedModel, so both give the same numbers, and the export loads with
`tf.saved_model.load` alone (no featcache, no tensorflow_hub, no Keras).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache.layout import CacheKey
from ..errors import UserError, first_line
from ..extract.models import call_kwargs, identity, load_model
from ..extract.preprocess import preprocess_views
from ..head.records import ledger, read_config
from ..settings import DEFAULT_PRECISION, parse_views
from ..extract.sources.folder import decode_file, is_image_name


def resolve_run(runs_dir, run_id: str | None) -> tuple[Path, str]:
    """(run folder, why it was chosen): the named run, or else among the runs on the default cache
    settings (all runs if none is) the best by validation accuracy, or else the latest.

    A quick run on a 1,000-image limit with a validation split thus never outranks the full default run.
    `why` also names the dataset and cache the run was trained on.
    """
    runs_dir = Path(runs_dir)
    if run_id:
        run_dir = runs_dir / run_id if not Path(run_id).is_dir() else Path(run_id)
        if not (run_dir / "head.keras").exists():
            raise UserError(f"no run {run_id!r} with a head.keras in {runs_dir}")
        return run_dir, "as asked"
    rows = [r for r in ledger(runs_dir) if (runs_dir / r["run"] / "head.keras").exists()]
    if not rows:
        raise UserError(f"no runs in {runs_dir}; train one with: python train_head.py")
    on_default = [r for r in rows if r["key"] == CacheKey()]
    pool, where = ((on_default, "on the default cache settings") if on_default
                   else (rows, "(none is on the default cache settings)"))
    with_val = [r for r in pool if r["val_acc"] is not None]
    if with_val:
        chosen, why = with_val[0], f"best validation accuracy among runs {where}"
    else:
        chosen, why = max(pool, key=lambda r: _started(r["run"])), f"latest run {where}"
    key = chosen["key"]
    return runs_dir / chosen["run"], f"{why}; trained on {key.dataset_name()} {key.settings_name()}"


def _started(run: str) -> tuple:
    """A run folder's name as the time it started: `<date>-<time>`, then `-1`, `-2`, ... in that order."""
    parts = run.split("-")
    return parts[:2], int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0


@dataclass
class RunParts:
    """What classifying with a run takes: its cache key (preprocessing, model), TTA, class names, the loaded
    network and head. `probabilities` maps preprocessed float images to the head's class probabilities."""

    run: str
    key: CacheKey
    tta_views: tuple[str, ...]  # the views whose probabilities are averaged
    class_names: tuple[str, ...]
    network: object
    call_kwargs: dict
    head: object

    def probabilities(self, x):
        import tensorflow as tf

        return self.head(tf.cast(self.network(x, **self.call_kwargs), tf.float32), training=False)


def load_run(run_dir: Path) -> RunParts:
    """A run's parts, checked: its record, the model folder unchanged, an f32 cache, a readable head."""
    import keras

    config = read_config(run_dir)
    name, key = Path(run_dir).name, CacheKey.from_attrs(config["cache"])
    if key.model_sha256 and identity(key.model)[1] != key.model_sha256:
        raise UserError(f"run {name}: model folder {key.model} holds other files than the model the run was trained "
                        "on (its content hash differs)")
    if key.precision != DEFAULT_PRECISION:
        raise UserError(f"run {name} was trained on {key.precision} embeddings (OpenVINO), but predict and export "
                        f"run the {DEFAULT_PRECISION} TensorFlow network, whose embeddings differ: train a head on a "
                        f"{DEFAULT_PRECISION} cache (extract and train without `precision`) to serve")
    path = Path(run_dir) / "head.keras"
    try:
        head = keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a foreign file, a missing one: all the same here
        why = first_line(exc, 120) if not path.is_file() or zipfile.is_zipfile(path) else "not a complete .keras archive"
        raise UserError(f"run {name}: its head.keras cannot be read ({why}); train the run again") from None
    network = load_model(key.model, run=name)
    return RunParts(name, key, parse_views(config["head"]["tta_views"]), tuple(config["class_names"]), network,
                    call_kwargs(network, key.image_size), head)


def build_classifier(run_dir: Path):
    """A tf.Module for one run: `classify(uint8 [N,H,W,3]) -> {probabilities, top_class, class_names}`."""
    import tensorflow as tf

    parts = load_run(run_dir)
    key = parts.key

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__(name="featcache_classifier")
            self.extractor, self.head = parts.network, parts.head  # tracked, so that a SavedModel holds them
            self.class_names = tf.constant(parts.class_names)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def classify(self, images):
            views = preprocess_views(images, parts.tta_views, key.image_size, key.resize, key.crop)
            probs = tf.add_n([parts.probabilities(x) for x in views]) / len(views)
            return {"probabilities": probs, "top_class": tf.gather(self.class_names, tf.argmax(probs, axis=1)),
                    "class_names": self.class_names}

    return Classifier()


def decode_image(path: Path) -> np.ndarray:
    """PNG/JPEG/BMP/GIF of any size and mode (gray, RGB, RGBA) -> uint8 [H, W, 3], decoded as extraction does."""
    image, reason = decode_file(Path(path))
    if image is None:
        raise UserError(f"cannot read image ({reason})")
    return image


def expand_paths(paths) -> list[Path]:
    """Files as given; folders become their image files, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if is_image_name(f.name))
        else:
            out.append(p)
    return out


def export(classifier, out_dir: Path, force: bool = False):
    """Save the classifier as a SavedModel folder `out_dir`: written under a temporary name beside it and renamed
    when complete, so nothing half-written is ever left there; an existing folder is replaced only with `force`."""
    import tensorflow as tf

    out_dir = check_destination(out_dir, force, folder=True)
    tmp, old = (out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{what}") for what in ("tmp", "old"))
    try:
        tf.saved_model.save(classifier, str(tmp), signatures={"serving_default": classifier.classify})
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except (OSError, tf.errors.OpError) as exc:
        raise UserError(f"writing {out_dir} failed ({getattr(exc, 'strerror', None) or first_line(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_destination(path, force: bool, folder: bool) -> Path:
    """An export's destination (a SavedModel `folder`, or a file): refused when it exists, unless `force` and it
    is of the same kind, which is then replaced whole."""
    path = Path(path)
    if path.exists() and not (force and path.is_dir() == folder):
        same_kind = path.is_dir() == folder
        raise UserError(f"{path} exists already; choose a new name" + (" or pass `force=True` to replace it"
                                                                        if same_kind else ""))
    return path
