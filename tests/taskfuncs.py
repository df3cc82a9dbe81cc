"""Functions the tests run in worker processes (importable by name, cheap to import)."""

from __future__ import annotations

import os
import signal
import threading
import time


def inc(x):
    return x + 1


def add(*xs):
    return sum(xs)


def identity(x):
    return x


def fail(message):
    raise ValueError(message)


def exit_now(code):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def segfault():
    import ctypes

    ctypes.string_at(0)


def env(*names):
    return {name: os.environ.get(name) for name in names}


def cwd():
    return os.getcwd()


def affinity():
    return sorted(os.sched_getaffinity(0))


def pid():
    return os.getpid()


def death_signal():
    """The signal this process gets when its parent dies (prctl PR_GET_PDEATHSIG)."""
    import ctypes

    value = ctypes.c_int(-1)
    ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(value), 0, 0, 0)
    return value.value


def mark(directory, name, value=None):
    """Record that this call ran (one file per run) and return ``value``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.{os.getpid()}.{time.monotonic_ns()}"), "w"):
        pass
    return value


def runs(directory, name=None):
    if not os.path.isdir(directory):
        return 0
    return sum(1 for f in os.listdir(directory) if name is None or f.startswith(f"{name}."))


def gate(directory, name, value=None, timeout=120.0):
    """Say "started", then wait until the test creates the release file."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.started")
    tmp = f"{path}.{os.getpid()}.tmp"  # (calls may share a gate: each writes its own)
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, path)  # the file appears with its content
    release = os.path.join(directory, f"{name}.release")
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {name} was never released")
        time.sleep(0.005)
    return value


def started(directory, name):
    return os.path.exists(os.path.join(directory, f"{name}.started"))


def release(directory, name):
    with open(os.path.join(directory, f"{name}.release"), "w"):
        pass


def append_line(path, text):
    with open(path, "a") as fh:
        fh.write(text + "\n")
    return text


def sleep_forever():
    while True:
        time.sleep(1)


def return_lock():
    return threading.Lock()


class UnpicklableError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable():
    raise UnpicklableError("carries a lock")


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be rebuilt from ``args`` alone."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_needs_two():
    raise NeedsTwoArgs(1, 2)


def say(text):
    print(text, flush=True)
    return len(text)


def with_state(x, state=None, counter=None):
    return (x, state, counter)


def nested_executor():
    from executorkit import SingleNodeExecutor

    with SingleNodeExecutor() as inner:
        results = [f.result(timeout=60) for f in [inner.submit(inc, i) for i in range(3)]]
        return inner.max_cores, inner.max_gpus, results


def gate_env(directory, name, var):
    """Like gate(), but the started file holds the value of ``var`` this process sees."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.env"), "w") as fh:
        fh.write(os.environ.get(var, ""))
    return gate(directory, name)


def mpi_ranks(x):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), x, os.environ.get("OMP_NUM_THREADS")


def mpi_allreduce(x):
    from mpi4py import MPI

    return MPI.COMM_WORLD.allreduce(x * (MPI.COMM_WORLD.Get_rank() + 1))


def mpi_fail_on(rank_to_fail):
    """The failing rank raises before the barrier the others wait in."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() == rank_to_fail:
        raise ValueError(f"rank {rank_to_fail} failed")
    comm.barrier()
    return comm.Get_rank()


def mpi_exit_on(rank_to_exit):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() == rank_to_exit:
        os._exit(7)
    comm.barrier()
    return comm.Get_rank()


