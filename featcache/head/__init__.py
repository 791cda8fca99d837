"""Stage 2: a small Keras classifier trained on cached embeddings (seconds, not hours).

The head standardises features with statistics of its training rows (a Normalization layer, so they
are saved inside the .keras file), optionally passes them through one hidden ReLU layer, and ends in a
softmax over the cache's classes. Each training view gives one row per image, and at test time the
probabilities of several views can be averaged (TTA). rows.py makes the rows, model.py the Keras model,
fit.py the Adam loop that trains it, probe.py the converged linear fit (L-BFGS), training.py ties them
together and scores; runs.py records runs (records.py), with their plots, TensorBoard events and thumbnails.
"""
