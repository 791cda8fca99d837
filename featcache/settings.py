"""Every default and every choice of featcache, defined here once and imported everywhere else.

Stage 1's settings (which cache a run selects, how it is made), what a view is, where caches and
runs live, and stage 2's head settings (HeadConfig). The command-line options, the Python API and
the library functions all take their defaults from here.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import UserError

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = PROJECT_DIR / "cache"
DEFAULT_RUNS_DIR = PROJECT_DIR / "runs"

# --- which cache: the settings in a CacheKey -------------------------------------------------------
DATASETS = ("cifar10", "cifar100", "folder", "webdataset", "parquet")
DEFAULT_DATASET = "cifar10"
SPLITS = ("train", "test")
LISTED_CACHES = 3  # the caches present a missing cache's error names (the rest counted), to keep it one readable line
DEFAULT_TEST_FRACTION = 0.2  # a one-level class folder's share of files in the test split
# A Parquet dataset's columns when none are named: these, else the only column whose Hugging Face feature is an
# Image / a ClassLabel.
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
DEFAULT_MODEL = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4"
DEFAULT_IMAGE_SIZE = 224  # MobileNetV2's training size; a model whose signature fixes another size gets its own
MAX_IMAGE_SIZE = 1024  # the largest side accepted: memory per image grows with its square


MAX_COUNT = 2**31 - 1  # the largest count (limit, chunk or batch size) accepted: HDF5 attributes and TF take int32/64


def check_count(name: str, value, minimum: int = 1):
    """Refuse a count that is not a whole number in [minimum, MAX_COUNT]."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        raise UserError(f"`{name}` must be a whole number in [{minimum}, {MAX_COUNT}], got {value!r}")


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
# A view is a fixed transformation of a batch of uint8 images [B, H, W, C], applied after the center crop and before
# the resize: the same pixels on every run, so a resumed or extended cache holds what one run would. Each view is its
# own dataset in the HDF5 file; heads train on (train_views) and average over (tta_views) any of those it holds.
CROP_PLACES = ("tl", "tr", "bl", "br", "c")  # crop views: 7/8 of each side at four corners and the centre
VIEWS = ("plain", "flip") + tuple(f"crop-{place}{flip}" for place in CROP_PLACES for flip in ("", "-flip"))
# Names for groups of views, usable wherever views are listed.
VIEW_SETS = {"crops": tuple(f"crop-{p}" for p in CROP_PLACES),
             "crops-flip": tuple(f"crop-{p}-flip" for p in CROP_PLACES)}
DEFAULT_VIEWS = "plain,flip"  # what extract.py caches and a head trains on and averages over


def parse_views(views, name: str = "views") -> tuple[str, ...]:
    """Views named by a string ("plain,flip", or "plain+flip" where commas separate other things) or a
    sequence of view and set names; in catalogue order. A name given twice is refused (views_union merges lists)."""
    if not isinstance(views, (str, list, tuple)):
        raise UserError(f"`{name}` must be view names (a comma-separated string or a list), got {views!r}")
    names = views.replace("+", ",").split(",") if isinstance(views, str) else list(views)
    names = [part.strip() for part in names if part.strip()]
    if not names:
        raise UserError(f"`{name}` names no view; choose from {', '.join(VIEWS + tuple(VIEW_SETS))}")
    chosen = []
    for part in names:
        if part not in VIEWS and part not in VIEW_SETS:
            raise UserError(f"unknown view {part!r} in `{name}`; choose from {', '.join(VIEWS + tuple(VIEW_SETS))}")
        for view in VIEW_SETS.get(part, (part,)):
            if view in chosen:  # named twice, or a set's member named besides the set
                raise UserError(f"`{name}` names {view} twice; name each once")
            chosen.append(view)
    return tuple(view for view in VIEWS if view in chosen)


def views_union(*groups) -> tuple[str, ...]:
    """The views of several lists of them, each once, in catalogue order."""
    return parse_views(tuple(dict.fromkeys(view for group in groups for view in group)))


def views_label(views) -> str:
    """Views named as briefly as the sets allow: `plain+flip+crops`."""
    left, parts = list(parse_views(views)), []
    for name, members in VIEW_SETS.items():
        if all(view in left for view in members):
            left = [view for view in left if view not in members]
            parts.append(name)
    return "+".join(left + parts)


