"""MPI-parallel calls (cores > 1) with a real mpiexec."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap

import capabilities
import pytest
import taskfuncs as tf
from conftest import new_executor, wait_until

from executorkit import SingleNodeExecutor
from executorkit.errors import SerializationError, TaskTimeoutError, WorkerDiedError
from executorkit.launchers.local import mpiexec_command

T = 120
HAVE_MPI = capabilities.missing("mpi") is None
pytestmark = [pytest.mark.mpi, capabilities.skip_unless("mpi")]

MPI_MODES = {
    "per-task": ({"max_cores": 2}, {"cores": 2}),
    "block": ({"max_cores": 2, "resource_dict": {"cores": 2}}, None),
}


# the same MPI behaviour with Flux's PMI starting the ranks, when a broker is reachable
@pytest.fixture(params=[*MPI_MODES, *(pytest.param(f"flux-{m}", marks=pytest.mark.flux)
                                      for m in MPI_MODES)])
def mpi_exe(request):
    kwargs, per_call = MPI_MODES[request.param.removeprefix("flux-")]
    exe = new_executor(request.param, **kwargs)
    yield exe, per_call
    exe.shutdown(wait=True, cancel_futures=True)


def test_results_in_rank_order(mpi_exe):
    exe, res = mpi_exe
    out = exe.submit(tf.mpi_ranks, "x", resource_dict=res).result(timeout=T)
    assert [r[:3] for r in out] == [(0, 2, "x"), (1, 2, "x")]
    assert exe.submit(tf.mpi_allreduce, 1, resource_dict=res).result(timeout=T) == [3, 3]


def test_failure_on_one_rank_reports_that_rank(mpi_exe):
    exe, res = mpi_exe
    with pytest.raises(ValueError, match="rank 1 failed") as info:
        exe.submit(tf.mpi_fail_on, 1, resource_dict=res).result(timeout=T)
    assert "[rank 1 of 2]" in info.value.__cause__.tb
    assert "mpi_fail_on" in info.value.__cause__.tb
    # the executor keeps working afterwards
    assert len(exe.submit(tf.mpi_ranks, 1, resource_dict=res).result(timeout=T)) == 2


def test_rank_that_exits_fails_the_call(mpi_exe):
    exe, res = mpi_exe
    with pytest.raises(WorkerDiedError):
        exe.submit(tf.mpi_exit_on, 1, resource_dict=res).result(timeout=T)
    assert len(exe.submit(tf.mpi_ranks, 2, resource_dict=res).result(timeout=T)) == 2


def test_unpicklable_result_on_one_rank(mpi_exe):
    exe, res = mpi_exe
    with pytest.raises(SerializationError, match="rank 1"):
        exe.submit(tf.mpi_unpicklable_on, 1, resource_dict=res).result(timeout=T)


def test_hanging_mpi_call_is_stopped_by_run_time_max(mpi_exe):
    exe, res = mpi_exe
    res = {**(res or {}), "run_time_max": 2}
    with pytest.raises(TaskTimeoutError):
        exe.submit(tf.sleep_forever, resource_dict=res).result(timeout=T)


def job_segments(directory, running: bool = True) -> list[str]:
    """The MPICH shared-memory files the call in ``directory`` noted (see taskfuncs); while
    it runs, they exist."""
    path = directory / "segments"
    wait_until(path.exists, timeout=T)
    segments = path.read_text().split()
    assert segments  # the job has some (a rank notes the files it has mapped)
    assert not running or all(os.path.exists(s) for s in segments)
    return segments


def gone(segments) -> bool:
    return not any(os.path.exists(s) for s in segments)


def test_a_cancelled_mpi_call_leaves_no_shared_memory_behind(mpi_exe, tmp_path):
    # MPICH removes its /dev/shm file at MPI_Finalize, which a killed job never reaches
    exe, res = mpi_exe
    future = exe.submit(tf.mpi_segments_then_hang, str(tmp_path), resource_dict=res)
    segments = job_segments(tmp_path)
    assert future.cancel()
    wait_until(lambda: gone(segments), timeout=T)


def test_an_mpi_call_that_aborts_leaves_no_shared_memory_behind(mpi_exe, tmp_path):
    exe, res = mpi_exe
    future = exe.submit(tf.mpi_segments_then_fail_on, str(tmp_path), 1, resource_dict=res)
    segments = job_segments(tmp_path, running=False)  # (it may have aborted already)
    with pytest.raises(ValueError, match="rank 1 failed"):
        future.result(timeout=T)
    wait_until(lambda: gone(segments), timeout=T)


@pytest.mark.parametrize("block", [False, True])
def test_a_one_process_mpi_call_leaves_no_shared_memory_behind(tmp_path, block):
    # forked workers leave with os._exit: mpi4py's MPI_Finalize at exit never runs
    with SingleNodeExecutor(max_workers=1, block_allocation=block) as exe:
        assert exe.submit(tf.singleton_segments, str(tmp_path)).result(timeout=T) == 1
    segments = job_segments(tmp_path, running=False)
    wait_until(lambda: gone(segments), timeout=T)


@pytest.mark.parametrize("block", [False, True])
def test_a_cancelled_one_process_mpi_call_leaves_no_shared_memory_behind(tmp_path, block):
    with SingleNodeExecutor(max_workers=1, block_allocation=block) as exe:
        future = exe.submit(tf.singleton_segments_then_hang, str(tmp_path))
        segments = job_segments(tmp_path)
        assert future.cancel()
        wait_until(lambda: gone(segments), timeout=T)


def test_a_killed_driver_leaves_no_shared_memory_behind(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import taskfuncs as tf
        from executorkit import SingleNodeExecutor
        exe = SingleNodeExecutor(max_cores=2)
        exe.submit(tf.mpi_segments_then_hang, {str(tmp_path)!r}, resource_dict={{"cores": 2}})
        time.sleep(600)
    """))
    private = tmp_path / "tmp"  # where the driver keeps its MPI workers' directories
    private.mkdir()
    driver = subprocess.Popen([sys.executable, str(script)],
                              env={**os.environ, "TMPDIR": str(private)})
    try:
        segments = job_segments(tmp_path)
        assert list(private.iterdir())
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=T)
    wait_until(lambda: gone(segments), timeout=T)  # the fork server cleans up after it
    wait_until(lambda: not list(private.iterdir()), timeout=T)  # and its directories


