#!/usr/bin/env python
"""Stage 2: train a softmax head on cached embeddings, report test accuracy, record the run."""

import time

import click
from click.core import ParameterSource

from featcache.cache.read import views_present
from featcache.cli import (
    RUNS_DIR, TEXT, VIEWS_HELP, as_flags, cache_remedy, format_table, one_line_errors, parse_grid,
    selected, selection_options, stopped, trainable, verbosity_options,
)
from featcache.errors import UserError, plural
from featcache.head.records import LEDGER_COLUMNS, ledger
from featcache.head.runs import run_experiment, run_grid
from featcache.head.tensorboard import backfill
from featcache.process import setup_process
from featcache.selection import changed_since_cached
from featcache.settings import (
    COMPUTES, DEFAULT_VIEWS, MAX_BATCH_SIZE, MAX_PROJECTOR_POINTS, MIN_STEPS_PER_EPOCH, SCHEDULES,
    SOLVERS, HeadConfig,
)

DEFAULTS = HeadConfig()


@click.command()
@selection_options
@click.option("--epochs", type=int, default=DEFAULTS.epochs, show_default=True)
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True, help="Peak Adam learning rate.")
@click.option("--batch-size", type=int, default=None,
              help="Cached rows per training step of the head (not extract.py's images per forward pass). Default: "
                   f"{MAX_BATCH_SIZE}, or fewer on small datasets so that an epoch has at least {MIN_STEPS_PER_EPOCH} "
                   f"steps (rows / {MIN_STEPS_PER_EPOCH}).")
@click.option("--l2", type=float, default=DEFAULTS.l2, show_default=True, help="L2 weight penalty.")
@click.option("--label-smoothing", type=float, default=DEFAULTS.label_smoothing, show_default=True)
@click.option("--hidden", type=click.IntRange(min=0), default=DEFAULTS.hidden, show_default=True,
              help="Units of an optional hidden ReLU layer (0: linear head).")
@click.option("--dropout", type=float, default=DEFAULTS.dropout, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=DEFAULTS.schedule, show_default=True)
@click.option("--train-views", default=None,
              help=f"Cached views whose rows train the head (one row per image and view) [default: {DEFAULT_VIEWS}, "
                   "those of them the caches hold]. " + VIEWS_HELP)
@click.option("--tta-views", default=None,
              help="Cached views whose predictions are averaged at test time (and by predict.py and export.py) "
                   f"[default: {DEFAULT_VIEWS}, those of them the caches hold].")
@click.option("--features", type=TEXT, default=DEFAULTS.features, show_default=True,
              help="Cached features feeding the head, comma-separated, concatenated in this order, each column "
                   "standardised on the training rows: final (the network's output vector) and the inner layers "
                   "extract.py --layers adds (LAYER, or LAYER@2x2 for its 2x2 cells).")
@click.option("--solver", type=click.Choice(SOLVERS), default=DEFAULTS.solver, show_default=True,
              help="adam: --epochs of Adam steps; lbfgs: a linear head fit to convergence on all rows at once "
                   "(full-batch L-BFGS; ignores --epochs, --lr, --batch-size, --schedule).")
@click.option("--val-split", type=float, default=DEFAULTS.val_split, show_default=True,
              help="Fraction of train images held out for validation.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--compute", type=click.Choice(COMPUTES), default=DEFAULTS.compute, show_default=True,
              help="Number format of the first layer's products in training steps. auto: bf16 with a hidden layer "
                   "on a CPU with native bf16 (AVX512-BF16, AMX), else f32. The saved head is f32 either way.")
@RUNS_DIR
@click.option("--sweep", type=click.Choice(["l2"]), default=None,
              help="Choose --l2 on a validation split (--val-split, default 0.2), then refit on all rows.")
@click.option("--grid", multiple=True, metavar="NAME=V1,V2,...",
              help="Run every combination (repeat for more settings, e.g. --grid hidden=0,1024 --grid lr=1e-3,1e-2), "
                   "features loaded once, each recorded; prints a table by validation accuracy.")
@click.option("--projector", type=click.IntRange(min=1, max=MAX_PROJECTOR_POINTS), default=None, metavar="N",
              help="Also record a TensorBoard Projector sample of N test embeddings (seeded) with their true and "
                   "predicted classes, and thumbnails where the images can be read (CIFAR: --data-dir or "
                   "$CIFAR10_DATA_DIR; folders: the files).")
