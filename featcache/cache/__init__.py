"""The HDF5 embedding cache, by role: where a cache lives and what it says about itself (layout.py),
reading and checking one (read.py), and writing one so that a crash at any moment loses at most a
chunk (write.py). Stage 1 writes caches, stage 2 reads them; neither needs the other.
"""
