"""Each recorded run as TensorBoard shows it: read back with TensorBoard's own event reader, and from a real
`tensorboard` server's HTTP data API."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import run_cli
from featcache.cache.layout import CacheKey
from featcache.cache.read import Features
from featcache.settings import HeadConfig

pytest.importorskip("tensorboard", reason="tensorboard is not installed (requirements.txt)")

CENTERS = np.random.default_rng(0).normal(size=(3, 8)) * 3


def _features(per_class: int, seed: int) -> Features:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    plain = (CENTERS[labels] + rng.normal(size=(len(labels), 8)) * 2).astype(np.float32)
    return Features({"plain": plain}, labels, ("cat", "dog", "bird"))


def _record(runs, **settings):
    """One run recorded as train_head.py records it, on small synthetic features."""
    from featcache.head.training import train
    from featcache.head.records import record_run

    config = HeadConfig(train_views="plain", tta_views="plain", **settings)
    test = _features(10, 2)
    trained = train(_features(30, 1), test, config)
    return record_run(runs, CacheKey(limit=90), config, trained, test.labels, {}, {})


def _events(runs):
    from tensorboard.backend.event_processing import event_multiplexer

    keep_all = {"tensors": 0}  # the reader's default keeps a sample of 10 points per series
    return event_multiplexer.EventMultiplexer(size_guidance=keep_all).AddRunsFromDirectory(str(runs)).Reload()


def _series(events, run, tag):
    from tensorboard.util import tensor_util

    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(run, tag)]


def _session(events, run):
    from tensorboard.plugins.hparams import metadata

    content = events.PluginRunToTagToContent(metadata.PLUGIN_NAME)[run][metadata.SESSION_START_INFO_TAG]
    info = metadata.parse_session_start_info_plugin_data(content)
    return info.group_name, {name: getattr(value, value.WhichOneof("kind")) for name, value in info.hparams.items()}


def _experiment(events):
    from tensorboard.plugins.hparams import api_pb2, metadata

    content = events.PluginRunToTagToContent(metadata.PLUGIN_NAME)["."][metadata.EXPERIMENT_TAG]
    experiment = metadata.parse_experiment_plugin_data(content)
    return {info.name: api_pb2.DataType.Name(info.type) for info in experiment.hparam_infos}, experiment


def test_the_event_reader_finds_metrics_json_curves_hparams_and_images(tmp_path):
    runs = tmp_path / "runs"
    adam = _record(runs, epochs=4, batch_size=16, val_split=0.2, lr=3e-3, hidden=4)
    lbfgs = _record(runs, solver="lbfgs", l2=1e-2)
    events = _events(runs)
    assert sorted(events.Runs()) == sorted([".", adam.name, f"{adam.name}/train", f"{adam.name}/validation",
                                            lbfgs.name, f"{lbfgs.name}/train"])
    metrics = json.loads((adam / "metrics.json").read_text())
    history = json.loads((adam / "history.json").read_text())
    # the final scalars are metrics.json's (TensorBoard keeps float32), at the last epoch
    for name in ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "fit_seconds"):
        assert _series(events, adam.name, name) == [(4, np.float32(metrics[name]).item())]
    # the per-epoch curves are history.json's, epochs 1..4, each split in its own subfolder
    for folder, prefix in (("train", ""), ("validation", "val_")):
        for tag in ("loss", "accuracy"):
            assert _series(events, f"{adam.name}/{folder}", f"epoch_{tag}") == [
                (step, np.float32(v).item()) for step, v in enumerate(history[prefix + tag], start=1)]
    assert len(history["loss"]) == 4 and history["val_accuracy"][-1] == metrics["val_accuracy"]
    # the hparams: one session per run, named by it; numbers as numbers, the batch size as used
    group, hparams = _session(events, adam.name)
    assert group == adam.name
    assert {k: hparams[k] for k in ("solver", "lr", "epochs", "batch_size", "hidden", "val_split", "limit",
                                    "train_views", "sweep", "cache")} == {
        "solver": "adam", "lr": 3e-3, "epochs": 4.0, "batch_size": 16.0, "hidden": 4.0, "val_split": 0.2,
        "limit": 90.0, "train_views": "plain", "sweep": False, "cache": "cifar10/224px-bicubic-limit90"}
    _, fitted = _session(events, lbfgs.name)
    assert fitted["solver"] == "lbfgs" and fitted["l2"] == 1e-2
    assert not {"lr", "epochs", "batch_size", "schedule"} & set(fitted)  # not used by L-BFGS: left out, not None
    # one experiment config at the root declares every column with its type; every value is of that type
    types, experiment = _experiment(events)
    assert types["lr"] == types["batch_size"] == types["limit"] == "DATA_TYPE_FLOAT64"
    assert types["solver"] == "DATA_TYPE_STRING" and types["sweep"] == "DATA_TYPE_BOOL"
    kinds = {"DATA_TYPE_FLOAT64": float, "DATA_TYPE_STRING": str, "DATA_TYPE_BOOL": bool}
    for run in (adam, lbfgs):
        assert all(type(value) is kinds[types[name]] and value != ""
                   for name, value in _session(events, run.name)[1].items())
    assert {(m.name.group, m.name.tag) for m in experiment.metric_infos} >= {("", "test_accuracy"),
                                                                             ("train", "epoch_loss")}
    # made again by the second run: one file, marking the columns whose values differ (TensorBoard shows those first)
    from featcache.head.tensorboard import experiment_files

    assert len(experiment_files(runs)) == 1
    differs = {info.name for info in experiment.hparam_infos if info.differs}
    assert {"solver", "l2", "hidden", "val_split"} <= differs and not {"lr", "dataset", "cache", "seed"} & differs
    # L-BFGS curves are per iteration: on charts of their own, not on the epochs' axis
    curve = [v for _, v in _series(events, f"{lbfgs.name}/train", "iteration_loss")]
    assert curve == [np.float32(v).item() for v in json.loads((lbfgs / "history.json").read_text())["loss"]]
    assert len(curve) > 4 and not events.GetAccumulator(f"{lbfgs.name}/train").Tags()["tensors"].count("epoch_loss")
    # the figures, as the PNGs the run folder holds
    from tensorboard.util import tensor_util

    for tag, file in (("confusion_matrix", "confusion.png"), ("learning_curves", "curves.png")):
        (image,) = events.Tensors(adam.name, tag)
        assert tensor_util.make_ndarray(image.tensor_proto)[2] == (adam / file).read_bytes()


def test_runs_recorded_before_are_made_viewable_with_one_command(tmp_path):
    runs = tmp_path / "runs"
    first, second = _record(runs, epochs=2, val_split=0.2), _record(runs, epochs=3)
    for run in (first, second):  # as recorded before featcache wrote events
        for path in list(run.rglob("events.out.tfevents.*")):
            path.unlink()
        shutil.rmtree(run / "train"), shutil.rmtree(run / "validation", ignore_errors=True)
    for path in runs.glob("events.out.tfevents.*"):
        path.unlink()
    damaged = runs / "20000101-000000"
    damaged.mkdir()
    (damaged / "metrics.json").write_text('{"test_accuracy": 0.')

    done = run_cli("train_head.py", "--runs-dir", runs, "--backfill-events")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("TensorBoard events written for 2 of 2 runs")
    assert "warning: skipping run 20000101-000000" in done.stderr
    events = _events(runs)
    for run in (first, second):
        metrics = json.loads((run / "metrics.json").read_text())
        assert _series(events, run.name, "test_accuracy")[0][1] == np.float32(metrics["test_accuracy"]).item()
        assert len(_series(events, f"{run.name}/train", "epoch_loss")) == metrics["epochs"]
        assert _session(events, run.name)[1]["epochs"] == metrics["epochs"]
    assert len(_series(events, f"{first.name}/validation", "epoch_accuracy")) == 2
    assert _experiment(events)[0]["l2"] == "DATA_TYPE_FLOAT64"
    again = run_cli("train_head.py", "--runs-dir", runs, "--backfill-events")
    assert again.returncode == 0 and again.stdout.startswith("TensorBoard events written for 0 of 2 runs")
    assert len(list(first.glob("events.out.tfevents.*"))) == 1  # nothing written twice


def test_projector_sample_holds_test_embeddings_labels_and_cifar_thumbnails(small_run, tiny_model, cifar_root,
                                                                            tmp_path):
    import tensorflow as tf
    from PIL import Image

    from featcache.cache.read import load_features
    from featcache.extract.sources import cifar
    from featcache.head.runs import run_experiment
    from featcache.selection import select_cached

    base, _ = small_run
    key = select_cached(base / "cache", model=str(tiny_model), image_size=40)
    notes = []
    config = HeadConfig(epochs=1, train_views="plain", tta_views="plain")
    run_dir, _ = run_experiment(key, base / "cache", tmp_path / "runs", config, projector=12, data_dir=cifar_root,
                                note=notes.append, log=lambda _: None)
    folder = run_dir / "projector"
    lines = (folder / "labels.tsv").read_text().splitlines()
    assert lines[0] == "label\tpredicted\tcorrect\trow" and len(lines) == 13
    rows = np.array([int(line.split("\t")[3]) for line in lines[1:]])
    test, _ = load_features(key, "test", base / "cache", ("plain",))
    assert list(rows) == sorted(set(rows)) and rows.max() < len(test.labels)
    assert [line.split("\t")[0] for line in lines[1:]] == [test.class_names[i] for i in test.labels[rows]]
    probs = np.load(run_dir / "test_probs.npy")
    assert [line.split("\t")[1] for line in lines[1:]] == [test.class_names[i] for i in probs[rows].argmax(1)]
    reader = tf.train.load_checkpoint(str(folder))
    np.testing.assert_array_equal(reader.get_tensor("embedding/.ATTRIBUTES/VARIABLE_VALUE"), test.views["plain"][rows])
    sprite = np.asarray(Image.open(folder / "sprite.png"))
    assert sprite.shape == (4 * 32, 4 * 32, 3)  # 12 thumbnails in a 4 x 4 grid
    images = cifar.load_split(cifar.resolve_source(cifar_root), "test").images
    np.testing.assert_array_equal(sprite[32:64, 0:32], images[rows[4]])  # the fifth: row 1, column 0
    assert 'image_path: "sprite.png"' in (folder / "projector_config.pbtxt").read_text() and notes == []


def test_without_a_cifar_copy_the_projector_sample_has_no_sprite(small_run, tiny_model, tmp_path, monkeypatch):
    from featcache.head.runs import run_experiment
    from featcache.selection import select_cached

    base, _ = small_run
    monkeypatch.delenv("CIFAR10_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras"))  # no download is attempted
    notes = []
    run_dir, _ = run_experiment(select_cached(base / "cache", model=str(tiny_model), image_size=40), base / "cache",
                                tmp_path / "runs", HeadConfig(epochs=1, train_views="plain", tta_views="plain"),
                                projector=5, note=notes.append, log=lambda _: None)
    from featcache.cli import as_flags
    from featcache.errors import in_python

    (note,) = notes
    assert in_python(note) == ("note: the Projector sample has no sprite: no local copy of CIFAR-10 to draw thumbnails "
                               "from (pass data_dir=PATH)")
    assert as_flags(note).endswith("(pass --data-dir PATH)")
    assert not (run_dir / "projector" / "sprite.png").exists()
    assert len((run_dir / "projector" / "labels.tsv").read_text().splitlines()) == 6


def test_the_projector_note_is_printed_as_python_spells_it_by_default(small_run, tiny_model, tmp_path, monkeypatch,
                                                                       capsys):
    """A Python caller that passes no `note` reads `data_dir=PATH`, not the marked template."""
    from featcache.head.runs import run_experiment
    from featcache.selection import select_cached

    base, _ = small_run
    monkeypatch.delenv("CIFAR10_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras"))
    run_experiment(select_cached(base / "cache", model=str(tiny_model), image_size=40), base / "cache",
                   tmp_path / "runs", HeadConfig(epochs=1, train_views="plain", tta_views="plain"), projector=5,
                   log=lambda _: None)
    assert capsys.readouterr().out.splitlines() == [
        "note: the Projector sample has no sprite: no local copy of CIFAR-10 to draw thumbnails from (pass "
        "data_dir=PATH)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _ask(port: int, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://localhost:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_tensorboard_server_lists_every_run_with_its_test_accuracy_beside_damaged_folders(tmp_path):
    runs = tmp_path / "runs"
    good = [_record(runs, epochs=2, val_split=0.2), _record(runs, epochs=3, lr=3e-3), _record(runs, solver="lbfgs")]
    half = _record(runs, epochs=1)  # half-written: as if killed while writing its events, before metrics.json
    (half / "metrics.json").unlink()
    event_file = next(half.glob("events.out.tfevents.*"))
    event_file.write_bytes(event_file.read_bytes()[:-7])
    garbage = runs / "29991231-235958"
    garbage.mkdir()
    (garbage / "events.out.tfevents.1.garbage.v2").write_bytes(b"\x00\xff not an event file" * 10)
    listed = run_cli("train_head.py", "--runs-dir", runs, "--list")
    assert listed.returncode == 0 and {line.split()[0] for line in listed.stdout.splitlines()[1:]} == {
        run.name for run in good}

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        expected = {"."} | {run.name for run in good} | {f"{run.name}/train" for run in good}
        for _ in range(1200):  # TensorBoard starts (importing TensorFlow), then loads the folders in the background
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                if expected <= set(_ask(port, "/data/runs")):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        else:
            pytest.fail("TensorBoard did not list the runs in 2 minutes")
        experiment = _ask(port, "/data/plugin/hparams/experiment", {"experimentName": ""})
        assert {"lr", "solver", "cache", "batch_size"} <= {info["name"] for info in experiment["hparamInfos"]}
        groups = _ask(port, "/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"group": "", "tag": "test_accuracy"}, "includeInResult": True},
                          {"hparam": "solver", "includeInResult": True}]})["sessionGroups"]
        accuracy = {group["name"]: next(m["value"] for m in group["metricValues"]
                                        if m["name"]["tag"] == "test_accuracy")
                    for group in groups if group["name"] in {run.name for run in good}}
        assert accuracy == {run.name: pytest.approx(json.loads((run / "metrics.json").read_text())["test_accuracy"],
                                                     rel=1e-6) for run in good}
        assert [g["hparams"]["solver"] for g in groups if g["name"] == good[2].name] == ["lbfgs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