# --- inner-layer features: pooled activations of a layer inside the network, cached beside the views ---------
# A feature is `<layer>` or `<layer>@2x2` (extract/layers.py names a model's layers and pools them); the network's
# own output is feature "final" (the `embeddings` datasets).
FINAL_FEATURE = "final"
FEATURE_POOLS = {"": 1, "2x2": 4}  # a feature name's pooling suffix (after "@") -> values per channel
FEATURE_NAME = re.compile(r"[A-Za-z0-9_.-]+(@2x2)?")


def split_feature(feature: str) -> tuple[str, str]:
    """(layer, pooling suffix): `block_13_add@2x2` -> ("block_13_add", "2x2"), `out_relu` -> ("out_relu", "")."""
    layer, _, pool = feature.partition("@")
    return layer, pool


def parse_features(features, name: str = "layers") -> tuple[str, ...]:
    """Feature names given as a comma-separated string or a sequence, checked for spelling only (which layers a
    model has is extract/layers.py's to say) and for a name given twice; in the order given."""
    names = features.split(",") if isinstance(features, str) else features
    if not isinstance(names, (list, tuple)) or not all(isinstance(part, str) for part in names):
        raise UserError(f"`{name}` must be layer names (a comma-separated string or a list), got {features!r}")
    names = [part.strip() for part in names if part.strip()]
    if not names:
        raise UserError(f"`{name}` names no layer; extract.py with `list_layers=True` lists the layers the model "
                        "offers")
    for part in names:
        if not FEATURE_NAME.fullmatch(part):
            raise UserError(f"{part!r} in `{name}` is not a layer name (letters, digits, _ . - and an optional "
                            "@2x2); extract.py with `list_layers=True` lists the layers the model offers")
    if twice := next((part for i, part in enumerate(names) if part in names[:i]), None):
        raise UserError(f"`{name}` names {twice} twice; name each once")
    return tuple(names)


# --- how stage 1 runs -----------------------------------------------------------------------------
ENGINES = ("auto", "tensorflow", "openvino")
DEFAULT_ENGINE = "auto"  # OpenVINO on a CPU when it is installed, else TensorFlow
RUNNERS = ("local", "ray")
DEFAULT_RUNNER = "local"
DEFAULT_CHUNK_SIZE = 1024  # images per committed chunk: what a crash can cost at most (folders: sources.folder)
DEFAULT_SHARD_ITEMS = 10_000  # items per shard of a new plan on a cluster (extract/plan.py, ray_runner.py)
SHARDS_PER_WORKER = 2  # a new plan on a cluster has at least this many shards per worker: the last ones spread
# int8 (extract/quantize.py, and export.py's int8 file): a seeded draw of train images calibrates the network
CALIBRATION_SIZE = 300  # NNCF's default subset size
CALIBRATION_SEED = 0
MAX_CALIBRATION_BYTES = 2 * 2**30  # the sample is held in memory: 300 images of 1,500 x 1,500 at most


def default_batch_size(engine: str, gpu: bool) -> int:
    """Images per forward pass when none is asked: the fastest measured (OpenVINO's batch-1 requests run
    one stream per core; TensorFlow on a CPU peaks at 16; a GPU wants large batches)."""
    return 128 if gpu else 1 if engine == "openvino" else 16


# --- stage 2: the head ------------------------------------------------------------------------------
SCHEDULES = ("cosine", "constant")
SWEEP_VAL_SPLIT = 0.2  # the L2 sweep's validation split when none is asked
DEFAULT_TOP_K = 3  # classes predict.py shows per image
MAX_PROJECTOR_POINTS = 10_000  # the most test rows a Projector sample takes: its t-SNE runs on at most 10,000
RUN_CHOICES = ("latest", "best")  # which run predict and export serve when none is named
DEFAULT_RUN = "latest"
COMPUTES = ("auto", "f32", "bf16")


SOLVERS = ("adam", "lbfgs")
MIN_STEPS_PER_EPOCH = 32  # the fewest optimizer steps per epoch a default batch size gives (auto_batch_size)
MAX_BATCH_SIZE = 2048
MIN_BATCH_SIZE = 16


