"""The local runner of stage 1's shards (ray_runner.RayRunner is the cluster's): it runs shard.run_shard for the
shards pipeline.extract gives it, and joins them (`assemble`). Both runners build the same Extractor and cut shards
into the same chunks, so their caches hold the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import replace

from .shard import Held, assemble_shards, progress_bar, run_shard


class LocalRunner(Held):
    """The shards in order, in this process (one model, all of this machine's cores).

    Held (as extract.py holds it for both splits), it keeps the loaded model between runs with the same settings,
    so the model is loaded (and compiled) once per job; `announce` gets a line before each load."""

    def __init__(self, announce=None):
        self.announce = announce
        self._kept = None  # the last load until close(): (settings but the shape hint, no quantizer?), extractor, size

    def close(self):
        self._kept = None

    def shards(self, items: int, chunk_size: int) -> int:
        """A new plan's shard count when none is asked: one, the cache itself (nothing to assemble)."""
        return 1

    def run(self, job, indices, log, progress, reader) -> dict:
        """Run shards `indices` of `job`: {processed, engine, load_seconds}, as pipeline.ExtractResult names them."""
        started = time.perf_counter()
        extractor, fixed = self._extractor(replace(job.settings, input_shape=reader.image_shape), job.quantizer, log)
        job.settings.record_input_size(fixed, job.cache_dir)
        loaded = time.perf_counter() - started
        with progress_bar(job, indices, progress) as bar:
            def above_bar(line):  # a line logged while the bar is drawn goes above it, not onto it
                bar.clear()
                log(line)
                bar.refresh()

            processed = sum(run_shard(job, index, extractor, reader, bar, above_bar) for index in indices)
        return dict(processed=processed, engine=extractor.engine, load_seconds=loaded)

    def _extractor(self, settings, quantizer, log):
        # the input shape is only a hint of what to compile first (any size works); int8's quantizer calibrates
        # on the train split whichever split asks, so one built for either serves both
        same = (replace(settings, input_shape=None), quantizer is None)
        if self._kept and self._kept[0] == same:
            return self._kept[1:]
        if self.announce:
            self.announce(f"loading model {settings.model} ...")
        extractor, fixed = settings.build(quantizer, log)
        self._kept = (same, extractor, fixed)
        return extractor, fixed

    assemble = staticmethod(assemble_shards)
