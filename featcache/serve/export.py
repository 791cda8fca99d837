"""A recorded run exported as a .tflite or .onnx file: loaded, converted (int8: calibrated and corrected), written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import int8
from .convert import onnx_converter, portable_function, to_onnx, to_tflite, with_tflite_metadata
from .files import PREPROCESSING, SUFFIXES, check_destination, write_export
from .run import load_run

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZE = ("int8",)


def export_run(run_dir: Path, path, format: str, input_size: int | None = None, force: bool = False,
               quantize: str | None = None, log=None) -> Path:
    """Export a run as a .tflite or .onnx file at `path` (its suffix added when missing); the path written.
    `input_size`: the side of the images the file takes (default: the network's input size).
    `quantize='int8'` (tflite only): int8 weights and activations, calibrated on the run's train images.
    `log`, when given, gets a line before each long step. The options are checked where they enter (export.py)."""
    log = log or (lambda line: None)
    path = Path(path)
    if path.suffix != SUFFIXES[format]:
        path = path.with_name(path.name + SUFFIXES[format])
    check_destination(path, force, folder=False)  # before the slow part
    if format == "onnx":
        onnx_converter()
    log(f"loading run {Path(run_dir).name} and its model")
    parts = load_run(run_dir)
    size = input_size or parts.key.image_size  # the network's: any photo classified as by the run
    recipe = json.dumps({"resize": parts.key.resize, "crop": parts.key.crop, "image_size": parts.key.image_size})
    if format == "onnx":
        log(f"converting to ONNX ({size}x{size} input)")
        content = to_onnx(portable_function(parts, size), {"class_names": json.dumps(list(parts.class_names)),
                                                           "featcache_run": parts.run,
                                                           PREPROCESSING: recipe})
    elif quantize:
        log("reading the run's train images for int8 calibration and correction")
        calibration, fit = int8.train_samples(parts, size)
        log("correcting the head for the int8 network (one int8 conversion, then its embeddings)")
        head = int8.int8_head(parts, size, calibration, fit)
        log(f"converting to LiteRT int8 ({size}x{size} input)")
        content = to_tflite(portable_function(dataclasses.replace(parts, head=head), size), calibration)
    else:
        log(f"converting to LiteRT ({size}x{size} input)")
        content = to_tflite(portable_function(parts, size))
    if format == "tflite":
        content = with_tflite_metadata(content, PREPROCESSING, recipe)
    write_export(path, content, parts.class_names)
    return path

