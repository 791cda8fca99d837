"""INT8 for the OpenVINO engine: NNCF post-training quantization, calibrated on train images only.

The calibration sample is a fixed, seeded draw of `CALIBRATION_SIZE` images from the *train*
split (never test: test images must stay unseen by every choice made). The quantized network
is built once and saved as OpenVINO IR next to the embedding caches, keyed by model, image
size, resize, input shape and a hash of the sample, so later runs (the test split, a forced
rebuild, a resume) load it instead of calibrating again.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from .. import cpu
from ..errors import UserError, first_line, last_line
from ..settings import CALIBRATION_SEED, CALIBRATION_SIZE, DEFAULT_CROP, MAX_CALIBRATION_BYTES
from .preprocess import center_square, crop_shape, view_images

RECIPE = "q2"  # names how the model is quantized (below); part of the saved model's file name
# CPU classes (cpu.int8_class) on which int8's accuracy cost against f32 was measured (README, Results).
MEASURED_CLASSES = ("avx512-vnni", "avx2")


class CalibrationUnusable(UserError):
    """The train images cannot calibrate int8 (`problem`); the message advises the extraction's other precisions."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(f"{problem}; use `precision='f32'` or `precision='bf16'` for this dataset")


def calibration_samples(reader, draws, fit=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, their train items) for each (size, seed) draw from the train split's reader. The items are
    drawn first and only they are read (a folder's files decoded one by one, an unreadable one left out). `fit`
    maps each image to the array kept (all of one shape); without it, the images must be of one size."""
    row_sets = [np.sort(np.random.default_rng(seed).choice(reader.rows, min(size, reader.rows), replace=False))
                for size, seed in draws]
    wanted = np.unique(np.concatenate(row_sets))
    held = len(wanted) * 3 * np.prod(reader.image_shape or 0)
    if fit is None and held > MAX_CALIBRATION_BYTES:
        height, width = reader.image_shape
        raise CalibrationUnusable(f"int8 calibration holds {len(wanted)} train images in memory: at {width}x{height} "
                                  f"that is {held / 2**30:.1f} GiB, above the {MAX_CALIBRATION_BYTES / 2**30:.0f} "
                                  "GiB allowed")
    fit = fit or np.copy  # a copy: a chunk's array is not kept whole for the few images taken from it
    if hasattr(reader, "decode"):  # files: decoding is the cost, so only the drawn ones are
        found = {int(item): fit(image) for item in wanted if (image := reader.decode(int(item))[0]) is not None}
    else:
        found = {}
        for chunk in reader.chunks(4096):
            inside = np.isin(chunk.items, wanted)
            found.update((int(item), fit(image)) for item, image, keep in zip(chunk.items, chunk.images, inside)
                         if keep)
    if not found:
        raise CalibrationUnusable(f"none of the {len(wanted)} train images drawn for int8 calibration can be read")
    if len({image.shape for image in found.values()}) > 1:
        raise CalibrationUnusable("int8 needs train images of one size (it is calibrated per input size)")
    return [(np.stack([found[int(item)] for item in rows if int(item) in found]), rows) for rows in row_sets]


class Int8Quantizer:
    """Turns the f32 OpenVINO model of one input shape into its INT8 version, building it at most once."""

    def __init__(self, train_reader, folder: Path):
        self.reader, self.folder = train_reader, Path(folder)
        # Weights on 7 bits (NNCF's OverflowFix.ENABLE) where the CPU lacks int8 dot products (cpu.int8_dot_products),
        # so that its u8 x s8 pair sums cannot saturate their 16-bit intermediate.
        self.overflow_fix = not cpu.int8_dot_products()
        self.paths: list[Path] = []

    @functools.cached_property
    def sample(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(images, their train rows, sha256 of the images): read on first use only."""
        ((images, rows),) = calibration_samples(self.reader, [(CALIBRATION_SIZE, CALIBRATION_SEED)])
        return images, rows, hashlib.sha256(images.tobytes()).hexdigest()

    def unmeasured_note(self) -> str | None:
        """A note for a CPU class whose int8 accuracy cost was never measured (None where it was)."""
        kind = cpu.int8_class()
        if kind in MEASURED_CLASSES:
            return None
        return (f"note: int8's accuracy cost was measured on {' and '.join(MEASURED_CLASSES)} CPUs, not on this one "
                f"({kind}); before relying on it, compare heads on f32 and int8 caches of a few thousand images")

    def describe(self) -> dict:
        """What the cache records about its calibration."""
        _, rows, digest = self.sample
        fix = ", weights on 7 bits (overflow fix for CPUs without VNNI)" if self.overflow_fix else ""
        return {"calibration": f"{len(rows)} train images, seed {CALIBRATION_SEED}, NNCF post-training quantization"
                               f"{fix}",
                "calibration_sha256": digest, "quantized_model": ", ".join(dict.fromkeys(map(str, self.paths)))}

    def __call__(self, model, batch_size: int, image_size: int, resize: str, crop: str = DEFAULT_CROP, log=print):
        """The quantized `model` (an openvino.Model with a static uint8 input [batch, H, W, 3], center crops
        already cut when `crop` says so). The network of the crop views (their smaller input) is calibrated on
        the images' center crops."""
        import openvino as ov

        images, _, digest = self.sample
        if crop == "center":
            images = center_square(images)
        height, width = model.inputs[0].get_partial_shape().to_shape()[1:3]
        recipe = RECIPE + ("-ovf" if self.overflow_fix else "")
        path = self.folder / f"{image_size}px-{resize}-in{height}x{width}-b{batch_size}-cal{digest[:12]}-{recipe}.xml"
        self.paths.append(path)
        if path.exists():
            try:
                return ov.Core().read_model(path)
            except RuntimeError as exc:  # damaged (cut short, overwritten): calibrated again, replaced atomically
                log(f"note: the saved int8 network {path} cannot be read ({last_line(exc)}); calibrating it again")
        import nncf

        if (height, width) == crop_shape(*images.shape[1:3]):  # the network of the crop views
            images = view_images(images, "crop-c")
        if (images.shape[1], images.shape[2]) != (height, width):
            raise UserError(f"calibration images are {images.shape[1]}x{images.shape[2]}, the network takes "
                            f"{height}x{width}")
        batches = [_padded(images[i : i + batch_size], batch_size) for i in range(0, len(images), batch_size)]
        # Full bias correction, and the first and last convolution kept in f32 (input quantization and the layer
        # that makes the embedding hurt most): of the recipes tried, the embeddings closest to f32's (docs/).
        convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                        if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
        options = {"ignored_scope": nncf.IgnoredScope(names=sorted({convolutions[0], convolutions[-1]}),
                                                      validate=False)} if convolutions else {}
        if self.overflow_fix:
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

            options["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
        quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), fast_bias_correction=False,
                                  **options)
        _save_atomically(quantized, path)
        return quantized


def _padded(images: np.ndarray, batch_size: int) -> np.ndarray:
    """A full batch: its first image repeated, rather than black padding that would feed the statistics."""
    return np.concatenate([images, np.repeat(images[:1], batch_size - len(images), axis=0)])


def _save_atomically(model, path: Path):
    """IR is two files; the .xml appears last, so an existing .xml always has its .bin."""
    import openvino as ov

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xml")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, tmp, compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # disk full, a folder made read-only: the next run calibrates again
        raise UserError(f"saving the int8 network {path} failed ({getattr(exc, 'strerror', None) or first_line(exc)})"
                        ) from None
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
