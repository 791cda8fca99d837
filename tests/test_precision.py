"""--precision f32|bf16|int8: part of the cache key, calibrated on train images only, built once, clear errors."""

import h5py
import numpy as np
import pytest

from featcache.extract import extractor, ov_engine, pipeline
from featcache.errors import UserError
from featcache.extract.sources import cifar
from conftest import make_key, run_cli

needs_openvino = pytest.mark.skipif(not (ov_engine.available() and ov_engine.available("nncf")),
                                    reason="OpenVINO and NNCF are optional (requirements-openvino.txt)")


def _key(model, precision):
    return make_key(str(model), 32, "bilinear", None, precision)


def _extract(model, precision, split, data_dir, cache):
    return pipeline.extract(_key(model, precision), split, data_dir=data_dir, cache_dir=cache, progress=False)


@needs_openvino
def test_int8_calibrates_on_train_images_only_once_and_coexists_with_f32(tiny_model, cifar_root, tmp_path,
                                                                          monkeypatch):
    import nncf

    seen = []
    real_quantize = nncf.quantize

    def spying_quantize(model, dataset, **kwargs):
        seen.extend(np.asarray(item) for item in dataset.get_inference_data())
        return real_quantize(model, dataset, **kwargs)

    monkeypatch.setattr(nncf, "quantize", spying_quantize)
    # The test split first: it must still calibrate on train images.
    int8 = _extract(tiny_model, "int8", "test", cifar_root, tmp_path)
    source = cifar.resolve_source(cifar_root)
    train, test = cifar.load_split(source, "train"), cifar.load_split(source, "test")
    assert len(seen) == len(train.labels)  # the fixture's train split is smaller than the sample size
    train_rows = {image.tobytes(): i for i, image in enumerate(train.images)}
    test_images = {image.tobytes() for image in test.images}
    rows = sorted(train_rows[batch[0].tobytes()] for batch in seen)
    assert rows == list(range(len(train.labels)))
    assert not any(batch[0].tobytes() in test_images for batch in seen)

    with h5py.File(int8.path, "r") as f:
        assert f.attrs["precision"] == "int8" and f.attrs["engine"] == "openvino"
        assert f.attrs["calibration"].startswith(f"{len(train.labels)} train images, seed 0")
        model_file = f.attrs["quantized_model"]
    before = (tmp_path / model_file).stat().st_mtime_ns

    def no_calibration(*_, **__):
        raise AssertionError("the quantized model was built again")

    monkeypatch.setattr(nncf, "quantize", no_calibration)
    again = _extract(tiny_model, "int8", "train", cifar_root, tmp_path)
    assert again.processed == len(train.labels)
    assert (tmp_path / model_file).stat().st_mtime_ns == before

    f32 = _extract(tiny_model, "f32", "test", cifar_root, tmp_path)
    assert f32.path != int8.path and int8.path.exists()
    assert f32.path.parent.name == "32px-bilinear" and int8.path.parent.name == "32px-bilinear-int8"
    with h5py.File(f32.path, "r") as a, h5py.File(int8.path, "r") as b:
        assert a.attrs["precision"] == "f32" and "calibration" not in a.attrs
        f32_rows, int8_rows = a["embeddings"][:], b["embeddings"][:]
    assert not np.array_equal(f32_rows, int8_rows)  # quantized for real
    cosine = (f32_rows * int8_rows).sum(1) / np.linalg.norm(f32_rows, axis=1) / np.linalg.norm(int8_rows, axis=1)
    assert cosine.min() > 0.9, cosine.min()  # and still the same features


def test_precision_errors_are_one_line(monkeypatch):
    with pytest.raises(UserError, match="OpenVINO engine only"):
        extractor.resolve_engine("tensorflow", "int8")
    monkeypatch.setattr(ov_engine, "available", lambda: False)
    with pytest.raises(UserError, match="needs the OpenVINO engine: pip install -r requirements-openvino.txt"):
        extractor.resolve_engine("auto", "bf16")


@needs_openvino
def test_bf16_without_native_support_and_int8_without_nncf_are_refused(monkeypatch):
    import openvino

    class CpuWithoutBf16:
        def get_property(self, device, name):
            return ["FP32", "INT8", "BIN"]

    monkeypatch.setattr(openvino, "Core", CpuWithoutBf16)
    with pytest.raises(UserError, match="needs a CPU with native bf16"):
        extractor.resolve_engine("auto", "bf16")
    monkeypatch.setattr(ov_engine, "available", lambda package="openvino": package != "nncf")
    with pytest.raises(UserError, match="needs NNCF"):
        extractor.resolve_engine("openvino", "int8")


def test_cli_precision_on_the_tensorflow_engine_and_a_missing_cache(tiny_model, tmp_path):
    out = run_cli("extract.py", "--engine", "tensorflow", "--precision", "int8", "--model", tiny_model,
                  "--split", "test", "--cache-dir", tmp_path, "--data-dir", tmp_path / "nothing")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "--precision int8 runs on the OpenVINO engine only" in line  # said before the data is even looked at
    missing = run_cli("train_head.py", "--precision", "bf16", "--model", tiny_model, "--cache-dir", tmp_path,
                      "--runs-dir", tmp_path / "runs")
    assert missing.returncode == 2
    (line,) = missing.stderr.strip().splitlines()
    assert "224px-bicubic-bf16" in line and "--precision bf16" in line


