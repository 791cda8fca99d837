"""The frozen feature extractor: a TF Hub image feature-vector model behind an in-graph resize.

`Extractor.embed(chunk)` takes uint8 images (one array of same-size images, or a list of images of different sizes)
and returns one float32 [N, D] array per view (preprocess.view_images), and with `features` (layers.py) one per view
and feature too, keyed `<view>@<feature>`, from the same pass of the network. Preprocessing (optional center crop ->
view -> [0,1] floats -> resize -> clip) runs inside the graph, batch by batch, so a resized split never exists in
memory; with OpenVINO it is compiled together with the network for same-size chunks, and images of mixed sizes are
resized one by one before the network.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..errors import UserError, first_line
from ..settings import (
    DEFAULT_CROP, DEFAULT_ENGINE, DEFAULT_IMAGE_SIZE, DEFAULT_PRECISION, DEFAULT_RESIZE, ENGINES, FINAL_FEATURE,
    default_batch_size,
)
from .models import call_kwargs, checked_size, fixed_input_size, identity, load_model, record_input_size
from .preprocess import center_square, preprocess_static, preprocess_views, view_images

# Source pixels resized at a time by the TensorFlow engine (16 images of 1024^2): a large photo goes alone instead
# of a batch of them as floats at full size.
PREPROCESS_PIXELS = 16 * 1024**2
MIXED_GROUP = 32  # images of mixed sizes resized at a time
# OpenVINO networks kept compiled (each input shape is its own network: a full image and a crop per image size,
# plus the float network of mixed chunks); the least recently used beyond this is dropped and recompiled if needed.
MAX_OV_NETWORKS = 4


def check_engine_options(engine: str, precision: str = DEFAULT_PRECISION):
    """Refuse an engine/precision choice that cannot run here, before any data or model is read.

    bf16 and int8 exist on the OpenVINO engine only: asking for them picks it, never silently f32.
    """
    from . import ov_engine

    if engine not in ENGINES:
        raise UserError(f"unknown `engine` {engine!r}; choose one of {', '.join(ENGINES)}")
    if precision != DEFAULT_PRECISION:
        if engine == "tensorflow":
            raise UserError(f"`precision={precision!r}` runs on the OpenVINO engine only; drop "
                            f"`engine='tensorflow'` or use `precision={DEFAULT_PRECISION!r}`")
        if not ov_engine.available():
            raise UserError(f"`precision={precision!r}` needs the OpenVINO engine: {ov_engine.INSTALL_HINT}")
        ov_engine.check_precision(precision)
    if engine == "openvino" and not ov_engine.available():
        raise UserError(f"the openvino engine is not installed: {ov_engine.INSTALL_HINT}")


def resolve_engine(engine: str, precision: str = DEFAULT_PRECISION) -> str:
    """'auto' -> OpenVINO when it is installed and no GPU is visible (or a precision needs it), else TensorFlow."""
    from . import ov_engine

    check_engine_options(engine, precision)
    if precision != DEFAULT_PRECISION:
        return "openvino"
    if engine == "auto":
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
        return "openvino" if ov_engine.available() and not gpu else "tensorflow"
    return engine


def library_versions() -> dict:
    """What the cache records about the software that computed its vectors (a library not installed: "")."""
    from importlib import metadata

    import tensorflow as tf
    import tensorflow_hub as hub

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return ""

    return {"tensorflow_version": tf.__version__, "tensorflow_hub_version": hub.__version__,
            **{f"{name}_version": version(name) for name in ("openvino", "nncf", "ray")}}


@dataclass(frozen=True)
class ExtractorSettings:
    """An Extractor's settings without the loaded model: small and picklable, so each Ray worker builds its own."""

    model: str
    image_size: int = DEFAULT_IMAGE_SIZE
    resize: str = DEFAULT_RESIZE
    views: tuple[str, ...] = ("plain",)
    batch_size: int | None = None
    engine: str = DEFAULT_ENGINE
    precision: str = DEFAULT_PRECISION
    crop: str = DEFAULT_CROP
    input_shape: tuple | None = None
    model_sha256: str = ""  # a local model folder's content hash, as the cache key has it
    features: tuple[str, ...] = ()  # inner-layer features computed besides the embeddings (layers.py)

    def build(self, quantizer=None, log=print, threads: int | None = None) -> tuple[Extractor, int | None]:
        """Load the model: (its Extractor, the input size its signature fixes or None).

        A local folder must still hold the model the cache key names (on another node, the same path
        may hold other files)."""
        if self.model_sha256 and identity(self.model)[1] != self.model_sha256:
            raise UserError(f"model folder {self.model} holds other files here than where the job started "
                            "(its content hash differs)")
        model = load_model(self.model)
        fixed = fixed_input_size(model)
        checked_size(self.model, fixed, self.image_size)  # a size the model's signature contradicts, in one line
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__
                  if name not in ("model", "model_sha256")}
        return Extractor(model, **fields, quantizer=quantizer, log=log, threads=threads), fixed

    def record_input_size(self, fixed: int | None, cache_dir):
        """Keep the input size the loaded model fixes (`build`'s second answer) under `<cache_dir>/models/`."""
        record_input_size(fixed, self.model, self.model_sha256, cache_dir)


