"""Where ProcessPoolExecutor's behaviour is the contract, checked without CPython's test
package (tests/test_stdlib_conformance.py runs the upstream tests themselves)."""

from __future__ import annotations

import multiprocessing

import faultfuncs as ff
import pytest
import taskfuncs as tf

from executorkit import SingleNodeExecutor

T = 120


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_message_matches_the_stdlib(bad):
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        SingleNodeExecutor(max_workers=bad)


def test_map_rejects_chunksize_below_one(make_executor):
    exe = make_executor(max_workers=1)
    assert list(exe.map(tf.inc, range(5), chunksize=2, timeout=T)) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        exe.map(tf.inc, range(5), chunksize=0)


def test_cancel_futures_spares_calls_submitted_while_slots_were_free(make_executor, tmp_path):
    # Submitted with a slot free, the first call starts (as in the stdlib pools) even when
    # shutdown(cancel_futures=True) follows at once; only the calls that would wait are
    # cancelled.
    d = str(tmp_path)
    exe = make_executor(max_workers=1)
    first = exe.submit(tf.gate, d, "first", 1)
    rest = [exe.submit(tf.inc, i) for i in range(20)]
    exe.shutdown(wait=False, cancel_futures=True)
    tf.release(d, "first")
    assert first.result(timeout=T) == 1
    assert sum(f.cancelled() for f in rest) >= 19
    exe.shutdown(wait=True)


def test_multiprocessing_manager_proxies_as_arguments(make_executor):
    # Works with ProcessPoolExecutor; needs the driver's multiprocessing authkey in workers.
    exe = make_executor(max_workers=1)
    with multiprocessing.get_context("fork").Manager() as manager:
        shared = manager.dict()
        exe.submit(ff.store, shared, "k", 3).result(timeout=T)
        assert shared["k"] == 3
