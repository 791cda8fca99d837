"""Stage 1's shards on a Ray cluster: one actor call per shard, and the worker does the shard's whole loop.

Each worker is a Ray actor (one per free CPU, or GPU, unless `workers` says fewer) that loads the model once, then
runs shard.run_shard for shard after shard, opening the source itself (the cluster shares storage) and writing its
own shard file. The driver only schedules and tracks the shards, and a Ray task joins them: it reads no image and no
row. Workers that would make other rows than worker 0 stop the job in one line. A dead worker is restarted by Ray
and its shard retried, resuming from its committed rows. No wait is unbounded (START_SECONDS, STALL_SECONDS).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, first_line
from ..settings import DEFAULT_SHARD_ITEMS, SHARDS_PER_WORKER
from . import sources
from .shard import Held, assemble_shards, progress_bar, run_shard

INSTALL_HINT = "pip install -r requirements-ray.txt"
CONNECT_SECONDS = 10  # how long a cluster address may take to answer
START_SECONDS = 300  # how long the workers may take to start and load the model
STALL_SECONDS = 900  # how long the job waits with no shard file changing (a chunk committed) before it stops
POLL_SECONDS = 2.0  # how often the driver looks at the shards in flight
MAX_RESTARTS = 3  # times Ray starts a dead worker again (reloading the model) and retries its shard
FORWARDED_ENV = ("TFHUB_CACHE_DIR", "TFHUB_MODEL_LOAD_FORMAT", "TF_CPP_MIN_LOG_LEVEL", "TF_DETERMINISTIC_OPS")
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"`runner='ray'` needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class ShardWorker:
    """One worker: an Extractor built when the actor starts (and again when Ray restarts it), and the sources it
    has opened. A failed load is kept and reported by `info()`, so the driver gets the reason and the node in one
    line instead of a dead actor's traceback."""

    def __init__(self, settings, threads: int | None):
        import ray

        self.place = {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                      "pid": os.getpid()}
        self.notes: list[str] = []
        self.readers: dict = {}
        self.extractor, self.fixed_input_size, self.error = None, None, None
        started = time.perf_counter()
        try:
            if threads:
                import tensorflow as tf

                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            self.extractor, self.fixed_input_size = settings.build(log=self.notes.append, threads=threads)
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported, with its node, by info()
            self.error = first_line(exc) if not isinstance(exc, UserError) else exc.template
        self.load_seconds = time.perf_counter() - started

    def info(self) -> dict:
        return dict(self.place, error=self.error, notes=self.notes, load_seconds=self.load_seconds,
                    fixed_input_size=self.fixed_input_size,
                    provenance=self.extractor.provenance() if self.extractor else {})

    def run(self, job, index: int) -> dict:
        """Run shard `index` of `job`: (images embedded, seconds, this process's pid)."""
        if self.error:  # a restarted worker that could not load the model again
            raise RuntimeError(f"cannot load the model: {self.error}")
        started = time.perf_counter()
        where = (job.key, job.split, job.data_dir, job.strict)
        if where not in self.readers:
            self.readers[where] = sources.open_split(job.key, job.split, job.data_dir, strict=job.strict)
        done = run_shard(job, index, self.extractor, self.readers[where], log=self.notes.append)
        return {"processed": done, "seconds": time.perf_counter() - started, "pid": os.getpid()}


@dataclass
class Worker:
    """The driver's view of one actor: where it runs and what it did."""

    actor: object
    index: int
    node: str = ""
    ip: str = ""
    pids: list = field(default_factory=list)
    load_seconds: float = 0.0
    shards: int = 0
    images: int = 0
    busy_seconds: float = 0.0

    def line(self) -> str:
        restarts = f", restarted {len(self.pids) - 1}x" if len(self.pids) > 1 else ""
        speed = self.images / self.busy_seconds if self.busy_seconds else 0.0
        return (f"worker {self.index} on node {self.node[:8]} ({self.ip}, pid {self.pids[-1]}): {self.shards} shards, "
                f"{self.images} images, {speed:.1f} images/s while busy, model load {self.load_seconds:.1f} s"
                f"{restarts}")


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
    if isinstance(cause, UserError):
        return cause.template
    return first_line(cause) if cause is not None else first_line(exc)


