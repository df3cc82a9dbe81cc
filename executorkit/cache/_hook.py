"""The engine's use of the cache: look a call up before it runs, tell the worker where to
record it.

Keys are computed in the driver, so every backend gives the same call the same key. A
Future argument contributes its upstream task's key (Merkle chaining), so a cached
downstream result is found without running, or even loading, anything upstream. When an
input is a Future without a key (from another executor, or an uncached task), the key is
computed once the inputs are known, from their values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import TYPE_CHECKING, Any, Protocol

import cloudpickle

from executorkit.cache._keys import compute_key
from executorkit.errors import TaskTimeoutError, WorkerDiedError
from executorkit.transport import CacheSpec, RunTask, TaskDone

if TYPE_CHECKING:
    from executorkit.cache._store import CacheStore


class _CallResources(Protocol):
    cache_directory: str | None
    cache_key: str | None

    def as_dict(self) -> dict[str, Any]: ...


class _Call(Protocol):
    """What the hook reads and sets on an engine task (the engine's ``_Task`` has these)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    res: _CallResources
    future: Future
    key: str | None
    cache_spec: CacheSpec | None


log = logging.getLogger("executorkit")


class _NoKeyYet(Exception):
    """An input future has no cache key: hash its value once it is known."""


def _future_key(fut: Future) -> str:
    task = getattr(fut, "_task", None)
    key = getattr(task, "key", None)
    if key is None:
        raise _NoKeyYet
    return key


class CacheHook:
    """Per-executor cache logic; ``init_function`` (block allocation) is part of every key,
    because the functions receive what it returns."""

    def __init__(self, init_function: Any = None) -> None:
        self._init = init_function
        self._stores: dict[str, CacheStore] = {}

    def _store(self, directory: str) -> CacheStore:
        store = self._stores.get(directory)
        if store is None:
            from executorkit.cache._access import remove_stale_temporaries
            from executorkit.cache._store import CacheStore

            store = self._stores[directory] = CacheStore(directory)
            remove_stale_temporaries(directory)  # once per directory and executor
        return store

    def _key(self, task: _Call) -> str:
        kwargs = task.kwargs
        if self._init is not None:
            kwargs = {**kwargs, "\0init_function": self._init}
        return compute_key(task.fn, task.args, kwargs, future_key=_future_key)

    def prepare(self, task: _Call, deps: list[Future]) -> bool:
        """At submit. False: the future was answered from the cache (nothing to run)."""
        directory = task.res.cache_directory
        if directory is None:
            return True
        key = task.res.cache_key
        if key is None:
            try:
                key = self._key(task)
            except _NoKeyYet:
                return True  # decided in ready(), once the inputs are known
        return self._lookup(task, directory, key)

    def ready(self, task: _Call) -> bool:
        """Inputs resolved. False: answered from the cache."""
        directory = task.res.cache_directory
        if directory is None or task.key is not None:
            return True
        return self._lookup(task, directory, self._key(task))

    def attempt_ended(self, task: Any, exc: BaseException, *, final: bool) -> None:
        """A running attempt failed (``final``: and will not run again): keep it."""
        if task.cache_spec is not None:
            _Attempts.ended(self._store(task.cache_spec.directory), task, exc, final=final)

    def record_outcome(self, spec: CacheSpec, run: RunTask, done: TaskDone) -> None:
        """Record a call whose outcome the launcher produced itself (a program it ran
        directly, with no worker to record it), exactly as a worker records its call."""
        from executorkit.cache._writer import record_call

        try:
            record_call(spec, run, done)
        except Exception as err:  # the result still reaches its future; only the entry is lost
            log.warning("could not record task %d in the cache %s: %s", run.task_id,
                        spec.directory, err)

    def _lookup(self, task: _Call, directory: str, key: str) -> bool:
        task.key = key
        hit, value = self._store(directory).lookup(key)
        if hit and not _still_valid(value):
            hit = False  # e.g. a program's declared output files were removed since
        if hit:
            with contextlib.suppress(InvalidStateError):  # cancelled by the user meanwhile
                task.future.set_result(value)
            return False
        if "/" in key:  # a user's "subdir/name": the worker keeps <key>.out there too
            os.makedirs(os.path.dirname(os.path.join(directory, key)), exist_ok=True)
        task.cache_spec = CacheSpec(directory, key, _name(task.fn), task.res.as_dict())
        return True


class _Attempts:
    """Every attempt of a call is kept in the cache, not only the last: ``<key>.h5`` holds
    the final outcome, ``<key>.attempt-<n>.h5`` the earlier failed attempts. Attempts whose
    process never wrote a record (killed, timed out, cancelled while running) are recorded
    here, in the driver, with what it knows."""

    @staticmethod
    def ended(store: CacheStore, task: Any, exc: BaseException, *, final: bool) -> None:
        spec = task.cache_spec
        if spec is None or task.started is None:
            return
        n = len(task.failures or ()) or 1
        worker_wrote = not isinstance(exc, (WorkerDiedError, TaskTimeoutError, CancelledError))
        if not final:
            target = f"{spec.key}.attempt-{n}"
            if worker_wrote:
                _rename_entry(store, spec.key, target)
                return
        elif worker_wrote:
            return  # the worker's record of the last attempt is the final one
        else:
            target = spec.key
        try:
            store.write(_driver_record(target, spec, task, exc))
        except Exception as err:  # the campaign record is a courtesy; never fail the task
            log.warning("could not record attempt %d of task %d in %s: %s", n, task.id,
                        spec.directory, err)


def _rename_entry(store: CacheStore, key: str, target: str) -> None:
    """Keep the worker's record of a failed attempt as entry ``target``, with ``target`` as
    its key too (like the attempts the driver records): a record's key always names its
    file, and ``get_cache_data`` never shows two rows of one key."""
    try:
        record = store.read(key)
        store.write(dataclasses.replace(record, key=target))
        os.remove(store.path(key))
    except FileNotFoundError:
        pass  # the worker wrote nothing after all (the driver's record covers it)
    except Exception as err:  # the campaign record is a courtesy; never fail the task
        log.warning("could not keep attempt %s in %s: %s", target, store.directory, err)


def _driver_record(key: str, spec: CacheSpec, task: Any, exc: BaseException) -> Any:
    from executorkit.cache._store import CacheRecord

    payload = task.payload
    if payload is None and task.fn is not None:  # the call's bytes went with its frame
        with contextlib.suppress(Exception):
            payload = cloudpickle.dumps(task.fn), cloudpickle.dumps((task.args, task.kwargs))
    fn_blob, args_blob = payload or (b"", pickle.dumps(((), {})))
    try:
        args, kwargs = pickle.loads(args_blob)
        args_bytes, kwargs_bytes = cloudpickle.dumps(args), cloudpickle.dumps(kwargs)
    except Exception:
        args_bytes, kwargs_bytes = args_blob, cloudpickle.dumps({})
    try:
        error: bytes | None = cloudpickle.dumps(exc)
    except Exception:
        error = None
    worker = task.worker
    text = "".join(traceback.format_exception_only(type(exc), exc))
    return CacheRecord(
        key=key, function_name=spec.function_name, function=fn_blob, args=args_bytes,
        kwargs=kwargs_bytes, resource_dict=task.res.as_dict(), status="failed", output=None,
        error=error, error_text=text, started=task.started or time.time(),
        finished=time.time(), hostname=getattr(worker, "host", None) or socket.gethostname(),
        pid=getattr(worker, "pid", None) or 0, slot=spec.slot)


def _still_valid(value: Any) -> bool:
    check = getattr(type(value), "__executorkit_cache_valid__", None)
    return check is None or bool(check(value))


def _name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}" if module else qualname
