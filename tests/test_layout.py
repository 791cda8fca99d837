"""The codebase's shape as tests: the library speaks Python and the CLI flags, stage 2 never loads a
network, no import cycle, flag names only in the command-line layer."""

import ast
import hashlib
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, _script_module, save_tiny_model
from featcache import api, cli
from featcache.extract import models, pipeline
from featcache.cache.layout import CacheKey
from featcache.cache.read import CacheUnusable
from featcache.errors import UserError
from featcache.selection import select, select_cached
from featcache.settings import HeadConfig


@pytest.mark.parametrize("make_error, python, flags", [
    (lambda: HeadConfig(lr=-1).check(), "lr must be positive and finite, got -1",
     "--lr must be positive and finite, got -1"),
    (lambda: HeadConfig(val_split=1.0).check(), "val_split must be in [0, 1), got 1.0",
     "--val-split must be in [0, 1), got 1.0"),
    (lambda: _script_module("extract.py").make_runner("local", workers=2), "workers applies to runner='ray' only",
     "--workers applies to --runner ray only"),
    (lambda: _script_module("extract.py").make_runner("local", ray_address="h:1", workers=2),
     "ray_address and workers apply to runner='ray' only", "--ray-address and --workers apply to --runner ray only"),
    (lambda: select(None, dataset="folder"),
     "dataset='folder' needs data_dir=PATH: a folder of class folders of images",
     "--dataset folder needs --data-dir PATH: a folder of class folders of images"),
    (lambda: select(None, test_fraction=0.3), "test_fraction applies to dataset='folder' only",
     "--test-fraction applies to --dataset folder only"),
    (lambda: pipeline.extract(CacheKey(), "train", views="plain,mirror"),
     "unknown view 'mirror' in views; choose from plain, flip, crop-tl, crop-tl-flip, crop-tr, crop-tr-flip, crop-bl, "
     "crop-bl-flip, crop-br, crop-br-flip, crop-c, crop-c-flip, crops, crops-flip",
     "unknown view 'mirror' in --views; choose from plain, flip, crop-tl, crop-tl-flip, crop-tr, crop-tr-flip, crop-bl, "
     "crop-bl-flip, crop-br, crop-br-flip, crop-c, crop-c-flip, crops, crops-flip"),
    (lambda: pipeline.extract(CacheKey(), "train", chunk_size=0),
     "chunk_size must be a whole number in [1, 2147483647], got 0",
     "--chunk-size must be a whole number in [1, 2147483647], got 0"),
])
def test_errors_name_parameters_in_python_and_flags_on_the_command_line(make_error, python, flags):
    with pytest.raises(UserError) as caught:
        make_error()
    assert str(caught.value) == python
    assert cli.as_flags(caught.value.template) == flags


def test_flag_wording_of_each_kind_of_value():
    assert cli.as_flags("`force=True` `strict=False` `lr=0.001` `limit=100` `model=PATH` `image_size`") == \
        "--force --no-strict --lr 0.001 --limit 100 --model PATH --image-size"


def test_a_missing_cache_names_the_command_that_makes_it_and_the_caches_present(tmp_path):
    present = CacheKey(resize="bilinear", limit=100)
    path = present.path(tmp_path, "train")
    path.parent.mkdir(parents=True)
    from featcache.cache.read import size_label
    from featcache.cache.write import CacheWriter, locked
    import numpy as np

    attrs = dict(present.attrs("train"), rows=2, source_fingerprint="f", class_names='["a", "b"]', engine="tensorflow")
    with locked(path), CacheWriter(path, attrs, 3, ("plain",)) as writer:
        writer.write(0, {"plain": np.zeros((2, 3), np.float32)}, np.arange(2))
        writer.finish()
    with pytest.raises(CacheUnusable) as caught:
        api.load_cache("train", cache_dir=tmp_path, limit=100)
    wanted = CacheKey(limit=100).path(tmp_path, "train")
    size = size_label(path.stat().st_size / 1e6)  # a few kB
    assert str(caught.value) == (f"no train cache at {wanted}; extract it. Caches present: resize='bilinear' "
                                 f"limit=100: train 2 rows complete {size}, views plain")
    assert cli.cache_remedy(caught.value) == (
        f"no train cache at {wanted}; run: python extract.py --split all --limit 100 --cache-dir {tmp_path}. "
        "Caches present (pass their options): --resize bilinear --limit 100: "
        f"train 2 rows complete {size}, views plain")


