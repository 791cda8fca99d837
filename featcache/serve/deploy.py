"""The trained classifier where MobileNetV2 is meant to run: LiteRT (TFLite) and ONNX files, and reading them back.

An exported file takes uint8 images [N, S, S, 3] of one input size S and returns class probabilities
[N, K]: inside are the run's own preprocessing (its resize as two constant matrix products, which every
runtime has, where tf.image.resize's bicubic kernel is a TensorFlow-only op), the frozen network, the
run's head, averaged over the run's test-time views. The class names travel with it: ONNX metadata
(`class_names`, JSON), or `<file>.labels.txt` beside a .tflite file. `quantize='int8'` makes a LiteRT file
with int8 weights and activations, calibrated on a seeded sample of the run's *train* images; the depthwise
convolutions, the resize products and the head stay float (FLOAT_OPS): quantizing all of them left this
MobileNetV2's embeddings at a mean cosine similarity of 0.877 to f32 and the head far off (docs/benchmarks.md).
The head of an int8 file is corrected for its network's embeddings (int8_head): per dimension, the f32
embedding is fitted as a * int8 + b on a seeded sample of up to 2,000 train images (a draw of its own, which
may share images with the calibration sample), a float layer in front of the head.

Files are written under a temporary name and renamed when complete. `open_exported` reads any export
back (a SavedModel folder too) for predict.py, with the runtime each format is meant for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from ..extract.quantize import CALIBRATION_SEED, CALIBRATION_SIZE, MAX_CALIBRATION_BYTES

FORMATS = ("saved_model", "tflite", "onnx")
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
INSTALL_HINT = "pip install -r requirements-deploy.txt"
ONNX_OPSET = 17
QUANTIZE = ("int8",)
# Op types an int8 LiteRT file keeps in float: MobileNetV2's depthwise convolutions (the first one's int8
# output was off by 1.45 quantization steps on average), the resize as matrix products and the head (its
# standardisation's SUB and MUL, whose one int8 scale for all 1280 standardised inputs cost agreement, and its
# FULLY_CONNECTED). Float depthwise weights add 0.02 MB to the network's 2.71 MB (docs/benchmarks.md).
FLOAT_OPS = ("DEPTHWISE_CONV_2D", "BATCH_MATMUL", "FULLY_CONNECTED", "SUB", "MUL")
CORRECTION_IMAGES, CORRECTION_SEED = 2000, 1  # train images (at most) the int8 head correction is fitted on
MIN_SLOPE_ROWS = 200  # fewer rows: the mean shift alone (a slope fitted on a few rows is noise)
SLOPES = (0.5, 2.0)  # the range a fitted slope is held to


def export_run(run_dir: Path, path, format: str, input_size: int | None = None, force: bool = False,
               quantize: str | None = None) -> Path:
    """Export a run as a .tflite or .onnx file at `path` (its suffix added when missing); the path written.
    `quantize='int8'` (tflite only): int8 weights and activations, calibrated on the run's train images."""
    from .classifier import check_destination, load_run
    from ..settings import check_image_size

    if format not in SUFFIXES:
        raise UserError(f"unknown `format` {format!r} for a file; choose one of {', '.join(SUFFIXES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"unknown `quantize` {quantize!r}; the one choice is 'int8'")
    if quantize and format != "tflite":
        raise UserError(f"`quantize='int8'` is for `format='tflite'` only, not {format}")
    path = Path(path)
    if path.suffix != SUFFIXES[format]:
        path = path.with_name(path.name + SUFFIXES[format])
    check_destination(path, force, folder=False)  # before the slow part
    if format == "onnx":
        require("tf2onnx", "format onnx")
    parts = load_run(run_dir)
    size = input_size or default_input_size(parts.key)
    check_image_size(size, "input_size")
    if format == "onnx":
        content = to_onnx(portable_function(parts, size), parts.class_names, parts.run)
    elif quantize:
        count = min(CORRECTION_IMAGES, MAX_CALIBRATION_BYTES // (size * size * 3))  # held in memory like calibration
        calibration, fit = train_samples(run_dir, parts.key, size,
                                         [(CALIBRATION_SIZE, CALIBRATION_SEED), (count, CORRECTION_SEED)])
        head = int8_head(parts, size, calibration, fit)
        content = to_tflite(portable_function(dataclasses.replace(parts, head=head), size), calibration)
    else:
        content = to_tflite(portable_function(parts, size))
    write_export(path, content, parts.class_names)
    return path


def default_input_size(key) -> int:
    """The image side an exported file takes by default: the dataset's own when it has one (CIFAR: 32), else
    the network's input size."""
    from ..extract.sources import cifar

    return cifar.IMAGE_SHAPE[0] if key.dataset in cifar.LAYOUTS else key.image_size


def train_samples(run_dir: Path, key, size: int, draws) -> list[np.ndarray]:
    """Seeded samples of the run's train images (never test), of the input size, one per (size, seed) draw, read
    in one pass (quantize.calibration_samples)."""
    from ..cache.read import attributes
    from ..extract.quantize import CalibrationUnusable, calibration_samples
    from ..head.records import read_config
    from ..extract.sources import open_split

    train_cache = read_config(run_dir)["train_cache"]["path"]
    try:
        source = attributes(Path(train_cache))["source"]
    except (OSError, KeyError) as exc:
        raise UserError(f"int8 calibration reads the run's train images, but its train cache {train_cache} cannot "
                        f"be read ({first_line(exc)})") from None
    try:
        samples = calibration_samples(open_split(key, "train", data_dir=None if key.data_dir else source), draws)
    except CalibrationUnusable as exc:
        raise UserError(f"{exc.problem}; export this run without `quantize`") from None
    images = samples[0][0]  # all of one size: calibration_samples checks
    if images.shape[1:3] != (size, size):
        raise UserError(f"int8 calibration needs train images of the input size {size}x{size}; the run's are "
                        f"{images.shape[2]}x{images.shape[1]} (choose `input_size` {images.shape[1]})")
    return [images for images, _ in samples]


def require(module: str, what: str):
    """Import an optional package, or say in one line which requirements file brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs {module.split('.')[0]}, which is not installed: {INSTALL_HINT}") from None


def labels_path(path: Path) -> Path:
    """The class-name file beside a .tflite file: one name per line."""
    return Path(path).with_suffix(".labels.txt")


def portable_function(parts, input_size: int, embeddings: bool = False):
    """The run's classifier as a frozen concrete function of uint8 [None, S, S, 3] -> probabilities [None, K]
    (`embeddings`: the network's output instead, [views x N, D], each view's images in turn)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from ..extract.preprocess import resize_matrix
    from ..settings import view_images

    key = parts.key

    def resized(x):
        """[0, 1] floats [N, H, W, 3] -> [N, S, S, 3], channels first in between so that both resize products
        are plain (batched) matrix products."""
        rows = tf.constant(resize_matrix(x.shape[1], key.image_size, key.resize))
        cols = tf.constant(resize_matrix(x.shape[2], key.image_size, key.resize).T)
        x = tf.matmul(tf.matmul(rows, tf.transpose(x, [0, 3, 1, 2])), cols)
        return tf.clip_by_value(tf.transpose(x, [0, 2, 3, 1]), 0.0, 1.0)

    @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.uint8, name="images")])
    def classify(images):
        x = tf.cast(images, tf.float32) / 255.0  # square: a center crop would cut nothing
        # The views go through the network as one batch: one copy of it in the graph, whatever their number.
        views = tf.concat([resized(view_images(x, view)) for view in parts.tta_views], axis=0)
        if embeddings:
            return {"embeddings": tf.cast(parts.network(views, **parts.call_kwargs), tf.float32)}
        per_view = tf.reshape(parts.probabilities(views), [len(parts.tta_views), -1, len(parts.class_names)])
        probs = tf.reduce_mean(per_view, axis=0)
        return {"probabilities": tf.identity(probs, name="probabilities")}

    return convert_variables_to_constants_v2(classify.get_concrete_function())


