"""A recorded run, chosen and loaded for serving: which run (`resolve_run`) and its parts (`load_run`)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..cache.layout import CacheKey
from ..errors import UserError, first_line
from ..extract.models import call_kwargs, identity, load_model
from ..head.records import ledger, read_config
from ..settings import DEFAULT_PRECISION, DEFAULT_RUN, FINAL_FEATURE, RUN_CHOICES, parse_features, parse_views


def resolve_run(runs_dir, run_id: str | None = DEFAULT_RUN) -> tuple[Path, str]:
    """(run folder, why it was chosen, with the dataset and cache it was trained on): the run named (an id under
    `runs_dir`, or a folder); 'latest' (the default): the run recorded last; 'best': among the runs on the default
    cache settings (all runs if none is; so never a quick limited run over the default one) the best by
    validation accuracy, or else the latest."""
    runs_dir = Path(runs_dir)
    run_id = run_id or DEFAULT_RUN
    if run_id not in RUN_CHOICES:
        run_dir = runs_dir / run_id if not Path(run_id).is_dir() else Path(run_id)
        if not (run_dir / "head.keras").exists():
            raise UserError(f"no run {run_id!r} with a head.keras in {runs_dir}; the recorded runs are listed by "
                            f"python train_head.py `list=True` `runs_dir={runs_dir}`")
        return run_dir, "as asked"
    rows = [r for r in ledger(runs_dir) if (runs_dir / r["run"] / "head.keras").exists()]
    if not rows:
        raise UserError(f"no runs in {runs_dir}; train one with: python train_head.py")
    if run_id == "latest":
        chosen = max(rows, key=lambda r: _started(r["run"]))
        why, hint = "the latest run", "; `run='best'` takes the best validated" if len(rows) > 1 else ""
    else:
        on_default = [r for r in rows if r["key"] == CacheKey()]
        pool, where = ((on_default, "on the default cache settings") if on_default
                       else (rows, "(none is on the default cache settings)"))
        with_val = [r for r in pool if r["val_acc"] is not None]
        chosen = with_val[0] if with_val else max(pool, key=lambda r: _started(r["run"]))
        hint = ""
        why = (f"best validation accuracy among runs {where}" if with_val
               else f"no run has a validation accuracy: the latest run {where}")
    key = chosen["key"]
    return runs_dir / chosen["run"], f"{why}; trained on {key.dataset_name()} {key.settings_name()}{hint}"


def _started(run: str) -> tuple:
    """A run folder's name as the time it started: `<date>-<time>`, then `-1`, `-2`, ... in that order."""
    parts = run.split("-")
    return parts[:2], int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0


@dataclass
class RunParts:
    """What classifying with a run takes: its cache key (preprocessing, model), TTA, class names, the loaded
    network, the features its head reads and the head (and where its train cache is, for an int8 export's
    calibration). `embed` maps preprocessed float images to the head's input, `probabilities` to its class
    probabilities."""

    run: str
    key: CacheKey
    tta_views: tuple[str, ...]  # the views whose probabilities are averaged
    class_names: tuple[str, ...]
    network: object
    call_kwargs: dict
    head: object
    train_cache: str = ""
    features: tuple[str, ...] = (FINAL_FEATURE,)
    feature_function: object = None  # extract.layers.feature_function's, when the head reads more than "final"

    def embed(self, x):
        """The features the head was trained on, side by side in its order, as float32 [N, D]."""
        import tensorflow as tf

        if self.feature_function is None:
            return tf.cast(self.network(x, **self.call_kwargs), tf.float32)
        vectors = self.feature_function(x)
        return tf.concat([tf.cast(vectors[name], tf.float32) for name in self.features], axis=1)

    def probabilities(self, x):
        return self.head(self.embed(x), training=False)


def load_run(run_dir: Path, announce=None) -> RunParts:
    """A run's parts, checked: its record, the model folder unchanged, an f32 cache, a readable head. `announce`
    gets a line before TensorFlow, the head and the network load (seconds for a real network)."""
    config, key = read_config(run_dir)
    name = Path(run_dir).name
    if key.model_sha256 and identity(key.model)[1] != key.model_sha256:
        raise UserError(f"run {name}: model folder {key.model} holds other files than the model the run was trained "
                        "on (its content hash differs)")
    if key.precision != DEFAULT_PRECISION:
        raise UserError(f"run {name} was trained on {key.precision} embeddings (OpenVINO), but predict and export "
                        f"run the {DEFAULT_PRECISION} TensorFlow network, whose embeddings differ: train a head on a "
                        f"{DEFAULT_PRECISION} cache (extract and train without `precision`) to serve")
    if announce:
        announce(f"loading run {name}: its head and the model {key.model} ...")
    import keras

    path = Path(run_dir) / "head.keras"
    try:
        head = keras.models.load_model(path, compile=False)
    # Not a zip, or none at all (ValueError), a zip without a model's entries (KeyError, ValueError), an unknown layer
    # (TypeError), damaged weights (OSError).
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile) as exc:
        damaged = path.is_file() and not zipfile.is_zipfile(path)
        why = "not a complete .keras archive" if damaged else first_line(exc, 120)
        raise UserError(f"run {name}: its head.keras cannot be read ({why}); train the run again") from None
    network = load_model(key.model, run=name)
    features = parse_features(config["head"].get("features", FINAL_FEATURE))
    function = None
    if features != (FINAL_FEATURE,):
        from ..extract.layers import feature_function

        function = feature_function(network, key.image_size, tuple(f for f in features if f != FINAL_FEATURE))
    return RunParts(name, key, parse_views(config["head"]["tta_views"]), tuple(config["class_names"]), network,
                    call_kwargs(network, key.image_size), head, config["train_cache"]["path"], features, function)
