"""A run's TensorBoard events: what TensorBoard, pointed at the runs folder, shows of each recorded head.

Written from a run's record (config.json's head and cache, history.json, metrics.json, the two PNGs) after its fit:

- `<run>/train/` and `<run>/validation/`: `epoch_loss` and `epoch_accuracy` (L-BFGS: `iteration_...`, on charts of
  their own), the Keras layout, so that both splits of every run share one chart per tag;
- `<run>/`: the final `test_accuracy`, `test_loss` (and `val_accuracy`, `val_loss`, `fit_seconds`) as scalars equal
  to metrics.json's, the run's settings and cache selection through the HParams plugin (one session per run, named
  by the run), and the confusion matrix and learning curves as images;
- the runs folder itself: one HParams experiment config declaring every column with its type, so that all runs
  line up and a number column stays a number column (made again as runs are recorded, to mark the columns that
  differ). A run never writes an empty or None value: a setting that does not apply (the learning rate of an L-BFGS
  fit) is left out of that run;
- on request, `<run>/projector/`: a Projector sample of test embeddings (a checkpoint, labels, an optional sprite),
  drawn by `projector_sample`.

TensorBoard reads every run folder on its own: one damaged or half-written folder costs only that run.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from collections import namedtuple
from pathlib import Path

import numpy as np

from ..cache.layout import CacheKey
from ..settings import FINAL_FEATURE, HeadConfig, parse_features, views_label
from .thumbnails import test_thumbnails

EXPERIMENT_SUFFIX = ".featcache-hparams"  # names the runs folder's experiment config among its event files
TRAIN, VALIDATION = "train", "validation"  # the per-epoch curves' subfolders, as Keras' TensorBoard callback names them
PROJECTOR = "projector"  # the subfolder of a run's Projector sample

# The HParams columns: name, kind (float for numbers, str, bool), description. TensorBoard orders them itself (the
# columns whose values differ first, then by name) and shows the first five.
HPARAMS = (
    ("solver", str, "adam (epochs of Adam steps) or lbfgs (a linear head fit to convergence)"),
    ("epochs", float, "training epochs (adam only)"),
    ("lr", float, "peak Adam learning rate (adam only)"),
    ("batch_size", float, "rows per training step, as used (adam only)"),
    ("schedule", str, "learning-rate schedule (adam only)"),
    ("l2", float, "L2 weight penalty (the L2 sweep's choice when sweep is true)"),
    ("sweep", bool, "l2 chosen on a validation split, then refit on all rows"),
    ("hidden", float, "units of the hidden ReLU layer (0: linear head)"),
    ("dropout", float, "dropout rate"),
    ("label_smoothing", float, "label smoothing of the training loss"),
    ("train_views", str, "cached views whose rows train the head"),
    ("tta_views", str, "cached views whose predictions are averaged at test time"),
    ("features", str, "cached features feeding the head, concatenated in this order (final: the network's output)"),
    ("val_split", float, "fraction of train images held out for validation"),
    ("seed", float, "seed of initialisers, dropout, the validation split and row order"),
    ("compute", str, "number format of the first layer's products in training steps, as used"),
    ("cache", str, "the cache: dataset/settings, as the ledger of runs names it"),
    ("dataset", str, "the dataset (a folder dataset by its name)"),
    ("model", str, "the network that made the embeddings"),
    ("image_size", float, "side the images were resized to"),
    ("resize", str, "resize method"),
    ("crop", str, "none (squashed) or center"),
    ("precision", str, "network precision"),
    ("limit", float, "images per split the cache was limited to (0: all)"),
)
KINDS = {name: kind for name, kind, _ in HPARAMS}
# The HParams metrics: (group: the run's subfolder, "" for the run folder itself; tag; description).
METRICS = (
    ("", "test_accuracy", "test accuracy (metrics.json)"),
    ("", "test_loss", "test cross-entropy (metrics.json)"),
    ("", "val_accuracy", "validation accuracy at the end (metrics.json; the L2 sweep's best with sweep)"),
    ("", "val_loss", "validation cross-entropy at the end (metrics.json)"),
    (TRAIN, "epoch_accuracy", "training accuracy of the last epoch (adam)"),
    (TRAIN, "epoch_loss", "training loss of the last epoch (adam)"),
    ("", "fit_seconds", "seconds the fit took (metrics.json)"),
)
FINAL_SCALARS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "fit_seconds")
IMAGES = (("confusion_matrix", "confusion.png", "test confusion matrix, share of each true class"),
          ("learning_curves", "curves.png", "loss and accuracy per epoch, training and validation"))
PROJECTOR_TENSOR = "embedding/.ATTRIBUTES/VARIABLE_VALUE"  # a tf.train.Checkpoint's name for its `embedding`


def hparams_of(record: dict, metrics: dict) -> dict:
    """The HParams values of a run (config.json's record, metrics.json): numbers as float, no None.

    Raises ValueError (or KeyError, TypeError) for a record that cannot give them.
    """
    head, key = record["head"], CacheKey.from_attrs(record["cache"])
    solver = metrics.get("solver", head["solver"])
    values = {"solver": solver, "l2": head["l2"], "sweep": "sweep" in metrics, "hidden": head["hidden"],
              "dropout": head.get("dropout"), "label_smoothing": head.get("label_smoothing"),
              "train_views": views_label(head["train_views"]), "tta_views": views_label(head["tta_views"]),
              "features": "+".join(parse_features(head.get("features", FINAL_FEATURE))),
              "val_split": head.get("val_split"), "seed": head.get("seed"),
              "compute": metrics.get("compute", head.get("compute")),
              "cache": f"{key.dataset_name()}/{key.settings_name()}", "dataset": key.dataset_name(),
              "model": key.model, "image_size": key.image_size, "resize": key.resize, "crop": key.crop,
              "precision": key.precision, "limit": key.limit}
    if solver == "adam":
        values.update(epochs=metrics.get("epochs", head.get("epochs")), lr=head.get("lr"),
                      batch_size=metrics.get("batch_size", head.get("batch_size")), schedule=head.get("schedule"))
    kept = {}
    for name, value in values.items():
        if value is None or value == "":
            continue  # left out: the column stays of its kind, this run's cell empty
        kind = KINDS[name]
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name} is {str(value)[:20]!r}, not a number")
        if kind is not float and not isinstance(value, kind):
            raise TypeError(f"{name} is {str(value)[:20]!r}, not a {kind.__name__}")
        kept[name] = float(value) if kind is float else value
    return kept


# The summaries below are the protobufs TensorBoard's own summary functions write, built with TensorFlow's protobuf
# classes and the hparams plugin's protobuf modules alone: the plugins' Python helpers import TensorBoard's TensorFlow
# stub, a third of a second per process. (The scalar and image plugins' data is empty: version 0.)


def _summary(tag: str, plugin: str, tensor, content: bytes = b"", display_name: str = "", description: str = ""):
    import tensorflow as tf

    metadata = tf.compat.v1.SummaryMetadata(display_name=display_name, summary_description=description,
                                            plugin_data={"plugin_name": plugin, "content": content})
    return tf.compat.v1.Summary(value=[{"tag": tag, "metadata": metadata, "tensor": tensor}])


def _hparams_summary(tag: str, **data):
    """An HParams plugin summary (its data on the metadata, an empty tensor), as the plugin's metadata module makes."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(**data).SerializeToString()
    return _summary(tag, "hparams", tf.make_tensor_proto([], tf.float32, shape=[0]), content)


def experiment_summary(differs: set[str] = frozenset()):
    """The HParams experiment config: every column of HPARAMS with its type, and the METRICS. The columns in
    `differs` (their values differ between runs) come first in TensorBoard's HParams tab, and are the ones shown."""
    from tensorboard.plugins.hparams import api_pb2

    types = {float: api_pb2.DATA_TYPE_FLOAT64, str: api_pb2.DATA_TYPE_STRING, bool: api_pb2.DATA_TYPE_BOOL}
    infos = [api_pb2.HParamInfo(name=name, type=types[kind], description=text, differs=name in differs)
             for name, kind, text in HPARAMS]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(group=group, tag=tag), description=text,
                                  dataset_type=api_pb2.DATASET_TRAINING if group == TRAIN else None)
               for group, tag, text in METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=time.time(),
                                    description="featcache head runs (train_head.py)")
    return _hparams_summary("_hparams_/experiment", experiment=experiment)


