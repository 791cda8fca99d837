"""featcache: extract frozen-network embeddings of an image dataset once, train heads on them in seconds."""

__version__ = "0.1.0"  # recorded in every cache file featcache writes (`tool_version`)
