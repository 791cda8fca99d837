"""featcache: extract frozen-network embeddings of CIFAR-10 once, train heads on them in seconds."""

__version__ = "0.1.0"