@dataclass
class RayRunner(Held):
    """Run shards on a Ray cluster: `address` None starts a local Ray (RAY_ADDRESS, if set, is used instead),
    'auto' joins the cluster running on this machine, host:port or ray://host:port a given one.

    Held (as extract.py holds it for both splits), the connection and the workers stay up between runs with the
    same settings, so the model is loaded once per job; else a Ray it started ends with the run.
    """

    address: str | None = None
    workers: int | None = None
    verbose: bool = False
    _pool: list = field(default_factory=list, init=False, repr=False)
    _settings: object = field(default=None, init=False, repr=False)
    _released: int = field(default=0, init=False, repr=False)  # workers just stopped, their CPUs soon free
    _kind: str = field(default="CPU", init=False, repr=False)  # what each worker of the pool holds: CPU or GPU
    _started_here: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        import_ray()  # before any data is read: without Ray, say so at once

    def shards(self, items: int, chunk_size: int) -> int:
        """A new plan's shard count: shards of about DEFAULT_SHARD_ITEMS items, at least SHARDS_PER_WORKER per
        worker, at most one per chunk."""
        slots, kind = self._free_slots(import_ray())
        if self._pool:  # the workers up (held between splits) hold theirs
            slots = len(self._pool) + (slots if kind == self._kind else 0)
        wanted = max(math.ceil(items / DEFAULT_SHARD_ITEMS), SHARDS_PER_WORKER * (self.workers or max(slots, 1)))
        return min(wanted, math.ceil(items / chunk_size))

    def run(self, job, indices, log, progress, reader) -> dict:
        """Run shards `indices` of `job`: {processed, engine, load_seconds, report}, as pipeline.ExtractResult names
        them."""
        ray = import_ray()
        if job.quantizer is not None:
            raise UserError("`precision='int8'` runs with `runner='local'` only (its calibrated network is built on "
                            "the driver); use `precision='f32'` or `precision='bf16'` with `runner='ray'`")
        try:
            started = time.perf_counter()
            if not self._pool or job.settings != self._settings:
                self._stop_workers()
                self._start(ray, job, log)
            loaded = time.perf_counter() - started
            for worker in self._pool:
                worker.shards, worker.images, worker.busy_seconds = 0, 0, 0.0
            resumed = {index: job.committed(index) for index in indices}  # the bar starts from them, as the local one
            with progress_bar(job, indices, progress, sum(resumed.values())) as bar:
                processed = self._schedule(ray, job, collections.deque(indices), bar, resumed)
        except BaseException:  # an error or Ctrl-C stops the work this job started at once
            self.close()
            raise
        return dict(processed=processed, engine=self._engine, load_seconds=loaded, report=self._report())

    def _schedule(self, ray, job, pending: collections.deque, bar, resumed: dict) -> int:
        """Give each idle worker the next shard until all are done; the images embedded. The bar counts a shard's
        items but those `resumed` when it ends."""
        running, processed = {}, 0  # result ref -> (worker, shard index)
        while pending or running:
            for worker in self._pool:
                if pending and worker not in [w for w, _ in running.values()]:
                    index = pending.popleft()
                    running[worker.actor.run.remote(job, index)] = worker, index
            flight = [index for _, index in running.values()]
            (ref,) = _wait(ray, list(running), [job.partial(index) for index in flight],
                           f"no shard committed a chunk in {STALL_SECONDS} s (shards {', '.join(map(str, flight))} in "
                           "flight): the Ray cluster may be down or its workers hung; finished shards and committed "
                           "rows are kept, a rerun resumes from them")
            worker, index = running.pop(ref)
            try:
                out = ray.get(ref, timeout=POLL_SECONDS)
            except ray.exceptions.RayError as exc:
                raise UserError(f"shard {index} failed on ray worker {worker.index} on node {worker.node[:8]} "
                                f"({worker.ip}): {_cause(exc)}; finished shards and committed rows are kept, "
                                "a rerun resumes from them") from None
            processed += self._finished(worker, out)
            bar.update(job.items(index) - resumed[index])
        return processed

    def assemble(self, job, reader) -> list:
        """Join the shards in a Ray task (no CPU reserved: it copies), so the driver reads none of their rows."""
        ray = import_ray()
        self._connect(ray)
        ref = ray.remote(num_cpus=0, max_retries=MAX_RESTARTS)(_assemble).remote(job)
        _wait(ray, [ref], [job.partial()], f"assembling {job.path} committed nothing in {STALL_SECONDS} s: the Ray "
              "cluster may be down; the shards are kept, a rerun assembles them")
        try:
            return ray.get(ref, timeout=POLL_SECONDS)
        except ray.exceptions.RayError as exc:
            raise UserError(f"assembling {job.path} on the Ray cluster failed: {_cause(exc)}") from None

    @staticmethod
    def _finished(worker: Worker, out: dict) -> int:
        """Count a finished shard's work; the images it embedded."""
        worker.shards, worker.images = worker.shards + 1, worker.images + out["processed"]
        worker.busy_seconds += out["seconds"]
        if out["pid"] != worker.pids[-1]:
            worker.pids.append(out["pid"])  # Ray restarted it: the shard resumed from its committed rows
        return out["processed"]

    def _free_slots(self, ray) -> tuple[int, str]:
        self._connect(ray)
        free = ray.available_resources()
        gpus = int(free.get("GPU", 0))
        return (gpus, "GPU") if gpus else (int(free.get("CPU", 0)), "CPU")

    def _start(self, ray, job, log):
        """Start the workers (sized to the free resources) and wait, at most START_SECONDS, for their model loads."""
        slots, kind = self._free_slots(ray)
        deadline = time.monotonic() + START_SECONDS
        while slots < self._released and time.monotonic() < deadline:  # the pool just stopped frees its CPUs
            time.sleep(POLL_SECONDS / 10)
            slots, kind = self._free_slots(ray)
        self._released = 0
        total = int(ray.cluster_resources().get(kind, 0))
        if slots == 0:
            raise UserError(f"the Ray cluster has no free {kind}: all {total} are held by other jobs; run again "
                            "once they are done, or add nodes")
        count = self.workers or slots
        if count > slots:  # Ray would keep the extra workers pending forever
            raise UserError(f"`workers` {count} needs one {kind} each; the Ray cluster has {slots} free (of {total})")
        options = dict(num_cpus=1, num_gpus=1 if kind == "GPU" else 0, max_restarts=MAX_RESTARTS,
                       max_task_retries=MAX_RESTARTS)
        remote = ray.remote(ShardWorker).options(**options)
        log(f"ray: starting {count} workers (each loads the model)")
        self._pool = [Worker(remote.remote(job.settings, None if kind == "GPU" else 1), index)
                      for index in range(count)]
        try:
            infos = ray.get([worker.actor.info.remote() for worker in self._pool], timeout=START_SECONDS)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"the {count} ray workers did not all start within {START_SECONDS} s (the cluster's "
                            f"{kind}s may have been taken by another job meanwhile); run again") from None
        except ray.exceptions.RayError as exc:
            raise UserError(f"a ray worker did not start: {first_line(exc)}") from None
        for worker, info in zip(self._pool, infos):
            worker.node, worker.ip, worker.pids, worker.load_seconds = info["node"], info["ip"], [info["pid"]], \
                info["load_seconds"]
            if info["error"]:
                raise UserError(f"ray worker {worker.index} on node {info['node'][:8]} ({info['ip']}): {info['error']}")
            made, first = info["provenance"], infos[0]["provenance"]
            if made != first:
                differ = ", ".join(f"{name} {made.get(name)} vs {first.get(name)}" for name in sorted(made | first)
                                   if made.get(name) != first.get(name))
                raise UserError(f"ray worker {worker.index} on node {worker.node[:8]} ({worker.ip}) would make other "
                                f"rows than worker 0 ({differ}); one cache never mixes them: install the same "
                                "libraries on every node, or pass `engine`")
        for note in infos[0]["notes"]:
            log(note)
        job.settings.record_input_size(infos[0]["fixed_input_size"], job.cache_dir)
        made = infos[0]["provenance"]
        self._settings, self._engine, self._kind = job.settings, made["engine"], kind
        nodes = len({worker.node for worker in self._pool})
        log(f"ray: {count} workers on {nodes} node(s), {self._engine}, batch {made['batch_size']}")

    def _report(self) -> list[str]:
        """Per worker shards and throughput, then images per node."""
        per_node = collections.Counter()
        for worker in self._pool:
            per_node[f"{worker.node[:8]} ({worker.ip})"] += worker.images
        nodes = ", ".join(f"{node}: {images}" for node, images in per_node.items())
        return [worker.line() for worker in self._pool] + [f"images per node: {nodes}"]

    def close(self):
        """Kill this job's workers, and end the Ray this job started (a cluster it joined stays up)."""
        self._stop_workers()
        self._released = 0
        if self._started_here:
            import ray

            ray.shutdown()
            self._started_here = False

    def _stop_workers(self):
        ray = import_ray()
        for worker in self._pool:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor, no_restart=True)
        self._released += len(self._pool)
        self._pool, self._settings = [], None

    def _connect(self, ray):
        """Join or start Ray, once; when this runner started (or joined) it, closing ends it too."""
        if ray.is_initialized():
            return  # the caller's own Ray session (a notebook, a test), or this runner's: used and left running
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
        self._started_here = True


def _assemble(job) -> list:
    return assemble_shards(job, sources.open_split(job.key, job.split, job.data_dir, strict=job.strict))


def _wait(ray, refs: list, files: list[Path], stalled: str) -> list:
    """Wait for one of `refs` to be ready (the list of it) while one of `files` changes (a chunk committed); a
    UserError `stalled` once none has for STALL_SECONDS."""
    changed, last = time.monotonic(), None
    while not (ready := ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)[0]):
        now = [_mtime(file) for file in files]
        if now != last:
            changed, last = time.monotonic(), now
        elif time.monotonic() - changed > STALL_SECONDS:
            raise UserError(stalled)
    return ready


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