def to_tflite(frozen, calibration: np.ndarray | None = None) -> bytes:
    """A LiteRT model: f32, or with `calibration` (uint8 images) int8 but for FLOAT_OPS."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    try:
        if calibration is None:
            return converter.convert()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        # The converter's own way to keep op types in float (selective quantization); its debug data is not used
        # for the model it returns.
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([image[None]] for image in calibration[:1]),
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS)))
        return debugger.get_nondebug_quantized_model()
    except Exception as exc:  # noqa: BLE001 - the converter's errors are many and all mean the same here
        raise UserError(f"the TFLite converter cannot convert this classifier: {first_line(exc)}") from None


def int8_head(parts, input_size: int, calibration: np.ndarray, images: np.ndarray):
    """The run's head for the int8 network's embeddings: per dimension, the f32 embedding fitted as a * int8 + b
    over `images` (train images, all TTA views; affine_fit), put in front of the head as a float layer. On the
    10,000 CIFAR-10 test images the int8 file scored 0.8423 without it and 0.8570 with it (f32: 0.8567;
    docs/benchmarks.md)."""
    import tensorflow as tf

    frozen = portable_function(parts, input_size, embeddings=True)
    interpreter = require("ai_edge_litert.interpreter", "int8 export").Interpreter(
        model_content=to_tflite(frozen, calibration), num_threads=os.cpu_count())
    # A frozen function returns its outputs as a list.
    quantized, f32 = _litert_call(interpreter), lambda batch: frozen(tf.constant(batch))[0].numpy()
    batches = [images[i : i + 100] for i in range(0, len(images), 100)]
    q, y = (np.concatenate([call(batch) for batch in batches]) for call in (quantized, f32))
    return corrected(parts.head, *affine_fit(q, y))


def corrected(head, a: np.ndarray, b: np.ndarray):
    """`head` behind a float layer computing a * x + b (a > 0), whatever the head's own layers."""
    import keras

    # (x - mean) / sqrt(variance) with mean = -b / a and variance = 1 / a^2 is a * x + b.
    correction = keras.layers.Normalization(axis=-1, mean=-b / a, variance=1 / a**2, name="int8_correction")
    inputs = keras.Input(shape=(len(a),))
    return keras.Model(inputs, head(correction(inputs)))