def test_threads_reach_every_rank():
    with SingleNodeExecutor(max_cores=4) as exe:
        out = exe.submit(tf.mpi_ranks, 0, resource_dict={"cores": 2, "threads_per_core": 2})
        assert [r[3] for r in out.result(timeout=T)] == ["2", "2"]


def test_cores_one_returns_the_plain_value():
    with SingleNodeExecutor(max_cores=2) as exe:
        rank, size, x, _ = exe.submit(tf.mpi_ranks, 3).result(timeout=T)
        assert (rank, size, x) == (0, 1, 3)


def test_mpiexec_command_is_built_per_flavor():
    cmd = mpiexec_command(4, mpiexec="/x/mpiexec", flavor="openmpi", oversubscribe=True)
    assert cmd[:4] == ("/x/mpiexec", "-n", "4", "--oversubscribe")
    assert cmd[-2:] == ("-m", "executorkit.worker.mpi")
    cmd = mpiexec_command(2, mpiexec="mpiexec", flavor="mpich", oversubscribe=True)
    assert "--oversubscribe" not in cmd


def test_mpich_ranks_of_a_local_call_listen_on_loopback_only():
    with SingleNodeExecutor(max_cores=2) as exe:
        per_rank = exe.submit(tf.mpi_listening_addresses,
                              resource_dict={"cores": 2}).result(timeout=T)
    assert len(per_rank) == 2
    for addresses in per_rank:
        assert all(ip.startswith("127.") or ip == "::1" for ip in addresses), per_rank


def test_mpich_command_keeps_the_transports_on_loopback():
    cmd = mpiexec_command(2, mpiexec="mpiexec", flavor="mpich")
    text = " ".join(cmd)
    assert "-iface lo" in text and "-genv UCX_NET_DEVICES lo" in text
    assert "-genv FI_TCP_IFACE lo" in text
    assert "UCX_NET_DEVICES" not in " ".join(mpiexec_command(2, mpiexec="m", flavor="openmpi"))


