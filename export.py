#!/usr/bin/env python
"""Export a trained run for deployment: a SavedModel (uint8 images of any size in), a LiteRT (.tflite) or an ONNX
file (float32 pixel values of one size in); class probabilities out."""

import click

from featcache.cli import NonEmptyPath, as_flags, one_line_errors, run_options, verbosity_options
from featcache.errors import UserError
from featcache.process import setup_process
from featcache.serve.classifier import build_classifier
from featcache.serve.export import FORMATS, QUANTIZE, export_run
from featcache.serve.files import check_destination, save_model
from featcache.serve.run import resolve_run
from featcache.settings import check_image_size


@click.command()
@click.argument("out", type=NonEmptyPath())
@click.option("--format", "format_", type=click.Choice(FORMATS), default=FORMATS[0], show_default=True,
              help="saved_model: a folder, for TensorFlow and TF Serving (images of any size); tflite: a LiteRT file "
                   "(class names in OUT.labels.txt beside it); onnx: an ONNX file (class names in its metadata). "
                   "tflite and onnx take images of one size (--input-size).")
@click.option("--quantize", type=click.Choice(QUANTIZE), default=None,
              help="tflite only: int8 weights and activations (depthwise convolutions, resize and head kept float), "
                   "calibrated on a seeded sample of the run's train images, the head corrected for the int8 "
                   "embeddings on another.")
@click.option("--input-size", type=click.IntRange(min=1), default=None,
              help="tflite/onnx: the side of the square images the file takes (float32 pixel values, 0 to 255). "
                   "Default: the network's input size, at which any photo brought to it gets the run's result.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@run_options
@verbosity_options
@one_line_errors
def main(out, format_, quantize, input_size, force, run_id, runs_dir, quiet, verbose):
    """Write the run's classifier (preprocessing, frozen network, head, averaged over its test-time views) to OUT."""
    setup_process(verbose)
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    if quantize and format_ != "tflite":
        raise UserError(f"--quantize int8 is for --format tflite only, not {format_}")
    if input_size:
        if format_ == "saved_model":
            raise UserError("--input-size is for --format tflite or onnx (a SavedModel takes images of any size)")
        check_image_size(input_size, "input_size")
    if format_ == "saved_model":
        check_destination(out, force, folder=True)  # before the slow model load
    run_dir, why = resolve_run(runs_dir, run_id)
    click.echo(f"using run {run_dir.name} ({as_flags(why)})", err=True)
    if format_ != "saved_model":
        path = export_run(run_dir, out, format_, input_size, force, quantize, log)
        click.echo(f"exported run {run_dir.name} to {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return
    log(f"loading run {run_dir.name} and its model")
    classifier = build_classifier(run_dir)
    log(f"writing the SavedModel {out}")
    save_model(classifier, out, force)
    n = int(classifier.class_names.shape[0])
    click.echo(f"exported run {run_dir.name} to {out} (serving_default: images uint8 [N,H,W,3] -> "
               f"probabilities [N,{n}], top_class [N], class_names [{n}])")


if __name__ == "__main__":
    main()