@click.option("--list", "list_runs", is_flag=True, help="Print the table of recorded runs and exit.")
@click.option("--backfill-events", is_flag=True,
              help="Write TensorBoard event files for the recorded runs that have none (runs recorded before "
                   "featcache wrote them) and exit.")
@verbosity_options
@one_line_errors
def main(runs_dir, sweep, grid, projector, list_runs, backfill_events, quiet, verbose, **options):
    """Train a softmax head on the cached train split and evaluate it on the cached test split."""
    setup_process(verbose)
    if list_runs or backfill_events:
        rows = ledger(runs_dir)
        if not rows:
            click.echo(f"no runs recorded in {runs_dir}")
        elif list_runs:
            click.echo(format_table([{c: r[c] for c in LEDGER_COLUMNS} for r in rows]))
        else:
            written = backfill(runs_dir, rows, warn=lambda message: click.echo(message, err=True))
            had = f" ({len(rows) - len(written)} had them)" if len(written) < len(rows) else ""
            click.echo(f"TensorBoard events written for {len(written)} of {plural(len(rows), 'run')}{had}; "
                       f"view them with: tensorboard --logdir {runs_dir}")
        return
    started = time.perf_counter()
    if grid and sweep:
        raise UserError("--sweep l2 is a grid of its own; use one of --sweep and --grid")
    combinations = parse_grid(grid) if grid else []  # a bad value refused before the cache is looked for
    key, cache_dir, data_dir = selected(options, "head")  # takes the selection options out; the head's remain
    for changed in changed_since_cached(key, cache_dir):
        click.echo(f"warning: {cache_remedy(changed)}", err=True)
    config = HeadConfig(**options)
    config.check()
    served = config.for_cached_views(views_present(key, cache_dir))
    if served.train_view_list != config.train_view_list or served.tta_view_list != config.tta_view_list:
        lacking = [view for view in config.views_needed() if view not in served.views_needed()]
        click.echo(f"note: the caches hold no {', '.join(lacking)} view, so the head trains on and averages "
                   f"{served.train_views}", err=True)
    config = served
    if config.solver == "lbfgs":
        source = click.get_current_context().get_parameter_source
        ignored = [f"--{n.replace('_', '-')}" for n in ("epochs", "lr", "batch_size", "schedule")
                   if source(n) == ParameterSource.COMMANDLINE]
        if ignored:
            click.echo(f"note: --solver lbfgs fits to convergence on all rows at once; {', '.join(ignored)} "
                       f"{'is' if len(ignored) == 1 else 'are'} not used", err=True)
    log = (lambda _: None) if quiet else click.echo
    note = lambda message: click.echo(as_flags(message), err=True)  # noqa: E731
    tensorboard = dict(projector=projector or 0, data_dir=data_dir, note=note)
    try:
        if grid:
            combinations, note_skipped = trainable(config, combinations)
            if note_skipped:
                click.echo(note_skipped, err=True)
            rows = run_grid(key, cache_dir, runs_dir, config, combinations, log=log, **tensorboard)
        else:
            run_dir, metrics = run_experiment(key, cache_dir, runs_dir, config, sweep=sweep == "l2", log=log,
                                              **tensorboard)
    except KeyboardInterrupt as exc:
        raise stopped(exc, "the run in progress was not recorded" + (" (those finished before it were)" if grid
                                                                       else "")) from None
    if grid:
        click.echo(format_table(rows))
        click.echo(f"{plural(len(rows), 'run')} recorded in {runs_dir} ({time.perf_counter() - started:.1f} s in all)")
        return
    click.echo(f"run recorded in {run_dir} ({time.perf_counter() - started:.1f} s in all)")
    if "val_accuracy" in metrics:
        click.echo(f"val accuracy {metrics['val_accuracy']:.4f}  val loss {metrics['val_loss']:.4f}"
                   + ("  (best of the L2 sweep; refit on all training rows)" if "sweep" in metrics else ""))
    click.echo(f"test accuracy {metrics['test_accuracy']:.4f}  test loss {metrics['test_loss']:.4f}  "
               f"({plural(metrics['rows'], 'training row')}, {fit_length(metrics)}, "
               f"fit in {metrics['fit_seconds']:.1f} s)")


def fit_length(metrics: dict) -> str:
    if metrics["solver"] == "lbfgs":
        limit = "" if metrics["converged"] else ", stopped at its limit"
        return f"{plural(metrics['iterations'], 'L-BFGS iteration')}{limit}"
    return f"{plural(metrics['epochs'], 'epoch')} of batch {metrics['batch_size']}"


if __name__ == "__main__":
    main()
