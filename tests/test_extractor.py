import numpy as np
import pytest

from featcache.extract import ov_engine
from featcache.errors import UserError
from featcache.extract.extractor import Extractor
from featcache.extract.preprocess import preprocess, preprocess_static
from featcache.extract.models import load_model
from featcache.settings import RESIZE_METHODS
from conftest import TINY_DIM, save_tiny_model


def test_preprocess_gives_requested_size_and_unit_range():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images[0] = 0
    images[1, ::2] = 255  # hard edges make bicubic overshoot before clipping
    for method in ("bicubic", "bilinear"):
        out = preprocess(images, 224, method).numpy()
        assert out.shape == (3, 224, 224, 3) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert out[0].max() == 0.0 and out[1].max() == 1.0


@pytest.mark.parametrize("method", RESIZE_METHODS)
@pytest.mark.parametrize("shape,size", [((32, 32), 224), ((20, 28), 48)])
def test_matrix_resize_gives_the_same_pixels_as_tf_image_resize(method, shape, size):
    images = np.random.default_rng(1).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    ref = preprocess(images, size, method).numpy()
    assert np.abs(preprocess_static(images, size, method).numpy() - ref).max() < 1e-5


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model))


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_embeddings_do_not_depend_on_batch_size(tiny):
    images = _images(23)
    a = Extractor(tiny, image_size=64, batch_size=5, engine="tensorflow").embed(images)["plain"]
    b = Extractor(tiny, image_size=64, batch_size=23, engine="tensorflow").embed(images)["plain"]
    assert a.shape == (23, TINY_DIM) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_flip_view_is_the_embedding_of_the_mirrored_image(tiny):
    images = _images(6)
    ex = Extractor(tiny, image_size=48, views=("plain", "flip"), batch_size=4, engine="tensorflow")
    out = ex.embed(images)
    mirrored = ex.embed(images[:, :, ::-1])
    np.testing.assert_allclose(out["flip"], mirrored["plain"], atol=1e-5)
    assert np.abs(out["flip"] - out["plain"]).max() > 1e-3  # the model does see left from right


def test_model_without_training_argument_is_accepted(tmp_path):
    model = load_model(str(save_tiny_model(tmp_path / "plain", with_training_arg=False)))
    assert Extractor(model, image_size=40, engine="tensorflow").embed(_images(3))["plain"].shape == (3, TINY_DIM)


def test_model_that_is_not_a_feature_vector_is_rejected(tmp_path):
    model = load_model(str(save_tiny_model(tmp_path / "map", output="map")))
    with pytest.raises(UserError, match=r"expected a \[N, D\] float feature vector"):
        Extractor(model, image_size=40, engine="tensorflow")


def test_a_folder_that_is_not_a_savedmodel_is_named_without_hub_advice(tmp_path):
    with pytest.raises(UserError, match=f"cannot load the SavedModel in {tmp_path} .*contains neither 'saved_model.pb'"):
        load_model(str(tmp_path))


@pytest.mark.skipif(not ov_engine.available(), reason="openvino is not installed (optional engine)")
@pytest.mark.parametrize("batch_size", [None, 8])  # default (1), and a batch that 37 images leave partly empty
def test_openvino_engine_agrees_with_tensorflow(tiny, batch_size):
    tf_engine = Extractor(tiny, image_size=64, views=("plain", "flip"), batch_size=8, engine="tensorflow")
    openvino = Extractor(tiny, image_size=64, views=("plain", "flip"), batch_size=batch_size, engine="openvino")
    for images in (_images(37), _images(5)[:, :24]):  # CIFAR's 32x32, and another input size
        tf_out, ov_out = tf_engine.embed(images), openvino.embed(images)
        for view in ("plain", "flip"):
            assert ov_out[view].shape == (len(images), TINY_DIM)
            assert np.abs(tf_out[view] - ov_out[view]).max() < 1e-3


@pytest.mark.skipif(not ov_engine.available(), reason="openvino is not installed (optional engine)")
def test_openvino_keeps_a_bounded_number_of_compiled_networks(tiny):
    from featcache.extract.extractor import MAX_OV_NETWORKS

    views = ("plain", "crop-tl")  # two shapes per image size: the image and its crop
    tf_engine = Extractor(tiny, image_size=32, views=views, batch_size=8, engine="tensorflow")
    openvino = Extractor(tiny, image_size=32, views=views, engine="openvino")
    shapes = [(16, 16), (20, 24), (24, 20), (32, 32), (16, 16)]  # 8 networks needed, the first shape again last
    for height, width in shapes:
        images = _images(3)[:, :height, :width]
        ov_out, tf_out = openvino.embed(images), tf_engine.embed(images)
        for view in views:
            assert np.abs(ov_out[view] - tf_out[view]).max() < 1e-3
        assert len(openvino._ov_networks) <= MAX_OV_NETWORKS
    assert list(openvino._ov_networks)[-2:] == [(16, 16), (14, 14)]  # the most recent shapes are the ones kept


def _odd_images(n=5, height=24, width=37, seed=3):
    """Images whose width and height differ by an odd number: a mirrored image's center square is not the
    mirrored center square of the image."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_crop_center_embeds_the_centered_square_in_both_views(tiny):
    images = _odd_images()
    square = images[:, :, 6:30]  # (37 - 24) // 2 = 6 columns cut on the left
    cropped = Extractor(tiny, image_size=32, views=("plain", "flip"), crop="center", engine="tensorflow")
    plain = Extractor(tiny, image_size=32, views=("plain",), engine="tensorflow")
    out = cropped.embed(images)
    np.testing.assert_allclose(out["plain"], plain.embed(square)["plain"], atol=1e-5)
    np.testing.assert_allclose(out["flip"], plain.embed(square[:, :, ::-1])["plain"], atol=1e-5)
    mixed = cropped.embed(list(images))  # images of mixed sizes go through the per-image path
    for view in ("plain", "flip"):
        np.testing.assert_allclose(mixed[view], out[view], atol=1e-5)
    squashed = Extractor(tiny, image_size=32, views=("plain",), engine="tensorflow").embed(images)["plain"]
    assert np.abs(squashed - out["plain"]).max() > 1e-3  # crop none squashes the whole image instead


@pytest.mark.skipif(not ov_engine.available(), reason="openvino is not installed (optional engine)")
def test_crop_center_agrees_across_engines_in_both_views(tiny):
    images = _odd_images()
    by_engine = {engine: Extractor(tiny, image_size=32, views=("plain", "flip"), crop="center", engine=engine,
                                   input_shape=images.shape[1:3]).embed(images) for engine in ("tensorflow", "openvino")}
    for view in ("plain", "flip"):
        np.testing.assert_allclose(by_engine["openvino"][view], by_engine["tensorflow"][view], atol=1e-4)
