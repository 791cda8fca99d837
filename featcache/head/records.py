"""Run records: one folder per trained head under runs/, and the ledger that lists them.

A run folder holds config.json (head settings, the cache's key and files, class names),
history.json, head.keras, test_probs.npy, curves.png, confusion.png, TensorBoard's event files (tensorboard.py; with
a projector/ sample when asked), and metrics.json, written last: a folder without it is a run that did not finish
(or is being recorded), listed with a warning.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..cache.layout import CacheKey
from ..errors import UserError, first_line
from ..settings import FINAL_FEATURE, HeadConfig, parse_features, parse_views, views_label
from . import plots, tensorboard


def check_writable(runs_dir):
    """Refuse a runs folder that cannot be written, before any training."""
    runs_dir = Path(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write runs folder {runs_dir}: {exc.strerror}") from None
    if not os.access(runs_dir, os.W_OK | os.X_OK):
        raise UserError(f"cannot write runs folder {runs_dir}: permission denied")


def new_run_dir(runs_dir) -> Path:
    """A new, empty folder named by the time (with -1, -2, ... when several start in one second)."""
    runs_dir = Path(runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run_dir = runs_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot write runs folder {runs_dir}: {exc.strerror}") from None
    raise UserError(f"too many runs started at {stamp} in {runs_dir}")


def record_run(runs_dir, key: CacheKey, config: HeadConfig, trained, test_labels: np.ndarray,
               train_info: dict, test_info: dict, projector: tensorboard.ProjectorSample | None = None) -> Path:
    """Write one run folder: config, history, head.keras, test probabilities, plots, TensorBoard events (and the
    Projector's sample of test rows), then metrics."""
    run_dir = new_run_dir(runs_dir)
    record = {"head": config.to_dict(), "cache": {**key.attrs("")}, "train_cache": train_info,
              "test_cache": test_info, "class_names": list(trained.class_names)}
    record["cache"].pop("split")
    try:
        write_json(run_dir / "config.json", record)
        write_json(run_dir / "history.json", trained.history)
        trained.model.save(run_dir / "head.keras")
        np.save(run_dir / "test_probs.npy", trained.test_probs.astype(np.float32))
        plots.plot_history(trained.history, run_dir / "curves.png", title=f"run {run_dir.name}")
        plots.plot_confusion(test_labels, trained.test_probs.argmax(1), trained.class_names,
                             run_dir / "confusion.png",
                             title=f"run {run_dir.name}: test accuracy {trained.metrics['test_accuracy']:.4f}")
        tensorboard.write_experiment(runs_dir, also=(tensorboard.hparams_of(record, trained.metrics),))
        tensorboard.write_run(run_dir, record, trained.history, trained.metrics)
        if projector is not None:
            tensorboard.write_projector(run_dir, projector, test_labels[projector.rows],
                                        trained.test_probs[projector.rows].argmax(1), trained.class_names)
        write_json(run_dir / "metrics.json", trained.metrics)  # last: a run is listed only once it is whole
    except BaseException as exc:  # disk full, a folder made read-only meanwhile, Ctrl-C: no half-written run stays
        shutil.rmtree(run_dir, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise
        raise UserError(f"recording the run in {run_dir} failed ({exc.strerror or first_line(exc)}); nothing was "
                        "recorded") from None
    return run_dir


def read_config(run_dir: Path) -> tuple[dict, CacheKey]:
    """A run's config.json and the cache key it records; a missing or damaged one is one line naming the run."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
        key = CacheKey.from_attrs(config["cache"])
        _check_head(config["head"])
        config["class_names"]  # noqa: B018 - what every reader needs
    except OlderRun:
        raise UserError(f"run {Path(run_dir).name} was made by an older featcache (before views were named); "
                        "train it again") from None
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(f"run {Path(run_dir).name}: its config.json is damaged or half-written "
                        f"({type(exc).__name__}: {str(exc)[:80]})") from None
    return config, key


class OlderRun(ValueError):
    """A run recorded before views were named (its head has flip_train/tta): it cannot be served as it was."""


def _check_head(head: dict):
    if "tta_views" not in head and "tta" in head:
        raise OlderRun("made by an older featcache (before views were named)")
    parse_views(head["tta_views"]), parse_views(head["train_views"]), head["solver"]  # noqa: B018 - needed


LEDGER_COLUMNS = ("run", "val_acc", "test_acc", "fit_s", "solver", "epochs", "hidden", "l2", "lr", "train_views",
                  "tta_views", "features", "cache")


def ledger(runs_dir, warn=lambda message: print(message, file=sys.stderr)) -> list[dict]:
    """One row per recorded run, best validation accuracy first (runs without one last).

    A run folder whose record is unreadable or incomplete is skipped with one warning line.
    """
    rows = []
    runs = {path.parent for name in ("metrics.json", "config.json") for path in Path(runs_dir).glob(f"*/{name}")}
    for run_dir in sorted(runs):
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.exists():
            warn(f"warning: skipping run {run_dir.name}: it has no metrics.json (unfinished, interrupted, or being "
                 "recorded now)")
            continue
        try:
            metrics = json.loads(metrics_path.read_text())
            config = json.loads((run_dir / "config.json").read_text())
            head, key = config["head"], CacheKey.from_attrs(config["cache"])
            _check_head(head)
            solver = metrics.get("solver", head["solver"])
            row = {"run": run_dir.name, "val_acc": metrics.get("val_accuracy"),
                   "test_acc": metrics.get("test_accuracy"), "fit_s": metrics.get("fit_seconds"),
                   "solver": solver, "epochs": metrics.get("epochs"), "hidden": head["hidden"], "l2": head["l2"],
                   "lr": head["lr"] if solver == "adam" else None,
                   "train_views": views_label(head["train_views"]), "tta_views": views_label(head["tta_views"]),
                   "features": "+".join(parse_features(head.get("features", FINAL_FEATURE))),
                   "cache": f"{key.dataset_name()}/{key.settings_name()}",
                   "key": key}
            _check_numbers(row, metrics)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as exc:
            why = (str(exc) if isinstance(exc, OlderRun) else "its record is damaged or half-written "
                   f"({type(exc).__name__}: {str(exc)[:80]})")
            warn(f"warning: skipping run {run_dir.name}: {why}")
            continue
        rows.append(row)
    return sorted(rows, key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0), -(r["test_acc"] or 0)))


def _check_numbers(row: dict, metrics: dict):
    """A listed run's scores are finite numbers, and its numbers numbers."""
    scores = [metrics.get(k) for k in ("test_accuracy", "test_loss", "val_accuracy", "val_loss")]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores if v is not None):
        raise ValueError("its metrics are not finite numbers")
    for column in ("fit_s", "epochs", "hidden", "l2", "lr"):
        value = row[column]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            name = "fit_seconds" if column == "fit_s" else column  # the record's own key
            raise TypeError(f"{name} is {str(value)[:20]!r}, not a number")


def write_json(path: Path, obj):
    """Write JSON under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
