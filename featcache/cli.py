"""The command-line layer: what the scripts share (the options that select a cache, one-line errors in
flag words, --grid parsing, tables; their process setup is process.py). The library speaks Python; only
this module, and the scripts at the top level, know flag names: errors.py's marked parameters become
flags here."""

from __future__ import annotations

import ast
import functools
import itertools
import shlex
from dataclasses import replace

import click

from .cache.read import CacheUnusable, caches_present, list_caches, size_label
from .errors import PARAMETER, UserError, plural
from .extract.layers import recorded_layers
from .settings import (
    CALIBRATION_SIZE, CROPS, DATASETS, DEFAULT_CACHE_DIR, DEFAULT_CROP, DEFAULT_DATASET, DEFAULT_IMAGE_SIZE,
    DEFAULT_MODEL, DEFAULT_PRECISION, DEFAULT_RESIZE, DEFAULT_TEST_FRACTION, IMAGE_COLUMN, LABEL_COLUMN, LISTED_CACHES,
    MAX_COUNT, PRECISIONS, RESIZE_METHODS, SPLITS, VIEW_SETS, VIEWS, HeadConfig, DEFAULT_RUN, DEFAULT_RUNS_DIR,
    split_feature,
)

VIEWS_HELP = (f"Comma-separated views ({', '.join(VIEWS)}) or sets "
              f"({', '.join(f'{name}: {len(views)} views' for name, views in VIEW_SETS.items())}); "
              "a crop view is the 7/8 window at top-left, top-right, bottom-left, bottom-right or center.")


def verbosity_options(func):
    """The same --quiet/--verbose pair on every script."""
    func = click.option("--verbose", is_flag=True, help="Also show TensorFlow's own log lines.")(func)
    return click.option("--quiet", is_flag=True, help="No progress (extract.py: the loading lines and the bar; "
                        "train_head.py: the epoch, L-BFGS, per-run and L2-sweep lines; export.py: the step lines; "
                        "predict.py: the loading lines); results, notes and errors still print.")(func)


class CliError(click.ClickException):
    """A UserError on the command line: 'Error: <one line>' and click's usage-error exit code."""

    exit_code = click.UsageError.exit_code


def stopped(exc: KeyboardInterrupt, what: str = "") -> SystemExit:
    """Ctrl-C, or SIGTERM (process.py), as every CLI meets it: one line on stderr, then exit code 130."""
    click.echo(f"Stopped ({str(exc) or 'Ctrl-C'})" + (f": {what}" if what else ""), err=True)
    return SystemExit(130)  # the shell's code for a process ended by SIGINT


def one_line_errors(func):
    """Turn UserError into CliError, worded in flags, so bad input never shows a traceback; and Ctrl-C at any
    moment into one line and exit code 130 (not click's "Aborted!" and 1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CacheUnusable as exc:
            raise CliError(cache_remedy(exc)) from None
        except UserError as exc:
            raise CliError(as_flags(exc.template)) from None
        except KeyboardInterrupt as exc:
            raise stopped(exc) from None

    return wrapper


def flag(name: str, value=None) -> str:
    """A parameter as its flag: `lr` -> --lr, force=True -> --force, strict=False -> --no-strict,
    views='plain' -> --views plain."""
    option = "--" + name.replace("_", "-")
    if value is None or value is True:
        return option
    if value is False:
        return "--no-" + name.replace("_", "-")
    return f"{option} {value:g}" if isinstance(value, float) else f"{option} {value}"


def as_flags(text: str) -> str:
    """A library message with its marked parameters (errors.py) as flags."""
    def one(match):
        name, value = match.group(1), match.group(2)
        if value is None:
            return flag(name)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a placeholder such as PATH
        return flag(name, value)

    return PARAMETER.sub(one, text)


def selection_args(chosen: dict) -> str:
    """Selection settings (CacheKey.chosen) as the options that select their cache."""
    return " ".join(flag(name, shlex.quote(value) if isinstance(value, str) else value)
                    for name, value in chosen.items())


def extract_command(error: CacheUnusable, layers=None) -> str:
    """The extract.py command that builds the cache an error is about (with the views it lacks, and the inner-layer
    features it lacks or `layers` of them)."""
    views = f"--views {','.join(error.views)}" if error.views else ""  # added to both splits: a head needs both
    layers = error.layers if layers is None else layers
    layers = f"--layers {','.join(layers)}" if layers else ""
    other = next(split for split in SPLITS if split != error.split)
    neither = error.action == "extract" and not error.key.path(error.cache_dir, other).exists()
    split = "all" if error.views or error.layers or neither else error.split
    return " ".join(filter(None, ["python extract.py", f"--split {split}", selection_args(_as_given(error.key)),
                                  views, layers, f"--cache-dir {shlex.quote(str(error.cache_dir))}"]))


GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)  # options the user gave


def _as_given(key) -> dict:
    """The settings selecting `key`'s cache, as given on this command line where they were (a CIFAR copy's
    `data_dir` is no part of the key, yet the command must read it), in the options' order."""
    from .selection import SELECTION_NAMES

    context = click.get_current_context(silent=True)
    given = {name: context.params[name] for name in SELECTION_NAMES if context and name in context.params
             and name != "cache_dir" and context.get_parameter_source(name) in GIVEN}
    chosen = {**key.chosen(), **given}
    return {name: chosen[name] for name in SELECTION_NAMES if name in chosen}


