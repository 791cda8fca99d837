#!/usr/bin/env python
"""Stage 2 speed: the default head's fit on the full default caches, median of several runs.

The features are loaded once; each run is `head.train` with the given settings, as
train_head.py calls it. Prints fit seconds per run, their median and the test accuracy.

    python bench/head_speed.py [--runs 5] [--epochs 5] [--hidden 0] [--precision f32]
"""

import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.command()
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--cache-dir", default=str(ROOT / "cache"), show_default=True)
@click.option("--precision", default="f32", show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--hidden", type=int, default=0, show_default=True)
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--lr", type=float, default=None, help="Default: HeadConfig's.")
@click.option("--batch-size", type=int, default=None, help="Default: HeadConfig's.")
@click.option("--l2", type=float, default=None, help="Default: HeadConfig's.")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
def main(runs, cache_dir, precision, epochs, hidden, dropout, lr, batch_size, l2, label_smoothing):
    from bench.extract_speed import cpu_flags, cpu_name
    from featcache.head import HeadConfig, train
    from featcache.runs import load_features
    from featcache.selection import default_key

    settings = dict(epochs=epochs, hidden=hidden, dropout=dropout, label_smoothing=label_smoothing)
    settings.update({k: v for k, v in (("lr", lr), ("batch_size", batch_size), ("l2", l2)) if v is not None})
    config = HeadConfig(**settings)
    key = replace(default_key(), precision=precision)
    train_features, _ = load_features(key, "train", cache_dir, config.views_needed())
    test_features, _ = load_features(key, "test", cache_dir, config.views_needed())
    fits, accuracies = [], []
    for _ in range(runs):
        metrics = train(train_features, test_features, config).metrics
        fits.append(metrics["fit_seconds"])
        accuracies.append(metrics["test_accuracy"])
        print(f"fit {metrics['fit_seconds']:.2f} s  test accuracy {metrics['test_accuracy']:.4f}", flush=True)
    print(f"CPU: {cpu_name()} ({cpu_flags()}); {settings}: median fit {statistics.median(fits):.2f} s over "
          f"{runs} runs, test accuracy {statistics.median(accuracies):.4f}")


if __name__ == "__main__":
    main()
