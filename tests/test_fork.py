"""How the fork server forks per-task workers (executorkit.worker.forkserver._Forker).

On CPython 3.10/3.11 a single-threaded fork server calls libc's fork() itself and skips only
the at-fork hooks that re-create locks for other threads; every other hook registered with
os.register_at_fork (the stdlib random's reseeding, a preloaded module's own) still runs
where os.fork would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from executorkit import SingleNodeExecutor

T = 60

RAW = sys.implementation.name == "cpython" and (3, 10) <= sys.version_info < (3, 12)


def forked_by() -> str | None:
    """In a worker: how the fork server (the worker's ``__main__``) forked it."""
    return getattr(sys.modules["__main__"], "FORKED_BY", None)


def draw() -> float:
    import random

    return random.random()


def threads() -> int:
    import threading

    return threading.active_count()


@pytest.fixture
def hooked(tmp_path, module_for_workers):
    """A module that registers all three at-fork hooks; the parent's write to a file."""
    log = tmp_path / "parent-hooks.txt"
    module = module_for_workers("hooked", f"""
        import os

        CHILD_HOOK_PID = None


        def _log(what):
            with open({str(log)!r}, "a") as fh:
                fh.write(f"{{what}} {{os.getpid()}}\\n")


        def _child():
            global CHILD_HOOK_PID
            CHILD_HOOK_PID = os.getpid()


        os.register_at_fork(before=lambda: _log("before"),
                            after_in_parent=lambda: _log("parent"), after_in_child=_child)


        def report():
            return os.getpid(), CHILD_HOOK_PID
    """)
    return module, log


@pytest.mark.skipif(not RAW, reason="libc's fork is used on CPython 3.10 and 3.11 only")
def test_workers_are_forked_by_libc_in_a_single_threaded_fork_server():
    with SingleNodeExecutor(max_workers=2) as exe:
        assert {exe.submit(forked_by).result(timeout=T) for _ in range(3)} == {"libc"}


def test_plain_fork_when_asked(monkeypatch):
    monkeypatch.setenv("EXECUTORKIT_PLAIN_FORK", "1")
    with SingleNodeExecutor(max_workers=1) as exe:
        assert exe.submit(forked_by).result(timeout=T) == "os"


@pytest.mark.parametrize("plain", [False, True], ids=["libc", "os"])
def test_registered_hooks_run_as_os_fork_runs_them(hooked, monkeypatch, plain):
    module, log = hooked
    if plain:
        monkeypatch.setenv("EXECUTORKIT_PLAIN_FORK", "1")
    with SingleNodeExecutor(max_workers=2, preload=[module.__name__]) as exe:
        reports = [exe.submit(module.report).result(timeout=T) for _ in range(3)]
        server = exe._engine.launcher.process.pid
    for pid, hook_pid in reports:
        assert hook_pid == pid  # the child's hook ran in the worker itself
    lines = log.read_text().split()
    pairs = list(zip(lines[::2], map(int, lines[1::2]), strict=True))
    # before and after_in_parent ran in the fork server, once per fork
    assert {pid for _, pid in pairs} == {server}
    befores = sum(1 for what, _ in pairs if what == "before")
    assert befores >= len(reports)
    assert befores == sum(1 for what, _ in pairs if what == "parent")


def test_stdlib_random_is_reseeded_in_every_worker():
    # random registers its reseeding with os.register_at_fork; preloaded, its state is the
    # fork server's, and only that hook gives each worker numbers of its own.
    with SingleNodeExecutor(max_workers=2, preload=["random"]) as exe:
        draws = [exe.submit(draw).result(timeout=T) for _ in range(4)]
    assert len(set(draws)) == 4


def test_a_fork_server_with_a_second_thread_forks_with_os_fork(module_for_workers):
    # Another Python thread may hold a lock at fork time: then CPython's own after-fork
    # work is needed, and the worker sees one thread only.
    name = module_for_workers("threaded", """
        import threading

        _stop = threading.Event()
        threading.Thread(target=_stop.wait, daemon=True).start()
    """, imported=False)
    with SingleNodeExecutor(max_workers=1, preload=[name]) as exe:
        assert exe.submit(forked_by).result(timeout=T) == "os"
        assert exe.submit(threads).result(timeout=T) == 1


def test_fork_server_loads_neither_openssl_nor_tempfile():
    # Every library the fork server maps is copied by each fork and torn down by each
    # worker's exit: what only the driver needs stays out (importlib.abc, for one, pulls in
    # tempfile, shutil and three compression libraries).
    code = ("import sys, executorkit.worker.forkserver as f; f._warm_up(); "
            "print(' '.join(sorted(sys.modules)))")
    import executorkit

    home = os.path.dirname(os.path.dirname(executorkit.__file__))  # (this checkout's)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=T, check=True, cwd=home,
                         env={**os.environ, "PYTHONPATH": home}).stdout.split()
    assert not {"hashlib", "_hashlib", "hmac", "ssl", "tempfile", "shutil"} & set(out)


