"""What every public executor shares: the parameters, submit/map/batched/shutdown.

A public executor only decides two things: which launcher starts its worker processes and
how large its pool is (:meth:`BaseExecutor._engine_config`). Everything else is here and in
the engine.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from executorkit.command import Command, CommandCall, run_command
from executorkit.engine import Engine, EngineConfig, TaskFuture
from executorkit.errors import ResourceError
from executorkit.executors._compat import ExecutorkitExecutor, check_function
from executorkit.resources import Capabilities, Resources, merge, parse

log = logging.getLogger("executorkit")

_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


_interpreter_exiting = False


def _mark_interpreter_exiting() -> None:
    global _interpreter_exiting
    _interpreter_exiting = True


# Like concurrent.futures.thread: threading's exit hooks run when the main thread ends,
# before any atexit hook, so a submit from an atexit hook (whenever it was registered) gets
# the stdlib's error. Python 3.9+ has the hook; elsewhere an atexit hook is the fallback.
getattr(threading, "_register_atexit", atexit.register)(_mark_interpreter_exiting)


@atexit.register
def _shutdown_at_exit() -> None:
    # Like the stdlib pools: a script that forgot shutdown() still gets its results, unless
    # it is ending because of Ctrl-C: then the running calls are stopped, not waited for.
    interrupted = _ended_by_ctrl_c()
    for engine in list(_live_engines):
        try:
            if interrupted:
                engine.terminate()
            else:
                engine.shutdown(wait=True, cancel_futures=False)
        except KeyboardInterrupt:  # Ctrl-C while waiting here: stop the rest, quietly
            interrupted = True
            engine.terminate()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


def _ended_by_ctrl_c() -> bool:
    """The script is exiting because of an uncaught KeyboardInterrupt."""
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return isinstance(last, KeyboardInterrupt)


class BaseExecutor(ExecutorkitExecutor):
    """Shared implementation; see :class:`~executorkit.SingleNodeExecutor` for parameters."""

    _backend = "executor"

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        cache_directory: str | os.PathLike[str] | None = None,
        max_cores: int | None = None,
        resource_dict: Mapping[str, Any] | None = None,
        hostname_localhost: bool | None = None,
        block_allocation: bool = False,
        init_function: Callable[[], Mapping[str, Any]] | None = None,
        disable_dependencies: bool = False,
        refresh_rate: float = 0.01,
        plot_dependency_graph: bool = False,
        plot_dependency_graph_filename: str | None = None,
        export_workflow_filename: str | None = None,
        log_obj_size: bool = False,
        wait: bool = True,
        restart_limit: int = 10,  # _DEFAULT_RESTART_LIMIT
        openmpi_oversubscribe: bool = False,
        max_gpus: int | Iterable[int] | None = None,
        progress: bool = False,
        status_file: str | os.PathLike[str] | bool | None = None,
    ) -> None:
        _check_count("max_workers", max_workers)
        _check_count("max_cores", max_cores)
        resource_dict, restart_limit = _executor_settings(resource_dict, restart_limit)
        if not isinstance(restart_limit, int) or isinstance(restart_limit, bool) \
                or restart_limit < 0:
            raise ResourceError(f"restart_limit must be an int >= 0, got {restart_limit!r}",
                                key="restart_limit", allowed="an int >= 0")
        if init_function is not None and not block_allocation:
            raise ResourceError(
                "init_function needs block_allocation=True (it runs once per persistent "
                "worker)", key="init_function", allowed="None, or block_allocation=True")
        if init_function is not None and not callable(init_function):
            raise ResourceError(f"init_function must be callable, got {init_function!r}",
                                key="init_function", allowed="a callable returning a dict")
        # Dry run: record the graph instead of running it (drawn / exported at shutdown).
        self._plot = bool(plot_dependency_graph or plot_dependency_graph_filename)
        self._plot_filename = plot_dependency_graph_filename
        self._export_filename = export_workflow_filename
        self._recorder = None
        if self._plot or export_workflow_filename:
            from executorkit.export import WorkflowRecorder, check_plot_filename

            if plot_dependency_graph_filename is not None:
                check_plot_filename(plot_dependency_graph_filename)
            self._recorder = WorkflowRecorder()
        self._defaults = parse(resource_dict)
        if cache_directory is not None:
            self._defaults = parse({"cache_directory": cache_directory}, self._defaults)
        self._block = bool(block_allocation)
        self._wait_on_exit = wait
        self._log_obj_size = log_obj_size
        self._openmpi_oversubscribe = openmpi_oversubscribe
        self._hostname_localhost = hostname_localhost
        self._refresh_rate = refresh_rate  # accepted for compatibility; nothing polls
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._cache_directory = cache_directory
        self._resource_dict = dict(resource_dict or {})
        self._workers = 0  # block-allocation workers, set by _plan_pool
        self._core_limit: int | None = None  # most CPUs a resized pool may take (None: any)
        config, self._caps = self._engine_config(PoolParams(
            max_workers, max_cores, max_gpus, init_function, restart_limit))
        config.disable_dependencies = disable_dependencies
        config.status_file = _status_path(status_file, self._defaults.cache_directory)
        config.backend = self._backend
        config.log_obj_size = bool(log_obj_size)
        if progress:
            from executorkit._progress import Progress

            config.progress = Progress()
        self._engine = Engine(config)
        _live_engines.add(self._engine)
        self._finalizer = weakref.finalize(self, self._engine.shutdown, False, False)
        self._finalizer.atexit = False

    # ------------------------------------------------------------ to be provided
    def _engine_config(self, p: PoolParams) -> tuple[EngineConfig, Capabilities]:
        """Pick the launcher and size the pool (each executor's own part)."""
        raise NotImplementedError

    def _preload(self) -> tuple[str, ...]:
        """Modules worker processes will need, imported once where the launcher allows."""
        return ("executorkit.cache._writer", "h5py") if self._defaults.cache_directory else ()

    def _plan_pool(self, *, max_workers: int | None, max_cores: int | None,
                   default_cores: int, gpus: int, unsupported: dict[str, str],
                   max_nodes: int = 1) -> PoolPlan:
        """Size the pool and the workers from the parameters the user gave."""
        per_call = self._defaults.cpus
        if self._block:
            workers = max_workers or max(1, (max_cores or default_cores) // per_call)
            pool = workers * per_call
            if max_cores is not None and pool > max_cores:
                raise ResourceError(
                    f"max_workers={workers} workers of {per_call} CPUs need {pool} CPUs but "
                    f"max_cores={max_cores}", key="max_workers",
                    allowed=f"max_workers <= {max_cores // per_call}")
            need_gpus = workers * self._defaults.gpus
            if need_gpus > gpus:
                raise ResourceError(
                    f"{workers} workers with {self._defaults.gpus} GPUs each need {need_gpus} "
                    f"GPUs but the pool has {gpus} (max_gpus)", key="gpus_per_core",
                    allowed=f"gpus_per_core <= {gpus // max(workers, 1)}")
            unsupported = {**unsupported,
                           "exclusive": "block-allocation workers have a fixed size"}
            caps = Capabilities(self._backend, pool, gpus, unsupported,
                                per_task_cpus=per_call, per_task_gpus=self._defaults.gpus,
                                max_nodes=max_nodes)
            plan = PoolPlan(pool, workers, None, caps)
        else:
            pool = max_cores or (max_workers * per_call if max_workers else default_cores)
            caps = Capabilities(self._backend, pool, gpus, unsupported, max_nodes=max_nodes)
            plan = PoolPlan(pool, 0, max_workers if (max_workers and max_cores) else None, caps)
        self._workers = plan.workers or plan.max_running or pool
        self._core_limit = max_cores  # None: the pool follows max_workers
        caps.check(self._defaults)
        self._check_resources(self._defaults)
        return plan

    def _check_resources(self, res: Resources) -> Resources:
        """Backend-specific limits beyond :class:`Capabilities` (override as needed)."""
        return res

    # ------------------------------------------------------------ public API
    def submit(  # type: ignore[override]  # adds the resource_dict keyword
        self, fn: Callable[..., Any], /, *args: Any,
        resource_dict: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> Future:
        """Schedule ``fn(*args, **kwargs)``; Futures in the arguments become dependencies.

        ``resource_dict`` overrides the executor's defaults key by key for this call.
        """
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {type(fn).__name__}")
        check_function(fn)
        res = self._defaults if resource_dict is None else merge(self._defaults, resource_dict)
        if res is not self._defaults:
            res = self._check_resources(self._caps.check(res))
        if isinstance(fn, Command):
            fn, args = self._program_call(fn, args, kwargs, res)
        with self._shutdown_lock:
            if _interpreter_exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._recorder is not None:
                return self._recorder.record(fn, args, kwargs)
            return self._engine.submit(fn, args, kwargs, res)

    def _program_call(self, command: Command, args: tuple[Any, ...], kwargs: dict[str, Any],
                      res: Resources) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """A Command becomes a call of ``run_command`` (see executorkit.command)."""
        if args or kwargs:
            raise TypeError("a Command takes no call arguments: put them in its argv")
        if self._block and self._defaults.cores > 1:
            raise ResourceError(
                "a Command cannot run in block-allocation workers of several MPI ranks "
                "(each rank would start the program); use per-task mode (the default) and "
                "resource_dict={'cores': n}", key="cores", allowed="block workers of cores=1")
        launcher = self._engine.launcher
        if res.cores > 1 and not (hasattr(launcher, "program_prefix")
                                  or getattr(launcher, "runs_programs", False)):
            raise ResourceError(
                f"{self._backend} cannot yet start a Command as an MPI job of "
                f"cores={res.cores}", key="cores", allowed="cores=1 for a Command here")
        return run_command, (CommandCall(command, res.env, res.cwd),)

    def batched(self, futures: Iterable[Future], n: int) -> list[Future]:
        """Futures of lists of ``n`` results each, in completion order (see streaming)."""
        from executorkit.streaming import batched

        return batched(list(futures), n)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; ``cancel_futures`` cancels everything not yet running
        (also tasks waiting for their inputs); ``wait`` blocks until all is finished and
        every worker process has exited."""
        if wait and self._engine.on_engine_thread():
            raise RuntimeError(
                "shutdown(wait=True) was called from a done-callback, which runs on the "
                "executor's engine thread, and would wait for itself: call "
                "shutdown(wait=False) there, or shut down from another thread")
        with self._shutdown_lock:
            first = not self._shutdown
            self._shutdown = True
        if first and self._recorder is not None:
            self._finish_dry_run()
        self._engine.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            _live_engines.discard(self._engine)

    def _finish_dry_run(self) -> None:
        """Draw and/or export the recorded graph (its futures are done already)."""
        recorder = self._recorder
        assert recorder is not None
        if self._export_filename:
            recorder.export(self._export_filename)
        if self._plot:
            image = recorder.plot(self._plot_filename)
            if self._plot_filename is None:
                _display(image)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()  # Ctrl-C: stop everything now and let it propagate
            return
        self.shutdown(wait=self._wait_on_exit)

    def terminate(self) -> None:
        """Stop at once: cancel every call, kill the running ones and every worker process.

        What leaving a ``with`` block by Ctrl-C (``KeyboardInterrupt``) does; the executor
        takes no new calls afterwards.
        """
        with self._shutdown_lock:
            self._shutdown = True
        self._engine.terminate()
        _live_engines.discard(self._engine)

    @property
    def max_cores(self) -> int:
        """Number of CPU slots in the pool."""
        return self._caps.max_cpus

    @property
    def max_gpus(self) -> int:
        return self._caps.max_gpus

    @property
    def info(self) -> dict[str, Any]:
        """The executor's settings and its task counts, as one dict (a property, as in
        executorlib): ``backend``, ``max_workers``, ``max_cores``, ``max_gpus``,
        ``block_allocation``, ``cache_directory``, ``resource_dict`` (the defaults given),
        ``hostname_localhost``, ``log_obj_size``, and the counts ``submitted``, ``done``,
        ``failed``, ``cancelled``, ``running`` and ``waiting``. Still available after
        shutdown (executorlib then returns None)."""
        return {
            "backend": self._backend, "max_workers": self._workers,
            "max_cores": self.max_cores, "max_gpus": self.max_gpus,
            "block_allocation": self._block,
            "cache_directory": None if self._cache_directory is None
            else os.fspath(self._cache_directory),
            "resource_dict": dict(self._resource_dict),
            "hostname_localhost": self._hostname_localhost, "log_obj_size": self._log_obj_size,
            **self._engine.counts(),
        }

    def __len__(self) -> int:
        """Calls submitted and not finished yet (waiting for inputs, queued or running)."""
        counts = self._engine.counts()
        return counts["running"] + counts["waiting"]

    @property
    def max_workers(self) -> int | None:
        """Block allocation: the number of persistent workers; per-task processes: the most
        calls running at once. None after shutdown (as in executorlib). Settable: see the
        executor class."""
        return None if self._shutdown else self._workers

    @max_workers.setter
    def max_workers(self, value: int) -> None:
        if self._shutdown:
            raise RuntimeError("cannot change max_workers after shutdown")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ResourceError(
                f"max_workers must be an int >= 1, got {value!r} (to stop every worker, call "
                f"shutdown())", key="max_workers", allowed="an int >= 1")
        if self._block:
            self._resize_workers(value)
        else:
            self._limit_calls(value)
        self._workers = value

    def _resize_workers(self, workers: int) -> None:
        """Block allocation: ``workers`` persistent workers of the executor-level size."""
        per_call, pool = self._defaults.cpus, workers * self._defaults.cpus
        if self._core_limit is not None and pool > self._core_limit:
            raise ResourceError(
                f"max_workers={workers} workers of {per_call} CPUs need {pool} CPUs but "
                f"{self._backend} has {self._core_limit} (max_cores)", key="max_workers",
                allowed=f"1..{self._core_limit // per_call}")
        if workers * self._defaults.gpus > self.max_gpus:
            raise ResourceError(
                f"max_workers={workers} workers with {self._defaults.gpus} GPUs each need "
                f"{workers * self._defaults.gpus} GPUs but the pool has {self.max_gpus}",
                key="max_workers", allowed=f"1..{self.max_gpus // self._defaults.gpus}")
        cpus, real = self._pool_cpus(pool)
        self._caps = replace(self._caps, max_cpus=pool)
        self._engine.resize(workers, cpus=cpus, real=real)

    def _limit_calls(self, calls: int) -> None:
        """Per-task processes, as if created with ``max_workers=calls``: without max_cores
        the pool becomes ``calls`` calls' worth of CPUs; with it, at most ``calls`` at once."""
        if self._core_limit is None:
            pool = calls * self._defaults.cpus
            cpus, real = self._pool_cpus(pool)
            try:
                self._engine.resize(calls, cpus=cpus, real=real)
            except ValueError as exc:
                raise ResourceError(f"max_workers={calls}: {exc}", key="max_workers",
                                    allowed="a pool every waiting call fits in") from exc
            self._caps = replace(self._caps, max_cpus=pool)
            return
        if calls > self.max_cores:
            raise ResourceError(
                f"max_workers={calls} calls at once need at least {calls} CPUs but the pool "
                f"has {self.max_cores} (max_cores)", key="max_workers",
                allowed=f"1..{self.max_cores}")
        self._engine.resize(calls)

    def _pool_cpus(self, pool: int) -> tuple[tuple[int, ...], bool]:
        """CPU slot ids of a resized pool, and whether they are real CPUs to pin calls to
        (overridden where the slots are this machine's CPUs)."""
        return tuple(range(pool)), False


@dataclass(frozen=True)
class PoolParams:
    """The executor parameters that size its pool and workers."""

    max_workers: int | None
    max_cores: int | None
    max_gpus: int | Iterable[int] | None
    init_function: Callable[[], Mapping[str, Any]] | None
    restart_limit: int


@dataclass(frozen=True)
class PoolPlan:
    pool: int  # CPU slots
    workers: int  # block-allocation workers (0: per-task processes)
    max_running: int | None
    caps: Capabilities


def _display(image: Any) -> None:
    """Show the graph inline in Jupyter; elsewhere say where to ask for a file."""
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(image)
            return
    except ImportError:
        pass
    import warnings

    warnings.warn("plot_dependency_graph=True outside Jupyter draws nothing inline: pass "
                  "plot_dependency_graph_filename='graph.png' (or .svg)", stacklevel=3)


def _executor_settings(resource_dict: Mapping[str, Any] | None,
                       restart_limit: int) -> tuple[Mapping[str, Any] | None, int]:
    """executorlib reads ``restart_limit`` from the executor's resource_dict; here it is a
    parameter. Take it from there (a copy: the user's dict is not changed)."""
    if not isinstance(resource_dict, Mapping) or "restart_limit" not in resource_dict:
        return resource_dict, restart_limit
    rest = {k: v for k, v in resource_dict.items() if k != "restart_limit"}
    given = resource_dict["restart_limit"]
    if restart_limit != _DEFAULT_RESTART_LIMIT and given != restart_limit:
        raise ResourceError(
            f"restart_limit={restart_limit!r} but resource_dict['restart_limit']={given!r}; "
            f"give it once", key="restart_limit", allowed="the parameter or the resource_dict")
    return rest, given


_DEFAULT_RESTART_LIMIT = 10


def _status_path(status_file: Any, cache_directory: str | None) -> str | None:
    """Where the live status goes: ``status_file``, else ``<cache_directory>/status.json``;
    ``status_file=False`` turns it off."""
    if status_file is False:
        return None
    if status_file is None or status_file is True:
        if cache_directory is None:
            if status_file is True:
                raise ResourceError("status_file=True needs a cache_directory to put "
                                    "status.json in", key="status_file",
                                    allowed="a path, True with a cache_directory, False, None")
            return None
        return os.path.join(os.path.abspath(cache_directory), "status.json")
    if not isinstance(status_file, (str, os.PathLike)):
        raise ResourceError(f"status_file must be a path, a bool or None, got "
                            f"{type(status_file).__name__}", key="status_file",
                            allowed="a path, True with a cache_directory, False, None")
    path = os.path.abspath(os.fspath(status_file))
    return os.path.join(path, "status.json") if os.path.isdir(path) else path


def _check_count(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        # "must be greater than 0": the stdlib pools' wording, which callers match on
        raise ResourceError(f"{name} must be greater than 0 (a positive int or None), "
                            f"got {value!r}", key=name, allowed="a positive int or None")


def gpu_pool(max_gpus: int | Iterable[int] | None) -> tuple[int, ...]:
    """GPU ids of the pool: declared, or the ones this process was given."""
    if max_gpus is None:
        for var in ("EXECUTORKIT_GPUS", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
            value = os.environ.get(var)
            if value is not None:
                try:
                    return tuple(int(x) for x in value.split(",") if x.strip())
                except ValueError:
                    return ()
        return tuple(range(detect_gpus()))
    if isinstance(max_gpus, bool):
        raise ResourceError("max_gpus must be an int or a list of GPU ids",
                            key="max_gpus", allowed="an int >= 0 or a list of ints")
    if isinstance(max_gpus, int):
        if max_gpus < 0:
            raise ResourceError(f"max_gpus must be >= 0, got {max_gpus}", key="max_gpus",
                                allowed="an int >= 0 or a list of ints")
        return tuple(range(max_gpus))
    ids = tuple(max_gpus)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) \
            or len(set(ids)) != len(ids):
        raise ResourceError(f"max_gpus ids must be distinct ints >= 0, got {ids!r}",
                            key="max_gpus", allowed="an int >= 0 or a list of ints")
    return ids


def detect_gpus(run: Callable[..., Any] | None = None) -> int:
    """How many GPUs the vendor's tool reports (``nvidia-smi -L``, ``rocm-smi``); 0 if none."""
    import shutil
    import subprocess

    run = run or subprocess.run
    probes = (("nvidia-smi", ["-L"], "GPU "), ("rocm-smi", ["--showid"], "GPU["))
    for tool, args, marker in probes:
        path = shutil.which(tool)
        if path is None:
            continue
        try:
            out = run([path, *args], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        ids = {line.split(":")[0] for line in out.splitlines() if line.startswith(marker)}
        if ids:
            return len(ids)
    return 0


def gpu_variable() -> str:
    """The visibility variable of this machine's GPU vendor."""
    if "ROCR_VISIBLE_DEVICES" in os.environ or os.path.exists("/dev/kfd"):
        return "ROCR_VISIBLE_DEVICES"
    if "ZE_AFFINITY_MASK" in os.environ:
        return "ZE_AFFINITY_MASK"
    return "CUDA_VISIBLE_DEVICES"


__all__ = ["BaseExecutor", "TaskFuture"]
