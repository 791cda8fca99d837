"""A recorded run exported as a .tflite or .onnx file: loaded, converted (int8: calibrated and corrected), written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..extract.quantize import CALIBRATION_SEED, CALIBRATION_SIZE, MAX_CALIBRATION_BYTES
from .convert import portable_function, preprocessing, to_onnx, to_tflite, with_tflite_metadata
from .files import PREPROCESSING, SUFFIXES, check_destination, write_export
from .int8 import CORRECTION_IMAGES, CORRECTION_SEED, int8_head, train_samples
from .run import load_run
from .runtimes import require

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZE = ("int8",)


def export_run(run_dir: Path, path, format: str, input_size: int | None = None, force: bool = False,
               quantize: str | None = None) -> Path:
    """Export a run as a .tflite or .onnx file at `path` (its suffix added when missing); the path written.
    `quantize='int8'` (tflite only): int8 weights and activations, calibrated on the run's train images.
    The options are checked where they enter (export.py)."""
    path = Path(path)
    if path.suffix != SUFFIXES[format]:
        path = path.with_name(path.name + SUFFIXES[format])
    check_destination(path, force, folder=False)  # before the slow part
    if format == "onnx":
        require("tf2onnx", "format onnx")
    parts = load_run(run_dir)
    size = input_size or default_input_size(parts.key)
    if format == "onnx":
        content = to_onnx(portable_function(parts, size), parts.class_names, parts.run, preprocessing(parts.key))
    elif quantize:
        count = min(CORRECTION_IMAGES, MAX_CALIBRATION_BYTES // (size * size * 3))  # held in memory like calibration
        calibration, fit = train_samples(run_dir, parts.key, size,
                                         [(CALIBRATION_SIZE, CALIBRATION_SEED), (count, CORRECTION_SEED)])
        head = int8_head(parts, size, calibration, fit)
        content = to_tflite(portable_function(dataclasses.replace(parts, head=head), size), calibration)
    else:
        content = to_tflite(portable_function(parts, size))
    if format == "tflite":
        content = with_tflite_metadata(content, PREPROCESSING, preprocessing(parts.key))
    write_export(path, content, parts.class_names)
    return path


def default_input_size(key) -> int:
    """The image side an exported file takes by default: the dataset's own when it has one (CIFAR: 32), else
    the network's input size."""
    from ..extract.sources import cifar

    return cifar.IMAGE_SHAPE[0] if key.dataset in cifar.LAYOUTS else key.image_size
