"""Stage 1: a source's images -> chunks -> preprocessing in the TensorFlow graph -> the frozen network -> the cache.

sources/ reads images (CIFAR, class folders); models.py finds and loads the network; preprocess.py and extractor.py
(TensorFlow) or ov_engine.py and quantize.py (OpenVINO) embed them; pipeline.py runs a split end to end through a
runner (runners.py here, ray_runner.py on a cluster) into cache/'s writer.
"""
