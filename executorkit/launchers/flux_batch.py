"""Submit calls as Flux batch jobs (nested instances) and hear when each ends.

Pure functions build the batch script, the jobspec's shape and the words for how a job
ended (tested without a broker); :class:`FluxBatchQueue` talks to the broker.

Threads: one Flux handle, owned by one reactor thread (a handle is not thread safe).
Other threads hand it work through a queue and a wake-up pipe the reactor watches::

    caller thread --(fn, Future)--> deque --byte--> pipe --> reactor thread: fn(handle)
    reactor thread: job event watch --"finish" or "clean"--> on_end(JobEnd)

Nothing polls: a job's end arrives as an event of its eventlog (``event_watch``), which
Flux replays from the start, so a watch set up after the job ended still sees it. A lost
connection ends every watch with an error, which ends its job's future.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import shlex
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from executorkit.errors import ExecutorkitError, ResourceError, describe_exit
from executorkit.resources import Resources

log = logging.getLogger("executorkit")

# The jobspec attribute that ties a job to the cache directory it reads and writes.
CACHE_ATTRIBUTE = "user.executorkit.cache_directory"


class FluxUnavailableError(ExecutorkitError, RuntimeError):
    """Flux's Python bindings cannot be imported or no broker answers at the URI."""


class FluxSubmitError(ExecutorkitError):
    """Flux refused a job at submission; the message has Flux's reason."""


def import_flux() -> Any:
    """The ``flux`` bindings: importable as they are, or those of the ``flux`` on PATH
    (``PREFIX/lib/pythonX.Y/site-packages``), as ``flux python`` would find them."""
    try:
        import flux
    except ImportError as exc:
        path = _bindings_of_flux_on_path()
        if path is None:
            raise FluxUnavailableError(
                f"Flux's Python bindings do not import ({exc}) and no `flux` is on PATH: "
                f"load your site's Flux, or pip install flux-python matching flux-core") from exc
        sys.path.append(path)
        try:
            import flux
        except ImportError as again:
            raise FluxUnavailableError(
                f"the Flux bindings in {path} do not import ({again}); they need cffi, "
                f"pyyaml and ply") from again
    return flux


def _bindings_of_flux_on_path() -> str | None:
    exe = shutil.which("flux")
    if exe is None:
        return None
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(exe)))
    path = os.path.join(prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                        "site-packages")
    return path if os.path.isdir(os.path.join(path, "flux")) else None


def flux_command() -> str:
    """Absolute path of the ``flux`` program of the bindings in use (the job runs it to
    start the nested instance, whatever PATH the job gets)."""
    found = shutil.which("flux")
    if found:
        return os.path.abspath(found)
    flux = import_flux()
    # PREFIX/lib/pythonX.Y/site-packages/flux/__init__.py -> PREFIX/bin/flux
    prefix = os.path.dirname(flux.__file__)
    for _ in range(4):
        prefix = os.path.dirname(prefix)
    candidate = os.path.join(prefix, "bin", "flux")
    return candidate if os.access(candidate, os.X_OK) else "flux"


# ----------------------------------------------------------------------- the request
@dataclass(frozen=True)
class Pool:
    """What a Flux instance can ever grant: its totals and its largest node."""

    nodes: int
    cores: int
    gpus: int
    node_cores: int
    node_gpus: int


def pool_of(rset: Mapping[str, Any]) -> Pool:
    """Read an instance's resource set (RFC 20 ``R``) into a :class:`Pool`."""
    nodes = cores = gpus = node_cores = node_gpus = 0
    for entry in rset.get("execution", {}).get("R_lite", []):
        ranks = _idset_size(entry.get("rank", ""))
        children = entry.get("children", {})
        c, g = _idset_size(children.get("core", "")), _idset_size(children.get("gpu", ""))
        nodes += ranks
        cores += ranks * c
        gpus += ranks * g
        node_cores, node_gpus = max(node_cores, c), max(node_gpus, g)
    return Pool(nodes, cores, gpus, node_cores, node_gpus)


