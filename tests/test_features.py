"""Heads on inner-layer features (train_head.py --features): columns side by side in the order asked, every head,
grids over feature lists, the run's record, one-line refusals, and predict.py computing what the head was trained on."""

import json
import re

import numpy as np
import pytest

from conftest import run_cli, run_dirs


def test_side_by_side_joins_the_features_in_the_order_asked_and_leaves_final_alone():
    from featcache.cache.read import Features
    from featcache.head.rows import side_by_side

    rng = np.random.default_rng(0)
    final, inner = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
    labels = np.arange(5)

    def features():
        return Features({"plain": final.copy(), "flip": final[::-1].copy()}, labels, ("a",),
                        {"x": {"plain": inner.copy(), "flip": inner[::-1].copy()}})

    alone = features()
    assert side_by_side(alone, ("final",)) is alone  # the default head reads the cache as it always did
    joined = side_by_side(features(), ("x", "final"))
    np.testing.assert_array_equal(joined.views["plain"], np.hstack([inner, final]))
    np.testing.assert_array_equal(joined.views["flip"], np.hstack([inner, final])[::-1])
    assert joined.views["plain"].dtype == np.float32 and joined.labels is labels
    np.testing.assert_array_equal(side_by_side(features(), ("x",)).views["plain"], inner)


def test_a_head_on_features_is_the_head_on_their_columns_side_by_side(features_caches, tiny_model):
    """Each feature standardised on its own: the head's per-column standardisation of the joined columns."""
    from featcache.api import load_cache, run_head
    from featcache.cache.read import Features, load_features
    from featcache.head.training import train
    from featcache.selection import select_cached
    from featcache.settings import HeadConfig

    base, _ = features_caches
    selection = dict(cache_dir=base / "cache", model=str(tiny_model), image_size=40)
    got = run_head(**selection, epochs=2, hidden=8, features="Relu@2x2,final", tta_views="plain,flip,crop-tl")
    key = select_cached(**selection)
    splits = []
    for split in ("train", "test"):
        loaded, _ = load_features(key, split, base / "cache", ("plain", "flip", "crop-tl"), ("Relu@2x2",))
        splits.append(Features({view: np.hstack([loaded.inner["Relu@2x2"][view], rows])
                                for view, rows in loaded.views.items()}, loaded.labels, loaded.class_names))
    config = HeadConfig(epochs=2, hidden=8, features="Relu@2x2,final", train_views="plain,flip",
                        tta_views="plain,flip,crop-tl")
    want = train(*splits, config)
    np.testing.assert_array_equal(got.test_probs, want.test_probs)
    assert got.model.input_shape == (None, 16 * 4 + 16)
    mean = got.model.get_layer("standardize").mean.numpy().ravel()
    np.testing.assert_allclose(mean[-16:], load_cache("train", **selection).views["plain"].mean(0) / 2
                               + load_cache("train", **selection).views["flip"].mean(0) / 2, rtol=1e-4)


@pytest.mark.parametrize("head", [["--hidden", "8", "--dropout", "0.2"], ["--solver", "lbfgs"],
                                  ["--sweep", "l2", "--val-split", "0.25"]])
def test_every_head_trains_on_features_and_its_run_records_them(features_caches, head, tmp_path):
    from featcache.head.records import ledger
    from featcache.head.tensorboard import hparams_of

    base, common = features_caches
    runs = tmp_path / "runs"
    out = run_cli("train_head.py", *common, "--runs-dir", runs, "--epochs", "3", "--features", "final,Relu",
                  "--train-views", "plain,flip,crop-tl", "--tta-views", "plain,flip", *head)
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout
    (run_dir,) = run_dirs(runs)
    record = json.loads((run_dir / "config.json").read_text())
    assert record["head"]["features"] == "final,Relu"
    assert ledger(runs)[0]["features"] == "final+Relu"
    assert hparams_of(record, json.loads((run_dir / "metrics.json").read_text()))["features"] == "final+Relu"
    listed = run_cli("train_head.py", "--runs-dir", runs, "--list")
    assert "features" in listed.stdout.splitlines()[0] and "final+Relu" in listed.stdout


def test_predict_on_a_features_run_gives_the_runs_test_probabilities(features_caches, cifar_root, tmp_path):
    from featcache.extract.sources import cifar
    from featcache.serve.classifier import build_classifier

    base, common = features_caches
    out = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs", "--epochs", "3", "--hidden", "8",
                  "--features", "Relu@2x2,final,Relu", "--tta-views", "plain,flip,crop-tl")
    assert out.returncode == 0, out.stderr
    (run_dir,) = run_dirs(tmp_path / "runs")
    images = cifar.load_split(cifar.resolve_source(cifar_root), "test").images
    classifier = build_classifier(run_dir)  # kept: its tf.function holds the module only weakly
    got = classifier.classify(images)["probabilities"].numpy()
    np.testing.assert_allclose(got, np.load(run_dir / "test_probs.npy"), atol=1e-5)


