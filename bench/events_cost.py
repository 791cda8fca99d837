#!/usr/bin/env python
"""The cost of a run's TensorBoard events: what writing them (featcache/head/tensorboard.py) adds to recording a run,
each repeat in a fresh process as train_head.py records once per process.

A repeat loads the caches, fits a head as train_head.py does, then records two runs (the second as a --grid's later
runs are recorded), timing the event writing (the experiment config, curves, scalars, hparams and images) inside
each record. Prints the medians beside the fit and the whole record.

    python bench/events_cost.py [--repeats 5] [--cache-dir cache] [--limit N] [--setting NAME=VALUE ...]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, os, sys, time
sys.path.insert(0, os.environ["EVENTS_COST_ROOT"])
import tensorflow  # imported before any clock starts, as train_head.py has by then
from featcache.head import records, tensorboard
from featcache.head.training import train
from featcache.cache.read import load_splits, views_present
from featcache.selection import select_cached
from featcache.settings import HeadConfig
settings, cache_dir, limit, runs = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]) or None, sys.argv[4]
key = select_cached(cache_dir, limit=limit)
config = HeadConfig(**settings).for_cached_views(views_present(key, cache_dir))
(train_features, train_info), (test_features, test_info) = load_splits(key, cache_dir, config.views_needed(),
                                                                       config.tta_view_list)
trained = train(train_features, test_features, config)
spent = []
for name in ("write_experiment", "write_run"):
    original = getattr(tensorboard, name)
    def timed(*args, original=original, **kwargs):
        started = time.perf_counter()
        original(*args, **kwargs)
        spent[-1] += time.perf_counter() - started
    setattr(tensorboard, name, timed)
out = []
for _ in range(2):
    spent.append(0.0)
    started = time.perf_counter()
    records.record_run(runs, key, config, trained, test_features.labels, train_info, test_info)
    out.append({"record": time.perf_counter() - started, "events": spent[-1]})
print(json.dumps({"fit": trained.metrics["fit_seconds"], "epochs": len(trained.history["loss"]), "runs": out}))
"""


@click.command()
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--cache-dir", default=str(ROOT / "cache"), show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True,
              help="The cache's --limit (0: the full caches).")
@click.option("--setting", "settings", multiple=True, metavar="NAME=VALUE",
              help="HeadConfig field, e.g. --setting val_split=0.1 (repeatable).")
def main(repeats, cache_dir, limit, settings):
    """Seconds of event writing per recorded run, median of fresh processes."""
    from featcache.cli import parse_grid

    (overrides,) = parse_grid(settings) if settings else [{}]
    results = []
    env = {**os.environ, "EVENTS_COST_ROOT": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as runs:
            done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides), cache_dir, str(limit), runs],
                                  env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise click.ClickException(f"a repeat failed: {done.stderr.strip().splitlines()[-1]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = statistics.median
    click.echo(f"{repeats} fresh processes, {results[0]['epochs']} epochs, settings {overrides or 'default'}; medians:")
    click.echo("| record | events s | whole record s | fit s |")
    click.echo("| --- | --- | --- | --- |")
    for i, label in enumerate(("first in its process (train_head.py)", "second (a --grid's later runs)")):
        click.echo(f"| {label} | {median(r['runs'][i]['events'] for r in results):.3f} | "
                   f"{median(r['runs'][i]['record'] for r in results):.3f} | {median(r['fit'] for r in results):.3f} |")


if __name__ == "__main__":
    main()