def _idset_size(text: str) -> int:
    """Members of an RFC 22 idset such as ``"0-3,7"``."""
    count = 0
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def check_shape(res: Resources, pool: Pool) -> None:
    """Refuse at submit what no job of this instance can be granted, naming the key.

    Flux gives each rank a slot of ``threads_per_core`` cores (and ``gpus_per_core`` GPUs)
    on one node; ``num_nodes`` spreads the ranks evenly over that many nodes.
    """
    if res.threads_per_core > pool.node_cores:
        raise ResourceError(
            f"resource_dict['threads_per_core']={res.threads_per_core} but the largest node of "
            f"this Flux instance has {pool.node_cores} cores (a rank's threads share a node)",
            key="threads_per_core", allowed=f"1..{pool.node_cores}")
    if res.gpus_per_core > pool.node_gpus:
        raise ResourceError(
            f"resource_dict['gpus_per_core']={res.gpus_per_core} but the largest node of this "
            f"Flux instance has {pool.node_gpus} GPUs",
            key="gpus_per_core", allowed=f"0..{pool.node_gpus}")
    if res.exclusive and res.num_nodes is None:
        raise ResourceError("resource_dict['exclusive']=True needs 'num_nodes' on Flux "
                            "(whole nodes are granted by count)",
                            key="exclusive", allowed="exclusive together with num_nodes")
    if res.num_nodes is None:
        return
    if res.num_nodes > res.cores:
        raise ResourceError(
            f"resource_dict['num_nodes']={res.num_nodes} but the call has {res.cores} rank(s); "
            f"Flux places at least one rank on every node it grants",
            key="num_nodes", allowed=f"1..{res.cores} (at most 'cores')")
    per_node = math.ceil(res.cores / res.num_nodes)
    if per_node * res.threads_per_core > pool.node_cores:
        raise ResourceError(
            f"{res.cores} ranks x {res.threads_per_core} threads on {res.num_nodes} node(s) "
            f"need {per_node * res.threads_per_core} cores per node but the largest node has "
            f"{pool.node_cores}", key="num_nodes",
            allowed=f"num_nodes >= {math.ceil(res.cpus / max(pool.node_cores, 1))}")


def batch_script(res: Resources, *, input_file: str, python: str = sys.executable,
                 flux: str = "flux", pmi_mode: str | None = None) -> str:
    """The initial program of the job's nested instance: the call, under ``flux run``
    for MPI ranks (the nested instance holds exactly the job's resources)."""
    run = f"{shlex.quote(python)} -m executorkit.worker.file_task {shlex.quote(input_file)}"
    if res.cores > 1:
        opts = [f"-n{res.cores}", f"-c{res.threads_per_core}"]
        if res.gpus_per_core:
            opts.append(f"-g{res.gpus_per_core}")
        if res.num_nodes is not None:
            opts.append(f"-N{res.num_nodes}")
        if pmi_mode:
            opts.append(f"-opmi={shlex.quote(pmi_mode)}")
        run = f"{shlex.quote(flux)} run {' '.join(opts)} {run}"
    return f"#!/bin/sh\nexec {run}\n"


def batch_jobspec(res: Resources, *, key: str, script: str, cache_directory: str,
                  environment: Mapping[str, str], after_ok: Iterable[str] = (),
                  flux: str = "flux") -> Any:
    """A ``flux batch`` jobspec: a nested instance named ``key`` over the call's resources
    whose initial program is ``script``; its output goes to ``<key>.out``."""
    from flux.job import JobID, JobspecV1

    spec = JobspecV1.from_batch_command(
        script, key, num_slots=res.cores, cores_per_slot=res.threads_per_core,
        gpus_per_slot=res.gpus_per_core or None, num_nodes=res.num_nodes,
        exclusive=res.exclusive, environment=dict(environment),
        cwd=res.cwd or cache_directory,
        output=os.path.join(cache_directory, key + ".out"))
    spec.tasks[0]["command"][0] = flux  # "flux broker ...": the same flux as the bindings
    if res.run_time_max is not None:
        spec.duration = res.run_time_max
    deps = [{"scheme": "afterok", "value": str(int(JobID(j)))} for j in after_ok]
    if deps:
        spec.setattr("system.dependencies", deps)
    spec.setattr(CACHE_ATTRIBUTE, cache_directory)
    return spec


