"""OpenVINO runtime for stage 1: the same loaded TF Hub model, converted in memory.

What OpenVINO compiles is the whole uint8 -> embedding graph (preprocess_static, then the
network), with a fixed batch size, so TensorFlow does no work while it runs. Measured on
2 AVX-512 cores (README "Results"), each of these choices mattered:
- INFERENCE_PRECISION_HINT is pinned to f32. On CPUs with AMX/bf16, OpenVINO otherwise
  defaults to bf16, which moved embeddings by up to 1.7 (values up to ~5.5); f32 agrees
  with TensorFlow to ~7e-5.
- A static input shape: the same network ran ~25% faster than with a dynamic batch.
- Batch 1 requests through an AsyncInferQueue under the THROUGHPUT hint: one stream per
  core, each request's activations small enough to stay in the core's cache.
"""

from __future__ import annotations

import numpy as np

INSTALL_HINT = "pip install openvino  (optional; about 2.5x faster extraction on CPUs)"


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoNetwork:
    """uint8 [N,H,W,3] arrays in, float32 [N,D] out, from a tf.function with a static input signature."""

    def __init__(self, tf_function):
        import openvino as ov

        concrete = tf_function.get_concrete_function()
        self.batch_size = concrete.inputs[0].shape[0]
        compiled = ov.Core().compile_model(
            ov.convert_model(concrete), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"}
        )
        self.dim = compiled.output(0).get_partial_shape()[1].get_length()
        # Twice the streams' optimum, so a stream never waits while Python queues the next batch.
        requests = 2 * max(1, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(compiled, requests)
        self._queue.set_callback(self._collect)

    @staticmethod
    def _collect(request, rows):
        rows[:] = request.get_output_tensor(0).data[: len(rows)]  # padding rows are dropped

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Embed each array; their batches are interleaved, so all of them move through together."""
        outputs = [np.empty((len(images), self.dim), np.float32) for images in arrays]
        for lo in range(0, len(arrays[0]), self.batch_size):
            for images, out in zip(arrays, outputs):
                batch = images[lo : lo + self.batch_size]
                padded = np.zeros((self.batch_size, *batch.shape[1:]), np.uint8)
                padded[: len(batch)] = batch  # also makes a mirrored (strided) view contiguous
                self._queue.start_async({0: padded}, out[lo : lo + self.batch_size])
        self._queue.wait_all()
        return outputs
