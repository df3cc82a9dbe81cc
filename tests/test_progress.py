"""progress=True: a bar with done/running/waiting/failed."""

from __future__ import annotations

import pytest
import taskfuncs as tf

from executorkit import SingleNodeExecutor

T = 60


def test_progress_bar_counts_done_and_failed(capsys):
    with SingleNodeExecutor(max_workers=2, progress=True) as exe:
        good = [exe.submit(tf.inc, i) for i in range(8)]
        bad = [exe.submit(tf.fail, "x") for _ in range(2)]
        for f in good:
            f.result(timeout=T)
        for f in bad:
            with pytest.raises(ValueError):
                f.result(timeout=T)
    err = capsys.readouterr().err
    assert "10/10" in err
    assert "done=8" in err and "failed=2" in err


def test_counts_without_a_bar(tmp_path):
    with SingleNodeExecutor(max_workers=1) as exe:
        running = exe.submit(tf.gate, str(tmp_path), "c")
        waiting = exe.submit(tf.inc, 1)
        from conftest import wait_until

        wait_until(lambda: tf.started(str(tmp_path), "c"))
        counts = exe.info
        assert counts["running"] == 1 and counts["waiting"] == 1
        assert counts["submitted"] == 2
        tf.release(str(tmp_path), "c")
        running.result(timeout=T)
        waiting.result(timeout=T)
