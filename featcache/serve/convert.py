"""The trained classifier converted for the runtimes MobileNetV2 is meant for: LiteRT (TFLite) and ONNX.

A converted file takes float32 pixel values (0 to 255) [N, S, S, 3] of one input size S (float, so a photo brought
to S by the run's resize keeps what it computed) and returns class probabilities [N, K]: inside are the run's resize
(as matrix products, which every runtime has), the frozen network and the run's head, averaged over its test-time
views; int8 LiteRT files keep the op types in FLOAT_OPS in float.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError, first_line, require

ONNX_OPSET = 17
# Op types an int8 LiteRT file keeps in float (docs/benchmarks.md, int8 LiteRT, says why): the depthwise
# convolutions, the resize as matrix products, and the head's standardisation and dense layer.
FLOAT_OPS = ("DEPTHWISE_CONV_2D", "BATCH_MATMUL", "FULLY_CONNECTED", "SUB", "MUL")


def portable_function(parts, input_size: int, embeddings: bool = False):
    """The run's classifier as a frozen concrete function of float32 pixel values (0 to 255) [None, S, S, 3] ->
    probabilities [None, K] (`embeddings`: the head's input instead, [views x N, D], each view's images in turn)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    from ..extract.preprocess import resize_matrix, view_images

    key = parts.key

    def resized(x):
        """[0, 1] floats [N, H, W, 3] -> [N, S, S, 3], channels first in between so that both resize products
        are plain (batched) matrix products. Images of the network's size are passed as they are."""
        if x.shape[1] == x.shape[2] == key.image_size:
            return x
        rows = tf.constant(resize_matrix(x.shape[1], key.image_size, key.resize))
        cols = tf.constant(resize_matrix(x.shape[2], key.image_size, key.resize).T)
        x = tf.matmul(tf.matmul(rows, tf.transpose(x, [0, 3, 1, 2])), cols)
        return tf.clip_by_value(tf.transpose(x, [0, 2, 3, 1]), 0.0, 1.0)

    @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images")])
    def classify(images):
        x = images / 255.0  # square: a center crop would cut nothing
        # The views go through the network as one batch: one copy of it in the graph, whatever their number.
        views = tf.concat([resized(view_images(x, view)) for view in parts.tta_views], axis=0)
        if embeddings:
            return {"embeddings": parts.embed(views)}
        per_view = tf.reshape(parts.probabilities(views), [len(parts.tta_views), -1, len(parts.class_names)])
        probs = tf.reduce_mean(per_view, axis=0)
        return {"probabilities": tf.identity(probs, name="probabilities")}

    return convert_variables_to_constants_v2(classify.get_concrete_function())


def to_tflite(frozen, calibration: np.ndarray | None = None) -> bytes:
    """A LiteRT model: f32, or with `calibration` (images) int8 but for FLOAT_OPS."""
    import tensorflow as tf
    from tensorflow.lite.python.convert_phase import ConverterError

    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    try:
        if calibration is None:
            return converter.convert()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        # The converter's own way to keep op types in float (selective quantization); its debug data is not used
        # for the model it returns.
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([image[None].astype(np.float32)] for image in calibration[:1]),
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS)))
        return debugger.get_nondebug_quantized_model()
    except (ConverterError, ValueError, RuntimeError) as exc:  # an op it cannot convert, a calibration failure
        raise UserError(f"the TFLite converter cannot convert this classifier: {first_line(exc)}") from None


def with_tflite_metadata(content: bytes, name: str, value: str) -> bytes:
    """A LiteRT model with one more metadata entry (a named buffer, as the TFLite schema keeps metadata)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(value.encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = name, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def onnx_converter():
    """tf2onnx, or the one-line refusal naming its requirements file (checked before the slow part, too)."""
    return require("tf2onnx", "format onnx")


def to_onnx(frozen, metadata: dict[str, str]) -> bytes:
    """An ONNX model (opset ONNX_OPSET) with these metadata properties."""
    tf2onnx = onnx_converter()
    try:
        model, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
            output_names=[t.name for t in frozen.outputs], opset=ONNX_OPSET)
    except (ValueError, RuntimeError, NotImplementedError, TypeError, KeyError) as exc:  # what tf2onnx raises
        raise UserError(f"tf2onnx cannot convert this classifier: {first_line(exc)}") from None
    old_in, old_out = model.graph.input[0].name, model.graph.output[0].name
    for node in model.graph.node:  # plain names for the one input and output (tf2onnx keeps TensorFlow's `images:0`)
        node.input[:] = ["images" if name == old_in else name for name in node.input]
        node.output[:] = ["probabilities" if name == old_out else name for name in node.output]
    model.graph.input[0].name, model.graph.output[0].name = "images", "probabilities"
    for name, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = name, value
    return model.SerializeToString()
