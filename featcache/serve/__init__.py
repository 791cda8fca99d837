"""Serving a trained head: the classifier as one TensorFlow module (predict.py), and its exports (export.py)."""
