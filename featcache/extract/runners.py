"""Runners of stage 1's mapper: what turns chunks of images into embeddings, here or on a cluster.

pipeline.extract reads chunks and writes the cache itself; a runner only opens a mapper, whose
`map(chunks)` gives back each chunk with its embeddings, in order. The local runner embeds in
this process; `ray_runner.RayRunner` spreads the chunks over Ray actors. Both build the same
Extractor from the same ExtractorSettings, so their caches hold the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from ..errors import UserError
from ..settings import RUNNERS
from .extractor import library_versions


@dataclass
class LocalMapper:
    extractor: object
    fixed_input_size: int | None

    @property
    def engine(self) -> str:
        return self.extractor.engine

    @property
    def batch_size(self) -> int:
        return self.extractor.batch_size

    @property
    def dim(self) -> int:
        return self.extractor.dim

    @property
    def versions(self) -> dict:
        return library_versions()

    def map(self, chunks):
        """(chunk, {view: float32 [N, D]}) per chunk, in order; a chunk without rows gets None."""
        for chunk in chunks:
            yield chunk, self.extractor.embed(chunk.images) if len(chunk.labels) else None

    def report(self) -> list[str]:
        return []


class LocalRunner:
    """The extractor in this process (one model, all of this machine's cores).

    Used as a context manager (as extract.py does for both splits), it keeps the loaded model between `open()`s
    with the same settings, so the model is loaded (and compiled) once per job; `announce` gets a line before
    each load."""

    def __init__(self, announce=None):
        self.announce = announce
        self._mapper = self._settings = None
        self._entered = False

    def __enter__(self):
        self._entered = True
        return self

    def __exit__(self, *exc):
        self._entered = False
        self._mapper = self._settings = None

    @contextlib.contextmanager
    def open(self, settings, quantizer=None, log=print):
        # the input shape is only a hint of what to compile first (any size works); int8's quantizer calibrates
        # on the train split whichever split asks, so one built for either serves both
        same = (replace(settings, input_shape=None), quantizer is None)
        if self._mapper is None or same != self._settings:
            self._mapper = self._settings = None
            if self.announce:
                self.announce(f"loading model {settings.model} ...")
            mapper = LocalMapper(*settings.build(quantizer, log))
            if self._entered:
                self._mapper, self._settings = mapper, same
        else:
            mapper = self._mapper
        yield mapper


def make_runner(name: str, ray_address: str | None = None, workers: int | None = None, verbose: bool = False,
                announce=None):
    """The runner `name` names; Ray's settings mean nothing to the local runner, so they are refused there.
    `announce`: where the local runner says that it loads the model."""
    if name not in RUNNERS:
        raise UserError(f"unknown `runner` {name!r}; choose one of {', '.join(RUNNERS)}")
    if name == "local":
        given = [f"`{param}`" for param, value in (("ray_address", ray_address), ("workers", workers))
                 if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to `runner='ray'` only")
        return LocalRunner(announce)
    from .ray_runner import RayRunner

    return RayRunner(address=ray_address, workers=workers, verbose=verbose)