HUGE_SCRIPT = """
import ctypes, mmap, sys
from executorkit.worker import forkserver

def region(size, touch_every):
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, size, touch_every):
        m[offset] = 1
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))

def huge_kib(address):
    inside = False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields[0]) > 8:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            inside = low <= address < high
        elif inside and fields[0] == "AnonHugePages:":
            return int(fields[1])

def resident_pages(address, size):
    vec = ctypes.create_string_buffer(size // 4096)
    libc = ctypes.CDLL(None)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(address, size, vec) == 0
    return sum(vec.raw)

full, full_at = region(16 << 20, 4096)          # every page resident
sparse, sparse_at = region(16 << 20, 2 << 20)   # one page in each 2 MiB
forkserver._huge_heap()
# (the two may share one mapping: the sparse one is judged by its resident pages)
print(huge_kib(full_at), resident_pages(sparse_at, 16 << 20))
"""


def _huge_pages_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return "[never]" not in fh.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _huge_pages_available(),
                    reason="transparent huge pages are off on this machine")
def test_fork_server_memory_is_collapsed_into_huge_pages_where_resident():
    # What each fork copies and each worker's exit tears down shrinks when the fork server's
    # resident memory sits in 2 MiB folios; a window mostly not resident is left alone, so
    # memory never grows by more than it holds.
    import executorkit

    home = os.path.dirname(os.path.dirname(executorkit.__file__))
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    if release < (6, 1):
        pytest.skip(f"MADV_COLLAPSE needs Linux 6.1, this is {os.uname().release}")
    out = subprocess.run([sys.executable, "-c", HUGE_SCRIPT], capture_output=True, text=True,
                         timeout=T, check=True, cwd=home,
                         env={**os.environ, "PYTHONPATH": home}).stdout.split()
    huge_kib, sparse_pages = map(int, out)
    assert huge_kib >= 12 << 10  # at least 6 of its (at least 7) aligned 2 MiB windows
    assert sparse_pages == 8  # the pages it touched: not filled up to huge pages


def slot_view() -> tuple[int, list[int]]:
    return int(os.environ["EXECUTORKIT_WORKER_ID"]), sorted(os.sched_getaffinity(0))


def _pool() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    return cpus[:2]


def test_spares_wait_pinned_to_the_slot_they_are_kept_for():
    # A call that starts on a slot takes the spare kept there: already on its CPU, with its
    # worker id, so nothing moves it (a migration cost a third of a millisecond).
    import time

    pool = _pool()
    with SingleNodeExecutor(max_workers=2) as exe:
        assert exe.submit(abs, -1).result(timeout=T) == 1
        engine = exe._engine
        deadline = time.monotonic() + T
        while True:  # (the spares connect on their own time: wait for both)
            spares = [w for w in list(engine._spares) if w.pid]
            if len(spares) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        pinned = {tuple(sorted(os.sched_getaffinity(w.pid))) for w in spares}
    assert pinned == {(pool[0],), (pool[1],)}


def test_per_task_calls_see_their_own_slot_whichever_spare_takes_them():
    pool = _pool()
    with SingleNodeExecutor(max_workers=2) as exe:
        views = [f.result(timeout=T) for f in [exe.submit(slot_view) for _ in range(30)]]
    for worker_id, cpus in views:
        assert cpus == [pool[worker_id]]
    assert {worker_id for worker_id, _ in views} == {0, 1}