def session_summaries(hparams: dict, name: str, started: float):
    """A run's HParams session: its start (the values, the run's name as its group) and its successful end."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(group_name=name, start_time_secs=started)
    for key, value in hparams.items():
        kind = {bool: "bool_value", str: "string_value"}.get(type(value), "number_value")
        setattr(start.hparams[key], kind, value)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return (_hparams_summary("_hparams_/session_start_info", session_start_info=start),
            _hparams_summary("_hparams_/session_end_info", session_end_info=end))


@contextlib.contextmanager
def _events(folder: Path, suffix: str | None = None):
    """One event file in `folder`, written with TensorFlow's summary writer: yields write(summary, step). TensorFlow's
    errors inside (a full disk, a folder gone) come out as OSError."""
    import tensorflow as tf

    def write(summary, step: int):
        tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)

    try:
        writer = tf.summary.create_file_writer(str(folder), filename_suffix=suffix)
        try:
            with writer.as_default():
                yield write
        finally:
            writer.close()
    except tf.errors.OpError as exc:
        raise OSError(f"writing TensorBoard events failed: {exc.message.splitlines()[0][:160]}") from None


def _scalar(tag: str, value: float):
    """As tf.summary.scalar writes it (not tf.summary.scalar itself: its first call traces for a quarter second)."""
    import tensorflow as tf

    return _summary(tag, "scalars", tf.make_tensor_proto(value, tf.float32), display_name=tag)


def _image(tag: str, png: bytes, description: str):
    """An image-plugin summary holding a PNG as it is (no decoding and encoding again): [width, height, png]."""
    import tensorflow as tf

    size = struct.unpack(">II", png[16:24])  # width and height, in the IHDR chunk that starts every PNG
    return _summary(tag, "images", tf.make_tensor_proto([str(n).encode() for n in size] + [png]), display_name=tag,
                    description=description)


def experiment_files(runs_dir) -> list[Path]:
    return sorted(Path(runs_dir).glob(f"events.out.tfevents.*{EXPERIMENT_SUFFIX}"))


def write_experiment(runs_dir, also: tuple[dict, ...] = ()):
    """The runs folder's HParams experiment config, made again for the finished runs whose record gives their hparams
    (the ledger warns about the others) and `also`, a run being recorded: the columns whose values differ between them
    are marked. The new file is written before older ones are removed (only older ones: of two processes writing at
    once, the later file stays)."""
    values = list(also)
    for metrics in Path(runs_dir).glob("*/metrics.json"):
        try:
            values.append(hparams_of(json.loads((metrics.parent / "config.json").read_text()),
                                     json.loads(metrics.read_text())))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    differs = {name for name in KINDS if len({repr(v[name]) for v in values if name in v}) > 1}
    with _events(Path(runs_dir), EXPERIMENT_SUFFIX) as write:
        write(experiment_summary(differs), 0)
    for path in sorted(experiment_files(runs_dir), key=_written_order)[:-1]:
        path.unlink(missing_ok=True)


def _written_order(path: Path) -> tuple:
    """An event file's name as (time, host, pid, number): the order files were begun in."""
    parts = path.name.split(".")  # events.out.tfevents.<time>.<host>.<pid>.<number><suffix>
    return int(parts[3]), parts[4:-3], int(parts[-3]), int(parts[-2])


