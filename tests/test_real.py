"""The real MobileNetV2 and the real CIFAR-10 from ../shared (present in CI; skipped elsewhere)."""

import numpy as np

from featcache.extract import pipeline
from featcache.cache import read
from conftest import REAL_DATA, REAL_MODEL, make_key, requires_shared


@requires_shared()
def test_real_model_on_256_real_images_gives_useful_features(tmp_path):
    key = make_key(str(REAL_MODEL), 224, "bicubic", 256)
    rows = {}
    for split in ("train", "test"):
        result = pipeline.extract(key, split, data_dir=REAL_DATA, cache_dir=tmp_path, progress=False)
        embeddings, labels, _ = read.read(result.path, key.attrs(split), ("plain",))
        rows[split] = embeddings["plain"], labels
    x, y = rows["train"]
    assert x.shape == (256, 1280) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 6.0  # ReLU6 features after average pooling
    centroids = np.stack([x[y == c].mean(0) for c in range(10)])
    tx, ty = rows["test"]
    predicted = np.argmin(((tx[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float(np.mean(predicted == ty))
    assert accuracy > 0.5, f"nearest-centroid accuracy {accuracy:.3f} (chance is 0.1)"
