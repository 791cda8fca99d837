#!/usr/bin/env python
"""Stage 2 speed: a head's fit on the full default caches, each run in a fresh process (as
train_head.py fits once per process), alternating between checkouts for a before/after.

Each run imports TensorFlow and loads the features, then times `head.train` as train_head.py calls
it. Prints fit seconds, train() seconds (fit + data preparation + test predictions) and accuracies
per run, and the medians per checkout.

    python bench/head_speed.py [--runs 5] [--setting NAME=VALUE ...] [--precision f32] [--checkout /path/to/old/clone]
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, os, sys, time
sys.path.insert(0, os.environ["HEAD_SPEED_ROOT"])
from dataclasses import replace
import tensorflow  # imported before the clock starts, as train_head.py has by then
from featcache.head.training import train
from featcache.settings import HeadConfig
from featcache.cache.read import load_features
from featcache.cache.layout import CacheKey
config = HeadConfig(**json.loads(sys.argv[1]))
key = replace(CacheKey(), precision=sys.argv[3])
train_features, _ = load_features(key, "train", sys.argv[2], config.views_needed())
test_features, _ = load_features(key, "test", sys.argv[2], config.views_needed())
started = time.perf_counter()
metrics = train(train_features, test_features, config).metrics
metrics["train_seconds"] = time.perf_counter() - started
print(json.dumps(metrics))
"""


def one_run(checkout: Path, settings: dict, cache_dir: str, precision: str) -> dict:
    env = {**os.environ, "HEAD_SPEED_ROOT": str(checkout), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), cache_dir, precision],
                          env=env, capture_output=True, text=True, cwd=checkout)
    if done.returncode:
        raise click.ClickException(f"run in {checkout} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--checkout", "checkouts", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Other clones to time too (e.g. a worktree of the previous commit); runs alternate.")
@click.option("--cache-dir", default=str(ROOT / "cache"), show_default=True)
@click.option("--precision", default="f32", show_default=True)
@click.option("--setting", "settings", multiple=True, metavar="NAME=VALUE",
              help="HeadConfig field, e.g. --setting hidden=2048 --setting epochs=15 (repeatable).")
def main(runs, checkouts, cache_dir, precision, settings):
    from featcache import cpu
    from featcache.cli import parse_grid

    overrides = parse_grid(settings)[0]  # NAME=VALUE parsed and typed as train_head.py --grid does
    roots = [ROOT, *map(Path, checkouts)]
    results: dict[Path, list[dict]] = {root: [] for root in roots}
    for _ in range(runs):
        for root in roots:
            metrics = one_run(root, overrides, cache_dir, precision)
            results[root].append(metrics)
            print(f"{root}: fit {metrics['fit_seconds']:.2f} s  train() {metrics['train_seconds']:.2f} s  "
                  f"test {metrics['test_accuracy']:.4f}  val {metrics.get('val_accuracy', float('nan')):.4f}  "
                  f"{metrics.get('compute', 'f32')}", flush=True)
    print(f"CPU: {cpu.name()} ({cpu.noted_flags()}); settings {overrides or 'defaults'}; medians of {runs} runs:")
    for root, rows in results.items():
        fits = [m["fit_seconds"] for m in rows]
        print(f"  {root}: fit {statistics.median(fits):.2f} s ({' / '.join(f'{f:.2f}' for f in fits)}), "
              f"train() {statistics.median(m['train_seconds'] for m in rows):.2f} s, "
              f"test accuracy {statistics.median(m['test_accuracy'] for m in rows):.4f}")


if __name__ == "__main__":
    main()
