import json

from featcache.runs import LEDGER_COLUMNS, format_ledger, ledger


def _record(runs, name, val, test):
    folder = runs / name
    folder.mkdir(parents=True)
    metrics = {"test_accuracy": test, "fit_seconds": 2.5}
    if val is not None:
        metrics["val_accuracy"] = val
    (folder / "metrics.json").write_text(json.dumps(metrics))
    head = {"epochs": 5, "hidden": 0, "l2": 1e-4, "lr": 1e-3, "flip_train": True, "tta": True}
    cache = {"image_size": 224, "resize": "bicubic", "views": "flip", "limit": 0}
    (folder / "config.json").write_text(json.dumps({"head": head, "cache": cache}))


def test_ledger_sorts_by_validation_accuracy_and_prints_a_table(tmp_path):
    _record(tmp_path, "a", 0.81, 0.80)
    _record(tmp_path, "b", None, 0.99)
    _record(tmp_path, "c", 0.86, 0.85)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    rows = ledger(tmp_path)
    assert [r["run"] for r in rows] == ["c", "a", "b"]
    lines = format_ledger(rows).splitlines()
    assert lines[0].split() == list(LEDGER_COLUMNS)
    assert lines[1].split()[:3] == ["c", "0.8600", "0.8500"] and lines[3].split()[1] == "-"
    assert "224px-bicubic-flip" in lines[1]
