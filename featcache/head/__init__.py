"""Stage 2: a small Keras classifier trained on cached embeddings (seconds, not hours).

The head standardises features with statistics of its training rows (a Normalization layer, so they
are saved inside the .keras file), optionally passes them through one hidden ReLU layer, and ends in a
softmax over the cache's classes. Each training view gives one row per image, and at test time the
probabilities of several views can be averaged (TTA). rows.py makes the rows, model.py the Keras model,
fit.py the Adam loop that trains it, probe.py the converged linear fit (L-BFGS), training.py ties them
together and scores.
"""

from .model import build_model
from .rows import TrainingData, column_stats, side_by_side, split_validation, training_data, training_rows
from .training import TrainedHead, predict, score, sweep_l2, train

__all__ = ["TrainedHead", "TrainingData", "build_model", "column_stats", "predict", "score", "side_by_side",
           "split_validation", "sweep_l2", "train", "training_data", "training_rows"]