def cache_remedy(error: CacheUnusable) -> str:
    """A missing or unusable cache's error, with the commands that make a usable one."""
    key, cache = error.key, f"--cache-dir {shlex.quote(str(error.cache_dir))}"
    recorded = recorded_layers(key.model, key.model_sha256, key.image_size, error.cache_dir) or ()  # no network load
    offered = {info.name for info in recorded}
    unknown = [feature for feature in error.layers if offered and split_feature(feature)[0] not in offered]
    command = extract_command(error, [feature for feature in error.layers if feature not in unknown])
    remedy = {"extract": f"run: {command}", "rebuild": f"rebuild it with {command} --force",
              "verify": f"check it with {command} --verify, rebuild it with {command} --force"}[error.action]
    if unknown:
        listing = " ".join(filter(None, ["python extract.py --list-layers", selection_args(_as_given(key)), cache]))
        others = f"; for the others, {remedy}" if error.views or len(unknown) < len(error.layers) else ""
        layers = ", ".join(dict.fromkeys(split_feature(feature)[0] for feature in unknown))
        remedy = f"the model offers no layer {layers} ({listing} lists its layers){others}"
    present, more = existing_caches(error.present), len(error.present) - LISTED_CACHES
    listed = f". Caches present (pass their options): {' | '.join(present[:LISTED_CACHES])}" if present else ""
    if more > 0:
        listed += f" | {more} more: python extract.py --list {cache}"
    return f"{as_flags(error.problem)}; {remedy}{listed}"


def existing_caches(present) -> list[str]:
    """One line per cached settings (cache.read.caches_present): its options, then its splits and their state."""
    return sorted(f"{selection_args(chosen) or '(defaults)'}: {state}" for chosen, state in present)


def list_caches_lines(cache_dir) -> list[str]:
    entries = list_caches(cache_dir)
    unreadable = [f"{entry['path']}: not a readable featcache file ({size_label(entry['megabytes'])})"
                  for entry in entries if entry["key"] is None]
    return existing_caches(caches_present(cache_dir, entries)) + unreadable