def _note_mpich_segments(directory):
    """Rank 0 writes the MPICH shared-memory files of its job to ``directory/segments``."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        with open("/proc/self/maps") as fh:
            found = {line.split(maxsplit=5)[-1].strip() for line in fh
                     if "/dev/shm/mpich_shm_" in line}
        path = os.path.join(directory, "segments")
        with open(path + ".tmp", "w") as fh:
            fh.write("\n".join(sorted(found)))
        os.replace(path + ".tmp", path)
    MPI.COMM_WORLD.barrier()


def singleton_segments(directory):
    """One process that initialises MPI itself, notes its files and returns."""
    _note_mpich_segments(directory)
    return 1


def singleton_segments_then_hang(directory):
    """One process that initialises MPI itself (no mpiexec), notes its files, hangs."""
    _note_mpich_segments(directory)
    time.sleep(600)


def mpi_segments_then_hang(directory):
    _note_mpich_segments(directory)
    time.sleep(600)


def mpi_segments_then_fail_on(directory, rank_to_fail):
    from mpi4py import MPI

    _note_mpich_segments(directory)
    return mpi_fail_on(rank_to_fail) if MPI.COMM_WORLD.Get_size() > 1 else None


def mpi_unpicklable_on(rank):
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == rank:
        return threading.Lock()
    return 1


def counted(directory, x):
    """x * 10, recording each execution as a file in ``directory``."""
    mark(directory, "counted")
    return x * 10


def counted_fail(directory, x):
    mark(directory, "counted_fail")
    raise RuntimeError(f"failed for {x}")


def uses_state(x, state=None):
    return (x, state)


def read(path):
    with open(path) as fh:
        return fh.read()


def counted_gate(directory, x):
    mark(directory, "cg-run")
    gate(directory, "cg")
    return x * 2


def inner_steps(n):
    """Inside a batch job: run n calls as job steps of that job."""
    from executorkit import SlurmJobExecutor

    with SlurmJobExecutor() as inner:
        futs = [inner.submit(env, "SLURM_STEP_ID", "SLURM_JOB_ID") for _ in range(n)]
        return [f.result(timeout=120) for f in futs], inner.max_cores


def slow_init():
    time.sleep(1.5)
    return {"state": "slow"}


def mpi_raise():
    raise ValueError("plain failure on every rank")


def inner_job_executor(n):
    """Inside a SlurmJobExecutor step: open another one and run n calls."""
    from executorkit import SlurmJobExecutor

    with SlurmJobExecutor() as inner:
        return inner.max_cores, [f.result(timeout=120) for f in
                                 [inner.submit(inc, i) for i in range(n)]]


def flux_instance(tag=None):
    """Inside a Flux batch job: the nested instance this call runs in (``tag`` only makes
    calls with different resources different calls)."""
    import flux

    from executorkit.launchers.flux_batch import pool_of

    handle = flux.Flux()
    pool = pool_of(handle.rpc("sched.resource-status").get()["all"])
    return {"size": int(handle.attr_get("size")), "cores": pool.cores, "nodes": pool.nodes,
            "uri": os.environ.get("FLUX_URI"), "omp": os.environ.get("OMP_NUM_THREADS")}


def inner_flux_jobs(n):
    """Inside a Flux batch job: n calls through FluxJobExecutor over the job's instance."""
    from executorkit import FluxJobExecutor

    with FluxJobExecutor() as inner:
        futs = [inner.submit(inc, i) for i in range(n)]
        return inner.max_cores, [f.result(timeout=120) for f in futs]


def mpi_listening_addresses():
    """This rank's listening TCP addresses, less those its launcher (the parent) holds too
    (hydra's control socket is inherited by every rank)."""
    import psutil
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()  # every rank has set up its transports

    def listening(proc):
        return {c.laddr for c in proc.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN}

    me = psutil.Process()
    own = listening(me) - listening(me.parent())
    MPI.COMM_WORLD.Barrier()
    return sorted(addr.ip for addr in own)


class Thing:
    """An object whose bound method (or itself, as a callable) is submitted."""

    def method(self):
        return "method"

    def __call__(self):
        return "called"


class Dummy:
    """A result that supports weak references."""

    def __init__(self, x):
        self.x = x


def make_dummy(x):
    return Dummy(x)


def size_of(data):
    return len(data)
