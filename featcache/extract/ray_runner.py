"""Stage 1's mapper on a Ray cluster: each worker is a Ray actor that loads the model once.

The driver (pipeline.extract) still reads the source and writes the one cache file with the
crash-safe writer, so resume, verification and every reader work unchanged; this module only sends
each chunk of images to the workers, cut into one piece per worker, and takes the embeddings back
in source order, with at most IN_FLIGHT_PER_WORKER pieces per worker in flight. Ray Core actors
rather than Ray Data's map_batches: the results must come back in order into one file with a bound
on what waits, which is a small queue here, and Ray Data would add pandas/pyarrow and a second
scheduler for it.

The engine is chosen once: the first worker resolves `engine` (auto: OpenVINO when installed,
no GPU, and the model converts) and its batch size, and every other worker is started with both
pinned, so one cache never mixes engines. A worker process that dies is restarted by Ray (the
model loaded again) and its chunks retried; a worker that cannot load the model stops the job
with one line naming its node. Each worker reserves one CPU (or one GPU) and runs that many threads.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from .extractor import batch_unit, library_versions

INSTALL_HINT = "pip install -r requirements-ray.txt"
IN_FLIGHT_PER_WORKER = 2  # one piece being embedded, the next already there: a worker never waits for the driver
CONNECT_SECONDS = 10  # how long a cluster address may take to answer
MAX_RESTARTS = 3  # times Ray starts a dead worker again (reloading the model) and retries its pieces
# What a worker started by `ray start` on another node does not inherit from this shell but needs.
FORWARDED_ENV = ("TFHUB_CACHE_DIR", "TFHUB_MODEL_LOAD_FORMAT", "TF_CPP_MIN_LOG_LEVEL", "TF_DETERMINISTIC_OPS")
PACKAGE_DIR = Path(__file__).resolve().parent


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"`runner='ray'` needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class Embedder:
    """One worker's state: an Extractor built when the actor starts (and again when Ray restarts it).

    A failed load is kept and reported by `info()`, not raised from the constructor, so the driver
    gets the reason and the node in one line instead of a dead actor's traceback.
    """

    def __init__(self, settings, threads: int | None):
        import ray

        self.place = {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                      "pid": os.getpid()}
        self.notes: list[str] = []
        self.extractor, self.fixed_input_size, self.error = None, None, None
        started = time.perf_counter()
        try:
            if threads:
                _limit_tensorflow_threads(threads)
            self.extractor, self.fixed_input_size = settings.build(log=self.notes.append, threads=threads)
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported, with its node, by info()
            self.error = first_line(exc) if not isinstance(exc, UserError) else exc.template
        self.load_seconds = time.perf_counter() - started

    def info(self) -> dict:
        extractor = self.extractor
        return dict(self.place, error=self.error, notes=self.notes, load_seconds=self.load_seconds,
                    fixed_input_size=self.fixed_input_size, versions=library_versions(),
                    engine=extractor and extractor.engine,
                    batch_size=extractor and extractor.batch_size, dim=extractor and extractor.dim)

    def embed(self, images):
        """({view: float32 [N, D]}, this process's pid, seconds spent, its peak RSS in bytes)."""
        if self.error:  # a restarted worker that could not load the model again
            raise RuntimeError(f"cannot load the model: {self.error}")
        started = time.perf_counter()
        vectors = self.extractor.embed(images)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB
        return vectors, self.place["pid"], time.perf_counter() - started, peak_rss


def _limit_tensorflow_threads(threads: int):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


@dataclass
class Worker:
    """The driver's view of one actor: where it runs and what it did."""

    actor: object
    index: int
    node: str = ""
    ip: str = ""
    pids: list = field(default_factory=list)
    load_seconds: float = 0.0
    in_flight: int = 0
    rows: int = 0
    busy_seconds: float = 0.0
    peak_rss: int = 0

    def line(self) -> str:
        restarts = f", restarted {len(self.pids) - 1}x" if len(self.pids) > 1 else ""
        speed = self.rows / self.busy_seconds if self.busy_seconds else 0.0
        return (f"worker {self.index} on node {self.node[:8]} ({self.ip}, pid {self.pids[-1]}): {self.rows} rows, "
                f"{speed:.1f} images/s while busy, model load {self.load_seconds:.1f} s, "
                f"peak RSS {self.peak_rss / 1e9:.2f} GB{restarts}")


class RayMapper:
    """Chunks in, (chunk, embeddings) out in the same order, embedded by Ray actors."""

    def __init__(self, ray, settings, workers: int | None, log=print):
        self.ray = ray
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        slots = gpus or int(resources.get("CPU", 0))
        count = workers or slots
        if count > slots:  # Ray would keep the extra workers pending forever
            raise UserError(f"`workers` {count} needs one {'GPU' if gpus else 'CPU'} each; the Ray cluster has {slots}")
        self._options = dict(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=MAX_RESTARTS,
                             max_task_retries=MAX_RESTARTS)
        self._threads = None if gpus else 1
        self._remote = ray.remote(Embedder)
        # All workers load at once; the first one's engine and batch size are the job's, and a worker
        # that resolved others (no OpenVINO on its node, a GPU) is started again with them pinned.
        log(f"ray: starting {count} workers (each loads the model)")
        self.workers = [Worker(self._actor(settings), index) for index in range(count)]
        try:
            self._pin(settings, log)
        except BaseException:
            self.stop()
            raise

    def _pin(self, settings, log):
        first = self._ready(self.workers[0])
        self.engine, self.batch_size = first["engine"], first["batch_size"]
        self.dim, self.fixed_input_size, self.versions = first["dim"], first["fixed_input_size"], first["versions"]
        for note in first["notes"]:
            log(note)
        pinned = replace(settings, engine=self.engine, batch_size=self.batch_size)
        for worker in self.workers[1:]:
            info = self._ready(worker)
            if (info["engine"], info["batch_size"], info["versions"]) != (self.engine, self.batch_size, self.versions):
                if info["versions"] != self.versions:
                    raise UserError(f"ray worker {worker.index} on node {worker.node[:8]} ({worker.ip}) has other "
                                    f"library versions than worker 0: {info['versions']} vs {self.versions}")
                self.ray.kill(worker.actor, no_restart=True)
                worker.actor = self._actor(pinned)
                self._ready(worker)
        nodes = len({worker.node for worker in self.workers})
        log(f"ray: {len(self.workers)} workers on {nodes} node(s), {self.engine}, batch {self.batch_size}")

    def _actor(self, settings):
        return self._remote.options(**self._options).remote(settings, self._threads)

    def _ready(self, worker: Worker) -> dict:
        """Wait for a worker's model load; a failure is one line naming the node."""
        try:
            info = self.ray.get(worker.actor.info.remote())
        except self.ray.exceptions.RayError as exc:
            raise UserError(f"ray worker {worker.index} did not start: {first_line(exc)}") from None
        worker.node, worker.ip, worker.pids, worker.load_seconds = info["node"], info["ip"], [info["pid"]], \
            info["load_seconds"]
        if info["error"]:
            raise UserError(f"ray worker {worker.index} on node {info['node'][:8]} ({info['ip']}): {info['error']}")
        return info

    def map(self, chunks):
        """(chunk, {view: float32 [N, D]}) per chunk, in order; a chunk without rows gets None.

        Each chunk is cut into one piece per worker (whole network batches, so every batch is the
        local runner's), each piece goes to the worker with the fewest pieces in flight, and the
        oldest chunk is taken back as soon as the workers hold IN_FLIGHT_PER_WORKER pieces each.
        Pieces rather than whole chunks keep every worker busy up to the last chunk: with whole
        chunks, 5,000 images in chunks of 1,024 kept one of two workers idle for a fifth of the run.
        """
        waiting = collections.deque()  # (chunk, [(worker, result ref, rows)])
        limit = IN_FLIGHT_PER_WORKER * len(self.workers)
        for chunk in chunks:
            waiting.append((chunk, [self._send(chunk.images[lo:hi]) for lo, hi in self._pieces(chunk.images)]))
            while waiting and (not waiting[0][1] or sum(w.in_flight for w in self.workers) >= limit):
                yield self._result(*waiting.popleft())
        while waiting:
            yield self._result(*waiting.popleft())

    def _pieces(self, images) -> list[tuple[int, int]]:
        """[lo, hi) ranges: one per worker, each a whole number of the extractor's batches (or groups)."""
        unit = batch_unit(images, self.batch_size)
        size = unit * max(1, math.ceil(len(images) / len(self.workers) / unit))
        return [(lo, min(lo + size, len(images))) for lo in range(0, len(images), size)]

    def _send(self, images):
        worker = min(self.workers, key=lambda w: w.in_flight)
        worker.in_flight += 1
        return worker, worker.actor.embed.remote(images), len(images)

    def _result(self, chunk, pieces):
        if not pieces:
            return chunk, None
        parts = []
        for worker, ref, rows in pieces:
            try:
                vectors, pid, seconds, peak_rss = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                raise UserError(f"ray worker {worker.index} on node {worker.node[:8]} ({worker.ip}) failed: "
                                f"{_cause(exc)}; committed rows are kept and a rerun resumes from them") from None
            worker.in_flight -= 1
            worker.rows += rows
            worker.busy_seconds += seconds
            worker.peak_rss = max(worker.peak_rss, peak_rss)
            if pid != worker.pids[-1]:
                worker.pids.append(pid)  # Ray restarted it: the pieces it held were embedded again
            parts.append(vectors)
        return chunk, {view: np.concatenate([part[view] for part in parts]) for view in parts[0]}

    def reset_counts(self):
        for worker in self.workers:
            worker.rows, worker.busy_seconds = 0, 0.0

    def report(self) -> list[str]:
        """Per worker rows and throughput, then rows per node."""
        per_node = collections.Counter()
        for worker in self.workers:
            per_node[f"{worker.node[:8]} ({worker.ip})"] += worker.rows
        nodes = ", ".join(f"{node}: {rows}" for node, rows in per_node.items())
        return [worker.line() for worker in self.workers] + [f"rows per node: {nodes}"]

    def stop(self):
        """Kill this job's actors (their in-flight work with them); the cluster itself stays up."""
        for worker in self.workers:
            with contextlib.suppress(Exception):
                self.ray.kill(worker.actor, no_restart=True)


def check_reachable(address: str, timeout: float = CONNECT_SECONDS):
    """Refuse a cluster address where nothing answers within `timeout` (ray.init would wait for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"`ray_address` {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot join the Ray cluster at {address}: nothing answers there "
                        f"({exc.strerror or type(exc).__name__})") from None


def _cause(exc) -> str:
    """The worker's own error line when it raised one, else Ray's first line."""
    cause = getattr(exc, "cause", None)
    return first_line(cause) if cause is not None else first_line(exc)


@dataclass
class RayRunner:
    """Embed on a Ray cluster: `address` None starts a local Ray (RAY_ADDRESS, if set, is used instead),
    'auto' joins the cluster running on this machine, host:port or ray://host:port a given one.

    Used as a context manager (as extract.py does for both splits), the connection and the workers
    stay up between `open()`s with the same settings, so the model is loaded once per job.
    """

    address: str | None = None
    workers: int | None = None
    verbose: bool = False
    _mapper: RayMapper | None = field(default=None, init=False, repr=False)
    _settings: object = field(default=None, init=False, repr=False)
    _started_here: bool = field(default=False, init=False, repr=False)
    _entered: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        import_ray()  # before any data is read: without Ray, say so at once

    def __enter__(self):
        self._entered = True
        return self

    def __exit__(self, *exc):
        self._entered = False
        self.close()

    @contextlib.contextmanager
    def open(self, settings, quantizer=None, log=print):
        ray = import_ray()
        if quantizer is not None:
            raise UserError("`precision='int8'` runs with `runner='local'` only (its calibrated network is built on "
                            "the driver); use `precision='f32'` or `precision='bf16'` with `runner='ray'`")
        failed = True
        try:
            same = replace(settings, input_shape=None)  # only a hint of what to compile first: any size works
            if self._mapper is None or same != self._settings:
                self._stop_workers()
                self._started_here = self._connect(ray) or self._started_here
                self._mapper, self._settings = RayMapper(ray, settings, self.workers, log), same
            self._mapper.reset_counts()
            yield self._mapper
            failed = False
        finally:  # an error or Ctrl-C stops the work this job started at once
            if failed or not self._entered:
                self.close()

    def close(self):
        """Kill this job's workers, and end the Ray this job started (a cluster it joined stays up)."""
        self._stop_workers()
        if self._started_here:
            import ray

            ray.shutdown()
            self._started_here = False

    def _stop_workers(self):
        if self._mapper is not None:
            self._mapper.stop()
        self._mapper = self._settings = None

    def _connect(self, ray) -> bool:
        """Join or start Ray; True when this call started (or joined) it, so the job ends it too."""
        if ray.is_initialized():
            return False  # the caller's own Ray session (a notebook, a test): used and left running
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        runtime_env = {"py_modules": [str(PACKAGE_DIR)],  # the nodes need not have this code installed
                       "env_vars": {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}}
        options = dict(log_to_driver=self.verbose, logging_level=logging.INFO if self.verbose else logging.ERROR,
                       runtime_env=runtime_env)
        if address == "local":
            options["include_dashboard"] = False
        elif address != "auto":
            check_reachable(address)
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot join the Ray cluster at {address}: {first_line(exc)}") from None
        finally:  # ray.init makes SIGTERM a bare sys.exit: it is met as Ctrl-C again (process.py), workers stopped
            signal.signal(signal.SIGTERM, sigterm)
        return True