def _one_call(sock, secret, linger):
    """A per-task worker's serve loop on ``sock``, in a thread; its return code lands in a
    list."""
    import threading

    from executorkit.worker.loop import _Server

    codes: list[int] = []
    server = _Server(sock, secret, False, None, None, linger)
    thread = threading.Thread(target=lambda: codes.append(server.serve()), daemon=True)
    thread.start()
    return thread, codes


def test_a_lingering_worker_exits_only_once_the_engine_shuts_its_connection(monkeypatch):
    # Replied, a forked one-call worker sleeps until the engine shuts the connection: the
    # engine thread, woken on the worker's CPU, then never waits behind its exit.
    import pickle
    import socket

    import cloudpickle

    from executorkit.transport import FrameReader, RunTask, TaskDone, encode
    from executorkit.worker import loop

    monkeypatch.setattr(loop, "LINGER_LIMIT", 10 * T)  # (only the shutdown may end it)
    secret = b"s" * 32
    engine, worker = socket.socketpair()
    with engine, worker:
        thread, codes = _one_call(worker, secret, linger=True)
        call = RunTask(7, cloudpickle.dumps(abs), pickle.dumps(((-3,), {})), None, None)
        engine.sendall(b"".join(encode(call, secret)))
        reader, replies = FrameReader(secret), []
        while not replies:
            replies = reader.feed(engine.recv(1 << 16))
        assert isinstance(replies[0], TaskDone) and replies[0].task_id == 7
        assert pickle.loads(replies[0].payload) == 3
        thread.join(0.2)
        assert thread.is_alive()  # replied, and waiting
        engine.shutdown(socket.SHUT_WR)
        thread.join(T)
        assert not thread.is_alive() and codes == [0]


def test_a_one_call_worker_ends_where_it_stands_once_shut(monkeypatch):
    # Returning up the stack would free the messages, the server and the channel and unwind
    # the frames (pages a forked worker shares with the fork server): the fork server's
    # workers exit from inside the loop.
    import pickle
    import socket
    import threading

    import cloudpickle

    from executorkit.transport import FrameReader, RunTask, encode
    from executorkit.worker import loop

    class Ended(Exception):
        pass

    codes: list[int] = []

    def exit_now(code):
        codes.append(code)
        raise Ended

    secret = b"s" * 32
    engine, worker = socket.socketpair()
    with engine, worker:
        server = loop._Server(worker, secret, False, None, None, True, exit_now)
        outcome: list[object] = []

        def run():
            try:
                outcome.append(server.serve())
            except Ended:
                outcome.append("ended")

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        call = RunTask(3, cloudpickle.dumps(abs), pickle.dumps(((-5,), {})), None, None)
        engine.sendall(b"".join(encode(call, secret)))
        reader, replies = FrameReader(secret), []
        while not replies:
            replies = reader.feed(engine.recv(1 << 16))
        assert pickle.loads(replies[0].payload) == 5
        engine.shutdown(socket.SHUT_WR)
        thread.join(T)
    assert outcome == ["ended"] and codes == [0]


def test_the_engine_shuts_a_lingering_workers_connection_after_its_reply(monkeypatch):
    import socket

    shut: list[int] = []
    original = socket.socket.shutdown

    def shutdown(self, how):
        shut.append(how)
        return original(self, how)

    monkeypatch.setattr(socket.socket, "shutdown", shutdown)
    with SingleNodeExecutor(max_workers=1) as exe:
        assert exe.submit(abs, -2).result(timeout=T) == 2
        assert exe.submit(abs, -3).result(timeout=T) == 3
    assert shut.count(socket.SHUT_WR) >= 2


