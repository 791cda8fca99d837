"""Inner tensors of a loaded TF Hub / SavedModel image model: which layers it offers, and one function computing
their pooled activations together with the model's own output.

A TF Hub SavedModel's call is a single StatefulPartitionedCall, whose inner tensors no caller can reach. So the call
(for one input size) is frozen with convert_variables_to_constants_v2, which inlines the function bodies into one
graph with constant weights; that graph is imported into a tf.compat.v1.wrap_function and pruned to the input and
the tensors asked for, plus pooling ops. The result runs the network once per image for every feature, and converts
to OpenVINO like any tf.function.

The layers offered (`list_layers`) are the 4-D float activations that depend on the images: the outputs of
activations (ReLU, ReLU6, ELU, ...), of residual additions and concatenations, and of batch normalisations not
followed by one of those (MobileNetV2's linear bottlenecks). Their names are the graph's, shortened to what tells
them apart: the call wrappers and the scope every layer shares dropped, then the op's own name within its layer
(`mobilenetv2_1.00_None/block_13_expand_relu/Relu6` -> `block_13_expand_relu`), `/` written as `.`.

A feature (settings.split_feature) is `<layer>`, the map averaged over its height and width (C values), or
`<layer>@2x2`, the map cut into a 2x2 grid of cells, each averaged, flattened in (cell_y, cell_x, channel) order
(4C values). An odd side is cut as adaptive average pooling cuts it: cell i of n along a side of L spans
[floor(i L / n), ceil((i + 1) L / n)), so for L = 7 the two cells share the middle row.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

from ..errors import UserError, first_line
from ..settings import FEATURE_POOLS, FINAL_FEATURE, split_feature
from .models import call_kwargs, hand_over, load_model, record_path, write_atomically

ACTIVATIONS = ("Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Softplus")
JOINS = ("Add", "AddV2", "ConcatV2")  # residual additions, concatenated branches (Inception)
NORMS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")  # offered when no activation or join follows
WRAPPERS = ("StatefulPartitionedCall", "PartitionedCall")  # name scopes of the inlined call, not of layers
GRID = 2  # cells per side of the `@2x2` pooling


@dataclass(frozen=True)
class LayerInfo:
    """A layer a model offers: its short name, the size of its activation map, and its tensor in the frozen graph."""

    name: str
    height: int
    width: int
    channels: int
    tensor: str = ""

    @property
    def size(self) -> str:
        return f"{self.height} x {self.width} x {self.channels}"


def feature_dim(layers: list[LayerInfo], feature: str) -> int:
    """Values per row of `feature`, of a layer among the model's `layers`."""
    layer, pool = split_feature(feature)
    return next(info.channels for info in layers if info.name == layer) * FEATURE_POOLS[pool]


def list_layers(model, image_size: int) -> list[LayerInfo]:
    """The layers `model` offers for `image_size` px images, in graph order."""
    return _frozen(model, image_size)[1]


def offered_layers(handle: str, sha256: str, image_size: int, cache_dir, announce=None) -> list[LayerInfo]:
    """The layers model `handle` offers for `image_size` px images: as recorded under `<cache_dir>/models/`, else
    listed from the loaded model and recorded (so that checking layer names costs a model load once). `announce`
    gets a line before a load."""
    recorded = recorded_layers(handle, sha256, image_size, cache_dir)
    if recorded is not None:
        return recorded
    if announce:
        announce(f"loading model {handle} to list its layers ...")
    model = load_model(handle)
    found = list_layers(model, image_size)
    hand_over(handle, model)  # the extraction that follows loads it no second time
    write_atomically(_record(handle, sha256, image_size, cache_dir),
                     {"model": handle, "model_sha256": sha256, "image_size": image_size,
                      "layers": [asdict(info) for info in found]})
    return found