# ----------------------------------------------------------------------- how a job ended
@dataclass
class JobEnd:
    """What a job's eventlog said about its end. ``status`` is the wait status of the
    ``finish`` event (None: the job never ran), ``exception`` the first fatal exception
    (type, note), ``lost`` why the watch itself failed."""

    job_id: str
    status: int | None = None
    exception: tuple[str, str] | None = None
    lost: str | None = None

    @property
    def state(self) -> str:
        """Flux's word for it: the exception type, "lost", "failed" or "completed"."""
        if self.lost is not None:
            return "lost"
        if self.exception is not None:
            return self.exception[0]
        return "completed" if self.status == 0 else "failed"

    def describe(self) -> str:
        """How the job ended: Flux's exception, then how its processes ended."""
        parts = [f"Flux job {self.job_id}"]
        if self.lost is not None:
            parts.append(f"was lost to this driver ({self.lost})")
        if self.exception is not None:
            parts.append(f"was stopped by Flux (job exception type={self.exception[0]}: "
                         f"{self.exception[1]})")
        if self.status is not None:
            parts.append(("and " if len(parts) > 1 else "") + _how(self.status))
        elif self.lost is None:
            parts.append("never started")
        return " ".join(parts)


def _how(status: int) -> str:
    """Words for the wait status of a ``finish`` event."""
    if os.WIFSIGNALED(status):
        return describe_exit(-os.WTERMSIG(status))[0]
    if os.WIFEXITED(status):
        return describe_exit(os.WEXITSTATUS(status))[0]
    return f"ended with wait status {status}"


