#!/usr/bin/env python
"""Export a trained run as one SavedModel: uint8 images in, class probabilities and names out."""

import click

from featcache.classifier import build_classifier, check_new_folder, export, resolve_run
from featcache.cli import one_line_errors
from featcache.process import setup_process
from featcache.settings import DEFAULT_RUNS_DIR


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--run", "run_id", default=None,
              help="Run id under --runs-dir. Default: best by validation, else latest.")
@click.option("--runs-dir", type=click.Path(file_okay=False), default=str(DEFAULT_RUNS_DIR), show_default=True)
@click.option("--verbose", is_flag=True, help="Also show TensorFlow's own log lines.")
@one_line_errors
def main(out_dir, run_id, runs_dir, verbose):
    """Write the run's classifier (resize, frozen extractor, standardisation, head) to OUT_DIR."""
    setup_process(verbose)
    check_new_folder(out_dir)  # before the slow model load
    run_dir, why = resolve_run(runs_dir, run_id)
    click.echo(f"using run {run_dir.name} ({why})", err=True)
    classifier = build_classifier(run_dir)
    export(classifier, out_dir)
    n = int(classifier.class_names.shape[0])
    click.echo(f"exported run {run_dir.name} to {out_dir} (serving_default: images uint8 [N,H,W,3] -> "
               f"probabilities [N,{n}], top_class [N], class_names [{n}])")


if __name__ == "__main__":
    main()
