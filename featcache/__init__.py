"""featcache: extract frozen-network embeddings of an image dataset once, train heads on them in seconds."""