# ----------------------------------------------------------------------- the broker
class FluxBatchQueue:
    """One connection to a Flux instance: submit, cancel, list and watch batch jobs."""

    def __init__(self, uri: str | None = None) -> None:
        import_flux()  # finds the bindings, or says how to get them
        import flux
        import flux.constants
        import flux.job

        self._flux = flux
        try:
            self._handle = flux.Flux(uri) if uri else flux.Flux()
        except OSError as exc:
            where = uri or os.environ.get("FLUX_URI") or "the system instance"
            raise FluxUnavailableError(f"no Flux broker answers at {where}: {exc}") from exc
        self.uri = uri
        self._requests: collections.deque[tuple[Callable[[Any], Any], Future]] = (
            collections.deque())
        self._watches: set[_Watch] = set()
        self._started: set[str] = set()
        self._closed = False
        self._gate = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="executorkit-flux-batch")
        self._thread.start()

    # ------------------------------------------------------------- called from any thread
    def call(self, fn: Callable[[Any], Any], *, timeout: float = 120.0) -> Any:
        """Run ``fn(handle)`` in the reactor thread and return its value (or raise)."""
        if threading.current_thread() is self._thread:
            return fn(self._handle)  # e.g. a done-callback that cancels a dependent job
        return self.post(fn).result(timeout=timeout)

    def post(self, fn: Callable[[Any], Any]) -> Future:
        """Queue ``fn(handle)`` for the reactor thread; its Future holds the outcome."""
        fut: Future = Future()
        with self._gate:  # the pipe is open while not closed
            if self._closed:
                fut.set_exception(FluxUnavailableError("the Flux connection is closed"))
                return fut
            self._requests.append((fn, fut))
            os.write(self._wake_w, b"x")
        return fut

    def pool(self) -> Pool:
        return pool_of(self.call(lambda h: h.rpc("sched.resource-status").get()["all"]))

    def submit(self, jobspec: Any) -> str:
        def submit(h: Any) -> str:
            try:
                return self._flux.job.JobID(self._flux.job.submit(h, jobspec)).f58
            except OSError as exc:
                raise FluxSubmitError(f"Flux refused the job {jobspec.getattr('system.job.name')}"
                                      f": {exc.strerror or exc}") from exc

        return self.call(submit)

    def cancel(self, job_ids: Iterable[str], reason: str = "cancelled by executorkit") -> None:
        ids = list(job_ids)

        def cancel(h: Any) -> None:
            for job_id in ids:
                # An already inactive job refuses: nothing to do then.
                self._flux.job.cancel_async(h, self._flux.job.JobID(job_id), reason)

        if ids:
            self.call(cancel)

    def jobs_by_name(self) -> dict[str, str]:
        """Name -> job id of this user's pending and running jobs."""
        def listing(h: Any) -> dict[str, str]:
            jobs = self._flux.job.JobList(h, attrs=["name"], filters=["pending", "running"],
                                          max_entries=0).jobs()
            return {j.name: j.id.f58 for j in jobs}

        return self.call(listing)

    def cache_directory_of(self, job_id: str) -> str | None:
        """The cache directory a job was submitted for (None: not one of ours)."""
        def lookup(h: Any) -> str | None:
            spec = self._flux.job.job_kvs_lookup(h, self._flux.job.JobID(job_id),
                                                 keys=["jobspec"])
            if spec is None:
                return None
            node: Any = spec["jobspec"].get("attributes", {})
            for part in CACHE_ATTRIBUTE.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            return node if isinstance(node, str) else None

        return self.call(lookup)

    def started(self, job_id: str) -> bool:
        return job_id in self._started

    def watch(self, job_id: str, on_end: Callable[[JobEnd], None],
              on_start: Callable[[float], None] | None = None) -> None:
        """Call ``on_end`` (in the reactor thread) once the job has ended, and ``on_start``
        with the time of its ``start`` event (epoch seconds) if it starts."""
        def start(h: Any) -> None:
            watch = _Watch(JobEnd(job_id), on_end, on_start)
            watch.future = self._flux.job.event_watch_async(h, self._flux.job.JobID(job_id))
            self._watches.add(watch)  # the Flux future must outlive this function
            watch.future.then(self._on_event, watch)

        self.post(start)

    def close(self) -> None:
        """Stop the reactor thread; unfinished watches report ``lost`` (jobs keep running
        in Flux)."""
        if threading.current_thread() is self._thread:
            self._handle.reactor_stop()  # e.g. the last job's end after shutdown(wait=False)
            return
        self.post(lambda h: h.reactor_stop())
        self._thread.join(timeout=60)

    # ------------------------------------------------------------- the reactor thread
    def _run(self) -> None:
        try:
            watcher = self._handle.fd_watcher_create(self._wake_r, self._wake,
                                                     events=self._flux.constants.FLUX_POLLIN)
            watcher.start()
            self._handle.reactor_run()
        except Exception:  # never die silently
            log.exception("the Flux reactor thread stopped")
        finally:
            with self._gate:
                self._closed = True
                for fd in (self._wake_r, self._wake_w):
                    os.close(fd)
            self._drain(run=False)
            for watch in list(self._watches):
                watch.end.lost = watch.end.lost or "the connection to Flux was closed"
                self._report(watch)
            self._watches.clear()

    def _wake(self, *_: Any) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        self._drain(run=True)

    def _drain(self, *, run: bool) -> None:
        while self._requests:
            fn, fut = self._requests.popleft()
            if not run:
                fut.set_exception(FluxUnavailableError("the Flux connection is closed"))
                continue
            try:
                fut.set_result(fn(self._handle))
            except BaseException as exc:  # the caller gets it
                fut.set_exception(exc)

    def _on_event(self, fut: Any, watch: _Watch) -> None:
        try:
            event = fut.get_event()
        except OSError as exc:  # the job is unknown, the broker went away, or we cancelled
            if not watch.reported:
                watch.end.lost = exc.strerror or str(exc)
            event = None
        if event is None:  # the stream is over
            self._watches.discard(watch)
            self._report(watch)
            return
        if watch.reported:
            return
        end = watch.end
        if event.name == "start":
            self._started.add(end.job_id)
            if watch.on_start is not None:
                try:
                    watch.on_start(event.timestamp)
                except Exception:
                    log.exception("handling the start of Flux job %s failed", end.job_id)
        elif event.name == "exception" and event.context.get("severity") == 0:
            end.exception = end.exception or (event.context.get("type", "?"),
                                              event.context.get("note", ""))
        elif event.name == "finish":
            end.status = event.context.get("status")
        if event.name in ("finish", "clean"):
            self._report(watch)
            with contextlib.suppress(Exception):
                fut.cancel()  # nothing more to hear; the stream ends with ENODATA

    @staticmethod
    def _report(watch: _Watch) -> None:
        if watch.reported:
            return
        watch.reported = True
        try:
            watch.on_end(watch.end)
        except Exception:
            log.exception("handling the end of Flux job %s failed", watch.end.job_id)


class _Watch:
    __slots__ = ("end", "future", "on_end", "on_start", "reported")

    def __init__(self, end: JobEnd, on_end: Callable[[JobEnd], None],
                 on_start: Callable[[float], None] | None = None) -> None:
        self.end = end
        self.on_end = on_end
        self.on_start = on_start
        self.future: Any = None
        self.reported = False
