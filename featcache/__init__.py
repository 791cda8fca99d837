"""featcache: extract frozen-network embeddings of an image dataset once, train heads on them in seconds."""

from .cache.layout import TOOL_VERSION as __version__  # the one place: the version every cache records
