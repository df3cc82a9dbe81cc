"""Streaming helpers built only on standard :class:`concurrent.futures.Future` objects.

Everything here works with the futures of any executor, or with bare ``Future()`` objects
completed by hand:

* :func:`as_completed` -- a drop-in for :func:`concurrent.futures.as_completed` that also
  accepts more futures while it is being iterated (:meth:`AsCompleted.add`), so an
  active-learning loop that keeps ``k`` tasks in flight is a few lines.
* :func:`batched` -- group futures into lists of ``n`` results, in completion order
  (failed inputs left out).
* :func:`split_future` / :func:`get_item_from_future` -- futures of the parts of a result.

Nothing blocks or polls: every output is a pending ``Future`` that is completed by a
done-callback on its inputs, and waiting uses a ``threading.Condition``.  Done-callbacks
never raise (the standard library would only log the exception and the output would hang);
if something unexpected happens, the affected output future fails instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures as _cf
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, Generic, TypeVar

from executorkit.errors import (
    DependencyError,
    ExecutorkitError,
    ResourceError,
    dependency_error,
    failure_text,
)
from executorkit.graph import ItemFuture, is_dry_run

__all__ = [
    "AsCompleted",
    "SplitFutureError",
    "as_completed",
    "batched",
    "get_item_from_future",
    "split_future",
]

T = TypeVar("T")
log = logging.getLogger("executorkit")


class SplitFutureError(ExecutorkitError, ValueError):
    """The result given to :func:`split_future` is not a sequence of the expected length.

    ``expected`` is the requested length, ``actual`` the length found (``None`` when the
    result has no length at all).
    """

    expected: int
    actual: int | None


# --------------------------------------------------------------------------- helpers


def _check_count(value: object, name: str) -> int:
    """Return ``value`` if it is a positive int (``bool`` excluded), else raise ResourceError."""
    # bool is an int subclass, but batched(fs, True) is certainly a mistake
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ResourceError(
            f"{name} must be a positive int, got {value!r}", key=name, allowed="an int >= 1"
        )
    return value


def _check_future(value: object, what: str) -> Future[Any]:
    if not isinstance(value, Future):
        raise TypeError(f"{what} must be a concurrent.futures.Future, got {type(value).__name__}")
    return value


def _outcome(fut: Future[Any]) -> tuple[Any, BaseException | None]:
    """Return ``(result, None)`` or ``(None, exception)`` of a done future; never raises."""
    try:
        if fut.cancelled():
            return None, CancelledError("the input future was cancelled")
        error = fut.exception()
        if error is not None:
            return None, error
        return fut.result(), None
    except Exception as exc:  # a misbehaving Future subclass: treat it as an upstream failure
        return None, exc


def _dependency_error(dependent: str, upstream: str, error: BaseException) -> DependencyError:
    """A DependencyError of ``dependent`` saying its input ``upstream`` raised ``error``."""
    return dependency_error(dependent, upstream, error)


def _resolve(out: Future[Any], value: Any) -> None:
    # The caller may have cancelled an output future; that is their choice, not an error.
    with contextlib.suppress(InvalidStateError):
        out.set_result(value)


def _reject(out: Future[Any], error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        out.set_exception(error)


def _settle(out: Future[Any], compute: Callable[[], Any]) -> None:
    """Complete ``out`` with ``compute()``, or with the exception it raises."""
    try:
        value = compute()
    except Exception as exc:
        _reject(out, exc)
    else:
        _resolve(out, value)


def _fail_unfinished(outputs: Iterable[Future[Any]], where: str, cause: BaseException) -> None:
    """Last resort of a done-callback: fail every output that is still pending."""
    for out in outputs:
        if not out.done():
            error = ExecutorkitError(f"internal error in {where}: {type(cause).__name__}: {cause}")
            error.__cause__ = cause
            _reject(out, error)


# --------------------------------------------------------------------------- as_completed


class AsCompleted(Generic[T]):
    """Iterator over futures in the order they complete; see :func:`as_completed`.

    Unlike a usual iterator it can be refilled: after it has raised ``StopIteration``,
    :meth:`add` more futures and iterate again (``for`` calls ``iter()``, which returns the
    same object).  This is deliberate, so a driver loop can pause when nothing is in flight.
    """

    def __init__(self, fs: Iterable[Future[T]], timeout: float | None = None):
        self._cond = threading.Condition(threading.Lock())
        self._waiting: set[Future[T]] = set()  # added, not done yet
        self._ready: deque[Future[T]] = deque()  # done, not yielded yet, in completion order
        # Everything ever added, to ignore duplicates; weak so that yielded futures are freed.
        self._seen: weakref.WeakSet[Future[T]] = weakref.WeakSet()
        self._total = 0
        self._broken: BaseException | None = None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        # The callback holds only a weak reference: futures kept by an executor (or by the
        # user) must not keep a dropped iterator alive, and no reference cycle is created.
        self._callback = functools.partial(_notify_member_done, weakref.ref(self))
        self.update(fs)

    # -- filling

    def add(self, future: Future[T]) -> None:
        """Add a future (thread-safe, also from the loop body); duplicates are ignored."""
        _check_future(future, "as_completed() items")
        with self._cond:
            if future in self._seen:
                return
            self._seen.add(future)
            self._waiting.add(future)
            self._total += 1
        # Outside the lock: a done future runs the callback right here, and it takes the lock.
        future.add_done_callback(self._callback)

    def update(self, futures: Iterable[Future[T]]) -> None:
        """Add several futures, see :meth:`add`."""
        for future in futures:
            self.add(future)

    @property
    def pending(self) -> int:
        """Number of futures added but not yielded yet (done or not)."""
        with self._cond:
            return len(self._waiting) + len(self._ready)

    def __len__(self) -> int:
        return self.pending

    def __repr__(self) -> str:
        return f"<AsCompleted pending={self.pending}>"

    # -- consuming

    def __iter__(self) -> AsCompleted[T]:
        return self

    def __next__(self) -> Future[T]:
        with self._cond:
            self._wait_for_ready(self._deadline)
            if not self._ready:
                raise StopIteration
            return self._ready.popleft()

    def next_batch(
        self, max_items: int | None = None, timeout: float | None = None
    ) -> list[Future[T]]:
        """Wait until a future is done, then return all done ones not yielded yet.

        At most ``max_items`` are returned (the rest stay for the next call).  Returns ``[]``
        when nothing is pending.  Raises ``TimeoutError`` if nothing completes within
        ``timeout`` seconds or before the deadline given to :func:`as_completed`.
        """
        if max_items is not None:
            _check_count(max_items, "max_items")
        deadline = self._deadline
        if timeout is not None:
            local = time.monotonic() + timeout
            deadline = local if deadline is None else min(deadline, local)
        with self._cond:
            self._wait_for_ready(deadline)
            count = len(self._ready) if max_items is None else min(max_items, len(self._ready))
            return [self._ready.popleft() for _ in range(count)]

    def _wait_for_ready(self, deadline: float | None) -> None:
        """With the lock held: wait until a future is ready or none is outstanding."""
        while not self._ready and self._waiting:
            if self._broken is not None:
                raise ExecutorkitError("as_completed() lost track of a future") from self._broken
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                # concurrent.futures.TimeoutError is the builtin one from Python 3.11 on
                raise _cf.TimeoutError(
                    f"{len(self._waiting)} (of {self._total}) futures unfinished"
                )
            self._cond.wait(remaining)

    def _member_done(self, future: Future[T]) -> None:
        # Runs inside Future.set_result()/cancel() of some thread: must never raise.
        try:
            with self._cond:
                self._waiting.discard(future)
                self._ready.append(future)
                self._cond.notify_all()
        except Exception as exc:
            # Wake the consumers so they report the problem instead of waiting forever.
            self._broken = exc
            with contextlib.suppress(Exception), self._cond:
                self._cond.notify_all()


def _notify_member_done(ref: weakref.ref[AsCompleted[Any]], future: Future[Any]) -> None:
    tracker = ref()
    if tracker is not None:  # else the iterator was dropped: nobody is waiting
        tracker._member_done(future)


def as_completed(fs: Iterable[Future[T]], timeout: float | None = None) -> AsCompleted[T]:
    """Drop-in for :func:`concurrent.futures.as_completed` that can be extended.

    Yields each distinct future once, as it completes; futures already done are yielded
    first (in the order given).  ``timeout`` counts seconds from this call; when it expires
    with futures still outstanding, iteration raises ``TimeoutError``.  The returned
    :class:`AsCompleted` accepts more futures via :meth:`~AsCompleted.add` at any time, from
    any thread -- even after it was exhausted, after which it can be iterated again.
    """
    return AsCompleted(fs, timeout)


# --------------------------------------------------------------------------- batched


class _Batcher:
    """Shared state of one :func:`batched` call: results fill the batches in completion
    order; failed inputs are left out (see :func:`batched`)."""

    def __init__(self, total: int, n: int):
        self._lock = threading.Lock()
        self._n = n
        self._left = total  # inputs not done yet
        self.outputs: list[Future[list[Any]]] = [Future() for _ in range(0, total, n)]
        self._batch = 0  # the batch being filled
        self._items: list[Any] = []
        self._failed: list[tuple[int, BaseException]] = []  # (input index, its error)

    def on_done(self, index: int, future: Future[Any]) -> None:
        # Runs inside Future.set_result()/cancel() of some thread: must never raise.
        try:
            value, error = _outcome(future)
            if error is not None:
                log.warning("batched(): input %d %s; it is left out of the batches", index,
                            failure_text(error))
            for action in self._record(index, value, error):
                action()  # outside the lock: it runs the output's own callbacks
        except Exception as exc:
            # The slot bookkeeping can no longer be trusted, so no batch would be reliable.
            _fail_unfinished(self.outputs, "batched()", exc)

    def _record(self, index: int, value: Any, error: BaseException | None
                ) -> list[Callable[[], None]]:
        """Count one completion; return what to do with the batches it completes."""
        actions: list[Callable[[], None]] = []
        with self._lock:
            self._left -= 1
            if error is not None:
                self._failed.append((index, error))
            else:
                self._items.append(value)
            if len(self._items) == self._n or (self._left == 0 and self._items):
                out, items = self.outputs[self._batch], self._items
                self._batch, self._items = self._batch + 1, []
                actions.append(functools.partial(_resolve, out, items))
            if self._left == 0 and self._batch < len(self.outputs):
                # Failures left these batches without a single result: they fail, naming
                # the first failed input (the others are in the message).
                (first, cause), others = self._failed[0], [i for i, _ in self._failed[1:]]
                source = f"{first}" + (f" (and inputs {_list(others)})" if others else "")
                for b in range(self._batch, len(self.outputs)):
                    dep = _dependency_error(f"batched() batch {b} (no input left to fill "
                                            f"it)", source, cause)
                    actions.append(functools.partial(_reject, self.outputs[b], dep))
        return actions


def _list(numbers: list[int], shown: int = 10) -> str:
    text = ", ".join(map(str, numbers[:shown]))
    return text + (f" and {len(numbers) - shown} more" if len(numbers) > shown else "")


def batched(futures: Iterable[Future[T]], n: int) -> list[Future[list[T]]]:
    """Group futures into ``ceil(len / n)`` futures of lists of ``n`` results.

    Results fill the outputs in completion order: output ``i`` is done as soon as ``n`` more
    inputs have succeeded (the last output may hold fewer). An input that fails or is
    cancelled is left out, as in executorlib, and logged as a warning (its own future still
    holds the error): the others fill the batches, and once every input is done the batch
    being filled completes with what it has. An output that no result is left for (when
    inputs failed) fails with :class:`DependencyError`, caught as the first failed input's
    exception type too (``__cause__`` is that exception).
    """
    n = _check_count(n, "n")
    inputs = [_check_future(f, f"batched() input {i}") for i, f in enumerate(futures)]
    if not inputs:
        return []
    batcher = _Batcher(len(inputs), n)
    for index, future in enumerate(inputs):
        future.add_done_callback(functools.partial(batcher.on_done, index))
    return list(batcher.outputs)


# --------------------------------------------------------------------------- split / item


def split_future(future: Future[Any], n: int) -> list[Future[Any]]:
    """Split a future of a length-``n`` sequence into ``n`` futures, item ``i`` each.

    If the result is not a sequence of length ``n``, every output fails with
    :class:`SplitFutureError` (a ``ValueError``); if ``future`` fails or is cancelled, every
    output fails with :class:`DependencyError` chained to the upstream exception.
    """
    n = _check_count(n, "n")
    _check_future(future, "split_future() input")
    outputs: list[Future[Any]] = [ItemFuture(future, i) for i in range(n)]
    if is_dry_run(future):  # stands for a call that never runs: its items are None too
        for out in outputs:
            _resolve(out, None)
    else:
        future.add_done_callback(functools.partial(_split_done, outputs))
    return outputs


def _split_done(outputs: list[Future[Any]], future: Future[Any]) -> None:
    # Runs inside Future.set_result()/cancel() of some thread: must never raise.
    try:
        value, error = _outcome(future)
        if error is not None:
            source = f"future (split into {len(outputs)} items)"
            for i, out in enumerate(outputs):
                _reject(out, _dependency_error(f"split_future() item {i}", source, error))
        else:
            _deliver_items(outputs, value)
    except Exception as exc:
        _fail_unfinished(outputs, "split_future()", exc)


def _deliver_items(outputs: list[Future[Any]], value: Any) -> None:
    expected = len(outputs)
    actual = _sequence_length(value)
    if actual != expected:
        for out in outputs:
            _reject(out, _split_error(value, expected, actual))
        return
    for index, out in enumerate(outputs):
        _settle(out, functools.partial(value.__getitem__, index))


def _sequence_length(value: Any) -> int | None:
    """``len(value)`` if it is indexable like a sequence, else ``None``."""
    # Mappings have __len__ and __getitem__ too, but value[0] would not be their first item.
    if isinstance(value, Mapping) or not hasattr(type(value), "__getitem__"):
        return None
    try:
        return len(value)
    except TypeError:  # e.g. a 0-d numpy array
        return None


def _split_error(value: Any, expected: int, actual: int | None) -> SplitFutureError:
    kind = type(value).__name__
    if actual is None:
        message = f"split_future() expected a sequence of length {expected}, got a {kind}"
    else:
        message = (
            f"split_future() expected a sequence of length {expected}, got a {kind} "
            f"of length {actual}"
        )
    error = SplitFutureError(message)
    error.expected = expected
    error.actual = actual
    return error


def get_item_from_future(future: Future[Any], key: Any) -> Future[Any]:
    """Return a future of ``future.result()[key]``.

    A ``KeyError``, ``IndexError`` or ``TypeError`` of the lookup fails the output with an
    exception of the same type whose message names ``key`` (the original is its
    ``__cause__``); if ``future`` fails or is cancelled, the output fails with
    :class:`DependencyError` chained to the upstream exception.
    """
    _check_future(future, "get_item_from_future() input")
    out: Future[Any] = ItemFuture(future, key)
    if is_dry_run(future):  # stands for a call that never runs: its item is None too
        _resolve(out, None)
    else:
        future.add_done_callback(functools.partial(_item_done, out, key))
    return out


def _item_done(out: Future[Any], key: Any, future: Future[Any]) -> None:
    # Runs inside Future.set_result()/cancel() of some thread: must never raise.
    try:
        value, error = _outcome(future)
        if error is not None:
            _reject(out, _dependency_error(f"get_item_from_future(key={key!r})", "future",
                                          error))
        else:
            _settle(out, functools.partial(_lookup, value, key))
    except Exception as exc:
        _fail_unfinished([out], "get_item_from_future()", exc)


def _lookup(value: Any, key: Any) -> Any:
    try:
        return value[key]
    except (KeyError, IndexError, TypeError) as exc:
        raise _lookup_error(exc, value, key) from exc


def _lookup_error(exc: Exception, value: Any, key: Any) -> Exception:
    """A fresh builtin exception of the same kind as ``exc``, naming ``key``."""
    kind = type(value).__name__
    # Build the builtin base class: a subclass may not accept a single message argument.
    if isinstance(exc, KeyError):
        return KeyError(f"key {key!r} not found in the result ({kind})")
    if isinstance(exc, IndexError):
        return IndexError(f"index {key!r} out of range for the result ({kind}): {exc}")
    return TypeError(f"cannot take item {key!r} of the result ({kind}): {exc}")