def write_run(run_dir, record: dict, history: dict, metrics: dict):
    """Every event file of one run (see the module's docstring), from its record; its PNGs are read from run_dir."""
    run_dir = Path(run_dir)
    hparams = hparams_of(record, metrics)  # before any file: a record without them writes nothing
    last = len(history.get("loss", ()))
    unit = "iteration" if metrics.get("solver", record["head"]["solver"]) == "lbfgs" else "epoch"  # an axis of its own
    for folder, prefix in ((TRAIN, ""), (VALIDATION, "val_")):
        series = {name[len(prefix):]: values for name, values in history.items()
                  if name.startswith(prefix) and (prefix or not name.startswith("val_")) and values}
        if not series:
            continue
        with _events(run_dir / folder) as write:
            for tag, values in series.items():
                first = max(last, len(values)) - len(values) + 1  # a shorter series (L-BFGS' validation) ends with it
                for step, value in enumerate(values, start=first):
                    write(_scalar(f"{unit}_{tag}", value), step)
    with _events(run_dir) as write:
        start, end = session_summaries(hparams, run_dir.name, (run_dir / "config.json").stat().st_mtime)
        write(start, 0)
        for name in FINAL_SCALARS:
            if metrics.get(name) is not None:
                write(_scalar(name, metrics[name]), max(last, 1))
        for tag, file, description in IMAGES:
            if (run_dir / file).exists():
                write(_image(tag, (run_dir / file).read_bytes(), description), max(last, 1))
        write(end, 0)


