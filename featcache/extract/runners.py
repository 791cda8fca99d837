"""Runners of stage 1's shards: who runs shard.run_shard for each shard of a plan, here or on a cluster.

pipeline.extract plans the split and, once every shard is done, has the runner join them (`assemble`) where it runs
them; a runner only runs the shards it is given. The local runner runs them in order in this process (one model, all
of this machine's cores); `ray_runner.RayRunner` runs one Ray call per shard on a cluster's workers. Both build the
same Extractor from the same ExtractorSettings and cut shards into the same chunks, so their caches hold the same
numbers. extract.py's `make_runner` picks one by name.
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

    def assemble(self, job, reader) -> list:
        return assemble_shards(job, reader)
