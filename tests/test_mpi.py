"""MPI-parallel calls (cores > 1) with a real mpiexec."""

from __future__ import annotations

import capabilities
import pytest
import taskfuncs as tf
from conftest import new_executor

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
