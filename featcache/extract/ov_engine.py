"""OpenVINO runtime for stage 1: the same loaded TF Hub model, converted in memory.

What OpenVINO compiles is the whole uint8 -> embedding graph (preprocess_static, then the network), with a fixed
batch size, so TensorFlow does no work while it runs. INFERENCE_PRECISION_HINT is pinned (f32 unless precision bf16
asks otherwise): on CPUs with AMX/bf16, OpenVINO otherwise defaults to bf16, whose embeddings are far from
TensorFlow's. A static input shape, and batches through an AsyncInferQueue under the THROUGHPUT hint (one stream per
core), were the fastest (docs/benchmarks.md, Engines).
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..settings import DEFAULT_PRECISION

INSTALL_HINT = "pip install -r requirements-openvino.txt  (optional; the faster extraction engine on CPUs)"


def available(package: str = "openvino") -> bool:
    """Whether OpenVINO (or NNCF, `package='nncf'`, which int8 needs) is installed."""
    try:
        __import__(package)
    except ImportError:
        return False
    return True


def conversion_errors() -> tuple[type[BaseException], ...]:
    """What OpenVINO raises when it cannot convert or compile a model: its frontend's failures, and the
    RuntimeError of compile_model. Anything else (our own bugs included) is not a reason to fall back."""
    from openvino import frontend

    return (frontend.GeneralFailure, frontend.OpConversionFailure, frontend.OpValidationFailure,
            frontend.NotImplementedFailure, frontend.InitializationFailure, RuntimeError)


def check_precision(precision: str):
    """bf16 only where the CPU computes it natively (else OpenVINO would emulate or ignore it); int8 needs NNCF."""
    if precision == "int8" and not available("nncf"):
        raise UserError("`precision='int8'` needs NNCF: pip install -r requirements-openvino.txt  (OpenVINO and NNCF)")
    if precision != "bf16":
        return
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        raise UserError("`precision='bf16'` needs a CPU with native bf16 (AMX or AVX512-BF16); OpenVINO finds only "
                        f"{', '.join(capabilities)} here. Use `precision='f32'` or `precision='int8'`")


class OpenVinoNetwork:
    """Image arrays in (uint8 [N,H,W,3], or preprocessed floats), float32 [N,D] out, from a tf.function with a
    static input signature; a function returning a dict of [N,D] tensors (inner-layer features) gives dicts."""

    def __init__(self, tf_function, precision: str = DEFAULT_PRECISION, quantize=None, threads: int | None = None):
        import openvino as ov
        from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils

        # Conversion telemetry goes to OpenVINO's own no-op stub (as without openvino-telemetry): its sender forks
        # from a thread pool, and a fork while another thread holds the logging lock hangs the extraction.
        convert_impl.tm = telemetry_utils.tm = telemetry_stub
        concrete = tf_function.get_concrete_function()
        self.batch_size = concrete.inputs[0].shape[0]
        keyed = isinstance(concrete.structured_outputs, dict)
        model = ov.convert_model(concrete)
        if precision == "int8":
            model = quantize(model)
        hint = "bf16" if precision == "bf16" else "f32"
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "THROUGHPUT"}
        if threads:  # a Ray worker's share of the machine; not pinned, or one-thread workers share core 0
            config.update(INFERENCE_NUM_THREADS=threads, ENABLE_CPU_PINNING=False)
        compiled = ov.Core().compile_model(model, "CPU", config)
        self.dims = [output.get_partial_shape()[1].get_length() for output in compiled.outputs]
        self.keys = [output.get_any_name() for output in compiled.outputs] if keyed else None
        # Twice the streams' optimum, so a stream never waits while Python queues the next batch.
        requests = 2 * max(1, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(compiled, requests)
        self._queue.set_callback(self._collect)

    @staticmethod
    def _collect(request, rows):
        for index, out in enumerate(rows):
            out[:] = request.get_output_tensor(index).data[: len(out)]  # padding rows are dropped

    def run(self, arrays: list[np.ndarray]) -> list:
        """Embed each array; their batches are interleaved, so all of them move through together."""
        outputs = [[np.empty((len(images), dim), np.float32) for dim in self.dims] for images in arrays]
        try:
            for lo in range(0, len(arrays[0]), self.batch_size):
                for images, out in zip(arrays, outputs):
                    batch = images[lo : lo + self.batch_size]
                    padded = np.zeros((self.batch_size, *batch.shape[1:]), batch.dtype)
                    padded[: len(batch)] = batch  # also makes a mirrored (strided) view contiguous
                    self._queue.start_async({0: padded}, [rows[lo : lo + self.batch_size] for rows in out])
        finally:
            # Also on Ctrl-C: requests still running call back into Python from OpenVINO's threads, and one
            # that does so while the interpreter shuts down aborts the process ("exception not rethrown").
            self._queue.wait_all()
        return [dict(zip(self.keys, out)) if self.keys else out[0] for out in outputs]