def test_a_missing_caches_error_names_a_few_caches_present_and_counts_the_rest(tmp_path):
    present = [({"limit": n}, f"train {n} rows complete") for n in range(10, 40)]
    error = CacheUnusable("no train cache at X", CacheKey(limit=5), "train", tmp_path, "extract", present)
    assert str(error) == ("no train cache at X; extract it. Caches present: limit=10: train 10 rows complete | "
                          "limit=11: train 11 rows complete | limit=12: train 12 rows complete | 27 more")
    assert cli.cache_remedy(error).endswith(
        ". Caches present (pass their options): --limit 10: train 10 rows complete | --limit 11: train 11 rows "
        f"complete | --limit 12: train 12 rows complete | 27 more: python extract.py --list --cache-dir {tmp_path}")

def test_a_missing_features_remedy_adds_only_layers_the_model_offers_as_extract_recorded_them(tmp_path):
    from featcache.extract.models import record_path, write_atomically

    key = CacheKey(model="/models/m", image_size=40, model_sha256="ab")
    error = CacheUnusable("the cache holds no feature nosuch", key, "train", tmp_path, "extract",
                          layers=("Relu@2x2", "nosuch"))
    assert "--layers Relu@2x2,nosuch " in cli.cache_remedy(error)  # nothing recorded: no layer is known to be wrong
    write_atomically(record_path(key.model, key.model_sha256, tmp_path, "-40px-layers"),
                     {"layers": [{"name": "Relu", "height": 20, "width": 20, "channels": 16}]})
    assert cli.cache_remedy(error) == (
        "the cache holds no feature nosuch; the model offers no layer nosuch (python extract.py --list-layers --model "
        f"/models/m --image-size 40 --cache-dir {tmp_path} lists its layers); for the others, run: python extract.py "
        f"--split all --model /models/m --image-size 40 --layers Relu@2x2 --cache-dir {tmp_path}")
    error.layers = ("nosuch",)
    assert cli.cache_remedy(error) == (
        "the cache holds no feature nosuch; the model offers no layer nosuch (python extract.py --list-layers --model "
        f"/models/m --image-size 40 --cache-dir {tmp_path} lists its layers)")


@pytest.mark.parametrize("call", [api.extract, api.verify, api.load_cache])
def test_the_api_refuses_an_unknown_split_where_it_enters(tmp_path, call):
    with pytest.raises(UserError, match=r"^unknown split 'val'; choose one of train, test$"):
        call("val", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is selected or written


def test_stage_2_finds_a_non_224_cache_with_the_hub_unreachable_and_no_model_record(cifar_root, tmp_path,
                                                                                   monkeypatch):
    handle = "https://hub.invalid/fixed96/1"  # a TF Hub handle, resolved from a local hub cache in stage 1 only
    hub_cache = tmp_path / "hub"
    save_tiny_model(hub_cache / hashlib.sha1(handle.encode()).hexdigest(), size=96)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(hub_cache))
    cache = tmp_path / "cache"
    for split in ("train", "test"):
        api.extract(split, cache_dir=cache, model=handle, data_dir=cifar_root, views="plain", limit=40,
                    engine="tensorflow", progress=False, log=lambda *_: None)
    shutil.rmtree(cache / "models")  # no record of the model's input size
    shutil.rmtree(hub_cache)  # the hub: unreachable (this machine has no internet)

    def no_network(handle):
        raise AssertionError(f"stage 2 loaded {handle}")

    monkeypatch.setattr(models, "load_model", no_network)
    key = select_cached(cache, model=handle, limit=40)
    assert key.image_size == 96
    result = api.run_head(cache_dir=cache, model=handle, limit=40, epochs=1, batch_size=16)
    assert result.metrics["train_images"] == 40 and result.test_probs.shape == (40, 10)


def _imports(path: Path) -> set[str]:
    """featcache modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("featcache")}


def test_no_import_cycle_and_stage_1_imports_nothing_of_stage_2():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "featcache").rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert [name for name in graph if name in reachable(name)] == []
    stage_2 = {"featcache.head", "featcache.head.runs", "featcache.head.records", "featcache.head.plots"}
    stage_1 = set().union(*(reachable(m) | {m} for m in _imports(ROOT / "extract.py") if m in graph))
    assert not {m for m in stage_1 if any(m == s or m.startswith(s + ".") for s in stage_2)}


def test_flag_names_are_spelled_only_in_the_command_line_layer():
    flag = re.compile(r"--[a-z][a-z-]+")
    spelled = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "featcache").rglob("*.py") if flag.search(p.read_text()))
    assert spelled == ["featcache/cli.py"]