def recorded_layers(handle: str, sha256: str, image_size: int, cache_dir) -> list[LayerInfo] | None:
    """The layers offered_layers recorded for the model at `image_size` px; None when none are (or the record is
    damaged), without loading the model."""
    try:
        record = _record(handle, sha256, image_size, cache_dir).read_text()
        return [LayerInfo(**entry) for entry in json.loads(record)["layers"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record(handle: str, sha256: str, image_size: int, cache_dir):
    """Where offered_layers records the model's layers at `image_size` px (under `<cache_dir>/models/`)."""
    return record_path(handle, sha256, cache_dir, f"-{image_size}px-layers")


def check_features(layers: list[LayerInfo], features: tuple[str, ...]):
    """Refuse, in one line, a feature naming a layer the model does not offer (settings.parse_features checked the
    spelling and the pooling)."""
    offered = {info.name for info in layers}
    for feature in features:
        if split_feature(feature)[0] not in offered:
            raise UserError(f"the model offers no layer {feature!r} in `layers`; extract.py with `list_layers=True` "
                            f"lists its {len(layers)} layers")


def feature_function(model, image_size: int, features: tuple[str, ...]):
    """A concrete function: preprocessed float images [B, S, S, 3] in [0, 1] -> {feature: float32 [B, dim]} for each
    of `features` (named by list_layers, checked by the caller) and "final", the model's own output."""
    import tensorflow as tf

    frozen, layers = _frozen(model, image_size)
    tensors = {info.name: info.tensor for info in layers}
    graph_def = frozen.graph.as_graph_def()
    wrapped = tf.compat.v1.wrap_function(lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    graph = wrapped.graph
    with graph.as_default():
        outputs = {feature: pool(graph.get_tensor_by_name(tensors[split_feature(feature)[0]]), feature)
                   for feature in features}
        outputs[FINAL_FEATURE] = tf.cast(graph.get_tensor_by_name(frozen.outputs[0].name), tf.float32)
    return wrapped.prune(feeds=graph.get_tensor_by_name(frozen.inputs[0].name), fetches=outputs)


def pool(activations, feature: str):
    """A layer's activations [B, H, W, C] (static H, W) pooled as `feature` names: float32 [B, C] or [B, 4C]."""
    import tensorflow as tf

    activations = tf.cast(activations, tf.float32)
    if not split_feature(feature)[1]:
        return tf.reduce_mean(activations, axis=[1, 2])
    rows, cols = _cells(activations.shape[1]), _cells(activations.shape[2])
    cells = [tf.reduce_mean(activations[:, top:bottom, left:right, :], axis=[1, 2])
             for top, bottom in rows for left, right in cols]
    return tf.concat(cells, axis=1)  # cell by cell: (cell_y, cell_x, channel) row-major


def _cells(length: int) -> list[tuple[int, int]]:
    """Adaptive pooling's [start, stop) of each of GRID cells along a side."""
    return [(i * length // GRID, math.ceil((i + 1) * length / GRID)) for i in range(GRID)]


def _frozen(model, image_size: int):
    """(the model's call for float [B, S, S, 3] images frozen into one graph, the layers it offers)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    kwargs = call_kwargs(model, image_size)
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    try:
        call = tf.function(lambda x: model(x, **kwargs)).get_concrete_function(spec)
        frozen = convert_variables_to_constants_v2(call)
    except (ValueError, TypeError, tf.errors.OpError) as exc:
        raise UserError(f"cannot read the layers inside this model ({first_line(exc)})") from None
    return frozen, _offered(frozen.graph)


def _offered(graph) -> list[LayerInfo]:
    import tensorflow as tf

    def is_map(tensor):
        shape = tensor.shape
        return (tensor.dtype in (tf.float32, tf.float16, tf.bfloat16) and shape.rank == 4 and shape[0] is None
                and all(side is not None for side in shape[1:]))

    chosen = []
    for op in graph.get_operations():
        if not op.outputs or not is_map(op.outputs[0]):
            continue
        followed = [consumer.type for consumer in op.outputs[0].consumers()]
        if op.type in ACTIVATIONS + JOINS or (op.type in NORMS and followed
                                              and not set(followed) <= set(ACTIVATIONS + JOINS)):
            chosen.append(op)
    names = _short_names([op.name for op in chosen])
    return [LayerInfo(name, *(int(side) for side in op.outputs[0].shape[1:]), tensor=op.outputs[0].name)
            for name, op in zip(names, chosen)]


def _short_names(full: list[str]) -> list[str]:
    """Graph op names shortened to what tells them apart (module docstring), unique, in [A-Za-z0-9_.-]."""
    parts = [[part for part in name.split("/") if part not in WRAPPERS] for name in full]
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]  # the scope every layer shares (the model's name)
    names, seen = [], {}
    for p in parts:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", ".".join(p[:-1] if len(p) > 1 else p))
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names
