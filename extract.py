#!/usr/bin/env python
"""Stage 1: embed a dataset's images with a frozen TF Hub model once, into an HDF5 cache under cache/."""

import functools

import click

from featcache.cache.layout import partial_path
from featcache.cli import (
    COUNT, TEXT, VIEWS_HELP, as_flags, selected, list_caches_lines, one_line_errors, selection_options,
    stopped, verbosity_options,
)
from featcache.errors import UserError, plural
from featcache.extract.extractor import check_engine_options
from featcache.extract.layers import offered_layers
from featcache.extract.pipeline import extract, verify
from featcache.extract.plan import shards_dir
from featcache.extract.runners import LocalRunner
from featcache.process import setup_process
from featcache.settings import (
    DEFAULT_CHUNK_SIZE, DEFAULT_ENGINE, DEFAULT_RUNNER, DEFAULT_SHARD_ITEMS, DEFAULT_VIEWS, ENGINES, RUNNERS,
    SHARDS_PER_WORKER, SPLITS, default_batch_size, parse_views,
)


@click.command()
@click.option("--split", type=click.Choice(SPLITS + ("all",)), default="all", show_default=True)
@selection_options
@click.option("--views", default=DEFAULT_VIEWS, show_default=True,
              help="Views to cache, each as its own dataset; those a complete cache lacks are added to it (its "
                   "other views are kept and not recomputed). " + VIEWS_HELP)
@click.option("--layers", type=TEXT, default=None,
              help="Also cache pooled activations of these inner layers of the network, for every view: "
                   "comma-separated LAYER (averaged over the map) or LAYER@2x2 (each cell of a 2x2 grid averaged); "
                   "those a complete cache lacks are added to it. --list-layers shows the layers.")
@click.option("--list-layers", is_flag=True, help="List the layers the model offers to --layers, with the size of "
              "their maps (height x width x channels) at the image size, and exit.")
@click.option("--chunk-size", type=COUNT, default=None,
              help="Images per committed chunk: a crash costs at most the work on the two chunks in flight. Default: "
                   f"the plan under way's, else {DEFAULT_CHUNK_SIZE}.")
@click.option("--batch-size", type=COUNT, default=None,
              help="Images per forward pass of the frozen network (not train_head.py's rows per training step). "
                   f"Default: {default_batch_size('openvino', False)} (OpenVINO), "
                   f"{default_batch_size('tensorflow', False)} (TensorFlow on a CPU), "
                   f"{default_batch_size('tensorflow', True)} (GPU).")
@click.option("--engine", type=click.Choice(ENGINES), default=DEFAULT_ENGINE, show_default=True,
              help="auto: OpenVINO on a CPU when installed, else TensorFlow.")
@click.option("--runner", type=click.Choice(RUNNERS), default=DEFAULT_RUNNER, show_default=True,
              help="local: this process; ray: Ray workers on a cluster (one per CPU, or per GPU, by default).")
@click.option("--ray-address", type=TEXT, default=None,
              help="With --runner ray: the cluster to join (host:port, or auto for the one running on this machine; "
                   "default: RAY_ADDRESS if set, else a Ray started for this run).")
@click.option("--workers", type=COUNT, default=None,
              help="With --runner ray: how many workers (each loads the model once).")
@click.option("--num-shards", type=COUNT, default=None,
              help="Cut each split into this many shards (item ranges), each built into its own file and joined "
                   "into the cache at the end. Default: the plan under way, else 1 (local) or shards of about "
                   f"{DEFAULT_SHARD_ITEMS:,} images, at least {SHARDS_PER_WORKER} per worker (ray).")
@click.option("--shard-index", type=click.IntRange(min=0), default=None,
              help="With --num-shards: build only this shard (0-based), in this process, no cluster engine (a job "
                   "array's task); then run without both options to join the shards.")
@click.option("--force", is_flag=True, help="Rebuild even if a complete cache exists (a rebuild under way, newer "
              "than the cache, is resumed; older partial and shard files are removed, but not those a running build "
              "holds).")
