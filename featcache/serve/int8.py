"""The head of an int8 LiteRT file, corrected for its network's embeddings (int8_head), and the seeded samples of
the run's train images that calibrate the network and fit the correction (train_samples)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line, require
from ..settings import CALIBRATION_SEED, CALIBRATION_SIZE, MAX_CALIBRATION_BYTES
from .convert import portable_function, to_tflite
from .runtimes import fitted, litert_call

CORRECTION_IMAGES, CORRECTION_SEED = 2000, 1  # train images (at most) the int8 head correction is fitted on
MIN_SLOPE_ROWS = 200  # fewer rows: the mean shift alone (a slope fitted on a few rows is noise)
SLOPES = (0.5, 2.0)  # the range a fitted slope is held to


def train_samples(parts, size: int) -> list[np.ndarray]:
    """[calibration images, correction images]: seeded samples of the train images (never test) of a run's
    (serve.run.RunParts) train cache, the calibration draw and up to CORRECTION_IMAGES for the head's correction
    (held in memory like calibration), each image brought to the file's input as a user would bring a photo: the
    run's crop, then its resize to `size` x `size`."""
    from ..cache.read import attributes
    from ..extract.quantize import CalibrationUnusable, calibration_samples
    from ..extract.sources import open_split

    train_cache, key = parts.train_cache, parts.key
    count = min(CORRECTION_IMAGES, MAX_CALIBRATION_BYTES // (size * size * 3))
    draws = [(CALIBRATION_SIZE, CALIBRATION_SEED), (count, CORRECTION_SEED)]
    try:
        source = attributes(Path(train_cache))["source"]
    except (OSError, KeyError) as exc:
        raise UserError(f"int8 calibration reads the run's train images, but its train cache {train_cache} cannot "
                        f"be read ({first_line(exc)})") from None
    if not Path(source).exists():
        raise UserError(f"int8 calibration reads the run's train images, but its data (the train split at {source}) "
                        "is gone; put it back there, or export this run without `quantize`")

    def input_image(image: np.ndarray) -> np.ndarray:
        if image.shape[:2] == (size, size):
            return image
        return np.round(fitted(image[None], size, key.resize, key.crop)[0]).astype(np.uint8)  # held as uint8

    try:
        samples = calibration_samples(open_split(key, "train", data_dir=None if key.data_dir else source), draws,
                                      fit=input_image)
    except CalibrationUnusable as exc:
        raise UserError(f"{exc.problem}; export this run without `quantize`") from None
    return [images for images, _ in samples]


def int8_head(parts, input_size: int, calibration: np.ndarray, images: np.ndarray):
    """The run's head for the int8 network's embeddings: per dimension, the f32 embedding fitted as a * int8 + b
    over `images` (train images, all TTA views; affine_fit), put in front of the head as a float layer."""
    import tensorflow as tf

    frozen = portable_function(parts, input_size, embeddings=True)
    interpreter = require("ai_edge_litert.interpreter", "int8 export").Interpreter(
        model_content=to_tflite(frozen, calibration), num_threads=os.cpu_count())
    # A frozen function returns its outputs as a list.
    quantized, f32 = litert_call(interpreter), lambda batch: frozen(tf.constant(batch))[0].numpy()
    batches = [images[i : i + 100].astype(np.float32) for i in range(0, len(images), 100)]
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
