"""Run one call and package its outcome as a :class:`~executorkit.transport.TaskDone`."""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import sys
import time
import traceback
import types
from collections.abc import Callable, Mapping
from typing import Any

import cloudpickle

from executorkit import _syspath
from executorkit._pickling import FunctionCache, dumps_result
from executorkit.errors import WorkerImportError
from executorkit.transport import ErrorInfo, RunTask, TaskDone, TaskSetup

FUNCTIONS = FunctionCache()  # (the fork server fills it for its workers: see Preload)
_signature_cache: dict[Any, frozenset[str] | None] = {}


class _CallClock:
    """When the function itself started (``time.perf_counter``); 0.0 outside of it.

    Read by the worker's overrun watch (another thread) to time the call alone, never the
    unpickling before it (which may import the function's module).
    """

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = 0.0


CLOCK = _CallClock()


def error_info(exc: BaseException, *, kind: str = "raised", skip_frames: int = 0) -> ErrorInfo:
    """The exception as bytes if it survives a round trip through pickle, always as text."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        pickled = cloudpickle.dumps(exc)
        pickle.loads(pickled)  # an exception that pickles but cannot be rebuilt is as bad
        blob: bytes | None = pickled
    except BaseException:  # (a __reduce__ that calls sys.exit must not end the worker)
        blob = None
    return ErrorInfo(blob, f"{type(exc).__module__}.{type(exc).__qualname__}", _str(exc),
                     text, kind)


def _str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException as err:  # the user's __str__ failed; say so instead of crashing
        return f"<str() of the exception failed: {type(err).__name__}: {err}>"


def _parameters(fn: Callable[..., Any]) -> frozenset[str] | None:
    """Names ``fn`` accepts by keyword (None: it takes **kwargs, so it accepts anything)."""
    try:
        return _signature_cache[fn]
    except (KeyError, TypeError):
        pass
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        names: frozenset[str] | None = frozenset()
    else:
        if any(p.kind is p.VAR_KEYWORD for p in params):
            names = None
        else:
            names = frozenset(
                p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
    with contextlib.suppress(TypeError):
        _signature_cache[fn] = names
    return names


def inject(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
           values: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``init_function`` results to ``kwargs`` for parameters ``fn`` takes by that name
    and the caller did not pass itself."""
    names = _parameters(fn)
    try:
        bound = set(inspect.signature(fn).bind_partial(*args).arguments) if args else set()
    except (TypeError, ValueError):
        bound = set()
    extra = {
        k: v for k, v in values.items()
        if (names is None or k in names) and k not in kwargs and k not in bound
    }
    return {**kwargs, **extra} if extra else kwargs


def unpickle(blob: bytes, loads: Callable[[bytes], Any] = pickle.loads) -> Any:
    """``loads(blob)``; a module missing here becomes a :class:`WorkerImportError` that says
    which module, where this worker looked, and the two ways out."""
    try:
        return loads(blob)
    except ModuleNotFoundError as exc:
        name = exc.name or str(exc)
        path = tuple(p for p in sys.path if isinstance(p, str))
        raise WorkerImportError(
            f"the worker cannot import module {name!r}, which the call needs ({exc}). "
            f"The worker's sys.path is {list(path)}. Either install the module or put it "
            f"in a directory every worker can read (workers get the driver's sys.path as "
            f"it is at submit), or send it with the call: "
            f"executorkit.pickle_by_value({name.partition('.')[0]!r}) "
            f"(cloudpickle.register_pickle_by_value)", module=name, worker_path=path,
        ) from exc


def load_call(msg: RunTask) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """The function and arguments of ``msg``, imported through the driver's path."""
    if msg.path is not None:
        _syspath.merge(msg.path)
    fn = unpickle(msg.fn, FUNCTIONS.loads)
    args, kwargs = unpickle(msg.args)
    return fn, args, kwargs


# Names under which a function receives the id of the worker running it (executorlib's, and
# ours). Only functions that name the parameter get it (not **kwargs catch-alls).
WORKER_ID_NAMES = ("executorlib_worker_id", "executorkit_worker_id")
_WORKER_ID_SET = frozenset(WORKER_ID_NAMES)