def test_a_grid_over_feature_lists_and_heads_records_each_run_with_its_features(features_caches, tmp_path):
    base, common = features_caches
    runs = tmp_path / "runs"
    out = run_cli("train_head.py", *common, "--runs-dir", runs, "--epochs", "2", "--val-split", "0.2",
                  "--grid", "features=final+Relu@2x2,Relu", "--grid", "solver=adam,lbfgs")
    assert out.returncode == 0, out.stderr
    recorded = {}
    for run_dir in run_dirs(runs):
        head = json.loads((run_dir / "config.json").read_text())["head"]
        recorded[head["features"], head["solver"]] = run_dir.name
    assert sorted(recorded) == [("Relu", "adam"), ("Relu", "lbfgs"), ("final,Relu@2x2", "adam"),
                                ("final,Relu@2x2", "lbfgs")]
    table = out.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:2] == ["features", "solver"])
    for line in table[header + 1 : header + 5]:
        features, solver, *_, run = line.split()
        assert recorded[features.replace("+", ","), solver] == run


@pytest.mark.parametrize("args, message", [
    (["--grid", "features=final,Relu"],
     "--grid features=final,Relu is ambiguous: --features final,Relu is one run on these features, but in --grid a "
     "comma separates runs and + joins features. One run on them all: --grid features=final+Relu; a run per feature: "
     "--grid features=final --grid features=Relu"),
    (["--features", "final,block_9@2x2"], "holds no feature block_9@2x2 (it holds Relu, Relu@2x2); the model offers "
                                          "no layer block_9 (python extract.py --list-layers --model "),
    (["--grid", "features=final", "--grid", "features=Relu+block_9"], "holds no feature block_9 (it holds Relu, "
                                                                      "Relu@2x2); the model offers no layer block_9 ("),
    (["--features", "final,Relu@3x3"], "'Relu@3x3' in --features is not a layer name"),
])
def test_bad_features_are_one_line_and_record_nothing(features_caches, tmp_path, args, message):
    base, common = features_caches
    out = run_cli("train_head.py", *common, "--runs-dir", tmp_path / "runs", "--epochs", "1", *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    if "no feature" in message:  # a layer the tiny model lacks, as extract.py recorded its layers: none to add
        assert "--layers" not in out.stderr and f"--cache-dir {base / 'cache'} lists its layers" in out.stderr
    assert not (tmp_path / "runs").exists() or not run_dirs(tmp_path / "runs")


@pytest.mark.parametrize("script, args, message", [
    ("train_head.py", ["--features", "final,Relu,final"], "Error: --features names final twice; name each once"),
    ("train_head.py", ["--grid", "features=Relu,Relu+Relu@2x2+Relu"],
     "Error: --grid: features names Relu twice; name each once"),
    ("extract.py", ["--layers", "Relu@2x2,Relu,Relu@2x2", "--engine", "tensorflow"],
     "Error: --layers names Relu@2x2 twice; name each once"),
    ("train_head.py", ["--train-views", "plain,flip,plain"], "Error: --train-views names plain twice; name each once"),
    ("extract.py", ["--views", "flip,flip", "--engine", "tensorflow"], "Error: --views names flip twice; name each once"),
])
def test_a_feature_named_twice_is_one_line_refusal(features_caches, tmp_path, script, args, message):
    base, common = features_caches
    out = run_cli(script, *common, *(["--runs-dir", tmp_path / "runs"] if script == "train_head.py" else []), *args)
    assert out.returncode == 2 and out.stderr.splitlines() == [message], out.stderr
    assert not (tmp_path / "runs").exists()


def test_run_head_refuses_a_feature_named_twice(features_caches, tiny_model):
    from featcache.api import run_head
    from featcache.errors import UserError

    base, _ = features_caches
    with pytest.raises(UserError, match="^features names final twice; name each once$"):
        run_head(cache_dir=base / "cache", model=str(tiny_model), image_size=40, features="final,Relu,final")


def test_the_list_of_caches_names_the_inner_layers_each_holds(features_caches):
    base, _ = features_caches
    listed = run_cli("extract.py", "--list", "--cache-dir", base / "cache")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    for split, rows in (("test", 40), ("train", 120)):
        assert re.search(rf"{split} {rows} rows complete [0-9]+ kB, views plain\+flip\+crop-tl, features "
                         r"Relu\+Relu@2x2(;|$)", line), line


@pytest.mark.parametrize("spec, twice", [("features=final,final", "final"), ("hidden=0,64,0", "0"),
                                         ("train_views=plain,plain", "plain")])
def test_a_grid_value_given_twice_is_refused_before_it_is_read_as_ambiguous(spec, twice):
    """`--grid features=final,final` said "one run on them all: --grid features=final+final", which is then refused;
    `--grid hidden=0,0` trained the same head twice."""
    from featcache.cli import parse_grid
    from featcache.errors import UserError

    with pytest.raises(UserError, match=rf"^--grid {spec} names {twice} twice; name each once$"):
        parse_grid([spec])
