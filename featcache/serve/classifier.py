"""The trained classifier as one TensorFlow module: uint8 images of any size in, class probabilities out.

Inside: the extractor's preprocessing with the cache's settings, the frozen network (or extract.layers' function
for a head reading inner layers) and the run's Keras head, averaged over the run's test-time views. predict.py
calls it and export.py saves it as a SavedModel (loaded by `tf.saved_model.load` alone), so both give the same
numbers.
"""

from __future__ import annotations

from pathlib import Path

from ..extract.preprocess import preprocess_views
from .run import load_run


def build_classifier(run_dir: Path, announce=None):
    """A tf.Module for one run: `classify(uint8 [N,H,W,3]) -> {probabilities, top_class, class_names}`; `announce`
    gets a line before the slow load (load_run)."""
    parts = load_run(run_dir, announce)  # says what loads before the import of TensorFlow, itself seconds long
    import tensorflow as tf

    key = parts.key

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__(name="featcache_classifier")
            self.head = parts.head  # tracked, so that a SavedModel holds it (and the network, when called as it is)
            if parts.feature_function is None:  # else the network is inside that function, frozen into constants
                self.extractor = parts.network
            self.class_names = tf.constant(parts.class_names)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def classify(self, images):
            views = preprocess_views(images, parts.tta_views, key.image_size, key.resize, key.crop)
            probs = tf.add_n([parts.probabilities(x) for x in views]) / len(views)
            return {"probabilities": probs, "top_class": tf.gather(self.class_names, tf.argmax(probs, axis=1)),
                    "class_names": self.class_names}

    return Classifier()
