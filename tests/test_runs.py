import json
from dataclasses import asdict

import pytest

from featcache.cache.layout import CacheKey
from featcache.cli import format_table
from featcache.head.records import LEDGER_COLUMNS, ledger


def _record(runs, name, val, test):
    folder = runs / name
    folder.mkdir(parents=True)
    metrics = {"test_accuracy": test, "fit_seconds": 2.5}
    if val is not None:
        metrics["val_accuracy"] = val
    (folder / "metrics.json").write_text(json.dumps(metrics))
    head = {"epochs": 5, "hidden": 0, "l2": 1e-4, "lr": 1e-3, "solver": "adam", "train_views": "plain,flip", "tta_views": "plain,flip"}
    cache = asdict(CacheKey(model="m"))
    (folder / "config.json").write_text(json.dumps({"head": head, "cache": cache, "class_names": ["a", "b"]}))


def test_ledger_sorts_by_validation_accuracy_and_prints_a_table(tmp_path):
    _record(tmp_path, "a", 0.81, 0.80)
    _record(tmp_path, "b", None, 0.99)
    _record(tmp_path, "c", 0.86, 0.85)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    rows = ledger(tmp_path)
    assert [r["run"] for r in rows] == ["c", "a", "b"]
    lines = format_table([{c: r[c] for c in LEDGER_COLUMNS} for r in rows]).splitlines()
    assert lines[0].split() == list(LEDGER_COLUMNS)
    assert lines[1].split()[:3] == ["c", "0.8600", "0.8500"] and lines[3].split()[1] == "-"
    # a record made before heads read inner layers has no features: it read the final vector
    assert lines[1].split()[-4:] == ["plain+flip", "plain+flip", "final", "cifar10/224px-bicubic"]


def _record_on(runs, name, val, model, limit, head_file=True):
    _record(runs, name, val, 0.8)
    config = json.loads((runs / name / "config.json").read_text())
    config["cache"].update(model=model, limit=limit)
    (runs / name / "config.json").write_text(json.dumps(config))
    if head_file:
        (runs / name / "head.keras").write_bytes(b"")


def test_the_best_run_is_the_best_on_the_default_cache_settings(tmp_path):
    from featcache.serve.run import resolve_run
    from featcache.settings import DEFAULT_MODEL

    _record_on(tmp_path, "full", 0.85, DEFAULT_MODEL, 0)
    _record_on(tmp_path, "quick", 0.95, DEFAULT_MODEL, 1000)  # better validation, but a --limit run
    _record_on(tmp_path, "half-written", 0.99, DEFAULT_MODEL, 0, head_file=False)
    run_dir, why = resolve_run(tmp_path, "best")
    assert run_dir.name == "full" and "default cache settings" in why
    (tmp_path / "full" / "head.keras").unlink()
    run_dir, why = resolve_run(tmp_path, "best")
    assert run_dir.name == "quick" and "none is on the default" in why


def test_the_default_run_is_the_latest_even_after_a_better_validated_one(tmp_path):
    """A grid with a validation split, then the default head: predict and export serve the head trained last."""
    from featcache.cli import as_flags
    from featcache.serve.run import resolve_run
    from featcache.settings import DEFAULT_MODEL

    _record_on(tmp_path, "20260101-120000", 0.90, DEFAULT_MODEL, 0)
    _record_on(tmp_path, "20260101-120000-1", 0.95, DEFAULT_MODEL, 0)
    _record_on(tmp_path, "20260101-120000-2", None, DEFAULT_MODEL, 0)  # the default head, no validation split
    _record_on(tmp_path, "20251231-235959", 0.99, DEFAULT_MODEL, 0)
    for asked in (None, "latest"):
        run_dir, why = resolve_run(tmp_path, asked)
        assert run_dir.name == "20260101-120000-2"
        assert as_flags(why) == ("the latest run; trained on cifar10 224px-bicubic; --run best takes the best "
                                 "validated")
    assert resolve_run(tmp_path, "best")[0].name == "20251231-235959"


def test_an_unknown_run_points_to_the_list_of_runs(tmp_path):
    from conftest import run_cli

    (tmp_path / "a.png").write_bytes(b"not read")
    out = run_cli("predict.py", "--run", "nope", "--runs-dir", tmp_path / "runs", tmp_path / "a.png")
    assert out.returncode == 2
    assert out.stderr == (f"Error: no run 'nope' with a head.keras in {tmp_path / 'runs'}; the recorded runs are "
                          f"listed by python train_head.py --list --runs-dir {tmp_path / 'runs'}\n")


def test_a_damaged_run_record_is_skipped_with_one_warning(tmp_path):
    _record(tmp_path, "good", 0.8, 0.8)
    _record(tmp_path, "damaged", 0.9, 0.9)
    (tmp_path / "damaged" / "config.json").write_text(json.dumps({"cache": {}}))  # no "head"
    warnings = []
    rows = ledger(tmp_path, warn=warnings.append)
    assert [r["run"] for r in rows] == ["good"]
    (warning,) = warnings
    assert warning.startswith("warning: skipping run damaged:") and "\n" not in warning


