"""The runtime estimator and the prefetch depth: pure policy, no processes."""

from __future__ import annotations

import pytest

from executorkit.estimator import CALL_FLOOR, DEPTH, QUEUE_TIME, TINY, RuntimeEstimator


def short() -> None:
    pass


def other() -> None:
    pass


def test_unknown_function_is_not_tiny():
    est = RuntimeEstimator()
    assert not est.is_tiny(short)
    assert est.mean(short) is None


def test_tiny_after_proof_short_calls():
    est = RuntimeEstimator(proof=2)
    est.observe(short, 20e-6)
    assert not est.is_tiny(short)  # one call proves nothing
    est.observe(short, 30e-6)
    assert est.is_tiny(short)


def test_import_heavy_first_call_does_not_make_a_short_function_look_long():
    # The worker reports the call's own duration: importing scipy while unpickling the
    # function is not part of it. Even a first call that is slow for another reason (a
    # cold cache) is forgotten after `proof` short calls, not after thousands.
    est = RuntimeEstimator(proof=2)
    est.observe(short, 0.4)
    assert not est.is_tiny(short)
    est.observe(short, 25e-6)
    est.observe(short, 25e-6)
    assert est.is_tiny(short)


def test_function_that_becomes_long_is_relearned_at_once():
    est = RuntimeEstimator()
    for _ in range(1000):
        est.observe(short, 10e-6)
    assert est.is_tiny(short)
    est.observe(short, 0.1)  # (or the worker's overrun report of a call still running)
    assert not est.is_tiny(short)


def test_function_that_becomes_short_again_is_relearned_within_a_few_calls():
    est = RuntimeEstimator(proof=3)
    for _ in range(100):
        est.observe(short, 1.0)
    calls = 0
    while not est.is_tiny(short):
        est.observe(short, 40e-6)
        calls += 1
    assert calls == 3


def test_calls_of_about_forty_microseconds_are_tiny():
    est = RuntimeEstimator()
    for _ in range(3):
        est.observe(short, 45e-6)
    assert est.is_tiny(short)


def test_threshold_is_strict():
    est = RuntimeEstimator(tiny=TINY, proof=1)
    est.observe(short, TINY)
    assert not est.is_tiny(short)
    est.observe(short, TINY / 2)
    assert est.is_tiny(short)


def test_functions_do_not_share_estimates():
    est = RuntimeEstimator(proof=1)
    est.observe(short, 1e-5)
    est.observe(other, 1.0)
    assert est.is_tiny(short)
    assert not est.is_tiny(other)


def test_unhashable_callable_is_never_tiny():
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self) -> None:
            pass

    est = RuntimeEstimator(proof=1)
    fn = Unhashable()
    est.observe(fn, 1e-6)
    assert not est.is_tiny(fn)
    assert est.mean(fn) is None


def test_table_keeps_the_most_recent_functions():
    est = RuntimeEstimator(proof=1, size=2)
    fns = [lambda: 1, lambda: 2, lambda: 3]
    for fn in fns:
        est.observe(fn, 1e-6)
    est.observe(fns[1], 1e-6)
    assert not est.is_tiny(fns[0])  # evicted, least recently seen
    assert est.is_tiny(fns[1]) and est.is_tiny(fns[2])


def test_mean_is_smoothed():
    est = RuntimeEstimator()
    est.observe(short, 1.0)
    est.observe(short, 0.0)
    assert est.mean(short) == pytest.approx(0.75)


def test_depth_only_while_every_active_call_is_tiny():
    est = RuntimeEstimator()
    assert est.depth(0) == min(DEPTH, int(QUEUE_TIME / CALL_FLOOR))
    assert est.depth(1) == 1
    assert RuntimeEstimator(depth=1).depth(0) == 1


def test_depth_holds_about_queue_time_of_the_recent_tiny_calls():
    est = RuntimeEstimator(depth=1000)
    for _ in range(100):  # calls of 1 ms: about QUEUE_TIME / 1 ms of them per worker
        est.observe(short, 0.001)
    assert est.depth(0) == pytest.approx(QUEUE_TIME / 0.001, abs=1)
    for _ in range(100):  # calls of 1 us count as CALL_FLOOR: the cap, not a million
        est.observe(short, 1e-6)
    assert est.depth(0) == pytest.approx(QUEUE_TIME / CALL_FLOOR, abs=1)
    assert RuntimeEstimator(depth=8).depth(0) == 8  # never past the engine's slots
    for _ in range(100):  # calls just under TINY still queue at least two
        est.observe(short, TINY * 0.99)
    assert est.depth(0) >= 2


def test_long_calls_do_not_change_the_depth_of_tiny_ones():
    est = RuntimeEstimator(depth=1000)
    for _ in range(50):
        est.observe(short, 0.001)
    before = est.depth(0)
    est.observe(short, 5.0)  # a long call makes its function slow, not the pace
    assert est.depth(0) == before


@pytest.mark.parametrize("kwargs", [{"tiny": 0}, {"proof": 0}, {"size": 0}, {"depth": 0}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError, match="required"):
        RuntimeEstimator(**kwargs)