class NonEmpty:
    """Refuses an empty value (often an unset variable, as in --cache-dir "$DIR"); mixed into a click type."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            hint = " (leave the option out for its default)" if isinstance(param, click.Option) else ""
            self.fail(f"is empty{hint}", param, ctx)
        return super().convert(value, param, ctx)


class NonEmptyPath(NonEmpty, click.Path):
    pass


class NonEmptyText(NonEmpty, click.types.StringParamType):
    name = "text"


TEXT = NonEmptyText()
COUNT = click.IntRange(min=1, max=MAX_COUNT)  # limits, chunk and batch sizes, workers


RUNS_DIR = click.option("--runs-dir", type=NonEmptyPath(file_okay=False), default=str(DEFAULT_RUNS_DIR),
                        show_default=True)


def run_options(func):
    """--run and --runs-dir: the recorded run predict.py and export.py serve."""
    return click.option("--run", "run_id", type=TEXT, default=None, help=(
        "Run id under --runs-dir, a run folder, latest (the run recorded last) or best (the best by validation "
        f"accuracy, among runs on the default cache settings if any is) [default: {DEFAULT_RUN}]."))(RUNS_DIR(func))


def selection_options(func):
    """Options that pick a cache; extract.py and train_head.py take the same ones."""
    options = [
        click.option("--cache-dir", type=NonEmptyPath(file_okay=False), default=str(DEFAULT_CACHE_DIR),
                     show_default=True, help="Where embedding caches live."),
        click.option("--dataset", type=click.Choice(DATASETS), default=DEFAULT_DATASET, show_default=True,
                     help="cifar10 / cifar100 (python-pickle layout); folder: --data-dir holds a folder per "
                          "class (or train/ and test/ folders of class folders); webdataset: tar shards "
                          "(train-*.tar, test-*.tar); parquet: Parquet files of image bytes and labels (the Hugging "
                          "Face Hub's data/train-*.parquet). Part of the cache key."),
        click.option("--data-dir", type=NonEmptyPath(), default=None,
                     help="cifar10/cifar100: a local copy (the batches folder, its parent, or the .tar.gz; also "
                          "$CIFAR10_DATA_DIR / $CIFAR100_DATA_DIR); default: the official download, cached "
                          "like Keras does. folder, webdataset, parquet: the data folder (needed; part of the "
                          "cache key)."),
        click.option("--test-fraction", type=float, default=None,
                     help=f"folder with class folders only: share of files (seeded hash of the path) that form "
                          f"the test split [default: {DEFAULT_TEST_FRACTION}]."),
        click.option("--image-column", type=TEXT, default=None,
                     help=f"parquet only: the column of encoded images [default: {IMAGE_COLUMN}, else the only "
                          "Hugging Face Image column]. Part of the cache key."),
        click.option("--label-column", type=TEXT, default=None,
                     help=f"parquet only: the column of integer labels [default: {LABEL_COLUMN}, else the only "
                          "Hugging Face ClassLabel column]. Part of the cache key."),
        click.option("--model", type=TEXT, default=DEFAULT_MODEL, show_default=True,
                     help="TF Hub handle (URL, resolved via TFHUB_CACHE_DIR offline) or local SavedModel folder."),
        click.option("--image-size", type=click.IntRange(min=1), default=None,
                     help=f"Side images are resized to before the model. Default: the model's own input size "
                          f"when it fixes one, else {DEFAULT_IMAGE_SIZE}; train_head.py takes the size of the caches "
                          "present for the other options (it never loads the model)."),
        click.option("--resize", type=click.Choice(RESIZE_METHODS), default=DEFAULT_RESIZE, show_default=True,
                     help="tf.image.resize method."),
        click.option("--crop", type=click.Choice(CROPS), default=DEFAULT_CROP, show_default=True,
                     help="none: squash each image to a square (Keras' default); center: cut the centered "
                          "square first, keeping the aspect ratio."),
        click.option("--limit", type=COUNT, default=None,
                     help="Only N images of each split (quick runs; part of the cache key): CIFAR's first N, "
                          "a seeded sample of the others'."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULT_PRECISION, show_default=True,
                     help="Network precision (OpenVINO engine for bf16/int8): f32 exact; bf16 on CPUs with "
                          f"native bf16 (AMX, AVX512-BF16); int8 NNCF-quantized, calibrated on {CALIBRATION_SIZE} "
                          "train images. "
                          "Part of the cache key; accuracy cost in the README."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def selected(options: dict, stage: str, announce=None, splits=()):
    """The CacheKey the selection options (popped from `options`) name, and the cache and data folders. "extract"
    (selection.select) may load the model to learn its input size (`announce` gets a line before it does; tars and
    Parquet files of `splits` are opened first); "head" (select_cached) finds the cache by what caches record."""
    from .selection import SELECTION_NAMES, select, select_cached

    chosen = {name: options.pop(name) for name in SELECTION_NAMES}
    cache_dir = chosen.pop("cache_dir")
    key = select(cache_dir, announce, splits, **chosen) if stage == "extract" else select_cached(cache_dir, **chosen)
    return key, cache_dir, chosen["data_dir"]


LIST_FIELDS = ("train_views", "tta_views", "features")  # HeadConfig fields holding lists: `+` joins them in --grid


def parse_grid(specs) -> list[dict]:
    """`["hidden=0,1024", "lr=1e-3,1e-2"]` -> every combination as HeadConfig overrides, in order. A NAME given
    again adds its values to the same axis."""
    defaults, axes = HeadConfig(), {}
    for spec in specs:
        name, _, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if name not in defaults.to_dict() or not values:
            raise UserError(f"--grid takes NAME=V1,V2,... with NAME one of {', '.join(defaults.to_dict())}; "
                            f"got {spec!r}")
        kind = HeadConfig.OPTIONAL.get(name) or type(getattr(defaults, name))
        parts = [v.strip() for v in values.split(",")]
        if twice := next((v for i, v in enumerate(parts) if v in parts[:i]), None):
            raise UserError(f"--grid {name}={values} names {twice} twice; name each once")
        parsed = [_parse_value(kind, v, name) for v in parts]
        if name in LIST_FIELDS and len(parsed) > 1 and not any("+" in value for value in parsed):
            option, what = name.replace("_", "-"), "views" if name.endswith("_views") else name
            raise UserError(f"--grid {name}={values} is ambiguous: --{option} {values} is one run on these {what}, "
                            f"but in --grid a comma separates runs and + joins {what}. One run on them all: --grid "
                            f"{name}={values.replace(',', '+')}; a run per {what[:-1]}: "
                            + " ".join(f"--grid {name}={value}" for value in parsed))
        axes[name] = axes.get(name, []) + [value for value in parsed if value not in axes.get(name, [])]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def trainable(config: HeadConfig, combinations: list[dict]) -> tuple[list[dict], str]:
    """The grid's combinations a head can take over `config`, and a note naming those it cannot (such as solver=lbfgs
    with hidden=8), which are skipped. A value no head takes even alone refuses the grid, as does a grid of which
    no combination can be trained."""
    kept, skipped = [], []
    for overrides in combinations:
        try:
            for name, value in overrides.items():
                replace(HeadConfig(), **{name: value}).check()
        except UserError as exc:  # a value out of range: said as the grid's
            raise UserError(f"--grid: {exc}") from None
        try:
            replace(config, **overrides).check()
            kept.append(overrides)
        except UserError as exc:
            skipped.append((" ".join(f"{name}={value}" for name, value in overrides.items()), as_flags(exc.template)))
    if not kept:
        raise UserError(f"--grid: no combination can be trained: {skipped[0][1]}")
    named = "; ".join(f"{combination} ({why})" for combination, why in skipped)
    note = (f"note: --grid skips {len(skipped)} of {plural(len(combinations), 'combination')}, which no head can "
            f"take: {named}") if skipped else ""
    return kept, note


GRID_KINDS = {bool: "true or false", int: "a whole number", float: "a number"}  # what a grid value must be
GRID_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _parse_value(kind, text: str, name: str):
    """One value of `--grid NAME=...` as the field's type, or a one-line error naming it."""
    try:
        if kind is bool:
            return GRID_BOOLS[text.lower()]
        if kind is int and not float(text).is_integer():
            raise ValueError(text)
        if kind is int:
            return int(float(text))  # 1e3 is a whole number too
        return kind(text)
    except (KeyError, ValueError):
        raise UserError(f"--grid: {name} must be {GRID_KINDS[kind]}, got {text!r}") from None


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as aligned columns (the grid's result, the ledger)."""
    columns = list(rows[0])
    table = [columns] + [[_cell(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table)


def _cell(column, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column.endswith("_acc"):
        return f"{value:.4f}"
    if column == "fit_s":
        return f"{value:.1f}"
    return f"{value:g}" if isinstance(value, float) else str(value)