# Test rows to show in the Projector: their indices in the test split, embeddings, and thumbnails for a sprite (uint8
# [n, side, side, 3]) or None.
ProjectorSample = namedtuple("ProjectorSample", "rows embeddings thumbnails")


def projector_sample(key: CacheKey, cache_dir, test, config: HeadConfig, points: int, data_dir,
                     note) -> ProjectorSample:
    """A seeded sample of `points` rows of the `test` split's Features (all when there are fewer) for the Projector:
    their embeddings in the first test-time view, and thumbnails where the source has images (else `note` says why
    not; `data_dir` is where a CIFAR copy for them is)."""
    rows = np.sort(np.random.default_rng(config.seed).permutation(len(test.labels))[:points])
    thumbnails, why = test_thumbnails(key, cache_dir, rows, test.labels[rows], data_dir)
    if thumbnails is None:
        note(f"note: the Projector sample has no sprite: {why}")
    return ProjectorSample(rows, test.views[config.tta_view_list[0]][rows], thumbnails)


def write_projector(run_dir, sample: ProjectorSample, labels: np.ndarray, predicted: np.ndarray, class_names):
    """The Projector's files, in the run's `projector/` folder (a TensorBoard run of its own, so that the Projector
    lists it once): the embeddings as a checkpoint, a label table (true class, predicted class, whether they agree,
    test row), the sprite, and the config naming them."""
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorboard.plugins import projector

    folder = Path(run_dir) / PROJECTOR
    folder.mkdir(exist_ok=True)
    with _events(folder):  # an event file: what makes the folder a run
        lines = ["label\tpredicted\tcorrect\trow"] + [
            f"{class_names[t]}\t{class_names[p]}\t{'yes' if t == p else 'no'}\t{row}"
            for t, p, row in zip(labels, predicted, sample.rows)]
        (folder / "labels.tsv").write_text("\n".join(lines) + "\n")
        tf.train.Checkpoint(embedding=tf.Variable(sample.embeddings.astype(np.float32))).save(str(folder / "embedding"))
        config = projector.ProjectorConfig()
        embedding = config.embeddings.add(tensor_name=PROJECTOR_TENSOR, metadata_path="labels.tsv")
        if sample.thumbnails is not None:
            side = sample.thumbnails.shape[1]
            _sprite(sample.thumbnails).save(folder / "sprite.png")
            embedding.sprite.image_path = "sprite.png"
            embedding.sprite.single_image_dim.extend([side, side])
        (folder / "projector_config.pbtxt").write_text(text_format.MessageToString(config))


def _sprite(thumbnails: np.ndarray):
    """Thumbnails in a square grid, row by row (the Projector's sprite layout)."""
    from PIL import Image

    n, side = len(thumbnails), thumbnails.shape[1]
    columns = int(np.ceil(np.sqrt(n)))
    blank = np.full((columns * columns - n, side, side, 3), 255, np.uint8)
    grid = np.concatenate([thumbnails, blank]).reshape(columns, columns, side, side, 3).swapaxes(1, 2)
    return Image.fromarray(grid.reshape(columns * side, columns * side, 3))


def backfill(runs_dir, rows: list[dict], warn) -> list[str]:
    """Event files for each listed run (the ledger's rows: readable, finished runs) that has none; returns the runs
    written. A run whose record cannot give them is skipped with one warning."""
    runs_dir, written = Path(runs_dir), []
    for row in rows:
        run_dir = runs_dir / row["run"]
        if any(run_dir.glob("events.out.tfevents.*")):
            continue
        try:
            record = json.loads((run_dir / "config.json").read_text())
            metrics = json.loads((run_dir / "metrics.json").read_text())
            history_path = run_dir / "history.json"
            history = json.loads(history_path.read_text()) if history_path.exists() else {}
            if not isinstance(history, dict) or not all(isinstance(v, list) for v in history.values()):
                raise ValueError("its history.json is not a table of series")
            hparams_of(record, metrics)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"warning: skipping run {run_dir.name}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        try:
            write_run(run_dir, record, history, metrics)
        except BaseException:
            _remove_events(run_dir)  # none half-written
            raise
        written.append(run_dir.name)
    if rows:
        write_experiment(runs_dir)
    return written


def _remove_events(run_dir: Path):
    for folder in (run_dir, run_dir / TRAIN, run_dir / VALIDATION):
        for path in folder.glob("events.out.tfevents.*"):
            path.unlink(missing_ok=True)
        if folder != run_dir and folder.is_dir() and not any(folder.iterdir()):
            os.rmdir(folder)
