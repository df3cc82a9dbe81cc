"""Regressions for failure modes found in review: each test fails on the old behaviour."""

from __future__ import annotations

import os
import struct

import capabilities
import pytest
import taskfuncs as tf
from conftest import dial, wait_until

from executorkit import SingleNodeExecutor
from executorkit.errors import ExecutorBrokenError, WorkerDiedError

T = 120


def _warm(exe, n=50):
    """Teach a block executor that inc is tiny, so several calls queue per worker."""
    assert [f.result(timeout=T) for f in [exe.submit(tf.inc, i) for i in range(n)]] == \
        list(range(1, n + 1))


def test_crash_among_queued_tiny_calls_fails_only_itself():
    with SingleNodeExecutor(max_workers=1, block_allocation=True, restart_limit=2) as exe:
        _warm(exe)
        before = [exe.submit(tf.inc, i) for i in range(14)]
        crash = exe.submit(tf.exit_now, 9)
        after = [exe.submit(tf.inc, i) for i in range(5)]
        assert [f.result(timeout=T) for f in before] == list(range(1, 15))
        with pytest.raises(WorkerDiedError, match="code 9"):
            crash.result(timeout=T)
        assert [f.result(timeout=T) for f in after] == list(range(1, 6))


def test_large_arguments_queued_in_a_worker_do_not_deadlock():
    blob = b"x" * (32 << 20)
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        _warm(exe)
        futs = [exe.submit(tf.identity, blob) for _ in range(3)]
        assert all(f.result(timeout=T) == blob for f in futs)


def test_fork_server_death_fails_futures_and_shutdown_returns(tmp_path):
    exe = SingleNodeExecutor(max_workers=1)
    fut = exe.submit(tf.gate, str(tmp_path), "fs")
    wait_until(lambda: tf.started(str(tmp_path), "fs"))
    exe._engine.launcher.process.kill()
    with pytest.raises((ExecutorBrokenError, WorkerDiedError)):
        fut.result(timeout=T)
    exe.shutdown(wait=True)  # must return


def test_forked_workers_die_with_the_fork_server():
    # PR_SET_PDEATHSIG, set in every forked child (spares and workers forked for a call).
    import signal

    with SingleNodeExecutor(max_workers=2) as exe:
        seen = [exe.submit(tf.death_signal) for _ in range(4)]
        assert [f.result(timeout=T) for f in seen] == [signal.SIGKILL] * 4


def test_run_time_max_counts_from_a_ready_worker():
    with SingleNodeExecutor(max_workers=1, block_allocation=True,
                            init_function=tf.slow_init) as exe:
        fut = exe.submit(tf.with_state, 1, resource_dict={"run_time_max": 1.0})
        assert fut.result(timeout=T) == (1, "slow", None)