def affine_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, (a, b) of the least-squares y ~ a * x + b, a held to SLOPES; a = 1 where x is constant, the slope
    is below 0.1 (no relation worth scaling by), or there are fewer than MIN_SLOPE_ROWS rows."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    spread = ((x - x_mean) ** 2).mean(0)
    a = ((x - x_mean) * (y - y_mean)).mean(0) / np.maximum(spread, 1e-12)
    usable = (spread > 1e-12) & (a >= 0.1) & (len(x) >= MIN_SLOPE_ROWS)
    a = np.where(usable, np.clip(a, *SLOPES), 1.0)
    return a, y_mean - a * x_mean


def to_onnx(frozen, class_names: tuple[str, ...], run: str) -> bytes:
    """An ONNX model (opset ONNX_OPSET) with the class names in its metadata."""
    tf2onnx = require("tf2onnx", "format onnx")
    try:
        model, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
            output_names=[t.name for t in frozen.outputs], opset=ONNX_OPSET)
    except Exception as exc:  # noqa: BLE001 - as above
        raise UserError(f"tf2onnx cannot convert this classifier: {first_line(exc)}") from None
    model.graph.input[0].name, model.graph.output[0].name = _rename(model, "images", "probabilities")
    for name, value in (("class_names", json.dumps(list(class_names))), ("featcache_run", run)):
        entry = model.metadata_props.add()
        entry.key, entry.value = name, value
    return model.SerializeToString()


def _rename(model, input_name: str, output_name: str) -> tuple[str, str]:
    """Give the graph's one input and one output plain names (tf2onnx keeps TensorFlow's `images:0`)."""
    old_in, old_out = model.graph.input[0].name, model.graph.output[0].name
    for node in model.graph.node:
        node.input[:] = [input_name if name == old_in else name for name in node.input]
        node.output[:] = [output_name if name == old_out else name for name in node.output]
    return input_name, output_name


def write_export(path: Path, content: bytes, class_names: tuple[str, ...]):
    """Write a .tflite or .onnx file (and a .tflite's labels) under temporary names, then rename: nothing
    half-written is ever left under the final names."""
    path = Path(path)
    files = {path: content}
    if path.suffix == SUFFIXES["tflite"]:
        files[labels_path(path)] = "".join(f"{name}\n" for name in class_names).encode()
    temporary = {final: final.with_name(f".{final.name}.{os.getpid()}.tmp") for final in files}
    try:
        for final, data in files.items():
            temporary[final].write_bytes(data)
        for final in sorted(files, key=lambda p: p == path):  # the model file last: a model always has its labels
            os.replace(temporary[final], final)
    except OSError as exc:
        raise UserError(f"writing {path} failed ({exc.strerror})") from None
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


@dataclass
class Exported:
    """An exported classifier read back with its own runtime: `probabilities(uint8 [N, H, W, 3])`."""

    format: str
    class_names: tuple[str, ...]
    input_size: int | None  # None: any size
    run: object

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        if self.input_size is not None and images.shape[1:3] != (self.input_size, self.input_size):
            raise UserError(f"the image is {images.shape[2]}x{images.shape[1]}, the exported model takes "
                            f"{self.input_size}x{self.input_size}")
        return self.run(images)


def open_exported(path) -> Exported:
    """A .tflite (LiteRT interpreter), .onnx (ONNX Runtime) file or a SavedModel folder (TensorFlow alone)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no exported model at {path}")
    try:
        if path.is_dir():
            return _open_saved_model(path)
        if path.suffix == SUFFIXES["tflite"]:
            return _open_tflite(path)
        if path.suffix == SUFFIXES["onnx"]:
            return _open_onnx(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: each runtime fails its own way
        raise UserError(f"cannot load {path} ({first_line(exc)})") from None
    raise UserError(f"{path} is not an export: a .tflite or .onnx file, or a SavedModel folder")


def _open_saved_model(path: Path) -> Exported:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    names = tuple(n.decode() for n in serve(images=tf.zeros([1, 8, 8, 3], tf.uint8))["class_names"].numpy())
    return Exported("saved_model", names, None,
                    lambda images: serve(images=tf.constant(images))["probabilities"].numpy())


def _open_tflite(path: Path) -> Exported:
    interpreter_module = require("ai_edge_litert.interpreter", "a .tflite model")
    interpreter = interpreter_module.Interpreter(model_path=str(path), num_threads=os.cpu_count())
    (entry,) = interpreter.get_input_details()
    if not labels_path(path).exists():
        raise UserError(f"{path} has no {labels_path(path).name} beside it (the class names)")
    names = tuple(labels_path(path).read_text().splitlines())
    return Exported("tflite", names, int(entry["shape"][1]), _litert_call(interpreter))


def _litert_call(interpreter):
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
    names = tuple(json.loads(session.get_modelmeta().custom_metadata_map["class_names"]))
    size = session.get_inputs()[0].shape[1]
    return Exported("onnx", names, size if isinstance(size, int) else None,
                    lambda images: session.run(["probabilities"], {"images": images})[0])
