#!/usr/bin/env python
"""Stage 2 memory with inner-layer features: the process's peak resident memory once a split's features are loaded,
once they are joined side by side (head.rows.side_by_side, the head's input per view), and once the shuffled training
rows are made (head.rows.training_rows), against the bytes of the joined features. Synthetic rows stand for a cache
read into memory (cache.read.load_features), so no cache or model is needed.

    python bench/features_memory.py [--rows 50000] [--dims 1280,2304,320] [--views 2]

`--dims`: values per row of each feature, the first the network's output ("final"), the others inner layers
(MobileNetV2's block_13_expand_relu@2x2 and block_16_project_BN by default).
"""

import resource
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from featcache.cache.read import Features  # noqa: E402
from featcache.head.rows import side_by_side, training_rows  # noqa: E402
from featcache.memory import fresh_array  # noqa: E402
from featcache.settings import FINAL_FEATURE, VIEWS  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


@click.command()
@click.option("--rows", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option("--dims", default="1280,2304,320", show_default=True)
@click.option("--views", type=click.IntRange(min=1, max=len(VIEWS)), default=2, show_default=True)
def main(rows, dims, views):
    dims = [int(d) for d in dims.split(",")]
    views = VIEWS[:views]
    names = (FINAL_FEATURE,) + tuple(f"layer_{i}" for i in range(1, len(dims)))

    def filled(dim):
        array = fresh_array((rows, dim), np.float32)
        array[:] = 1.0  # touched, as a read fills it
        return array

    start = peak_gb()
    features = Features({view: filled(dims[0]) for view in views}, np.zeros(rows, np.int64), ("a",),
                        {name: {view: filled(dim) for view in views} for name, dim in zip(names[1:], dims[1:])})
    loaded = peak_gb()
    joined = side_by_side(features, names)
    after_join = peak_gb()
    x, _ = training_rows(joined, views, seed=0)
    data = sum(array.nbytes for array in joined.views.values()) / 1e9
    click.echo(f"{rows} rows x {sum(dims)} values ({'+'.join(map(str, dims))}) x {len(views)} views: "
               f"{data:.2f} GB of features, {x.nbytes / 1e9:.2f} GB of training rows; peak resident memory:")
    click.echo("| stage | peak GB | in features' bytes, above the start |\n| --- | --- | --- |")
    for stage, peak in (("before", start), ("loaded", loaded), ("joined side by side", after_join),
                        ("training rows made", peak_gb())):
        click.echo(f"| {stage} | {peak:.2f} | {(peak - start) / data:.2f} |")


if __name__ == "__main__":
    main()