def test_failed_setup_does_not_leak_into_the_next_call(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe:
        bad = exe.submit(tf.env, "LEAK", resource_dict={"env": {"LEAK": "yes"},
                                                        "cwd": str(blocker / "sub")})
        with pytest.raises(OSError):
            bad.result(timeout=T)
        assert exe.submit(tf.env, "LEAK").result(timeout=T) == {"LEAK": None}


def test_block_calls_go_to_idle_workers(tmp_path):
    with SingleNodeExecutor(max_workers=2, block_allocation=True) as exe:
        _warm(exe)
        a = exe.submit(tf.gate, str(tmp_path), "a")
        b = exe.submit(tf.gate, str(tmp_path), "b")
        # both must run at once, one per worker, never queued behind each other
        wait_until(lambda: tf.started(str(tmp_path), "a") and tf.started(str(tmp_path), "b"),
                   timeout=60)
        tf.release(str(tmp_path), "a")
        tf.release(str(tmp_path), "b")
        a.result(timeout=T)
        b.result(timeout=T)


@pytest.mark.mpi
@capabilities.skip_unless("mpi")
def test_mpi_exceptions_are_not_worker_crashes():
    with SingleNodeExecutor(max_cores=2, block_allocation=True, restart_limit=0,
                            resource_dict={"cores": 2}) as exe:
        for _ in range(3):
            with pytest.raises(ValueError, match="plain failure"):
                exe.submit(tf.mpi_raise).result(timeout=T)
        assert len(exe.submit(tf.mpi_ranks, 0).result(timeout=T)) == 2


def test_unauthenticated_peers_cannot_send_large_frames():
    with SingleNodeExecutor(max_workers=1) as exe:
        with dial(exe._engine.address, timeout=10) as peer:
            peer.sendall(struct.pack("!Q32s", 10 << 20, b"\0" * 32) + os.urandom(1 << 16))
            peer.settimeout(10)
            try:
                closed = peer.recv(1) == b""
            except ConnectionResetError:
                closed = True
            assert closed  # dropped before 10 MB were buffered
        assert exe.submit(tf.inc, 1).result(timeout=T) == 2


SUBMIT_AT_EXIT = '''
import atexit, operator, sys
{early}
from executorkit import SingleNodeExecutor

exe = SingleNodeExecutor(max_workers=1, block_allocation={block})
assert exe.submit(operator.add, 1, 1).result(timeout=60) == 2

def submit_at_exit():
    try:
        exe.submit(operator.add, 1, 2)
    except BaseException as exc:
        print("RAISED", type(exc).__name__, exc, flush=True)
    else:
        print("NO ERROR", flush=True)

atexit.register(submit_at_exit)
'''


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("registered", ["before-import", "after-executor"])
def test_submit_after_interpreter_shutdown_raises_the_stdlib_error(tmp_path, block, registered):
    """Like the stdlib pools: from an atexit hook, submit raises RuntimeError, whichever
    order the hooks run in (ours registered before or after the user's)."""
    import subprocess
    import sys

    early = "atexit.register(lambda: submit_at_exit())" if registered == "before-import" else ""
    script = SUBMIT_AT_EXIT.format(early=early, block=block)
    if registered == "before-import":
        script = script.replace("\natexit.register(submit_at_exit)\n", "\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, check=False)
    assert ("RAISED RuntimeError cannot schedule new futures after interpreter shutdown"
            in proc.stdout), proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr


def test_fork_server_binds_its_libraries_at_start_and_workers_do_not_inherit_it():
    with SingleNodeExecutor(max_workers=1) as exe:
        assert exe.submit(tf.env, "LD_BIND_NOW").result(timeout=T) == {"LD_BIND_NOW": None}
        with open(f"/proc/{exe._engine.launcher.process.pid}/environ", "rb") as fh:
            assert b"LD_BIND_NOW=1" in fh.read().split(b"\0")  # as it started


def test_a_worker_steps_aside_for_its_exit():
    # After its reply a forked worker lowers its priority, so that tearing it down never
    # delays the next call on its CPU.
    from executorkit.worker import forkserver

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            before = os.nice(0)
            forkserver._step_aside()
            os.write(write, f"{before} {os.nice(0)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        before, after = map(int, os.read(read, 100).split())
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert after == min(19, before + forkserver.EXIT_NICENESS)


def test_per_task_worker_reads_its_call_without_a_zero_filled_buffer():
    # bytearray() fills every page of its buffer: a worker that reads one call allocates
    # none (a 1 MiB one cost each per-task call ~250 page faults, 64 KiB 16) and still gets
    # large arguments.
    import socket

    from executorkit.worker.loop import _Server

    a, b = socket.socketpair()
    with a, b:
        one_call = _Server(a, b"k" * 32, False, None, None)
        persistent = _Server(b, b"k" * 32, True, None, None)
        assert one_call.rbuf is None and len(persistent.rbuf) == 1 << 20
    blob = b"x" * (3 << 20)
    with SingleNodeExecutor(max_workers=1) as exe:
        assert exe.submit(len, blob).result(timeout=T) == len(blob)