@click.option("--strict", is_flag=True, help="Stop at the first image file that cannot be decoded (default: skip "
              "it and list it in the summary and the cache).")
@click.option("--verify", is_flag=True, help="Check existing caches against the source data; change nothing.")
@click.option("--list", "list_caches", is_flag=True, help="List the caches in --cache-dir (settings, rows, complete, "
              "partial or damaged, size) with the options that select each, and exit.")
@verbosity_options
@one_line_errors
def main(split, views, layers, list_layers, chunk_size, batch_size, engine, runner, ray_address, workers, num_shards,
         shard_index, force, strict, verify, list_caches, quiet, verbose, **selection):
    """Extract embeddings for one split (or both) into the cache, resuming an interrupted run."""
    setup_process(verbose)
    if list_caches and verify:
        raise click.UsageError("--list shows what the caches' attributes say, --verify reads their data: pass one")
    if list_caches:
        cache_dir = selection["cache_dir"]
        click.echo("\n".join(f"  {line}" for line in list_caches_lines(cache_dir)) or f"no caches in {cache_dir}")
        return
    announce = None if quiet else functools.partial(click.echo, err=True)  # says what the slow first seconds do
    if list_layers:
        return print_layers(*selected(selection, "extract", announce)[:2], announce)
    # the runner before anything slow: Ray missing is one line
    runner = make_runner(runner, ray_address, workers, verbose, announce)
    if not verify:  # before the model may be loaded to learn its input size
        check_engine_options(engine, selection["precision"])
        parse_views(views)
    splits = SPLITS if split == "all" else (split,)
    key, cache_dir, data_dir = selected(selection, "extract", announce, () if verify else splits)
    if verify:
        return verify_caches(key, splits, data_dir, cache_dir)
    with runner:  # its loaded model (or Ray's workers) serves both splits
        for one_split in splits:
            try:
                result = extract(key, one_split, data_dir=data_dir, cache_dir=cache_dir, views=views,
                                 chunk_size=chunk_size, batch_size=batch_size, engine=engine, force=force, strict=strict,
                                 progress=not quiet, log=click.echo, runner=runner, num_shards=num_shards,
                                 shard_index=shard_index, layers=layers)
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (process.py): the committed rows stay
                path = key.path(cache_dir, one_split)
                partial, shards = partial_path(path), shards_dir(path)
                kept = (f"the rows committed so far are kept in {shards if shards.exists() else partial}; rerun the "
                        "same command to resume" if partial.exists() or shards.exists()
                        else f"no {one_split} row was committed")
                raise stopped(exc, kept) from None
            click.echo(result.summary(words=as_flags))


def make_runner(name: str, ray_address=None, workers=None, verbose=False, announce=None):
    """The runner `name` names; Ray's settings mean nothing to the local runner, so they are refused there.
    `announce`: where the local runner says that it loads the model."""
    if name == "local":
        given = [f"`{param}`" for param, value in (("ray_address", ray_address), ("workers", workers))
                 if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to `runner='ray'` only")
        return LocalRunner(announce)
    from featcache.extract.ray_runner import RayRunner

    return RayRunner(address=ray_address, workers=workers, verbose=verbose)


def print_layers(key, cache_dir, announce):
    offered = offered_layers(key.model, key.model_sha256, key.image_size, cache_dir, announce)
    click.echo(f"{len(offered)} layers of {key.model} at {key.image_size} px (--layers NAME: the map averaged, "
               "C values; NAME@2x2: each cell of a 2x2 grid averaged, 4C values), height x width x channels:")
    width = max((len(info.name) for info in offered), default=0)
    for info in offered:
        click.echo(f"  {info.name:{width}}  {info.size}")


def verify_caches(key, splits, data_dir, cache_dir):
    failed = False
    for one_split in splits:
        path, problems = verify(key, one_split, data_dir=data_dir, cache_dir=cache_dir)
        click.echo(f"{one_split}: {path}: " + ("ok" if not problems else plural(len(problems), "problem")))
        for problem in problems:
            click.echo(f"  - {problem}")
        failed |= bool(problems)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
