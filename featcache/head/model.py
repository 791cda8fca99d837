"""The head as saved in head.keras: embedding -> standardize -> [hidden ReLU] -> [dropout] -> softmax."""

from __future__ import annotations

import numpy as np

from ..settings import HeadConfig


def build_model(dim: int, config: HeadConfig, mean: np.ndarray, variance: np.ndarray, classes: int):
    """The head as saved: embedding -> standardize -> [hidden ReLU] -> [dropout] -> softmax."""
    import keras

    def dense(units, activation, name, seed):  # seeded here: no process-wide random state is touched
        return keras.layers.Dense(units, activation=activation, name=name,
                                  kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                                  kernel_regularizer=keras.regularizers.l2(config.l2) if config.l2 else None)

    layers = []
    if config.hidden:
        layers.append(dense(config.hidden, "relu", "hidden", config.seed))
    if config.dropout:
        layers.append(keras.layers.Dropout(config.dropout, seed=config.seed))
    layers.append(dense(classes, "softmax", "classes", config.seed + 1))

    inputs = keras.Input(shape=(dim,), name="embedding")
    x = keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name="standardize")(inputs)
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name="head")
