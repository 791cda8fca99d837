"""Runners of stage 1's shards: who runs pipeline.run_shard for each shard of a plan, here or on a cluster.

pipeline.extract plans the split and, once every shard is done, assembles the cache; a runner only runs the shards it
is given, and joins them where it runs them. The local runner runs them in order in this process (one model, all of this machine's cores);
`ray_runner.RayRunner` runs one Ray call per shard on a cluster's workers. Both build the same Extractor from the same
ExtractorSettings and cut shards into the same chunks, so their caches hold the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from ..errors import UserError
from ..settings import RUNNERS


@dataclass
class RunReport:
    """What a runner did: images read and embedded, the engine, the model's load time, lines for the summary."""

    processed: int = 0
    engine: str = ""
    load_seconds: float = 0.0
    report: list = field(default_factory=list)


class LocalRunner:
    """The shards in order, in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def shards(self, items: int, chunk_size: int) -> int:
        """A new plan's shard count when none is asked: one, the cache itself (nothing to assemble)."""
        return 1

    def run(self, job, indices, log=print, progress=True, reader=None) -> RunReport:
        from . import sources
        from .pipeline import progress_bar, run_shard

        reader = reader or sources.open_split(job.key, job.split, job.data_dir, strict=job.strict)
        started = time.perf_counter()
        extractor, fixed = replace(job.settings, input_shape=reader.image_shape).build(job.quantizer, log)
        job.loaded(fixed)
        run = RunReport(engine=extractor.engine, load_seconds=time.perf_counter() - started)
        bar = progress_bar(sum(job.plan.shards[i][1] - job.plan.shards[i][0] for i in indices), job.split, progress)
        try:
            for index in indices:
                run.processed += run_shard(job, index, extractor, reader, bar, log)
        finally:
            bar.close()
        return run


    def assemble(self, job, reader=None) -> list:
        from .pipeline import assemble_shards

        return assemble_shards(job, reader)


def make_runner(name: str, ray_address: str | None = None, workers: int | None = None, verbose: bool = False):
    """The runner `name` names; Ray's settings mean nothing to the local runner, so they are refused there."""
    if name not in RUNNERS:
        raise UserError(f"unknown `runner` {name!r}; choose one of {', '.join(RUNNERS)}")
    if name == "local":
        given = [f"`{param}`" for param, value in (("ray_address", ray_address), ("workers", workers))
                 if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to `runner='ray'` only")
        return LocalRunner()
    from .ray_runner import RayRunner

    return RayRunner(address=ray_address, workers=workers, verbose=verbose)
