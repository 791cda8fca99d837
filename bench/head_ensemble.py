#!/usr/bin/env python
"""Stage 2: do several heads, their probabilities averaged, beat one head on the validation split?

Each `--member` is one head (HeadConfig fields as NAME=VALUE, space-separated; `+` joins features or views, as in
`train_head.py --grid`), trained on the same images: the validation images are held out once, by `--split-seed`
exactly as `train_head.py --val-split F --seed S` holds them out, while each member's own `seed` sets only its
initialisers and row order. So a member with `seed` equal to `--split-seed` is the run train_head.py makes, and no
member ever trains on a validation image. With `--folds K` every image is validated once instead (K heads a
member, each trained on the other folds): for small caches, where one split is too noisy to compare on.

Prints each member's and each `--ensemble`'s validation accuracy and loss, and how many validation images the
ensemble gets right that member 0 gets wrong and the reverse (a paired comparison). Test accuracy is printed
only for the ensembles named by `--test`: choose on validation first. `--probs FILE` keeps every member's
probabilities, so that `--test` on a later call reads them instead of training again.

    python bench/head_ensemble.py --cache-dir cache --val-split 0.1 --member "epochs=10 seed=0" \
        --member "epochs=10 seed=1" --ensemble 0+1 [--test 0+1] [--probs ens.npz]
    python bench/head_ensemble.py --limit 10000 --image-size 320 --folds 5 --member "features=final+block_16_add"
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcache.errors import UserError  # noqa: E402


def parse_member(spec: str) -> dict:
    """'features=final+block_16_add l2=0.006 seed=1' -> HeadConfig overrides (one value each)."""
    from featcache.cli import parse_grid

    combos = parse_grid(spec.split())
    if len(combos) != 1:
        raise click.BadParameter(f"{spec!r}: one value per NAME (join features or views with +)",
                                 param_hint="--member")
    if {"val_split"} & set(combos[0]):
        raise click.BadParameter(f"{spec!r}: the split is the script's (--val-split, --folds, --split-seed)",
                                 param_hint="--member")
    return combos[0]


def parse_ensemble(spec: str, members: int) -> tuple[int, ...]:
    try:
        chosen = tuple(int(i) for i in spec.split("+"))
    except ValueError:
        raise click.BadParameter(f"{spec!r}: member numbers joined by +, e.g. 0+1+2", param_hint="--ensemble")
    if not chosen or any(not 0 <= i < members for i in chosen) or len(set(chosen)) != len(chosen):
        raise click.BadParameter(f"{spec!r}: distinct member numbers 0-{members - 1}", param_hint="--ensemble")
    return chosen


def held_out(n: int, val_split: float, folds: int, split_seed: int) -> list[np.ndarray]:
    """The validation images of each fit: one split as train_head.py makes it, or K folds covering every image."""
    order = np.random.default_rng(split_seed).permutation(n)
    if folds:
        return [np.sort(part) for part in np.array_split(order, folds)]
    return [np.sort(order[: int(round(n * val_split))])]


def columns(rows: dict, union: tuple[str, ...], widths: dict, names: tuple[str, ...]) -> dict:
    """A member's input rows: its features' columns of the rows holding every member's features (`union` order);
    a view (no copy) when they are contiguous there in the member's order."""
    starts = dict(zip(union, np.cumsum([0] + [widths[f] for f in union[:-1]])))
    spans = [(starts[f], starts[f] + widths[f]) for f in names]
    if all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return {view: x[:, spans[0][0] : spans[-1][1]] for view, x in rows.items()}
    return {view: np.concatenate([x[:, a:b] for a, b in spans], 1) for view, x in rows.items()}