def inject_worker_id(fn: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pass ``EXECUTORKIT_WORKER_ID`` (block allocation: the worker's index; per-task: the
    call's lowest CPU slot) to a parameter of ``fn`` named in :data:`WORKER_ID_NAMES`."""
    if not _may_take_worker_id(fn):
        return kwargs
    names = _parameters(fn)
    if not names or names.isdisjoint(WORKER_ID_NAMES):
        return kwargs
    value = os.environ.get("EXECUTORKIT_WORKER_ID")
    if value is None:
        return kwargs
    return inject(fn, args, kwargs, dict.fromkeys(WORKER_ID_NAMES, int(value)))


def _may_take_worker_id(fn: Callable[..., Any]) -> bool:
    """False if ``fn`` is a plain function that names no worker-id parameter: decided from
    its code alone, without ``inspect.signature`` (whose first use costs a fresh per-task
    worker a good part of a millisecond)."""
    # (hasattr, not fn.__dict__: reading a function's __dict__ creates it, a write to the
    # function and a new object in every forked worker)
    if type(fn) is not types.FunctionType or hasattr(fn, "__wrapped__") \
            or hasattr(fn, "__signature__"):
        return True  # (a wrapper's signature may be another function's)
    code = fn.__code__
    return not _WORKER_ID_SET.isdisjoint(
        code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])


class _Setup:
    """Apply a per-call cwd and environment in a persistent worker, then undo them."""

    def __init__(self, setup: TaskSetup | None) -> None:
        self.setup = setup
        self.old_env: dict[str, str | None] = {}
        self.old_cwd: str | None = None

    def __enter__(self) -> None:
        try:
            self._apply()
        except BaseException:
            self.__exit__()  # a failed setup must not leak into the worker's next call
            raise

    def _apply(self) -> None:
        if self.setup is None:
            return
        if self.setup.cwd:
            os.makedirs(self.setup.cwd, exist_ok=True)
        for key in self.setup.unset:
            self.old_env[key] = os.environ.pop(key, None)
        for key, value in self.setup.env:
            self.old_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        if self.setup.cpus:
            os.sched_setaffinity(0, self.setup.cpus)
        if self.setup.cwd:
            self.old_cwd = os.getcwd()
            os.chdir(self.setup.cwd)

    def __exit__(self, *exc: object) -> None:
        for key, value in self.old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self.old_cwd is not None:
            os.chdir(self.old_cwd)


class _Tee:
    """A text stream that writes to the original stream and to a per-task log file."""

    def __init__(self, stream: Any, log: Any) -> None:
        self._stream = stream
        self._log = log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._log.flush()
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _KeepOutput:
    """With a cache, keep what the call prints in ``<cache>/<key>.out`` as well.

    Python-level writes (print, logging, warnings) are kept; output that C code or child
    processes write straight to the file descriptors still reaches the driver but is not
    kept.
    """

    def __init__(self, msg: RunTask) -> None:
        self.path = (os.path.join(msg.cache.directory, f"{msg.cache.key}.out")
                     if msg.cache is not None else None)
        self.log: Any = None

    def __enter__(self) -> None:
        if self.path is None:
            return
        # A private file, renamed into place at the end: two runs of the same call (two
        # executors sharing a cache) never trip over each other.
        self.tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            self.log = open(self.tmp, "w")  # closed in __exit__
        except OSError:
            return
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.log), _Tee(sys.stderr, self.log)

    def __exit__(self, *exc: object) -> None:
        if self.log is None:
            return
        sys.stdout, sys.stderr = self.saved
        try:
            empty = self.log.tell() == 0
            self.log.close()
            if empty:
                os.remove(self.tmp)
            else:
                os.replace(self.tmp, self.path)  # type: ignore[arg-type]
        except OSError:
            pass  # keeping output is a courtesy: it never fails the call


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:  # (after every call: no context manager objects on this path)
            stream.flush()
        except Exception:
            pass


def run(msg: RunTask, init_values: Mapping[str, Any] | None = None) -> TaskDone:
    """Unpickle, call, pickle: every failure becomes an error payload, never a crash.

    The reply's ``elapsed`` times the function call alone (see :class:`_CallClock`).
    """
    started = time.time()
    ok = False
    elapsed = -1.0
    # The environment, directory and CPUs apply before unpickling: a module imported while
    # unpickling (numpy, say) must already see OMP_NUM_THREADS and its GPUs.
    try:
        with _Setup(msg.setup), _KeepOutput(msg):
            try:
                fn, args, kwargs = load_call(msg)
            except BaseException as exc:
                return _failed(msg, started, error_info(exc, kind="serialization"))
            if init_values:
                kwargs = inject(fn, args, kwargs, init_values)
            kwargs = inject_worker_id(fn, args, kwargs)
            begun = CLOCK.started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - begun
                CLOCK.started = 0.0
        ok = True
    except BaseException as exc:
        info = error_info(exc, skip_frames=1)
    finally:
        _flush()
    if ok:
        try:
            payload = dumps_result(result)
        except BaseException as exc:
            info = error_info(exc, kind="serialization")
            info.message = (f"the result of {_name(fn)} (a {type(result).__qualname__}) "
                            f"cannot be pickled: {info.message}")
        else:
            done = TaskDone(msg.task_id, True, payload, started, time.time(), elapsed)
            _record(msg, done)
            return done
    return _failed(msg, started, info, elapsed)


def _failed(msg: RunTask, started: float, info: ErrorInfo, elapsed: float = -1.0) -> TaskDone:
    done = TaskDone(msg.task_id, False, pickle.dumps(info, protocol=5), started, time.time(),
                    elapsed)
    _record(msg, done)
    return done


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _record(msg: RunTask, done: TaskDone) -> None:
    """Write the finished call to the cache (in the worker: large results never travel twice)."""
    if msg.cache is None:
        return
    from executorkit.cache._writer import record_call

    try:
        record_call(msg.cache, msg, done)
    except Exception as exc:  # the result still goes back; only the cache entry is lost
        print(f"executorkit: could not record task {msg.task_id} in the cache "
              f"{msg.cache.directory}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
