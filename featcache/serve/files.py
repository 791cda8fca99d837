"""Writing an export so that nothing half-written is ever left under its name: the destination checked, the
content written under a temporary name beside it, then renamed. A SavedModel folder (`save_model`) or a
.tflite / .onnx file with its class names (`write_export`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import UserError, first_line

SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
# The metadata entry (an ONNX metadata property, a LiteRT metadata buffer) that records the run's preprocessing as
# JSON ({"resize", "crop", "image_size"}), so that a reader can bring images of any size to the file's input size.
PREPROCESSING = "featcache_preprocessing"


def check_destination(path, force: bool, folder: bool) -> Path:
    """An export's destination (a SavedModel `folder`, or a file): refused when it exists, unless `force` and it
    is of the same kind, which is then replaced whole."""
    path = Path(path)
    if path.exists() and not (force and path.is_dir() == folder):
        hint = " or pass `force=True` to replace it" if path.is_dir() == folder else ""
        raise UserError(f"{path} exists already; choose a new name{hint}")
    return path


def save_model(classifier, out_dir: Path, force: bool = False):
    """Save the classifier as a SavedModel folder `out_dir`, written under a temporary name and renamed. An existing
    folder (replaced only with `force`) is moved aside and deleted once the new one is in place, or moved back."""
    import tensorflow as tf

    out_dir = check_destination(out_dir, force, folder=True)
    tmp, old = (out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{what}") for what in ("tmp", "old"))
    try:
        tf.saved_model.save(classifier, str(tmp), signatures={"serving_default": classifier.classify})
        if out_dir.exists():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old.exists():
                os.replace(old, out_dir)
            raise
    except (OSError, tf.errors.OpError) as exc:
        raise UserError(f"writing {out_dir} failed ({getattr(exc, 'strerror', None) or first_line(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def labels_path(path: Path) -> Path:
    """The class-name file beside a .tflite file: one name per line."""
    return Path(path).with_suffix(".labels.txt")


def write_export(path: Path, content: bytes, class_names: tuple[str, ...]):
    """Write a .tflite or .onnx file (and a .tflite's labels) under temporary names, then rename; missing parent
    folders are made, as for a SavedModel."""
    path = Path(path)
    files = {path: content}
    if path.suffix == SUFFIXES["tflite"]:
        files[labels_path(path)] = "".join(f"{name}\n" for name in class_names).encode()
    temporary = {final: final.with_name(f".{final.name}.{os.getpid()}.tmp") for final in files}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for final, data in files.items():
            temporary[final].write_bytes(data)
        for final in sorted(files, key=lambda p: p == path):  # the model file last: a model always has its labels
            os.replace(temporary[final], final)
    except OSError as exc:
        raise UserError(f"writing {path} failed ({exc.strerror})") from None
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