@dataclass
class Extractor:
    """A loaded model plus its preprocessing: the 'mapper' stage of extraction."""

    model: object
    image_size: int = DEFAULT_IMAGE_SIZE
    resize: str = DEFAULT_RESIZE
    views: tuple[str, ...] = ("plain",)
    batch_size: int | None = None  # None: settings.default_batch_size
    engine: str = "tensorflow"
    precision: str = DEFAULT_PRECISION
    quantizer: object = None  # int8: turns an f32 OpenVINO model into its INT8 version (quantize.Int8Quantizer)
    crop: str = DEFAULT_CROP  # "center": the centered square of each image, before resizing
    input_shape: tuple | None = None  # (H, W) the source expects most images to have: compiled at load time
    log: object = print  # where one-line notices go (an OpenVINO fallback, an int8 network built again)
    threads: int | None = None  # OpenVINO's inference threads (None: all cores); a Ray worker uses its CPUs
    features: tuple[str, ...] = ()  # inner-layer features (layers.py), computed in the same pass as the embeddings

    def __post_init__(self):
        import tensorflow as tf

        asked, asked_batch_size = self.engine, self.batch_size
        self.engine = resolve_engine(self.engine, self.precision)
        if self.batch_size is None:
            self.batch_size = default_batch_size(self.engine, bool(tf.config.list_physical_devices("GPU")))
        self._preprocess = tf.function(  # uint8 images -> preprocessed floats [views, B, S, S, 3]
            lambda images: tf.stack(preprocess_views(images, self.views, self.image_size, self.resize, self.crop)),
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        if self.features:
            from .layers import feature_function

            self._features = feature_function(self.model, self.image_size, self.features)
        self.dim = self._probe()
        self._ov_networks = OrderedDict()
        if self.engine == "openvino":
            from .ov_engine import conversion_errors

            blank = np.empty((0, *(self.input_shape or (self.image_size, self.image_size)), 3), np.uint8)
            try:  # each view's network compiled now: it counts as load time, a conversion failure shows at once,
                # and an int8 cache records every quantized network it is made with (quantize.Int8Quantizer.describe)
                for shape in dict.fromkeys(viewed.shape[1:3] for viewed in self._viewed(blank).values()):
                    self._ov_network(shape)
            except conversion_errors() as exc:
                if asked != "auto" or self.precision != "f32":  # TensorFlow computes f32 only
                    name = getattr(self.model, "handle", type(self.model).__name__)
                    raise UserError(f"OpenVINO cannot convert model {name}: {first_line(exc)}") from None
                self.log(f"note: OpenVINO cannot convert this model ({first_line(exc)}); using TensorFlow instead")
                self.engine = "tensorflow"
                if asked_batch_size is None:
                    self.batch_size = default_batch_size(self.engine, gpu=False)

    def provenance(self) -> dict:
        """What a cache records about what computed its vectors: engine, batch size, library versions, and an int8
        network's calibration."""
        return dict(engine=self.engine, batch_size=self.batch_size, **library_versions(),
                    **(self.quantizer.describe() if self.quantizer else {}))

    def _network(self, x):
        """Preprocessed images -> embeddings [B, D], or with features {feature: [B, dim]} holding "final"."""
        import tensorflow as tf

        if self.features:
            return self._features(x)
        return tf.cast(self.model(x, **self._call_kwargs), tf.float32)

    def _probe(self) -> int:
        """Run two blank images once: checks that the model takes the input size and gives [N, D] floats."""
        import tensorflow as tf

        self._call_kwargs = {} if self.features else call_kwargs(self.model, self.image_size)  # features: their own
        spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)
        self._tf_network = tf.function(self._network, input_signature=[spec])
        try:
            out = self._tf_network(self._preprocess(np.zeros((2, self.image_size, self.image_size, 3), np.uint8))[0])
        except (TypeError, ValueError, tf.errors.InvalidArgumentError) as exc:
            raise UserError(f"model cannot take {self.image_size}x{self.image_size} float images: "
                            f"{first_line(exc)}") from None
        out = (out[FINAL_FEATURE] if self.features else out).numpy()
        if out.ndim != 2 or out.shape[0] != 2 or not np.issubdtype(out.dtype, np.floating):
            raise UserError(f"model output has shape {out.shape}, expected a [N, D] float feature vector")
        return int(out.shape[1])

    def _viewed(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{view: uint8 images} as OpenVINO's networks get them: a center crop is cut first, so that the flip view
        mirrors the crop, as the TensorFlow graph does."""
        if self.crop == "center":
            images = center_square(images)
        return {view: view_images(images, view) for view in self.views}

    def _ov_network(self, shape):
        """OpenVINO's compiled network for uint8 images of `shape` (height, width): the whole uint8 -> embedding
        graph; or for shape "float": the network alone, for preprocessed batches (chunks of mixed sizes). The least
        recently used networks beyond MAX_OV_NETWORKS are dropped."""
        import tensorflow as tf

        from .ov_engine import OpenVinoNetwork

        if shape not in self._ov_networks:
            if shape == "float" and self.precision == "int8":
                raise UserError("`precision='int8'` needs images of one size (it is calibrated per input size); "
                                "this chunk mixes sizes: use `precision='f32'` or `precision='bf16'`")
            while len(self._ov_networks) >= MAX_OV_NETWORKS:
                self._ov_networks.popitem(last=False)
            if shape == "float":
                spec = tf.TensorSpec([self.batch_size, self.image_size, self.image_size, 3], tf.float32)
                graph = tf.function(self._network, input_signature=[spec])
            else:
                spec = tf.TensorSpec([self.batch_size, *shape, 3], tf.uint8)
                graph = tf.function(lambda images: self._network(
                    preprocess_static(images, self.image_size, self.resize)), input_signature=[spec])
            quantize = None
            if self.precision == "int8":
                quantize = functools.partial(self.quantizer, batch_size=self.batch_size, image_size=self.image_size,
                                             resize=self.resize, crop=self.crop, log=self.log)
            self._ov_networks[shape] = OpenVinoNetwork(graph, self.precision, quantize, self.threads)
        self._ov_networks.move_to_end(shape)
        return self._ov_networks[shape]

    def _network_inputs(self, images: np.ndarray):
        """Preprocessed network batches in order: batch 0's views, then batch 1's, ... Large images are resized
        a few at a time (PREPROCESS_PIXELS), so that a batch of photos never exists as floats at full size."""
        import tensorflow as tf

        step = max(1, PREPROCESS_PIXELS // (images.shape[1] * images.shape[2]))
        for i in range(0, len(images), self.batch_size):
            batch = images[i : i + self.batch_size]
            yield from tf.concat([self._preprocess(batch[j : j + step]) for j in range(0, len(batch), step)], axis=1)

    def embed(self, images: np.ndarray | list) -> dict[str, np.ndarray]:
        """Embed a chunk of uint8 images in `batch_size` batches: {view: float32 [N, D]}.

        Each view is its own network call, so activation memory follows `batch_size` alone. OpenVINO gets each view
        as uint8 images, each shape its own compiled network, so TensorFlow does no work at all in its loop. A list
        of images of different sizes is preprocessed image by image, then goes through the network in batches.
        """
        if isinstance(images, list):
            return self._embed_mixed(images)
        if self.engine == "openvino":
            viewed = self._viewed(images)
            embedded = {}
            for shape in dict.fromkeys(batch.shape[1:3] for batch in viewed.values()):
                same = [view for view in self.views if viewed[view].shape[1:3] == shape]
                embedded.update(zip(same, self._ov_network(shape).run([viewed[view] for view in same])))
            return split_views([embedded[view] for view in self.views], self.views)
        outputs = [self._tf_network(x) for x in self._network_inputs(images)]
        return split_views(outputs, self.views)

    def _embed_mixed(self, images: list, group: int = MIXED_GROUP) -> dict[str, np.ndarray]:
        """Images of different sizes, `group` at a time (so only a few resized images exist at once)."""
        outputs, step = [], max(group, self.batch_size)
        for lo in range(0, len(images), step):
            chunk = images[lo : lo + step]
            views = np.concatenate([self._preprocess(image[None]).numpy() for image in chunk], axis=1)
            if self.engine == "openvino":
                outputs += self._ov_network("float").run(list(views))
            else:
                outputs += [self._tf_network(view[i : i + self.batch_size])
                            for i in range(0, len(chunk), self.batch_size) for view in views]
        return split_views(outputs, self.views)


def split_views(outputs: list, views: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Network outputs (numpy or tensors) alternate views (batch 0 plain, batch 0 flip, ...); regroup them per view as
    numpy. An output that is a dict of features gives `<view>` its "final" rows and `<view>@<feature>` each other
    feature's."""
    grouped = {}
    for i, view in enumerate(views):
        parts = outputs[i :: len(views)]
        for feature in parts[0] if isinstance(parts[0], dict) else (None,):
            rows = [part[feature] for part in parts] if feature else parts
            key = view if feature in (None, FINAL_FEATURE) else f"{view}@{feature}"
            grouped[key] = np.concatenate(rows).astype(np.float32, copy=False)
    return grouped
