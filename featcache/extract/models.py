"""A model's identity, its input size, and loading it.

A local SavedModel folder is identified by a hash of its contents (saved_model.pb and the variables index), so
replacing its files in place makes a new cache instead of silently reusing vectors of the old model; a TF Hub handle
names fixed contents by itself.

The input size comes from the model when its signature fixes one (Inception V3: 299), else from `image_size`.
Finding it means loading the model once; the answer is kept in `<cache_dir>/models/`, so up-to-date checks (and
stage 2, selection.select_cached) stay free of TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from ..cache.layout import model_slug
from ..errors import UserError, first_line

IDENTITY_FILES = ("saved_model.pb", "saved_model.pbtxt", "variables/variables.index")
# The model `input_size` loaded to learn its size, handed over to the next `load_model` of the same handle in this
# process (the extraction that follows), so that a first extraction into a new cache folder loads it once.
_loaded_for_size: dict = {}


def load_model(handle: str | os.PathLike, run: str | None = None):
    """hub.load a URL or a local SavedModel folder; a failure becomes one actionable line (for the network of
    `run`, no other model can stand in for it)."""
    if (kept := _loaded_for_size.pop(os.fspath(handle), None)) is not None:
        return kept
    import tensorflow as tf
    import tensorflow_hub as hub

    try:
        return hub.load(os.fspath(handle))
    # No network or no such file (OSError), not a SavedModel (ValueError), damaged variables (IndexError, OpError).
    except (OSError, ValueError, IndexError, tf.errors.OpError) as exc:
        if "://" not in str(handle) and os.path.isdir(handle):  # a local folder: no hub or network involved
            raise UserError(f"cannot load the SavedModel in {handle} ({first_line(exc, 200)}): the folder is damaged, "
                            "incomplete, or not loadable by this TensorFlow") from None
        other = (f" (run {run} was trained on it)" if run else
                 ", or pass `model=PATH` to a local SavedModel folder")
        raise UserError(f"cannot load model {handle!r} ({first_line(exc, 200)}). Offline, set TFHUB_CACHE_DIR to a "
                        f"TF Hub cache that holds it{other}") from None


def hand_over(handle: str, model):
    """Keep a model loaded for something else (its input size, its layers) for the extraction that follows (None:
    keep none)."""
    _loaded_for_size.clear()
    _loaded_for_size[os.fspath(handle)] = model


def call_kwargs(model, image_size: int) -> dict:
    """How to call a loaded model: TF Hub models take `training`, plain SavedModels may not."""
    import tensorflow as tf

    blank = tf.zeros([1, image_size, image_size, 3])
    for kwargs in ({"training": False}, {}):
        try:
            model(blank, **kwargs)
            return kwargs
        except (TypeError, ValueError, tf.errors.InvalidArgumentError):
            continue
    return {}


def identity(handle: str | os.PathLike) -> tuple[str, str]:
    """(handle, content sha256): a local folder (a str or path object) becomes its absolute path plus the hash of
    its files; a TF Hub handle (a URL) stays as it is."""
    handle = os.fspath(handle)
    if "://" in handle:
        return handle, ""
    if not os.path.exists(handle):
        raise UserError(f"model folder {handle} does not exist (`model` takes a TF Hub URL or a SavedModel folder)")
    folder = Path(handle).resolve()
    present = [name for name in IDENTITY_FILES if (folder / name).is_file()]
    if not present:
        raise UserError(f"model folder {folder} holds no SavedModel (no saved_model.pb)")
    digest = hashlib.sha256()
    for name in present:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as fh:
            while block := fh.read(1 << 20):  # in blocks: a saved_model.pb may be hundreds of MB
                digest.update(block)
    return str(folder), digest.hexdigest()


def fixed_input_size(model) -> int | None:
    """The square input size a loaded model's call signature fixes, or None when it takes any size."""
    functions = getattr(getattr(model, "__call__", None), "concrete_functions", None) or []
    if not functions and hasattr(model, "signatures") and "serving_default" in model.signatures:
        functions = [model.signatures["serving_default"]]
    for function in functions:
        args, kwargs = function.structured_input_signature
        specs = [s for s in list(args) + list(kwargs.values()) if getattr(s, "shape", None) is not None]
        if specs and specs[0].shape.rank == 4:
            height, width = specs[0].shape[1], specs[0].shape[2]
            if height is not None and width is not None:
                if height != width:
                    raise UserError(f"the model takes {height}x{width} images; only square inputs are supported")
                return int(height)
    return None


def input_size(handle: str, sha256: str, asked: int | None, default: int, cache_dir, announce=None) -> int:
    """The image size to feed the model: its own when it fixes one (a different `asked` is an error),
    else `asked`, else `default`. A model that cannot be loaded here (offline, say) is taken to accept
    any size: whatever then needs the model says why it cannot load, and extraction checks again. With `asked`,
    an unrecorded model is not loaded here (extraction checks it where it loads it: a cluster's driver never
    imports TensorFlow). `announce` gets a line before the model is loaded for it."""
    known, fixed = recorded_input_size(handle, sha256, cache_dir)
    if not known and not asked:
        if announce:
            announce(f"loading model {handle} to learn its input size ...")
        try:
            model = load_model(handle)
            fixed = record_input_size(fixed_input_size(model), handle, sha256, cache_dir)
        except UserError:
            fixed = None
        else:  # an extraction follows (a selection without a cache folder keeps nothing alive)
            hand_over(handle, model if cache_dir else None)
    return checked_size(handle, fixed, asked or (fixed or default))


def checked_size(handle: str, fixed: int | None, size: int) -> int:
    if fixed is not None and size != fixed:
        raise UserError(f"model {handle} takes {fixed}x{fixed} images; `image_size` {size} contradicts it "
                        "(leave `image_size` out)")
    return size


def record_input_size(fixed: int | None, handle: str, sha256: str, cache_dir) -> int | None:
    """Keep a model's fixed input size (or None) under `<cache_dir>/models/` for the next selection."""
    if cache_dir:
        write_atomically(record_path(handle, sha256, cache_dir),
                          {"model": handle, "model_sha256": sha256, "fixed_input_size": fixed})
    return fixed


def recorded_input_size(handle: str, sha256: str, cache_dir) -> tuple[bool, int | None]:
    """(whether a usable record exists, the fixed input size it keeps) without loading anything. A damaged
    record (cut short, not JSON, a size that is not a positive whole number) counts as none: the model is
    loaded again and the record rewritten."""
    try:
        fixed = json.loads(record_path(handle, sha256, cache_dir).read_text())["fixed_input_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, None
    usable = fixed is None or (type(fixed) is int and fixed > 0)
    return usable, fixed if usable else None


def record_path(handle: str, sha256: str, cache_dir, what: str = "") -> Path:
    """Where what is learnt about a model (`what`: '' its input size, else a suffix) is kept under `<cache_dir>`."""
    return Path(cache_dir) / "models" / f"{model_slug(handle, sha256)}{what}.json"


def write_atomically(path: Path, content: dict):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(content, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:  # only a shortcut: without it the model is loaded again next time
        with contextlib.suppress(OSError):
            tmp.unlink()
