"""Run records: open the caches a run needs, train a head, and keep everything under runs/<id>/.

A run folder holds config.json (head settings and the caches used), metrics.json,
history.json, head.keras and test_probs.npy, so experiments can be compared later
without retraining.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import plots, store
from .errors import UserError
from .head import Features, HeadConfig, sweep_l2, train, training_data
from .selection import selection_args
from .sources import legacy_class_names


def extract_command(key: store.CacheKey, split: str, cache_dir) -> str:
    """The extract.py command that builds the cache this key names."""
    return " ".join(filter(None, ["python extract.py", f"--split {split}", selection_args(key), f"--cache-dir {cache_dir}"]))


def existing_caches(cache_dir) -> list[str]:
    """One line per settings with caches in `cache_dir`: its options, then its splits and their state."""
    groups: dict[str, list[str]] = {}
    for entry in store.list_caches(cache_dir):
        if entry.get("key") is None:
            continue
        state = "complete" if entry["complete"] else f"partial {entry['rows_done']}/{entry['rows']}"
        groups.setdefault(selection_args(entry["key"]) or "(defaults)", []).append(
            f"{entry['split']} {entry['rows']} rows {state} {entry['megabytes']:.0f} MB")
    return [f"{options}: {'; '.join(splits)}" for options, splits in sorted(groups.items())]


def load_features(key: store.CacheKey, split: str, cache_dir, views: tuple[str, ...]) -> tuple[Features, dict]:
    """Read one complete cache; a missing one names the command that makes it."""
    path = key.path(cache_dir, split)
    if not path.exists():
        hint = " (an interrupted extraction is waiting to resume)" if store.partial_path(path).exists() else ""
        present = existing_caches(cache_dir)
        present = f". Caches present (pass their options): {' | '.join(present)}" if present else ""
        raise UserError(f"no {split} cache at {path}{hint}; run: {extract_command(key, split, cache_dir)}{present}")
    state = store.inspect(path, key.attrs(split))
    rebuild = f"{extract_command(key, split, cache_dir)} --force"
    if state.status != "complete":
        raise UserError(f"{split} cache {path} cannot be used: {state.reason}; rebuild it with {rebuild}")
    try:
        embeddings, labels, attrs = store.read(path, key.attrs(split), views)
    except store.CorruptCache as exc:
        raise UserError(f"{exc}; rebuild it with {rebuild}") from None
    for view, rows in embeddings.items():
        count, first = store.non_finite(rows)
        if count:
            raise UserError(f"{split} cache {path} holds {count} NaN/Inf values ({view} view, first in row {first}); "
                            f"check it with {extract_command(key, split, cache_dir)} --verify, rebuild it with {rebuild}")
    names = store.class_names(attrs) or legacy_class_names(key.dataset)
    return Features(embeddings, labels, names), {"path": str(path), "fingerprint": attrs["source_fingerprint"],
                                                 "engine": attrs.get("engine", ""), "rows": int(attrs["rows"])}


def _load_splits(key: store.CacheKey, cache_dir, runs_dir, views: tuple[str, ...]):
    """Both splits' features and cache info, after checking that a run can be recorded at all
    (that fails before training; the run folder itself is made only once there is a result)."""
    splits = [load_features(key, split, cache_dir, views) for split in ("train", "test")]
    _check_writable(runs_dir)
    return splits


def _check_writable(runs_dir):
    runs_dir = Path(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write runs folder {runs_dir}: {exc.strerror}") from None
    if not os.access(runs_dir, os.W_OK | os.X_OK):
        raise UserError(f"cannot write runs folder {runs_dir}: permission denied")


def new_run_dir(runs_dir) -> Path:
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


def run_experiment(key: store.CacheKey, cache_dir, runs_dir, config: HeadConfig, sweep: bool = False,
                   verbose: int = 0, log=print) -> tuple[Path, dict]:
    """Train one head on the cached train split, score it on test, and record the run.

    With `sweep`, the L2 strength is chosen on a validation split first, then the head is
    refit on all training rows with it.
    """
    config.check()
    (train_features, train_info), (test_features, test_info) = _load_splits(key, cache_dir, runs_dir,
                                                                            config.views_needed())
    sweep_table = best_row = None
    if sweep:
        best, sweep_table = sweep_l2(train_features, config)
        best_row = next(row for row in sweep_table if row["l2"] == best)
        for row in sweep_table:
            log(f"l2 {row['l2']:<8g} val accuracy {row['val_accuracy']:.4f}")
        log(f"best l2 {best:g}; refitting on all training rows")
        config = replace(config, l2=best, val_split=0.0)
    trained = train(train_features, test_features, config, verbose=verbose)
    if best_row:
        trained.metrics.update(sweep=sweep_table, val_accuracy=best_row["val_accuracy"],
                               val_loss=best_row["val_loss"])
    return record_run(runs_dir, key, config, trained, test_features.labels, train_info, test_info), trained.metrics


def parse_grid(specs) -> list[dict]:
    """`["hidden=0,1024", "lr=1e-3,1e-2"]` -> every combination as HeadConfig overrides, in order."""
    defaults, axes = HeadConfig(), {}
    for spec in specs:
        name, _, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if name not in defaults.to_dict() or not values:
            raise UserError(f"--grid takes NAME=V1,V2,... with NAME one of {', '.join(defaults.to_dict())}; got {spec!r}")
        kind = type(getattr(defaults, name))
        try:
            axes[name] = [_parse_value(kind, v.strip()) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--grid {name}: {values!r} are not {kind.__name__} values") from None
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _parse_value(kind, text: str):
    if kind is bool:
        if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "yes", "1")
    if kind is int:
        number = float(text)
        if not number.is_integer():
            raise ValueError(text)
        return int(number)
    return kind(text)


def run_grid(key: store.CacheKey, cache_dir, runs_dir, config: HeadConfig, grid: list[dict],
             log=print) -> list[dict]:
    """Every combination of `grid` over `config`, with the features loaded (and TensorFlow imported)
    once; each is recorded as its own run. Returns rows sorted by validation accuracy."""
    configs = [replace(config, **overrides) for overrides in grid]
    for one in configs:
        one.check()
    views = ("plain", "flip") if any(one.views_needed() == ("plain", "flip") for one in configs) else ("plain",)
    (train_features, train_info), (test_features, test_info) = _load_splits(key, cache_dir, runs_dir, views)
    rows, data = [], None
    for overrides, one in zip(grid, configs):
        data = training_data(train_features, one, reuse=data)  # shared by runs with the same split and flips
        trained = train(train_features, test_features, one, data=data)
        run_dir = record_run(runs_dir, key, one, trained, test_features.labels, train_info, test_info)
        rows.append({**overrides, "val_acc": trained.metrics.get("val_accuracy"),
                     "test_acc": trained.metrics["test_accuracy"], "fit_s": trained.metrics["fit_seconds"],
                     "run": run_dir.name})
        log(f"{len(rows)}/{len(grid)} " + "  ".join(f"{k}={v}" for k, v in overrides.items()) +
            f"  test accuracy {trained.metrics['test_accuracy']:.4f}")
    return sorted(rows, key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0), -r["test_acc"]))


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as aligned columns (the grid's result, the ledger)."""
    columns = list(rows[0])
    table = [columns] + [[_cell(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table)


def _cell(column, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column.endswith("_acc"):
        return f"{value:.4f}"
    if column == "fit_s":
        return f"{value:.1f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def record_run(runs_dir, key: store.CacheKey, config: HeadConfig, trained, test_labels: np.ndarray,
               train_info: dict, test_info: dict) -> Path:
    """Write one run folder: config, history, head.keras, test probabilities, plots, then metrics."""
    run_dir = new_run_dir(runs_dir)
    record = {"head": config.to_dict(), "cache": {**key.attrs("")}, "train_cache": train_info,
              "test_cache": test_info, "class_names": list(trained.class_names)}
    record["cache"].pop("split")
    _write_json(run_dir / "config.json", record)
    _write_json(run_dir / "history.json", trained.history)
    trained.model.save(run_dir / "head.keras")
    np.save(run_dir / "test_probs.npy", trained.test_probs.astype(np.float32))
    plots.plot_history(trained.history, run_dir / "curves.png", title=f"run {run_dir.name}")
    plots.plot_confusion(test_labels, trained.test_probs.argmax(1), trained.class_names, run_dir / "confusion.png",
                         title=f"run {run_dir.name}: test accuracy {trained.metrics['test_accuracy']:.4f}")
    _write_json(run_dir / "metrics.json", trained.metrics)  # last: a run is listed only once it is whole
    return run_dir


LEDGER_COLUMNS = ("run", "val_acc", "test_acc", "fit_s", "epochs", "hidden", "l2", "lr", "flip", "tta", "cache")


def ledger(runs_dir, warn=lambda message: print(message, file=sys.stderr)) -> list[dict]:
    """One row per recorded run, best validation accuracy first (runs without one last).

    A run folder whose record is unreadable or incomplete is skipped with one warning line;
    a run with non-finite metrics (recorded by an older version) is skipped silently.
    """
    rows = []
    for metrics_path in sorted(Path(runs_dir).glob("*/metrics.json")):
        run_dir = metrics_path.parent
        try:
            metrics = json.loads(metrics_path.read_text())
            config = json.loads((run_dir / "config.json").read_text())
            head, cache = config["head"], config["cache"]
            key = store.CacheKey.from_attrs(cache)
            row = {"run": run_dir.name, "val_acc": metrics.get("val_accuracy"),
                   "test_acc": metrics.get("test_accuracy"), "fit_s": metrics.get("fit_seconds"),
                   "epochs": head["epochs"], "hidden": head["hidden"], "l2": head["l2"], "lr": head["lr"],
                   "flip": head["flip_train"], "tta": head["tta"], "cache": key.settings_name(), "key": key}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warn(f"warning: skipping run {run_dir.name}: its record is damaged or half-written "
                 f"({type(exc).__name__}: {str(exc)[:80]})")
            continue
        if _finite_metrics(metrics):  # a diverged run (recorded by an older version) is never a candidate
            rows.append(row)
    return sorted(rows, key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0), -(r["test_acc"] or 0)))


def _finite_metrics(metrics: dict) -> bool:
    values = [metrics.get(k) for k in ("test_accuracy", "test_loss", "val_accuracy", "val_loss")]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values if v is not None)


def format_ledger(rows: list[dict]) -> str:
    return format_table([{c: r[c] for c in LEDGER_COLUMNS} for r in rows])


def _write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