@pytest.mark.parametrize("flags, cap, kind", [
    ({"avx2", "avx512f", "avx512_vnni"}, "", "avx512-vnni"),
    ({"avx2", "avx512f", "avx512_vnni"}, "AVX2", "avx2"),  # oneDNN held below VNNI: pair sums in 16 bits
    ({"avx2", "avx512f", "avx512_vnni"}, "avx512_core", "avx2"),
    ({"avx2", "avx512_vnni", "amx_int8"}, "", "amx"),
    ({"avx2", "avx512_vnni", "amx_int8"}, "AVX512_CORE_VNNI", "avx512-vnni"),
    ({"avx2", "avx512f", "avx512_vnni"}, "AVX2_VNNI", "avx2"),  # no AVX-VNNI on the CPU: plain AVX2 products
    ({"avx2", "avx_vnni", "avx512_vnni"}, "AVX2_VNNI", "avx-vnni"),
    ({"avx2", "avx_vnni"}, "", "avx-vnni"),
    ({"avx2"}, "", "avx2"),
    ({"avx2"}, "SSE41", "other"),
    (set(), "", "other"),
])
def test_int8_class_follows_the_cpu_and_the_onednn_cap(monkeypatch, flags, cap, kind):
    from featcache import cpu

    monkeypatch.setattr(cpu, "flags", lambda: frozenset(flags))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert cpu.int8_class() == kind
    assert cpu.int8_dot_products() == (kind in ("amx", "avx512-vnni", "avx-vnni"))


@needs_openvino
@pytest.mark.parametrize("flags, overflow_fix, note", [
    ({"avx2", "avx512f", "avx512_vnni"}, False, None),
    ({"avx2"}, True, None),
    ({"avx2", "avx512_vnni", "amx_int8"}, False, "not on this one (amx)"),
])
def test_int8_weights_take_7_bits_where_pair_sums_can_saturate_and_unmeasured_cpus_get_a_note(
        tiny_model, cifar_root, tmp_path, monkeypatch, flags, overflow_fix, note):
    import nncf
    from nncf.quantization.advanced_parameters import OverflowFix

    from featcache import cpu

    monkeypatch.setattr(cpu, "flags", lambda: frozenset(flags))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    options, real_quantize = [], nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda model, dataset, **kwargs: options.append(kwargs) or
                        real_quantize(model, dataset, **kwargs))
    logged = []
    done = pipeline.extract(_key(tiny_model, "int8"), "test", data_dir=cifar_root, cache_dir=tmp_path,
                            progress=False, log=logged.append)
    fix = options[0].get("advanced_parameters")
    assert (fix is not None and fix.overflow_fix == OverflowFix.ENABLE) == overflow_fix
    with h5py.File(done.path, "r") as f:
        assert f.attrs["quantized_model"].endswith("-ovf.xml") == overflow_fix
        assert ("weights on 7 bits" in f.attrs["calibration"]) == overflow_fix
    notes = [line for line in logged if line.startswith("note: int8")]
    assert notes == ([] if note is None else [
        "note: int8's accuracy cost was measured on avx512-vnni and avx2 CPUs, not on this one (amx); before relying "
        "on it, compare heads on f32 and int8 caches of a few thousand images"])


def test_a_calibration_sample_too_large_for_memory_is_refused_before_reading():
    from types import SimpleNamespace

    from featcache.extract.quantize import calibration_samples
    from featcache.settings import CALIBRATION_SEED, CALIBRATION_SIZE

    def unread(*args):
        raise AssertionError("no image may be read")

    photos = SimpleNamespace(rows=5000, image_shape=(3000, 4000), chunks=unread)
    with pytest.raises(UserError, match=r"^int8 calibration holds 300 train images in memory: at 4000x3000 that is "
                                        r"10\.1 GiB, above the 2 GiB allowed; use precision='f32'"):
        calibration_samples(photos, [(CALIBRATION_SIZE, CALIBRATION_SEED)])


@needs_openvino
def test_the_quantized_model_attribute_names_every_int8_network_the_cache_was_made_with(tiny_model, cifar_root,
                                                                                       tmp_path):
    done = pipeline.extract(_key(tiny_model, "int8"), "test", data_dir=cifar_root, cache_dir=tmp_path,
                            views="plain,crop-tl", progress=False)
    with h5py.File(done.path, "r") as f:
        names = f.attrs["quantized_model"].split(", ")
    assert len(names) == 2 and len({name.split("-in")[1] for name in names}) == 2  # 32x32 images and 28x28 crops
    assert all((tmp_path / name).exists() for name in names)
    assert sorted(path.name for path in done.path.parent.parent.glob("int8/*.xml")) == sorted(
        (tmp_path / name).name for name in names)
