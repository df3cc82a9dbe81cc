"""Tests of executorkit.streaming, with bare futures completed by hand or by a thread pool."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import pytest

from executorkit import streaming
from executorkit.errors import DependencyError, ExecutorkitError, ResourceError
from executorkit.streaming import (
    AsCompleted,
    SplitFutureError,
    as_completed,
    batched,
    get_item_from_future,
    split_future,
)

WAIT = 10  # seconds; only reached if something hangs

AsCompletedFn = Callable[..., Iterable["Future[Any]"]]
BOTH = pytest.mark.parametrize(
    "as_completed_fn", [cf.as_completed, as_completed], ids=["stdlib", "ours"]
)


def pending() -> Future[Any]:
    return Future()


def done(value: Any = None) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def failed(error: BaseException) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_exception(error)
    return fut


def cancelled() -> Future[Any]:
    fut: Future[Any] = Future()
    assert fut.cancel()
    return fut


def outcome_error(fut: Future[Any]) -> BaseException:
    """The exception a future fails with (waits at most WAIT seconds for it)."""
    error = fut.exception(timeout=WAIT)
    assert error is not None
    return error


@pytest.fixture
def no_callback_errors(caplog: pytest.LogCaptureFixture) -> Iterable[None]:
    """Fail if a done-callback raised: the stdlib only logs that, so look at the log."""
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        yield
    assert not [r for r in caplog.records if r.name == "concurrent.futures"]


# --------------------------------------------------------------------------- as_completed


@BOTH
def test_done_futures_first_then_completion_order(as_completed_fn: AsCompletedFn) -> None:
    p1, p2 = pending(), pending()
    d1, d2 = done(1), done(2)
    it = iter(as_completed_fn([p1, d1, p2, d2]))
    assert {next(it), next(it)} == {d1, d2}
    p2.set_result(3)
    assert next(it) is p2
    p1.set_result(4)
    assert next(it) is p1
    with pytest.raises(StopIteration):
        next(it)


@BOTH
def test_duplicates_yielded_once(as_completed_fn: AsCompletedFn) -> None:
    a, b = done(1), done(2)
    assert sorted(f.result(timeout=WAIT) for f in as_completed_fn([a, b, a, a])) == [1, 2]


def test_already_done_yielded_in_given_order() -> None:
    fs = [done(i) for i in range(20)]
    assert list(as_completed(f for f in fs)) == fs  # any iterable, like the stdlib


@BOTH
def test_timeout_fires_with_stdlib_message(as_completed_fn: AsCompletedFn) -> None:
    finished, never = done(1), pending()
    it = iter(as_completed_fn([finished, never], timeout=0.05))
    assert next(it) is finished  # done futures are yielded even though time is short
    with pytest.raises(cf.TimeoutError, match=r"^1 \(of 2\) futures unfinished$"):
        next(it)


def test_timeout_is_builtin_timeout_error() -> None:
    it = as_completed([pending()], timeout=0.05)
    with pytest.raises(TimeoutError, match=r"1 \(of 1\) futures unfinished"):
        next(it)


def test_add_from_loop_body() -> None:
    first = done(0)
    it = as_completed([first])
    seen = []
    for fut in it:
        value = fut.result(timeout=WAIT)
        seen.append(value)
        if value < 3:
            it.add(done(value + 1))
            it.add(fut)  # already yielded: ignored
    assert seen == [0, 1, 2, 3]
    assert it.pending == 0


def test_add_from_another_thread_while_blocked() -> None:
    first, extra = pending(), pending()
    it = as_completed([first])

    def producer() -> None:
        it.add(extra)
        extra.set_result("extra")
        first.set_result("first")

    thread = threading.Thread(target=producer)
    thread.start()
    # `first` is pending until after `extra` was added and completed, so the order is fixed
    # whether or not the loop was already waiting when the producer ran.
    assert [f.result(timeout=WAIT) for f in it] == ["extra", "first"]
    thread.join(WAIT)


def test_reiterate_after_exhaustion() -> None:
    a = done("a")
    it = as_completed([a])
    assert list(it) == [a]
    with pytest.raises(StopIteration):
        next(it)
    b = pending()
    it.add(b)
    it.add(a)  # a duplicate of an already yielded future
    assert it.pending == 1
    b.set_result("b")
    assert list(it) == [b]


def test_update_pending_and_len() -> None:
    a, b, c = pending(), pending(), done(3)
    it: AsCompleted[Any] = as_completed([])
    assert len(it) == 0
    it.update([a, b, a, c])
    assert it.pending == len(it) == 3
    assert next(it) is c
    assert it.pending == 2  # pending counts outstanding, not-yet-yielded futures


def test_add_rejects_non_futures() -> None:
    with pytest.raises(TypeError, match="Future"):
        as_completed([1])  # type: ignore[arg-type]


def test_next_batch_returns_all_done_in_completion_order() -> None:
    a, b, c = pending(), pending(), pending()
    it = as_completed([a, b, c])
    b.set_result(2)
    a.set_result(1)
    assert it.next_batch(timeout=WAIT) == [b, a]
    assert it.pending == 1
    c.set_result(3)
    assert it.next_batch() == [c]
    assert it.next_batch() == []  # nothing pending: no wait, no error


def test_next_batch_max_items() -> None:
    fs = [done(i) for i in range(5)]
    it = as_completed(fs)
    assert it.next_batch(max_items=2) == fs[:2]
    assert it.next_batch(max_items=2) == fs[2:4]
    assert it.next_batch(max_items=2) == fs[4:]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ResourceError, match="max_items"):
            it.next_batch(max_items=bad)  # type: ignore[arg-type]


def test_next_batch_timeout() -> None:
    it = as_completed([pending(), pending()])
    with pytest.raises(TimeoutError, match=r"2 \(of 2\) futures unfinished"):
        it.next_batch(timeout=0.05)


def test_next_batch_waits_for_a_thread() -> None:
    fut: Future[int] = Future()
    it = as_completed([fut])
    thread = threading.Thread(target=fut.set_result, args=(7,))
    thread.start()
    assert it.next_batch(timeout=WAIT) == [fut]
    thread.join(WAIT)


def test_keep_k_in_flight_with_thread_pool() -> None:
    k, total = 2, 12
    todo = iter(range(k, total))
    results, in_flight = [], []
    with ThreadPoolExecutor(2) as pool:
        it = as_completed([pool.submit(pow, x, 2) for x in range(k)])
        for fut in it:
            results.append(fut.result(timeout=WAIT))
            x = next(todo, None)
            if x is not None:
                it.add(pool.submit(pow, x, 2))
            in_flight.append(it.pending)
    assert sorted(results) == [x * x for x in range(total)]
    assert max(in_flight) == k


def test_dropped_iterator_is_freed_and_callback_is_harmless(no_callback_errors: None) -> None:
    fut: Future[int] = Future()
    it = as_completed([fut])
    ref = weakref.ref(it)
    del it
    gc.collect()
    assert ref() is None  # the future's callback must not keep the iterator alive
    fut.set_result(1)


def test_yielded_futures_are_not_kept() -> None:
    it = as_completed([done(1)])
    fut = next(it)
    ref = weakref.ref(fut)
    del fut
    gc.collect()
    assert ref() is None  # a long active-learning loop must not accumulate old futures


# --------------------------------------------------------------------------- batched


def test_batched_groups_by_completion_order(no_callback_errors: None) -> None:
    inputs = [pending() for _ in range(5)]
    out = batched(inputs, 2)
    assert len(out) == 3
    assert not any(f.done() for f in out)
    for i in (3, 1, 4, 0):
        inputs[i].set_result(i)
    assert out[0].result(timeout=WAIT) == [3, 1]
    assert out[1].result(timeout=WAIT) == [4, 0]
    assert not out[2].done()
    inputs[2].set_result(2)
    assert out[2].result(timeout=WAIT) == [2]  # last batch is shorter


def test_batched_completes_a_batch_as_soon_as_it_is_full() -> None:
    inputs = [pending() for _ in range(4)]
    out = batched(inputs, 2)
    inputs[2].set_result("c")
    assert not out[0].done()
    inputs[0].set_result("a")
    assert out[0].result(timeout=WAIT) == ["c", "a"]
    assert not out[1].done()


def test_batched_done_inputs_and_pool() -> None:
    with ThreadPoolExecutor(2) as pool:
        inputs = [pool.submit(pow, x, 2) for x in range(7)]
        out = batched(inputs, 3)
        results = [r for b in out for r in b.result(timeout=WAIT)]
    assert [len(b.result(timeout=WAIT)) for b in out] == [3, 3, 1]
    assert sorted(results) == [x * x for x in range(7)]


def test_batched_leaves_a_failed_input_out(no_callback_errors: None, caplog) -> None:
    # executorlib's rule: one failed simulation does not cost its batch the good results
    inputs = [pending() for _ in range(6)]
    out = batched(inputs, 3)
    with caplog.at_level(logging.WARNING, logger="executorkit"):
        inputs[5].set_exception(RuntimeError("boom"))
    for i in range(3):
        inputs[i].set_result(i)
    assert out[0].result(timeout=WAIT) == [0, 1, 2]
    inputs[3].set_result(3)
    assert not out[1].done()  # input 4 may still come
    inputs[4].set_result(4)
    assert out[1].result(timeout=WAIT) == [3, 4]  # short: every input is done
    assert "input 5 failed with RuntimeError: boom" in caplog.text


def test_batched_leaves_a_cancelled_input_out(no_callback_errors: None) -> None:
    inputs = [pending(), pending(), pending()]
    out = batched(inputs, 2)
    inputs[1].cancel()
    inputs[0].set_result("x")
    assert not out[0].done()
    inputs[2].set_result("z")
    assert out[0].result(timeout=WAIT) == ["x", "z"]
    error = outcome_error(out[1])  # nothing is left to fill it
    assert isinstance(error, DependencyError)
    assert isinstance(error.__cause__, CancelledError)
    assert "batch 1" in str(error) and "input 1" in str(error)


def test_batched_fails_the_batches_no_result_is_left_for(no_callback_errors: None) -> None:
    inputs = [pending() for _ in range(5)]
    out = batched(inputs, 2)
    boom = ValueError("boom")
    for i in (4, 1, 3):
        inputs[i].set_exception(boom if i == 4 else KeyError(i))
    inputs[0].set_result(0)
    assert not any(f.done() for f in out)  # input 2 may still fill batch 0
    inputs[2].set_result(2)
    assert out[0].result(timeout=WAIT) == [0, 2]
    for batch in (1, 2):
        error = outcome_error(out[batch])
        assert isinstance(error, DependencyError)
        assert isinstance(error, ValueError)  # caught as the first failure's type too
        assert error.__cause__ is boom
        assert f"batch {batch}" in str(error) and "input 4" in str(error)
        assert "inputs 1, 3" in str(error)


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_batched_leaves_out_a_failure_whose_text_cannot_be_made(no_callback_errors: None
                                                                ) -> None:
    inputs = [pending(), pending()]
    out = batched(inputs, 2)
    inputs[0].set_exception(_Unprintable())
    inputs[1].set_result(1)
    assert out[0].result(timeout=WAIT) == [1]


def test_batched_of_failed_inputs_only_fails_every_batch(no_callback_errors: None) -> None:
    inputs = [pending(), pending()]
    out = batched(inputs, 1)
    for f in inputs:
        f.set_exception(OSError("disk"))
    assert all(isinstance(outcome_error(b), OSError) for b in out)


@pytest.mark.parametrize("bad", [0, -2, True, False, 1.5, "2", None])
def test_batched_bad_n(bad: Any) -> None:
    with pytest.raises(ResourceError, match=r"\bn\b") as info:
        batched([done(1)], bad)
    assert info.value.key == "n"
    assert isinstance(info.value, ValueError)


def test_batched_empty_and_non_future() -> None:
    assert batched([], 3) == []
    with pytest.raises(TypeError, match="input 1"):
        batched([done(1), 2], 1)  # type: ignore[arg-type]


def test_batched_outputs_feed_as_completed() -> None:
    inputs = [pending() for _ in range(4)]
    out = batched(inputs, 2)
    it = as_completed(out)
    for i in (1, 3):
        inputs[i].set_result(i)
    assert next(it) is out[0]
    for i in (0, 2):
        inputs[i].set_result(i)
    assert next(it) is out[1]
    assert out[1].result(timeout=WAIT) == [0, 2]


def test_cancelled_output_is_left_alone(no_callback_errors: None) -> None:
    inputs = [pending(), pending()]
    out = batched(inputs, 2)
    assert out[0].cancel()
    for fut in inputs:
        fut.set_result(1)
    assert out[0].cancelled()


# --------------------------------------------------------------------------- split_future


def test_split_future_success(no_callback_errors: None) -> None:
    upstream: Future[tuple[int, str, None]] = Future()
    parts = split_future(upstream, 3)
    assert len(parts) == 3
    assert not any(p.done() for p in parts)
    upstream.set_result((1, "b", None))
    assert [p.result(timeout=WAIT) for p in parts] == [1, "b", None]


def test_split_future_done_input() -> None:
    assert [p.result(timeout=WAIT) for p in split_future(done([4, 5]), 2)] == [4, 5]


@pytest.mark.parametrize(
    ("value", "actual"), [([1, 2, 3], 3), ((1,), 1), (5, None), ({"a": 1, "b": 2}, None)]
)
def test_split_future_wrong_shape(value: Any, actual: int | None) -> None:
    parts = split_future(done(value), 2)
    for part in parts:
        error = outcome_error(part)
        assert isinstance(error, SplitFutureError)
        assert isinstance(error, ValueError)
        assert isinstance(error, ExecutorkitError)
        assert "length 2" in str(error)
        assert error.expected == 2
        assert error.actual == actual
        if actual is not None:
            assert f"length {actual}" in str(error)
    assert outcome_error(parts[0]) is not outcome_error(parts[1])


def test_split_future_upstream_failure_and_cancel() -> None:
    boom = RuntimeError("boom")
    for upstream, cause_type in ((failed(boom), RuntimeError), (cancelled(), CancelledError)):
        for part in split_future(upstream, 2):
            error = outcome_error(part)
            assert isinstance(error, DependencyError)
            assert isinstance(error.__cause__, cause_type)
            assert cause_type.__name__ in str(error)


def test_split_future_bad_n() -> None:
    for bad in (0, True, 2.0):
        with pytest.raises(ResourceError, match="n must be"):
            split_future(pending(), bad)  # type: ignore[arg-type]


def test_split_future_feeds_as_completed_while_pending() -> None:
    upstream: Future[list[int]] = Future()
    parts = split_future(upstream, 3)
    it = as_completed(parts)
    assert it.pending == 3
    upstream.set_result([10, 20, 30])
    assert sorted(f.result(timeout=WAIT) for f in it) == [10, 20, 30]


# --------------------------------------------------------------------------- get_item


def test_get_item_success(no_callback_errors: None) -> None:
    upstream: Future[dict[str, Any]] = Future()
    energy = get_item_from_future(upstream, "energy")
    last = get_item_from_future(upstream, "forces")
    assert not energy.done()
    upstream.set_result({"energy": -1.5, "forces": [0, 1]})
    assert energy.result(timeout=WAIT) == -1.5
    assert last.result(timeout=WAIT) == [0, 1]
    assert get_item_from_future(done([1, 2, 3]), -1).result(timeout=WAIT) == 3
    assert get_item_from_future(done("abc"), slice(1, None)).result(timeout=WAIT) == "bc"


@pytest.mark.parametrize(
    ("value", "key", "error_type"),
    [({"a": 1}, "missing", KeyError), ([1, 2], 5, IndexError), (None, "x", TypeError)],
)
def test_get_item_bad_key(
    value: Any, key: Any, error_type: type[Exception], no_callback_errors: None
) -> None:
    error = outcome_error(get_item_from_future(done(value), key))
    assert type(error) is error_type
    assert repr(key) in str(error)
    assert isinstance(error.__cause__, error_type)


def test_get_item_upstream_failure_and_cancel() -> None:
    boom = OSError("disk")
    error = outcome_error(get_item_from_future(failed(boom), 0))
    assert isinstance(error, DependencyError)
    assert error.__cause__ is boom
    assert "OSError" in str(error)
    error = outcome_error(get_item_from_future(cancelled(), 0))
    assert isinstance(error, DependencyError)
    assert isinstance(error.__cause__, CancelledError)


def test_get_item_feeds_as_completed_while_pending() -> None:
    upstream: Future[list[str]] = Future()
    items = [get_item_from_future(upstream, i) for i in (1, 0)]
    it = as_completed(items)
    upstream.set_result(["zero", "one"])
    assert sorted(f.result(timeout=WAIT) for f in it) == ["one", "zero"]


# --------------------------------------------------------------------------- robustness


class _LyingFuture(Future[Any]):
    """Claims success but raises from result(): a broken Future subclass."""

    def result(self, timeout: float | None = None) -> Any:
        raise RuntimeError("broken future")


def test_misbehaving_input_fails_outputs(no_callback_errors: None) -> None:
    upstream = _LyingFuture()
    part = split_future(upstream, 1)[0]
    item = get_item_from_future(upstream, 0)
    batch = batched([upstream], 1)[0]
    upstream.set_result([1])
    for out in (part, item, batch):
        error = outcome_error(out)
        assert isinstance(error, DependencyError)
        assert isinstance(error.__cause__, RuntimeError)


def test_internal_error_fails_outputs_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, no_callback_errors: None
) -> None:
    def explode(*args: Any) -> Any:
        raise RuntimeError("internal")

    monkeypatch.setattr(streaming, "_dependency_error", explode)
    upstream: Future[Any] = Future()
    outputs = [*split_future(upstream, 2), get_item_from_future(upstream, 0)]
    outputs += batched([upstream], 1)
    upstream.set_exception(ValueError("boom"))
    for out in outputs:
        error = outcome_error(out)
        assert type(error) is ExecutorkitError
        assert isinstance(error.__cause__, RuntimeError)
