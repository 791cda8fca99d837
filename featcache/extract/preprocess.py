"""Preprocessing in the TensorFlow graph: uint8 images -> optional center crop -> view -> [0, 1] floats -> resize.

A view (settings.VIEWS names them) is a fixed transformation of a batch of uint8 images [B, H, W, C], numpy or
tf.Tensor, applied after the center crop and before the resize, so the same pixels on every run.

`preprocess_views` is what extraction and the classifier run; `preprocess_static` gives the same numbers for a
fixed input size with the resize as two matrix products, the only form OpenVINO's converter takes.
"""

from __future__ import annotations

import numpy as np

from ..settings import CROP_PLACES, DEFAULT_CROP

CROP_EIGHTHS = 7  # a crop view keeps 7/8 of each side (28 of CIFAR's 32 px): the classic 224-of-256 crop
# (top, left) of each crop's window, in halves of the margin the crop leaves
CROP_WINDOWS = dict(zip(CROP_PLACES, ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))))


def crop_shape(height, width):
    """A crop view's (height, width) for images of this shape: 7/8 of each side, rounded (integers or tensors)."""
    return (height * CROP_EIGHTHS + 4) // 8, (width * CROP_EIGHTHS + 4) // 8


def view_images(images, view: str):
    """A batch of uint8 images [B, H, W, C] as `view` shows them (before the resize): a crop view's window of 7/8 of
    each side (integer arithmetic, so numpy and TensorFlow cut alike), mirrored left-right for a flip view."""
    if view.startswith("crop-"):
        height, width = _height_width(images)
        rows, cols = crop_shape(height, width)
        down, across = CROP_WINDOWS[view.split("-")[1]]
        top, left = ((height - rows) * down) // 2, ((width - cols) * across) // 2
        images = images[:, top : top + rows, left : left + cols]
    return images[:, :, ::-1] if view.endswith("flip") else images


def _height_width(images):
    """(height, width) of a batch: Python integers, or tensors in a tf.function traced for any size."""
    height, width = images.shape[1], images.shape[2]
    if height is None or width is None:
        import tensorflow as tf

        shape = tf.shape(images)
        height, width = shape[1], shape[2]
    return height, width


def center_square(images):
    """The centered square of a batch [B,H,W,3] (numpy or tf), as Keras' crop_to_aspect_ratio cuts it."""
    height, width = _height_width(images)
    if isinstance(height, int):
        side = min(height, width)
    else:
        import tensorflow as tf

        side = tf.minimum(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return images[:, top : top + side, left : left + side]


def preprocess(images, image_size: int, method: str, crop: str = DEFAULT_CROP):
    """uint8 [B,H,W,3] -> float32 [B,S,S,3] in [0,1]; bicubic overshoot is clipped back."""
    import tensorflow as tf

    if crop == "center":
        images = center_square(images)
    x = tf.image.convert_image_dtype(images, tf.float32)
    x = tf.image.resize(x, (image_size, image_size), method=method)
    return tf.clip_by_value(x, 0.0, 1.0)


def preprocess_views(images, views, image_size: int, method: str, crop: str = DEFAULT_CROP) -> list:
    """uint8 [B,H,W,3] -> one float32 [B,S,S,3] batch per view: each view cut from the (center-cropped)
    images, then resized."""
    if crop == "center":
        images = center_square(images)
    return [preprocess(view_images(images, view), image_size, method) for view in views]


def resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """tf.image.resize along one axis, as a float32 [n_out, n_in] matrix.

    Every method here is linear and separable, so resizing the identity gives the exact map.
    """
    import tensorflow as tf

    with tf.init_scope():  # eager even while a tf.function traces: the matrix is a constant
        basis = tf.eye(n_in)[:, :, None, None]  # n_in one-pixel-wide images, one per input row
        return tf.image.resize(basis, (n_out, 1), method=method)[:, :, 0, 0].numpy().T


def preprocess_static(images, image_size: int, method: str):
    """`preprocess` (without a crop) for a fixed input size, its resize as two constant matrix products.

    Same numbers as `preprocess` (a test checks), but made only of ops that OpenVINO's
    TensorFlow frontend converts; it has no ResizeBicubic / ScaleAndTranslate.
    """
    import tensorflow as tf

    rows = tf.constant(resize_matrix(images.shape[1], image_size, method))
    cols = tf.constant(resize_matrix(images.shape[2], image_size, method))
    x = tf.image.convert_image_dtype(images, tf.float32)
    x = tf.einsum("oh,bhwc->bowc", rows, x)
    x = tf.einsum("pw,bowc->bopc", cols, x)
    return tf.clip_by_value(x, 0.0, 1.0)
