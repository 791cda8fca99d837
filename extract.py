#!/usr/bin/env python
"""Stage 1: embed CIFAR-10 with a frozen TF Hub model once, into an HDF5 cache under cache/."""

import click

from featcache.cli import one_line_errors, selection_options
from featcache.data import DATA_DIR_ENV, SPLITS
from featcache.extractor import ENGINES
from featcache.pipeline import extract
from featcache.store import CacheKey


@click.command()
@click.option("--split", type=click.Choice(SPLITS + ("all",)), default="all", show_default=True)
@click.option("--data-dir", type=click.Path(), default=None,
              help=f"Local CIFAR-10: the cifar-10-batches-py folder, its parent, or the .tar.gz "
                   f"(also ${DATA_DIR_ENV}). Default: the official download, cached like Keras does.")
@selection_options
@click.option("--chunk-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Images per committed chunk (what a crash can cost at most).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass.")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="auto: OpenVINO on a CPU when installed, else TensorFlow.")
@click.option("--force", is_flag=True, help="Rebuild even if a complete cache exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def main(split, data_dir, cache_dir, model, image_size, resize, views, limit, chunk_size, batch_size,
         engine, force, quiet):
    """Extract embeddings for one split (or both) into the cache, resuming an interrupted run."""
    key = CacheKey.make(model, image_size, resize, views, limit)
    for one_split in SPLITS if split == "all" else (split,):
        result = extract(key, one_split, data_dir=data_dir, cache_dir=cache_dir, chunk_size=chunk_size,
                         batch_size=batch_size, engine=engine, force=force, progress=not quiet, log=click.echo)
        click.echo(result.summary())


if __name__ == "__main__":
    main()
