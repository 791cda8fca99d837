"""What the two CLIs share: the options that select a cache, and one-line error handling."""

from __future__ import annotations

import atexit
import functools
import gc
import io
import os
import re
import sys
import threading
from pathlib import Path

import click

from .errors import UserError
from .extractor import (DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, DEFAULT_RESIZE, DEFAULT_VIEWS, PRECISIONS, RESIZE_METHODS,
                        VIEWS)

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = PROJECT_DIR / "cache"
DEFAULT_RUNS_DIR = PROJECT_DIR / "runs"

# TensorFlow's C++ log lines (absl/TSL), the one absl prints before it is set up, and libjpeg's own
# messages about a broken JPEG (extract.py lists every file it skips, with the reason, itself).
NATIVE_LOG_LINE = re.compile(rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] "
                             rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
                             rb"|Improper call to JPEG library in state \d+$|Corrupt JPEG data: "
                             rb"|Premature end of JPEG file$|Invalid JPEG file structure: |Not a JPEG file: )")


def setup_process(verbose: bool):
    """Process-wide settings of a CLI run, made before TensorFlow is imported: deterministic ops, a quick
    exit, and quiet.

    Without --verbose no TensorFlow log line reaches the terminal: the CUDA probes on machines
    without a GPU, oneDNN's notice, a NodeDef warning from tf.data. This TensorFlow logs them
    through absl, which TF_CPP_MIN_LOG_LEVEL does not silence, so stderr's file descriptor goes
    through a filter that drops exactly such lines and passes every other one on; Python's own
    stderr (our errors, progress bars, tracebacks) is written past the filter, unchanged.
    """
    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")  # same seed, same head, on a GPU too
    # Exit without a last cyclic collection over the ~1M objects TensorFlow's import leaves: 1.4 of the
    # 1.5 s `python -c "import tensorflow"` spent exiting here. (Spack does the same; only finalizers of
    # cyclic garbage alive at exit are skipped, which Python never promises to run.)
    atexit.register(gc.freeze)
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = io.TextIOWrapper(io.FileIO(terminal, "w", closefd=False), encoding=sys.stderr.encoding,
                                  errors="backslashreplace", line_buffering=True)

    def forward():
        with open(read_end, "rb") as native:
            for line in native:
                if not NATIVE_LOG_LINE.match(line):
                    os.write(terminal, line)

    threading.Thread(target=forward, name="stderr-filter", daemon=True).start()


def verbosity_options(func):
    """The same --quiet/--verbose pair on every CLI."""
    func = click.option("--verbose", is_flag=True, help="Also show TensorFlow's own log lines (and Keras' "
                        "per-epoch progress in train_head.py).")(func)
    return click.option("--quiet", is_flag=True, help="No progress bar (extract.py) or per-step lines "
                        "(train_head.py); results, notes and errors still print.")(func)


class CliError(click.ClickException):
    """A UserError on the command line: 'Error: <one line>' and click's usage-error exit code."""

    exit_code = click.UsageError.exit_code


def one_line_errors(func):
    """Turn UserError into CliError, so bad input never shows a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            raise CliError(str(exc)) from None

    return wrapper


def selection_options(func):
    """Options that pick a cache; extract.py and train_head.py take the same ones."""
    from .selection import CROPS, DEFAULT_CROP
    from .sources import DATASETS, DEFAULT_DATASET, cifar, folder

    options = [
        click.option("--cache-dir", type=click.Path(file_okay=False), default=str(DEFAULT_CACHE_DIR),
                     show_default=True, help="Where embedding caches live."),
        click.option("--dataset", type=click.Choice(DATASETS), default=DEFAULT_DATASET, show_default=True,
                     help="cifar10 / cifar100 (python-pickle layout), or folder: --data-dir holds a folder per "
                          "class (or train/ and test/ folders of class folders). Part of the cache key."),
        click.option("--data-dir", type=click.Path(), default=None,
                     help=f"cifar10/cifar100: a local copy (the batches folder, its parent, or the .tar.gz; also "
                          f"${cifar.CIFAR10.env} / ${cifar.CIFAR100.env}); default: the official download, cached "
                          "like Keras does. folder: the image folder (needed; part of the cache key)."),
        click.option("--test-fraction", type=float, default=None,
                     help=f"folder with class folders only: share of files (seeded hash of the path) that form "
                          f"the test split [default: {folder.DEFAULT_TEST_FRACTION}]."),
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="TF Hub handle (URL, resolved via TFHUB_CACHE_DIR offline) or local SavedModel folder."),
        click.option("--image-size", type=click.IntRange(min=1), default=None,
                     help=f"Side images are resized to before the model. Default: the model's own input size "
                          f"when it fixes one, else {DEFAULT_IMAGE_SIZE}."),
        click.option("--resize", type=click.Choice(RESIZE_METHODS), default=DEFAULT_RESIZE, show_default=True,
                     help="tf.image.resize method."),
        click.option("--crop", type=click.Choice(CROPS), default=DEFAULT_CROP, show_default=True,
                     help="none: squash each image to a square (Keras' default); center: cut the centered "
                          "square first, keeping the aspect ratio."),
        click.option("--views", type=click.Choice(tuple(VIEWS)), default=DEFAULT_VIEWS, show_default=True,
                     help="'flip' also caches horizontally mirrored images (training rows and TTA)."),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="Only N images of each split (quick runs; part of the cache key): CIFAR's first N, "
                          "a seeded sample of a folder's."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="f32", show_default=True,
                     help="Network precision (OpenVINO engine for bf16/int8): f32 exact; bf16 on CPUs with "
                          "native bf16 (AMX, AVX512-BF16); int8 NNCF-quantized, calibrated on 300 train images. "
                          "Part of the cache key; accuracy cost in the README."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


SELECTION_NAMES = ("cache_dir", "dataset", "data_dir", "test_fraction", "model", "image_size", "resize", "crop",
                   "views", "limit", "precision")


def selected_key(options: dict):
    """The CacheKey the selection options (popped from `options`) name, and the cache and data folders."""
    from .selection import select

    chosen = {name: options.pop(name) for name in SELECTION_NAMES}
    return select(**chosen), chosen["cache_dir"], chosen["data_dir"]
