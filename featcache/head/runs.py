"""Stage 2 end to end: cache -> rows -> fit -> record, for one head, an L2 sweep, or a grid of heads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..cache.read import check_features, load_splits, views_present
from ..errors import in_python
from ..settings import FINAL_FEATURE, SPLITS, HeadConfig, views_union
from .records import check_writable, record_run
from .rows import side_by_side, training_data
from .tensorboard import projector_sample
from .training import TrainedHead, sweep_l2, train


ANNOUNCED_BYTES = 100_000_000  # caches of more than this (both splits) get a line before they are read


def _load_splits(key, cache_dir, configs: list[HeadConfig], log=None, runs_dir=None):
    """Both splits' features (train: every view the configs need; test: their test-time views; all configs have
    the same features, side by side) and cache info, after checking that a run can be recorded in `runs_dir` at all
    (that fails before training; the run folder itself is made only once there is a result). Large caches: `log`
    gets a line before they are read."""
    train_views = views_union(*(config.views_needed() for config in configs))
    test_views = views_union(*(config.tta_view_list for config in configs))
    names = configs[0].feature_list
    paths = [key.path(cache_dir, split) for split in SPLITS]
    size = sum(path.stat().st_size for path in paths if path.is_file())
    if log and size > ANNOUNCED_BYTES:
        log(f"reading the train and test caches in {paths[0].parent} ({size / 1e9:.2f} GB) ...")
    splits = load_splits(key, cache_dir, train_views, test_views, tuple(n for n in names if n != FINAL_FEATURE))
    if runs_dir is not None:
        check_writable(runs_dir)
    return [(side_by_side(features, names), info) for features, info in splits]


def _python_note(line: str):
    print(in_python(line))


def train_unrecorded(key, cache_dir, config: HeadConfig) -> TrainedHead:
    """One head trained on the cached train split and scored on test, recorded nowhere (the API's run_head)."""
    config = config.for_cached_views(views_present(key, cache_dir))
    (train_features, _), (test_features, _) = _load_splits(key, cache_dir, [config])
    return train(train_features, test_features, config)


def run_experiment(key, cache_dir, runs_dir, config: HeadConfig, sweep: bool = False,
                   log=print, projector: int = 0, data_dir=None, note=None) -> tuple[Path, dict]:
    """Train one head on the cached train split, score it on test, and record the run; `log` gets the progress.

    With `sweep`, the L2 strength is chosen on a validation split first, then the head is
    refit on all training rows with it. `projector` > 0 adds a Projector sample of that many test rows
    (projector_sample; `data_dir` is where a CIFAR copy for its thumbnails is; `note` gets a line saying why it has
    none, its parameters marked as errors.py marks them; by default printed as Python spells them).
    """
    config = config.for_cached_views(views_present(key, cache_dir))
    (train_features, train_info), (test_features, test_info) = _load_splits(key, cache_dir, [config], log, runs_dir)
    sample = (projector_sample(key, cache_dir, test_features, config, projector, data_dir, note or _python_note)
              if projector else None)
    sweep_table = best_row = None
    if sweep:
        best, sweep_table = sweep_l2(train_features, config, log=log)
        best_row = next(row for row in sweep_table if row["l2"] == best)
        log(f"best l2 {best:g}; refitting on all training rows")
        config = replace(config, l2=best, val_split=0.0)
    trained = train(train_features, test_features, config, log=log)
    if best_row:
        trained.metrics.update(sweep=sweep_table, val_accuracy=best_row["val_accuracy"],
                               val_loss=best_row["val_loss"])
    return (record_run(runs_dir, key, config, trained, test_features.labels, train_info, test_info, sample),
            trained.metrics)


def run_grid(key, cache_dir, runs_dir, config: HeadConfig, grid: list[dict], log=print, projector: int = 0,
             data_dir=None, note=None) -> list[dict]:
    """Every combination of `grid` (HeadConfig overrides) over `config`, with the cached vectors loaded once per
    feature list (TensorFlow imported once); each is recorded as its own run (with a Projector sample of the same
    test rows when `projector`).
    Returns rows by validation accuracy (with a validation split), else in the grid's order."""
    present = views_present(key, cache_dir)
    configs = [replace(config, **overrides).for_cached_views(present) for overrides in grid]
    # The runs go by feature list, the features of one list loaded at a time (each list's columns side by side).
    groups: dict[tuple, list[int]] = {}
    for index, one in enumerate(configs):
        groups.setdefault(one.feature_list, []).append(index)
    check_features(key, cache_dir, tuple(dict.fromkeys(name for names in groups for name in names
                                                       if name != FINAL_FEATURE)))  # before any run
    rows = {}
    for indices in groups.values():
        train_features = test_features = data = None  # the last list's rows freed before the next are read
        (train_features, train_info), (test_features, test_info) = _load_splits(
            key, cache_dir, [configs[i] for i in indices], log, runs_dir)
        # the same sample rows for every run, as each run's head sees them
        sample = (projector_sample(key, cache_dir, test_features, configs[0], projector, data_dir,
                                   note or _python_note) if projector else None)
        for index in indices:
            one, overrides = configs[index], grid[index]
            data = training_data(train_features, one, reuse=data)  # shared by runs with the same split and views
            prefix = f"run {len(rows) + 1}/{len(grid)}: "
            trained = train(train_features, test_features, one, log=lambda line: log(prefix + line), data=data)
            run_dir = record_run(runs_dir, key, one, trained, test_features.labels, train_info, test_info, sample)
            rows[index] = {**overrides, "val_acc": trained.metrics.get("val_accuracy"),
                           "test_acc": trained.metrics["test_accuracy"], "fit_s": trained.metrics["fit_seconds"],
                           "run": run_dir.name}
            log(f"{len(rows)}/{len(grid)} " + "  ".join(f"{k}={v}" for k, v in overrides.items()) +
                f"  test accuracy {trained.metrics['test_accuracy']:.4f}")
    rows = [rows[index] for index in range(len(grid))]
    if any(row["val_acc"] is None for row in rows):
        return rows  # without a validation split, in the grid's order: choosing by test accuracy would leak test data
    return sorted(rows, key=lambda row: -row["val_acc"])
