"""Any export read back with the runtime its format is meant for: a SavedModel folder (TensorFlow alone), a .tflite
file (the LiteRT interpreter), an .onnx file (ONNX Runtime)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line, require
from .files import PREPROCESSING, SUFFIXES, labels_path


@dataclass
class Exported:
    """An exported classifier read back with its own runtime: `probabilities(images [N, H, W, 3])`. A file of one
    input size gets images of another size brought to it by the run's preprocessing, which it records
    (files.PREPROCESSING); a file of uint8 input (an older export) gets them rounded to whole pixel values."""

    format: str
    class_names: tuple[str, ...]
    input_size: int | None  # None: any size
    run: object
    preprocessing: dict | None = None  # the run's {"resize", "crop", "image_size"}; None: a file that has none
    input_dtype: type = np.float32  # what the file takes: float32 pixel values (0 to 255), or uint8

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        if self.input_size is None:
            return self.run(images)
        if images.shape[1:3] != (self.input_size, self.input_size):
            if not self.preprocessing:
                raise UserError(f"the image is {images.shape[2]}x{images.shape[1]}, the exported model takes "
                                f"{self.input_size}x{self.input_size} (and records no resize to bring images to it: "
                                "export the run again)")
            images = fitted(images, self.input_size, self.preprocessing["resize"], self.preprocessing["crop"])
            if self.input_dtype == np.uint8:
                images = np.round(images)
        return self.run(images.astype(self.input_dtype))


def fitted(images: np.ndarray, size: int, resize: str, crop: str) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> float32 pixel values [N, size, size, 3] (0 to 255) as the run preprocesses
    them: its center crop, if any, then its resize method."""
    from ..extract.preprocess import preprocess

    return preprocess(images, size, resize, crop).numpy() * 255


def open_exported(path) -> Exported:
    """A .tflite (LiteRT interpreter), .onnx (ONNX Runtime) file or a SavedModel folder (TensorFlow alone)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no exported model at {path}")
    kind = "saved_model" if path.is_dir() else {suffix: kind for kind, suffix in SUFFIXES.items()}.get(path.suffix)
    if kind is None:
        raise UserError(f"{path} is not an export: a .tflite or .onnx file, or a SavedModel folder")
    try:
        return {"saved_model": _open_saved_model, "tflite": _open_tflite, "onnx": _open_onnx}[kind](path)
    except UserError:
        raise
    except _load_errors(kind) as exc:  # a damaged or foreign file
        raise UserError(f"cannot load {path} ({first_line(exc)})") from None


def _load_errors(kind: str) -> tuple[type[BaseException], ...]:
    """What each runtime raises for a damaged or foreign file (found by giving it some)."""
    if kind == "saved_model":  # no SavedModel, damaged variables, no serving signature, another one
        import tensorflow as tf

        return OSError, ValueError, IndexError, KeyError, TypeError, tf.errors.OpError
    if kind == "onnx":  # not an ONNX model, or no class names in its metadata
        from onnxruntime.capi import onnxruntime_pybind11_state as ort

        return (KeyError, ValueError, ort.Fail, ort.InvalidArgument, ort.InvalidGraph, ort.InvalidProtobuf,
                ort.NotImplemented)
    return ValueError, RuntimeError, OSError  # LiteRT: not a flatbuffer model; its labels unreadable


def _open_saved_model(path: Path) -> Exported:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    names = tuple(n.decode() for n in serve(images=tf.zeros([1, 8, 8, 3], tf.uint8))["class_names"].numpy())
    return Exported("saved_model", names, None,
                    lambda images: serve(images=tf.constant(images))["probabilities"].numpy())


def _open_tflite(path: Path) -> Exported:
    interpreter_module = require("ai_edge_litert.interpreter", "a .tflite model")
    from ai_edge_litert import schema_py_generated as schema

    interpreter = interpreter_module.Interpreter(model_path=str(path), num_threads=os.cpu_count())
    (entry,) = interpreter.get_input_details()
    if not labels_path(path).exists():
        raise UserError(f"{path} has no {labels_path(path).name} beside it (the class names)")
    names = tuple(labels_path(path).read_text().splitlines())
    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    preprocessing = None  # the PREPROCESSING metadata, if any
    for meta in map(model.Metadata, range(model.MetadataLength())):
        if meta.Name() == PREPROCESSING.encode():
            preprocessing = json.loads(model.Buffers(meta.Buffer()).DataAsNumpy().tobytes())
    return Exported("tflite", names, int(entry["shape"][1]), litert_call(interpreter), preprocessing,
                    np.dtype(entry["dtype"]).type)


def litert_call(interpreter):
    """A LiteRT interpreter of one input and one output as a function of a batch."""
    (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
    shape = [None]

    def run(images):
        if shape[0] != images.shape:  # allocating again for every call of one shape cost more than the model
            interpreter.resize_tensor_input(entry["index"], images.shape)
            interpreter.allocate_tensors()
            shape[0] = images.shape
        interpreter.set_tensor(entry["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(exit_["index"]).copy()

    return run


def _open_onnx(path: Path) -> Exported:
    ort = require("onnxruntime", "an .onnx model")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    names = tuple(json.loads(metadata["class_names"]))
    entry = session.get_inputs()[0]
    preprocessing = json.loads(metadata[PREPROCESSING]) if PREPROCESSING in metadata else None
    return Exported("onnx", names, entry.shape[1] if isinstance(entry.shape[1], int) else None,
                    lambda images: session.run(["probabilities"], {"images": images})[0], preprocessing,
                    np.uint8 if entry.type == "tensor(uint8)" else np.float32)