def fit_member(config, train, test, folds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Validation probabilities of every held-out image (each from the head that did not see it), the test
    probabilities of the head of the first split (None without test rows), and the seconds fitting took."""
    from featcache.cache.read import Features
    from featcache.head.rows import TrainingData, column_stats, training_rows
    from featcache.head.training import predict, train as train_head

    n = len(train.labels)
    val_probs, test_probs, seconds = np.zeros((n, len(train.class_names)), np.float32), None, 0.0
    for held in folds:
        images = np.setdiff1d(np.arange(n), held)
        val = Features({v: x[held] for v, x in train.views.items()}, train.labels[held], train.class_names)
        x, y = training_rows(train, config.train_view_list, config.seed, images)
        mean, variance = column_stats(x)
        data = TrainingData(train, TrainingData.settings_of(config), x, y, mean, variance + 1e-6, len(images), val)
        head = train_head(train, test if test_probs is None else None, config, data=data)
        seconds += head.fit_seconds
        val_probs[held] = predict(head.model, val, config.tta_view_list)
        if test_probs is None and test is not None:
            test_probs = head.test_probs
        del data, x, head
    return val_probs, test_probs, seconds


def score(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    right = probs[np.arange(len(labels)), labels]
    return float(np.mean(probs.argmax(1) == labels)), float(-np.mean(np.log(np.clip(right, 1e-7, 1.0))))


@click.command()
@click.option("--cache-dir", default=str(ROOT / "cache"), show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="The cache made with this limit.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="The cache of this image size.")
@click.option("--member", "members", multiple=True, required=True,
              help="One head: HeadConfig fields NAME=VALUE, space-separated (repeat for each member).")
@click.option("--ensemble", "ensembles", multiple=True,
              help="Members averaged, numbers joined by + (default: all of them).")
@click.option("--val-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True)
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="Validate every image once, in this many folds (train split only; no test).")
@click.option("--split-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the held-out images (train_head.py's --seed with --val-split).")
@click.option("--test", "tests", multiple=True, help="An ensemble (as --ensemble) whose test accuracy to print.")
@click.option("--probs", type=click.Path(dir_okay=False), default=None,
              help="Keep the members' probabilities in this .npz; read them from it when it exists.")
def main(cache_dir, limit, image_size, members, ensembles, val_split, folds, split_seed, tests, probs):
    from featcache import cpu
    from featcache.cache.read import Features, load_features, views_present
    from featcache.head.rows import side_by_side
    from featcache.selection import select_cached
    from featcache.settings import FINAL_FEATURE, HeadConfig

    try:
        key = select_cached(cache_dir, limit=limit, image_size=image_size)
        cached = views_present(key, cache_dir)
        configs = [replace(HeadConfig(**parse_member(m)), val_split=1 / folds if folds else val_split)
                   .for_cached_views(cached) for m in members]
        for config in configs:
            config.check()
    except UserError as exc:
        raise click.UsageError(str(exc)) from None
    chosen = [parse_ensemble(e, len(configs)) for e in ensembles] or [tuple(range(len(configs)))]
    test_sets = [parse_ensemble(e, len(configs)) for e in tests]
    if folds and test_sets:
        raise click.UsageError("--test needs one split (--val-split), not --folds")
    union = tuple(dict.fromkeys(f for c in configs for f in c.feature_list))
    views = tuple(dict.fromkeys(v for c in configs for v in c.train_view_list + c.tta_view_list))
    inner = tuple(f for f in union if f != FINAL_FEATURE)
    record = {"members": np.array(members), "split": np.array([val_split, folds or 0, split_seed])}

    saved = dict(np.load(probs)) if probs and Path(probs).exists() else None
    if saved is not None:
        if list(saved["members"]) != list(members) or list(saved["split"]) != list(record["split"]):
            raise click.UsageError(f"{probs} holds other members or another split; name a new --probs file")
        val_probs = [saved[f"val{i}"] for i in range(len(configs))]
        test_probs = [saved.get(f"test{i}") for i in range(len(configs))]
        labels, test_labels, seconds = saved["labels"], saved.get("test_labels"), list(saved["seconds"])
        held = np.concatenate(held_out(len(labels), val_split, folds or 0, split_seed))
    else:
        try:
            train, _ = load_features(key, "train", cache_dir, views, inner)
            test = None
            if not folds and key.path(cache_dir, "test").exists():
                test, _ = load_features(key, "test", cache_dir, views, inner)
        except UserError as exc:
            raise click.UsageError(str(exc)) from None
        widths = {f: (train.views if f == FINAL_FEATURE else train.inner[f])[views[0]].shape[1] for f in union}
        labels, test_labels = train.labels, None if test is None else test.labels
        train = side_by_side(train, union)
        test = None if test is None else side_by_side(test, union)
        folds_held = held_out(len(labels), val_split, folds or 0, split_seed)
        held = np.concatenate(folds_held)
        val_probs, test_probs, seconds = [], [], []
        for i, config in enumerate(configs):
            names = config.feature_list
            member_train = Features(columns(train.views, union, widths, names), labels, train.class_names)
            member_test = None if test is None else Features(columns(test.views, union, widths, names),
                                                             test_labels, test.class_names)
            v, t, s = fit_member(config, member_train, member_test, folds_held)
            val_probs.append(v), test_probs.append(t), seconds.append(s)
            print(f"member {i} ({members[i]}): val {score(v[held], labels[held])[0]:.4f}, fit {s:.1f} s",
                  flush=True)
        if probs:
            extra = {"test_labels": test_labels} if test_labels is not None else {}
            np.savez(probs, **record, labels=labels, seconds=np.array(seconds), **extra,
                     **{f"val{i}": v for i, v in enumerate(val_probs)},
                     **{f"test{i}": t for i, t in enumerate(test_probs) if t is not None})

    y = labels[held]
    reference = val_probs[0][held].argmax(1) == y
    where = (f"{folds} folds covering all {len(y):,} train images" if folds else
             f"{len(y):,} validation images (--val-split {val_split:g}, --split-seed {split_seed})")
    print(f"CPU: {cpu.name()} ({cpu.noted_flags()}); cache {key.path(cache_dir, 'train')}; {where}")
    print("| heads | val accuracy | val loss | right where member 0 is wrong / the reverse | fit s | test accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [((i,), f"member {i}: {members[i]}") for i in range(len(configs))]
    rows += [(e, "mean of " + "+".join(map(str, e))) for e in chosen]
    for numbers, name in rows:
        mean = np.mean([val_probs[i] for i in numbers], 0)
        accuracy, loss = score(mean[held], y)
        right = mean[held].argmax(1) == y
        test_cell = "-"
        if numbers in test_sets:
            if any(test_probs[i] is None for i in numbers):
                test_cell = "no test cache"
            else:
                test_cell = f"{score(np.mean([test_probs[i] for i in numbers], 0), test_labels)[0]:.4f}"
        print(f"| {name} | {accuracy:.4f} | {loss:.4f} | {int(np.sum(right & ~reference))} / "
              f"{int(np.sum(~right & reference))} | {sum(seconds[i] for i in numbers):.1f} | {test_cell} |")


if __name__ == "__main__":
    main()
