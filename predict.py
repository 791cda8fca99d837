#!/usr/bin/env python
"""Classify image files with a trained run: frozen extractor + the run's standardisation and head."""

import json
import sys
from pathlib import Path

import click

from featcache.cli import NonEmptyPath, as_flags, one_line_errors, run_options, verbosity_options
from featcache.errors import UserError, plural
from featcache.extract.sources.folder import IMAGE_FORMATS
from featcache.process import setup_process
from featcache.serve.classifier import build_classifier
from featcache.serve.images import decode_image, expand_paths
from featcache.serve.run import resolve_run
from featcache.serve.runtimes import open_exported
from featcache.settings import DEFAULT_TOP_K


@click.command()
@click.argument("images", nargs=-1, required=True, type=NonEmptyPath())
@run_options
@click.option("--model", "exported", type=NonEmptyPath(), default=None,
              help="Classify with an exported file instead of a run: a .tflite (LiteRT) or .onnx (ONNX Runtime) file, "
                   "or a SavedModel folder (export.py), to check what you ship against what you trained.")
@click.option("--top-k", type=click.IntRange(min=1), default=DEFAULT_TOP_K, show_default=True,
              help="Classes shown per image (at most the run's class count).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image, one per line.")
@verbosity_options
@one_line_errors
def main(images, run_id, runs_dir, exported, top_k, as_json, quiet, verbose):
    """Print the top classes of each image (PNG, JPEG, BMP, GIF, WebP, JPEG XL; any size); folders are expanded."""
    setup_process(verbose)
    log = None if quiet else (lambda line: click.echo(line, err=True))
    paths = expand_paths(images)
    if not paths:
        raise UserError(f"no {IMAGE_FORMATS} files in {', '.join(images)}")
    if not any(path.exists() for path in paths):  # before the seconds a network takes to load
        raise UserError(f"no such file or folder: {', '.join(image for image in images if not Path(image).exists())}")
    if exported:
        if run_id:
            raise UserError("--run and --model each choose the classifier; pass one")
        model = open_exported(exported)
        click.echo(f"using {model.format} export {exported}", err=True)
        names, source = list(model.class_names), f"export {exported}"
        probabilities = model.probabilities
    else:
        run_dir, why = resolve_run(runs_dir, run_id)
        click.echo(f"using run {run_dir.name} ({as_flags(why)})", err=True)
        classifier = build_classifier(run_dir, announce=log)
        names, source = [n.decode() for n in classifier.class_names.numpy()], run_dir.name

        def probabilities(pixels):
            return classifier.classify(pixels)["probabilities"].numpy()
    top_k = min(top_k, len(names))
    if log and not exported:  # the first call builds the classifier's graph: seconds for a real network
        log(f"classifying {plural(len(paths), 'image')} ...")
    failures = 0
    for path in paths:
        try:
            probs = probabilities(decode_image(path)[None])[0]
        except UserError as exc:
            failures += 1
            click.echo(json.dumps({"file": str(path), "error": str(exc)}) if as_json else f"{path}: error: {exc}",
                       err=not as_json)
            continue
        order = probs.argsort()[::-1][:top_k]
        if as_json:
            click.echo(json.dumps({"file": str(path), "run": source,
                                   "top": [{"class": names[i], "probability": float(probs[i])} for i in order],
                                   "probabilities": [float(p) for p in probs]}))
        else:
            click.echo(f"{path}: " + ", ".join(f"{names[i]} {probs[i]:.3f}" for i in order))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
