"""Fresh arrays for the big buffers (cache rows, training rows): prefilled by the kernel in the mmap call (steadily
fast, where numpy's huge pages may be compacted at first touch, at varying cost), and page-aligned, so TensorFlow
can use them in place."""

from __future__ import annotations

import mmap

import numpy as np

TF_ALIGNMENT = 64  # bytes; TensorFlow uses a CPU buffer in place (DLPack) only when it is this aligned
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux; elsewhere pages are touched as they are written


def fresh_array(shape, dtype) -> np.ndarray:
    """A zero-filled array in a fresh anonymous mapping (page-aligned)."""
    count = int(np.prod(shape))
    size = max(1, count * np.dtype(dtype).itemsize)
    if hasattr(mmap, "MAP_ANONYMOUS"):
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    else:
        buffer = mmap.mmap(-1, size)
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


def shared_tensor(x: np.ndarray):
    """The array as a tf.Tensor without copying it (a copy of the default train rows is slow) when TensorFlow
    allows."""
    import tensorflow as tf

    if x.flags.c_contiguous and x.ctypes.data % TF_ALIGNMENT == 0:
        return tf.experimental.dlpack.from_dlpack(x.__dlpack__())
    return tf.convert_to_tensor(x)