def auto_batch_size(rows: int) -> int:
    """Rows per training step when none is asked: 2,048, or fewer when that gives under 32 steps an epoch."""
    return max(MIN_BATCH_SIZE, min(MAX_BATCH_SIZE, -(-rows // MIN_STEPS_PER_EPOCH)))


@dataclass
class HeadConfig:
    """A head's settings; the defaults were chosen on a 10% validation split of the real cached train
    features (docs/benchmarks.md)."""

    OPTIONAL = {"batch_size": int, "train_views": str, "tta_views": str}  # fields whose default None means "automatic"

    epochs: int = 5
    lr: float = 1e-2
    batch_size: int | None = None  # None: auto_batch_size(rows)
    l2: float = 1e-3
    label_smoothing: float = 0.0
    hidden: int = 0
    dropout: float = 0.0
    schedule: str = "cosine"
    train_views: str | None = None  # each view's rows are training rows; None: DEFAULT_VIEWS, those the cache holds
    tta_views: str | None = None  # test-time probabilities are the mean over these views; None: as above
    features: str = FINAL_FEATURE  # cached features feeding the head, concatenated in this order
    solver: str = "adam"  # adam: the epoch loop (fit.py); lbfgs: a linear head fit to convergence (probe.py)
    val_split: float = 0.0
    seed: int = 0
    compute: str = "auto"  # number format of the first layer's products in training steps; see resolved_compute

    def resolved_compute(self) -> str:
        """bf16 when asked, or by default for a hidden layer (compute-bound) on a CPU with native bf16 products; a
        linear head is memory-bound (bf16 would only add casts), and GPUs get f32 unless asked."""
        if self.compute != "auto":
            return self.compute
        import tensorflow as tf

        from .cpu import native_bf16

        return "bf16" if self.hidden and native_bf16() and not tf.config.list_physical_devices("GPU") else "f32"

    def batch_for(self, rows: int) -> int:
        return self.batch_size or auto_batch_size(rows)

    def check(self):
        """Refuse settings no fit can use, naming the parameter."""
        for name, default in asdict(HeadConfig()).items():
            value, kind = getattr(self, name), self.OPTIONAL.get(name, type(default))
            if value is None and name in self.OPTIONAL:
                continue
            if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                    or kind is float and isinstance(value, int) and not isinstance(value, bool)):
                raise UserError(f"`{name}` must be {'a whole number' if kind is int else 'a ' + kind.__name__}, "
                                f"got {value!r}")
        for name, choices in (("schedule", SCHEDULES), ("compute", COMPUTES), ("solver", SOLVERS)):
            if getattr(self, name) not in choices:
                raise UserError(f"`{name}` must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        check_count("epochs", self.epochs)
        if not 0 < self.lr < math.inf:
            raise UserError(f"`lr` must be positive and finite, got {self.lr}")
        if self.batch_size is not None:
            check_count("batch_size", self.batch_size)
        if not 0 <= self.l2 < math.inf:
            raise UserError(f"`l2` must be >= 0 and finite, got {self.l2}")
        for name in ("val_split", "dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"`{name}` must be in [0, 1), got {getattr(self, name)}")
        for name in ("hidden", "seed"):
            check_count(name, getattr(self, name), minimum=0)
        self.train_view_list, self.tta_view_list, self.feature_list  # noqa: B018 - each names its parameter
        if self.solver == "lbfgs" and (self.hidden or self.dropout or self.label_smoothing):
            raise UserError("`solver='lbfgs'` fits a linear head: it takes no `hidden`, `dropout` or "
                            "`label_smoothing`")

    @property
    def train_view_list(self) -> tuple[str, ...]:
        return parse_views(DEFAULT_VIEWS if self.train_views is None else self.train_views, "train_views")

    @property
    def tta_view_list(self) -> tuple[str, ...]:
        return parse_views(DEFAULT_VIEWS if self.tta_views is None else self.tta_views, "tta_views")

    @property
    def feature_list(self) -> tuple[str, ...]:
        return parse_features(self.features.replace("+", ","), "features")  # + joins them in a grid

    def views_needed(self) -> tuple[str, ...]:
        """The train split's views a fit reads: its training views, and the test-time ones for a validation split."""
        return views_union(self.train_view_list, self.tta_view_list if self.val_split else ())

    def for_cached_views(self, cached: tuple[str, ...]) -> "HeadConfig":
        """The config a cache holding the views `cached` serves: views left to their default (None) become the
        default views it holds (a plain-view cache trains and scores on plain rows alone). Views asked for are
        kept as asked, so that reading the cache names the ones to add."""
        changes = {}
        for name in ("train_views", "tta_views"):
            if getattr(self, name) is None:
                kept = [view for view in parse_views(DEFAULT_VIEWS) if view in cached]
                changes[name] = ",".join(kept) or DEFAULT_VIEWS
            else:  # as recorded: in catalogue order, sets spelt out
                changes[name] = ",".join(parse_views(getattr(self, name), name))
        return replace(self, **changes, features=",".join(self.feature_list))

    def to_dict(self) -> dict:
        return asdict(self)