def _edit(**changes):
    """A damage: `changes` merged into one part ("metrics", "head" or "cache") of the run's record."""
    def damage(run):
        (part, values), = changes.items()
        file = run / ("metrics.json" if part == "metrics" else "config.json")
        record = json.loads(file.read_text())
        (record if part == "metrics" else record[part]).update(values)
        file.write_text(json.dumps(record))
    return damage


RUN_RECORD_DAMAGES = {
    "metrics cut short": lambda run: (run / "metrics.json").write_text('{"test_accuracy": 0.'),
    "metrics a list": lambda run: (run / "metrics.json").write_text("[0.9]"),
    "config cut short": lambda run: (run / "config.json").write_text('{"head": {"epochs'),
    "config emptied": lambda run: (run / "config.json").write_text(""),
    "config missing": lambda run: (run / "config.json").unlink(),
    "head a list": lambda run: (run / "config.json").write_text('{"head": [], "cache": {}}'),
    "accuracy a string": _edit(metrics={"test_accuracy": "0.9"}),
    "accuracy NaN": _edit(metrics={"val_accuracy": float("nan")}),
    "fit seconds a string": _edit(metrics={"fit_seconds": "slow"}),
    "epochs a string": _edit(metrics={"epochs": "five"}),
    "hidden a list": _edit(head={"hidden": [1]}),
    "l2 a string": _edit(head={"l2": "tiny"}),
    "views unknown": _edit(head={"tta_views": "sideways"}),
    "cache settings unknown": _edit(cache={"image_size": "big"}),
}


@pytest.mark.parametrize("damage", RUN_RECORD_DAMAGES.values(), ids=RUN_RECORD_DAMAGES)
def test_a_damaged_run_record_leaves_the_ledger_listing_the_others(tmp_path, damage):
    _record(tmp_path, "good", 0.8, 0.8)
    _record(tmp_path, "damaged", 0.9, 0.9)
    damage(tmp_path / "damaged")
    warnings = []
    rows = ledger(tmp_path, warn=warnings.append)
    assert [r["run"] for r in rows] == ["good"]
    (warning,) = warnings
    assert warning.startswith("warning: skipping run damaged: ") and "\n" not in warning
    assert format_table([{c: r[c] for c in LEDGER_COLUMNS} for r in rows]).splitlines()[1].split()[0] == "good"


def test_a_run_without_metrics_is_named_as_unfinished(tmp_path):
    _record(tmp_path, "good", 0.8, 0.8)
    _record(tmp_path, "cut", 0.9, 0.9)
    (tmp_path / "cut" / "metrics.json").unlink()
    warnings = []
    assert [r["run"] for r in ledger(tmp_path, warn=warnings.append)] == ["good"]
    assert warnings == ["warning: skipping run cut: it has no metrics.json (unfinished, interrupted, or being "
                        "recorded now)"]


def test_parse_grid_makes_every_combination_and_refuses_bad_specs():
    import pytest

    from featcache.errors import UserError
    from featcache.cli import parse_grid

    assert parse_grid(["hidden=0,1024", "lr=1e-3,1e-2"]) == [
        {"hidden": 0, "lr": 1e-3}, {"hidden": 0, "lr": 1e-2}, {"hidden": 1024, "lr": 1e-3}, {"hidden": 1024, "lr": 1e-2}]
    assert parse_grid(["tta-views=plain,plain+flip", "label-smoothing=0.1", "batch-size=64"]) == [
        {"tta_views": "plain", "label_smoothing": 0.1, "batch_size": 64},
        {"tta_views": "plain+flip", "label_smoothing": 0.1, "batch_size": 64}]
    for bad, message in ((["width=1,2"], "NAME one of"), (["hidden=1.5"], "--grid: hidden must be a whole number, got '1.5'"), (["lr="], "NAME=V1")):
        with pytest.raises(UserError, match=message):
            parse_grid(bad)


def test_a_grid_of_views_spelt_as_a_view_list_is_refused_with_both_spellings():
    """`--train-views plain,flip` is one run on two views; the same text in --grid would be two runs of one view."""
    import pytest

    from featcache.cli import parse_grid
    from featcache.errors import UserError

    with pytest.raises(UserError) as caught:
        parse_grid(["train_views=plain,flip"])
    assert str(caught.value) == (
        "--grid train_views=plain,flip is ambiguous: --train-views plain,flip is one run on these views, but in "
        "--grid a comma separates runs and + joins views. One run on them all: --grid train_views=plain+flip; "
        "a run per view: --grid train_views=plain --grid train_views=flip")
    assert parse_grid(["train_views=plain+flip"]) == [{"train_views": "plain+flip"}]
    assert parse_grid(["train-views=plain", "train-views=flip", "hidden=0"]) == [
        {"train_views": "plain", "hidden": 0}, {"train_views": "flip", "hidden": 0}]
    assert parse_grid(["tta_views=plain,plain+flip"]) == [{"tta_views": "plain"}, {"tta_views": "plain+flip"}]
    assert parse_grid(["lr=1e-3", "lr=1e-2,1e-3"]) == [{"lr": 1e-3}, {"lr": 1e-2}]