def test_a_lingering_worker_is_shut_only_after_its_future_completed(monkeypatch):
    # The woken worker's exit (a millisecond of unmapping) often runs on the engine's CPU
    # before the engine goes on: the shutdown comes last in the engine's turn, so the
    # caller's future never waits behind it.
    import socket
    from concurrent.futures import Future

    events: list[str] = []
    original = socket.socket.shutdown

    def shutdown(self, how):
        if how == socket.SHUT_WR:
            events.append("shut")
        return original(self, how)

    monkeypatch.setattr(socket.socket, "shutdown", shutdown)
    with SingleNodeExecutor(max_workers=1) as exe:
        gate: Future = Future()
        fut = exe.submit(abs, gate)  # (its callback is in place before it can finish)
        fut.add_done_callback(lambda _: events.append("done"))
        gate.set_result(-2)
        assert fut.result(timeout=T) == 2
    assert events[:2] == ["done", "shut"]


@pytest.fixture
def sent_by_value(tmp_path, module_for_workers):
    """A function sent by value whose unpickling appends the unpickler's pid to a file."""
    import cloudpickle

    import executorkit

    marker = tmp_path / "unpickled.txt"
    module = module_for_workers("byvalue", f"""
        import os


        def _rebuilt():
            with open({str(marker)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")
            return Witness()


        class Witness:
            def __reduce__(self):
                return _rebuilt, ()


        WITNESS = Witness()


        def work(x):
            return os.getpid(), type(WITNESS).__name__, x + 1
    """)
    executorkit.pickle_by_value(module)
    yield module, marker
    cloudpickle.unregister_pickle_by_value(module)


def test_a_function_sent_by_value_is_unpickled_once_in_the_fork_server(sent_by_value):
    # Workers forked after its first call find the function in their cache: no per-call
    # rebuilding of it (nor of what it holds) on the hand-over.
    module, marker = sent_by_value
    with SingleNodeExecutor(max_workers=2, preload=[]) as exe:
        results = [exe.submit(module.work, i).result(timeout=T) for i in range(12)]
        server = exe._engine.launcher.process.pid
    assert [r[1:] for r in results] == [("Witness", i + 1) for i in range(12)]
    unpicklers = [int(p) for p in marker.read_text().split() if int(p) != os.getpid()]
    assert server in unpicklers
    workers = {pid for pid, _, _ in results}
    # Only workers forked before the fork server had it rebuilt it themselves: the first
    # call's (forked with the fork server itself) and the two spares started with it.
    assert len(set(unpicklers) & workers) <= 3 < len(workers) - 3


def test_unpickling_a_function_imports_nothing_in_the_fork_server():
    # A function whose unpickling would import a module the fork server does not have
    # (one kept out on purpose, say) is left to the workers to rebuild.
    import cloudpickle

    import executorkit

    namespace = {"__name__": "__main__"}  # (a script's function: sent by value)
    exec("import wave\n\ndef f():\n    return wave.Error\n", namespace)
    blob = cloudpickle.dumps(namespace["f"])
    home = os.path.dirname(os.path.dirname(executorkit.__file__))
    script = (
        "import sys\n"
        "from executorkit.worker import forkserver, _call\n"
        "assert 'wave' not in sys.modules\n"
        f"forkserver._unpickle_function({blob!r})\n"
        "print('wave' in sys.modules, len(_call.FUNCTIONS._items))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=T, check=True, cwd=home,
                         env={**os.environ, "PYTHONPATH": home}).stdout.split()
    assert out == ["False", "0"]


def test_spares_skip_the_probe_call_only_while_tiny_calls_wait():
    # A spare runs one probe call while it waits, so its own call finds its pages faulted
    # in; with tiny calls waiting, its call comes at once and the probe would only take CPU
    # from them. Spares started with nothing waiting keep probing.
    with SingleNodeExecutor(max_workers=2) as exe:
        engine = exe._engine
        spares: list[tuple[bool, int]] = []
        spawn = engine._spawn

        def record(msg, w):
            if msg.spare:
                spares.append((msg.probe, engine.sched.waiting))
            return spawn(msg, w)

        engine._spawn = record
        for i in range(5):  # one at a time: nothing waits when a spare is started
            assert exe.submit(abs, -i).result(timeout=T) == i
        idle = list(spares)
        futures = [exe.submit(abs, -i) for i in range(300)]
        assert [f.result(timeout=T) for f in futures] == list(range(300))
        busy = spares[len(idle):]
    assert idle and all(probe for probe, _ in idle)
    assert any(not probe for probe, _ in busy)
    assert all(waiting for probe, waiting in busy if not probe)