def test_the_fork_server_removes_reaped_mpi_workers_directories_when_the_driver_goes(tmp_path):
    # Ranks that see their driver go exit on their own, and their mpiexec may be reaped
    # before the fork server reads the end of its own connection: their directories, and
    # the MPICH files their notes name, must go all the same.
    from executorkit.transport import Spawn
    from executorkit.worker.forkserver import ForkServer

    parent = tmp_path / "executorkit-engine"
    errdir = parent / "worker-3"
    errdir.mkdir(parents=True)
    segment = f"/dev/shm/mpich_shm_executorkit_test_{os.getpid()}"
    with open(segment, "w"):
        pass
    (errdir / "shm-rank-0.txt").write_text(f"{socket.gethostname()}\n{segment}\n")
    gone_pid = 2 ** 22 + 4321  # (no such process: the fake fork below "forked" it)
    server = ForkServer.__new__(ForkServer)  # (no driver to connect to: only the clean-up)
    server.children, server.pids, server.tmp_dirs = {}, {}, set()
    server.path, server.fork = None, lambda: (gone_pid, True)
    try:
        server._spawn(Spawn(3, (), None, None, persistent=False,
                            mpi_command=("mpiexec", "-n", "2"), errdir=str(errdir)))
        server.children.pop(gone_pid)  # reaped: the report is sent
        server._kill_all()
        assert not parent.exists()
        assert not os.path.exists(segment)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(segment)


def test_the_fork_server_cleans_up_when_a_report_to_the_driver_fails(tmp_path):
    # Its driver gone, a report (Exited) fails before the end of the connection is read
    # (a local socket refuses it at once): the fork server must still kill its workers
    # and remove their directories, not leave with the error.
    from executorkit.transport import BlockingChannel, FrameReader
    from executorkit.worker.forkserver import ForkServer

    parent = tmp_path / "executorkit-engine"
    (parent / "worker-5").mkdir(parents=True)
    ours, theirs = socket.socketpair()
    wake_r, wake_w = os.pipe()
    server = ForkServer.__new__(ForkServer)  # (no driver to connect to)
    server.chan, server.reader = BlockingChannel(ours, b"k" * 32), FrameReader(b"k" * 32)
    server.wake_r, server.outbox = wake_r, bytearray()
    server.children, server.tmp_dirs = {}, {str(parent)}

    def report_fails() -> None:
        raise BrokenPipeError("the driver is gone")

    server._reap = report_fails
    os.write(wake_w, b"\0")  # a child ended: its report is what fails
    try:
        server.run()
    finally:
        for fd in (wake_r, wake_w):
            os.close(fd)
        ours.close()
        theirs.close()
    assert not parent.exists()


def test_the_fork_server_keeps_reading_while_its_reports_wait(tmp_path):
    # The engine may be blocked sending to the fork server (Spawns, a large Preload) while
    # the fork server has more reports than the socket holds (a local socket: a few
    # hundred). Were the fork server to wait for its sends, neither would read again.
    import threading

    from executorkit.transport import Exited, FrameReader, Stop, encode
    from executorkit.worker.forkserver import ForkServer

    secret = b"k" * 32
    ours, theirs = socket.socketpair()
    wake_r, wake_w = os.pipe()
    server = ForkServer.__new__(ForkServer)  # (no driver to connect to)
    server.chan = type("Chan", (), {"sock": ours})()
    server.secret, server.reader, server.outbox = secret, FrameReader(secret), bytearray()
    server.wake_r = wake_r
    server.children, server.tmp_dirs = {}, set()
    count = 5000
    try:
        for i in range(count):  # nobody reads yet: none of these may block
            server._report(Exited(i, 0, 0))
        assert server.outbox  # (more than the socket holds)
        loop = threading.Thread(target=server.run, daemon=True)
        loop.start()
        reader, got = FrameReader(secret), []
        theirs.settimeout(T)
        while len(got) < count:  # the loop sends the rest as the driver reads
            got += reader.feed(theirs.recv(1 << 16))
        assert [m.worker_id for m in got] == list(range(count))
        theirs.sendall(b"".join(encode(Stop(), secret)))
        loop.join(timeout=T)
        assert not loop.is_alive()
    finally:
        for fd in (wake_r, wake_w):
            os.close(fd)
        ours.close()
        theirs.close()
