"""Every default and every choice of featcache, defined here once and imported everywhere else.

Stage 1's settings (which cache a run selects, how it is made), what a view is, where caches and
runs live, and stage 2's head settings (HeadConfig). The command-line options, the Python API and
the library functions all take their defaults from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import UserError

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = PROJECT_DIR / "cache"
DEFAULT_RUNS_DIR = PROJECT_DIR / "runs"

# --- which cache: the settings in a CacheKey -------------------------------------------------------
DATASETS = ("cifar10", "cifar100", "folder")
DEFAULT_DATASET = "cifar10"
SPLITS = ("train", "test")
DEFAULT_TEST_FRACTION = 0.2  # a one-level class folder's share of files in the test split
DEFAULT_MODEL = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4"
DEFAULT_IMAGE_SIZE = 224  # MobileNetV2's training size; a model whose signature fixes another size gets its own
# The largest side accepted: a batch of 16 images of this side is 16 x 1024^2 x 3 floats = 200 MB a view before the
# network's own activations, which grow the same way (ImageNet models are trained at 224-600 px).
MAX_IMAGE_SIZE = 1024


def check_image_size(size: int, name: str = "image_size"):
    """Refuse a side no batch of images should be resized to, before anything is allocated."""
    if size > MAX_IMAGE_SIZE:
        raise UserError(f"`{name}` {size} is above {MAX_IMAGE_SIZE}, the largest accepted: memory per image "
                        "grows with its square (ImageNet models are trained at 224-600 px)")


RESIZE_METHODS = ("bicubic", "bilinear", "area", "lanczos3", "nearest")
DEFAULT_RESIZE = "bicubic"  # measured best on real CIFAR-10 (docs/benchmarks.md)
CROPS = ("none", "center")
DEFAULT_CROP = "none"  # squash to a square, as Keras' image_dataset_from_directory does by default
PRECISIONS = ("f32", "bf16", "int8")
DEFAULT_PRECISION = "f32"

# --- views: the versions of each image whose embeddings a cache holds ------------------------------
# A view is a fixed transformation of a batch of images [B, H, W, C] (numpy array or tf.Tensor), applied
# after the crop and resize. A cache's `views` setting names one of the sets; each view is its own dataset
# in the HDF5 file, and the head trains on (flip_train) and averages over (tta) them.
VIEW_TRANSFORMS = {
    "plain": lambda images: images,
    "flip": lambda images: images[:, :, ::-1],  # mirrored left-right
}
VIEW_SETS = {"plain": ("plain",), "flip": ("plain", "flip")}
DEFAULT_VIEWS = "flip"


def view_images(images, view: str):
    """A batch of images [B, H, W, C] as `view` shows them."""
    return VIEW_TRANSFORMS[view](images)


def views_of(view_set: str) -> tuple[str, ...]:
    """The views a cache of this `views` setting holds."""
    if view_set not in VIEW_SETS:
        raise UserError(f"unknown `views` {view_set!r}; choose one of {', '.join(VIEW_SETS)}")
    return VIEW_SETS[view_set]


def view_dataset(view: str) -> str:
    """The HDF5 dataset holding a view's embeddings."""
    return "embeddings" if view == "plain" else f"embeddings_{view}"


def head_views(flip: bool) -> tuple[str, ...]:
    """The views a head trains on (flip: as extra rows) or averages at test time (flip: TTA)."""
    return VIEW_SETS["flip" if flip else "plain"]


# --- how stage 1 runs -----------------------------------------------------------------------------
ENGINES = ("auto", "tensorflow", "openvino")
DEFAULT_ENGINE = "auto"  # OpenVINO on a CPU when it is installed, else TensorFlow
RUNNERS = ("local", "ray")
DEFAULT_RUNNER = "local"
DEFAULT_CHUNK_SIZE = 1024  # images per committed chunk: what a crash can cost at most


def default_batch_size(engine: str, gpu: bool) -> int:
    """Images per forward pass when none is asked: the fastest measured (OpenVINO's batch-1 requests run
    one stream per core; TensorFlow on a CPU peaks at 16; a GPU wants large batches)."""
    return 128 if gpu else 1 if engine == "openvino" else 16


# --- stage 2: the head ------------------------------------------------------------------------------
SCHEDULES = ("cosine", "constant")
SWEEP_VAL_SPLIT = 0.2  # the L2 sweep's validation split when none is asked
DEFAULT_TOP_K = 3  # classes predict.py shows per image
COMPUTES = ("auto", "f32", "bf16")


@dataclass
class HeadConfig:
    """A head's settings; the defaults were chosen on a 10% validation split of the real cached train
    features (docs/benchmarks.md)."""

    epochs: int = 5
    lr: float = 1e-2
    batch_size: int = 2048
    l2: float = 1e-3
    label_smoothing: float = 0.0
    hidden: int = 0
    dropout: float = 0.0
    schedule: str = "cosine"
    flip_train: bool = True
    tta: bool = True
    val_split: float = 0.0
    seed: int = 0
    compute: str = "auto"  # number format of the first layer's products in training steps; see resolved_compute

    def resolved_compute(self) -> str:
        """bf16 when asked, or by default for a hidden layer on a CPU with native bf16 products (the fit
        of the README's hidden-layer recipe is compute-bound: measured about 1.4x faster, same accuracy).
        A linear head is memory-bound (bf16 would only add casts), and GPUs get f32 unless asked."""
        if self.compute != "auto":
            return self.compute
        import tensorflow as tf

        from .cpu import native_bf16

        return "bf16" if self.hidden and native_bf16() and not tf.config.list_physical_devices("GPU") else "f32"

    def check(self):
        """Refuse settings no fit can use, naming the parameter."""
        for name, default in asdict(HeadConfig()).items():
            value, kind = getattr(self, name), type(default)
            if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                    or kind is float and isinstance(value, int) and not isinstance(value, bool)):
                raise UserError(f"`{name}` must be {'a whole number' if kind is int else 'a ' + kind.__name__}, "
                                f"got {value!r}")
        for name, choices in (("schedule", SCHEDULES), ("compute", COMPUTES)):
            if getattr(self, name) not in choices:
                raise UserError(f"`{name}` must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.epochs < 1:
            raise UserError(f"`epochs` must be at least 1, got {self.epochs}")
        for name in ("lr", "batch_size"):
            if not getattr(self, name) > 0:
                raise UserError(f"`{name}` must be positive, got {getattr(self, name)}")
        if not self.l2 >= 0:
            raise UserError(f"`l2` must be >= 0, got {self.l2}")
        for name in ("val_split", "dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"`{name}` must be in [0, 1), got {getattr(self, name)}")
        for name in ("hidden", "seed"):
            if not 0 <= getattr(self, name) < 2**31:
                raise UserError(f"`{name}` must be in [0, 2^31), got {getattr(self, name)}")

    def for_cached_views(self, view_set: str) -> "HeadConfig":
        """The config a cache of `view_set` can serve: a plain-view cache has no flips to train or average on."""
        return replace(self, flip_train=False, tta=False) if "flip" not in views_of(view_set) else self

    def views_needed(self) -> tuple[str, ...]:
        return head_views(self.flip_train or self.tta)

    def to_dict(self) -> dict:
        return asdict(self)
