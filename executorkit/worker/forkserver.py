"""The fork server: a warm interpreter that forks worker processes on request.

Started once per executor as ``python -m executorkit.worker.forkserver``; reads its bootstrap
(the driver's address and secret) from standard input, connects back like a worker, and
then serves :class:`Spawn` and :class:`Kill` requests. Forking this small, single-threaded,
pre-imported process costs about a millisecond, where a fresh interpreter costs tens.

It is also the parent of every worker, so it is the one that learns how each ended: it reaps
children on SIGCHLD and reports an :class:`Exited` with the status. When the driver goes
away (EOF), it kills every worker's process group and exits, so nothing is left behind.
A Command's program (:class:`RunProgram`) it starts itself, with no worker in between (see
executorkit.worker.program).

Data flow::

    driver --Spawn/Kill/Stop--> fork server --fork()--> worker --Hello/TaskDone--> driver
    driver <-------------------- Exited(status) ------- fork server (waitpid)
    driver --RunProgram-------> fork server --vfork+exec--> program
    driver <-------- Exited(status, ProgramEnd) ------- fork server (waitpid)
"""

from __future__ import annotations

import _signal
import contextlib
import ctypes
import functools
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, MutableMapping
from typing import Any, NoReturn

# Pre-import what every worker needs, so a forked child starts warm.
import cloudpickle

# Programs (Command) run through subprocess: importing it (and json, shlex,
# concurrent.futures) in every child cost ~50 ms per call on a busy machine.
import executorkit.command  # noqa: F401
from executorkit import _syspath
from executorkit._pickling import FORK_UNSAFE
from executorkit.transport import (
    Address,
    Exited,
    FrameReader,
    Hello,
    Kill,
    Preload,
    ProgramEnd,
    RunProgram,
    Spawn,
    SpawnFailed,
    Stop,
    connect,
    encode,
)
from executorkit.worker import _call, loop, program
from executorkit.worker._shm import (
    discard_worker_dir,
    mapped_segments,
    release_own,
    unlink_segments,
)

_PR_SET_PDEATHSIG = 1

FORKED_BY = ""  # in a worker: how the fork server forked it ("libc" or "os"; see _Forker)


def _find_prctl() -> Any:
    """libc's ``prctl``, looked up once here: in every forked child the lookup would cost a
    third of a millisecond (ctypes touching its pages)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()


class _Forker:
    """``fork()`` without CPython's own after-fork work, where that work has nothing to do.

    ``os.fork()`` re-creates, in the child, every lock another thread might have held: the
    interpreter's, the import lock, and, through the hooks that ``threading``, ``logging``
    and ``concurrent.futures`` register with ``os.register_at_fork``, theirs. In this
    single-threaded process no other thread holds any, and doing it anyway wrote some 130
    pages in every worker before its first line (252 copied pages against 120, counted with
    getrusage), each a page fault of a few microseconds here: a per-task call cost a fifth
    more. So the fork server calls libc's ``fork()`` itself, through ``PyDLL``, so that the
    child resumes holding the GIL as its only thread, and runs every other registered hook
    as ``os.fork`` would: ``before`` hooks in reverse order, then ``after_in_parent`` or
    ``after_in_child`` (the stdlib ``random``'s reseeding, and whatever a preloaded module
    registered, whenever it did: the interpreter's own hook lists are read). libc's fork
    runs the C libraries' ``pthread_atfork`` handlers either way.

    Signals: a SIGCHLD that arrived just before the fork may still be pending in the child
    (``os.fork`` would clear it); the child runs the fork server's handler for it, a no-op,
    at its first Python call, before ``_child`` restores the default.

    It falls back to ``os.fork()`` when another Python thread exists (a preloaded module may
    start one), off CPython 3.10/3.11 (whose ``PyOS_AfterFork_Child`` this was checked
    against), when the hook lists cannot be found, and when the environment variable
    ``EXECUTORKIT_PLAIN_FORK`` is set. Made before the heap is frozen (see :func:`main`):
    the hook lists are found through the garbage collector, which does not look at frozen
    objects.
    """

    def __init__(self) -> None:
        self.fork: Any = None
        self.lists: tuple[list[Any], list[Any], list[Any]] | None = None
        self.runs: dict[int, tuple[int, tuple[Any, ...]]] = {}  # id(list) -> (len, to run)
        if (sys.implementation.name != "cpython" or not (3, 10) <= sys.version_info < (3, 12)
                or os.environ.get("EXECUTORKIT_PLAIN_FORK")):
            return
        with contextlib.suppress(OSError, AttributeError):
            self.fork = ctypes.PyDLL(None, use_errno=True).fork
            self.fork.restype = ctypes.c_int
            self.fork.argtypes = []
        self.lists = _hook_lists()

    def __call__(self) -> tuple[int, bool]:
        """(pid, whether libc's fork was used); in the child, its hooks have run."""
        if self.fork is None or self.lists is None or len(sys._current_frames()) != 1:
            return os.fork(), False
        before, parent, child = (self._to_run(hooks) for hooks in self.lists)
        sys.audit("os.fork")
        for hook in reversed(before):
            _call_hook(hook)
        pid = self.fork()
        if pid == 0:
            # (try, not contextlib.suppress, on the paths of every fork: a suppress object
            # and three Python calls each, pages a forked child or the fork server write)
            try:
                threading = sys.modules["threading"]
                threading.main_thread()._native_id = threading.get_native_id()
            except Exception:
                pass
            for hook in child:
                _call_hook(hook)
            return 0, True
        errno = ctypes.get_errno()
        for hook in parent:
            _call_hook(hook)
        if pid < 0:
            raise OSError(errno, os.strerror(errno))
        return pid, True

    def _to_run(self, hooks: list[Any]) -> tuple[Any, ...]:
        """The hooks of ``hooks`` that are not lock upkeep (the list only ever grows)."""
        known = self.runs.get(id(hooks))
        if known is not None and known[0] == len(hooks):
            return known[1]
        run = tuple(hook for hook in hooks if not _lock_upkeep(hook))
        self.runs[id(hooks)] = (len(hooks), run)
        return run


def _marker_before() -> None:
    """Registered (with the two below) so that the interpreter's hook lists can be found."""


def _marker_parent() -> None:
    pass


def _marker_child() -> None:
    pass


def _hook_lists() -> tuple[list[Any], list[Any], list[Any]] | None:
    """The interpreter's own lists of ``os.register_at_fork`` hooks (before, after in the
    parent, after in the child), found as the lists that hold this module's markers: every
    hook is in them, whoever registered it and when."""
    os.register_at_fork(before=_marker_before, after_in_parent=_marker_parent,
                        after_in_child=_marker_child)
    found = []
    for marker in (_marker_before, _marker_parent, _marker_child):
        lists = [r for r in gc.get_referrers(marker)
                 if type(r) is list and any(h is marker for h in r)]
        if len(lists) != 1:
            return None
        found.append(lists[0])
    return found[0], found[1], found[2]


def _lock_upkeep(hook: Any) -> bool:
    """Whether ``hook`` only takes, releases or re-creates locks for the sake of other threads
    (or is one of our markers): nothing to do where only one thread exists."""
    if hook in (_marker_before, _marker_parent, _marker_child):
        return True
    owner = getattr(hook, "__self__", None)
    if owner is not None and type(owner).__module__ == "_thread" \
            and type(owner).__name__ in ("lock", "RLock"):
        return True  # concurrent.futures.thread's shutdown lock, for one
    for module, names in _LOCK_HOOKS:
        mod = sys.modules.get(module)
        if mod is not None and any(hook is getattr(mod, name, None) for name in names):
            return True
    return False


_LOCK_HOOKS = (
    ("threading", ("_after_fork",)),
    ("logging", ("_acquireLock", "_releaseLock", "_after_at_fork_child_reinit_locks")),
)


def _call_hook(hook: Any) -> None:
    """As CPython calls an at-fork hook: an exception is reported and ignored."""
    try:
        hook()
    except BaseException:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"Exception ignored in: {hook!r}\n")
            traceback.print_exc()


def _sized_for(thread_env: dict[str, str]) -> bool:
    """Whether this process's thread variables are those the preloaded libraries saw."""
    return all(os.environ.get(k) == v for k, v in thread_env.items())


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the fork server dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class ForkServer:
    def __init__(self, address: Address, secret: bytes,
                 forker: _Forker | None = None) -> None:
        self.address = address
        self.secret = secret
        self.chan = connect(address, secret)
        self.chan.send(Hello(0, os.getpid(), socket.gethostname()))
        self.outbox = bytearray()  # reports not yet taken by the socket (see _report)
        self.reader = FrameReader(secret)
        self.children: dict[int, int] = {}  # pid -> worker_id
        # the engine's directories where MPI workers get their private ones (see _kill_all)
        self.tmp_dirs: set[str] = set()
        # thread variables set when modules were preloaded (their pools are sized so)
        self.thread_env: dict[str, str] = {}
        self.pids: dict[int, int] = {}  # worker_id -> pid
        # variables set here for the spares (all alike): their values before (None: unset)
        self.base_env: dict[str, str | None] = {}
        self.adopted: tuple[tuple[str, str], ...] | None = None  # the spares' env, as set
        self.spares_sized = True  # a spare's thread variables are those of the preload
        self.path: tuple[str, ...] | None = None  # the driver's sys.path, as last sent
        self.programs: dict[int, program.Running] = {}  # pid -> a program started here
        self.cpus = tuple(os.sched_getaffinity(0))
        self.fork = forker or _Forker()
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_w = wake_w
        # A Python-level handler is needed so SIGCHLD is delivered; the wakeup fd makes
        # select() return when it arrives.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w)

    def run(self) -> None:
        """Serve until the driver says stop or goes away (its end of the connection closes,
        or a report to it fails: a local socket says so at once); then kill every worker
        and clean up after them, however the loop ended."""
        try:
            self._serve()
        except ConnectionError:
            pass  # the driver is gone
        finally:
            self._kill_all()

    def _serve(self) -> None:
        sock = self.chan.sock
        while True:
            watched: list[Any] = [sock, self.wake_r]
            ready, writable, _ = select.select(watched, [sock] if self.outbox else [], [])
            if writable:
                self._flush_reports()
            if self.wake_r in ready:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                self._reap()
            if sock in ready:
                data = sock.recv(1 << 16)
                if not data:
                    break
                if not self._handle(self.reader.feed(data)):
                    break

    def _report(self, msg: object) -> None:
        """Send ``msg`` to the driver as far as the socket takes it now, never waiting; the
        loop sends the rest. The driver's engine may itself be blocked sending to this
        process (Spawns, a large Preload, a program's input): were this process to wait
        too, neither would read again (a local socket holds some 250 KB, a few hundred
        reports)."""
        self.outbox += b"".join(encode(msg, self.secret))
        self._flush_reports()

    def _flush_reports(self) -> None:
        while self.outbox:
            try:
                sent = self.chan.sock.send(self.outbox, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            del self.outbox[:sent]

    def _handle(self, messages: list[object]) -> bool:
        for msg in messages:
            if isinstance(msg, Spawn):
                self._spawn(msg)
            elif isinstance(msg, RunProgram):
                self._run_program(msg)
            elif isinstance(msg, Kill):
                self._kill(msg.worker_id, msg.signum)
            elif isinstance(msg, Preload):
                self._preload(msg)
            elif isinstance(msg, Stop):
                return False
        return True

    def _preload(self, msg: Preload) -> None:
        """Import what the calls need, once here instead of once per forked worker; unpickle
        the functions sent by value likewise, into the workers' function cache (each worker
        forked after finds its function there: a hand-over without unpickling it)."""
        for blob in msg.functions:
            _unpickle_function(blob)
        _NUMPY_ENTROPY.reset()  # (user code ran: it may have drawn from numpy's state)
        self.adopted = None  # (and it may have set variables: the spares' are looked at again)
        if not (msg.modules or msg.env):
            gc.freeze()  # (the function and what it holds: never scanned by a child)
            return
        for key, value in msg.env:
            os.environ[key] = value
        self.thread_env.update(msg.env)
        for module in msg.modules:
            _import(module)
        gc.collect()
        gc.freeze()  # the new objects too: children's collections must not copy their pages
        _huge_heap()

    def _spawn(self, msg: Spawn) -> None:
        if msg.path:
            self.path = msg.path  # (sent only when it changed)
            _syspath.merge(msg.path)  # here, so later spares inherit it too
        if msg.spare:
            self._adopt(msg.env)
        _NUMPY_ENTROPY.refill()  # (here, for the child: reseeding costs a child 100 faults)
        try:
            pid, raw = self.fork()
        except OSError as exc:
            self._report(SpawnFailed(msg.worker_id, f"fork() failed: {exc}"))
            return
        if pid == 0:  # child
            global FORKED_BY
            FORKED_BY = "libc" if raw else "os"
            code = 70
            try:
                code = self._child(msg)
            except BaseException:
                traceback.print_exc()  # the driver then reports exit code 70 for it
                sys.stderr.flush()
            finally:
                _exit_worker(code)
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first wins the race
        except OSError:
            pass
        self.children[pid] = msg.worker_id
        self.pids[msg.worker_id] = pid
        if msg.mpi_command and msg.errdir:
            self.tmp_dirs.add(os.path.dirname(msg.errdir))

    def _adopt(self, env: tuple[tuple[str, str], ...]) -> None:
        """Set a spare's variables here (once: they are the same for every spare), so the
        spares inherit them instead of each setting them (some 50 page faults a worker)."""
        if env == self.adopted:
            return  # (the same tuple every time: no look at the environment)
        for key, value in env:
            if os.environ.get(key) != value:
                self.base_env.setdefault(key, os.environ.get(key))
                os.environ[key] = value
        self.adopted = env
        self.spares_sized = _sized_for(self.thread_env)

    def _run_program(self, msg: RunProgram) -> None:
        env = dict(os.environ)
        apply_env(env, msg.env, self.base_env)
        try:
            running = program.start(msg, self.cpus, env)
        except Exception as exc:  # it never started: the call fails with this error
            end = program.failed(msg, _call.error_info(exc))
            self._report(Exited(msg.worker_id, 0, 0, program=end))
            return
        pid = running.proc.pid
        self.children[pid] = msg.worker_id
        self.pids[msg.worker_id] = pid
        self.programs[pid] = running

    def _child(self, msg: Spawn) -> int:
        # Every object touched here costs a forked worker a copied page: the plain C calls.
        signal.set_wakeup_fd(-1)
        # (signal.signal would turn the old handler, a lambda, into an enum: a ValueError
        # raised and formatted inside, 0.3 ms and some 50 page faults)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.close(self.chan.sock.detach())
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        _die_with_parent()
        if not msg.spare:  # (a spare's variables are this process's already: see _adopt)
            apply_env(os.environ, msg.env, self.base_env)
        if msg.cpus:
            try:
                os.sched_setaffinity(0, msg.cpus)
            except OSError:
                pass
        setup = _call.TaskSetup(cwd=msg.cwd) if msg.cwd else None
        if msg.mpi_command:
            self._exec_mpi(msg, setup)
        # (a spare's environment is this process's: known here, with no look at it)
        if not (self.spares_sized if msg.spare else _sized_for(self.thread_env)):
            # Preloaded libraries sized their thread pools for other thread variables
            # (threads_per_core): only a fresh interpreter honours this worker's.
            self._exec_fresh(msg, setup)
        if msg.spare and msg.probe:
            # A spare (no call yet): fault in the pages a call touches now, while it is
            # idle, instead of on the critical path of its call.
            _probe_call()
        # No driver watch thread here: this fork server kills every worker's process group
        # when the driver goes away, and PDEATHSIG covers the fork server's own death.
        return loop.serve(self.address, self.secret, msg.worker_id, persistent=msg.persistent,
                          init_payload=msg.init_payload, setup=setup, watch_driver=False,
                          linger=True, exit_now=_exit_worker)

    def _exec_mpi(self, msg: Spawn, setup: _call.TaskSetup | None) -> None:
        """Become ``mpiexec``; its ranks find the driver through a private boot file."""
        assert msg.errdir is not None
        boot = {"address": self.address, "secret": self.secret, "worker_id": msg.worker_id,
                "persistent": msg.persistent, "init_payload": msg.init_payload,
                "errdir": msg.errdir, "setup": setup, "path": self.path}
        path = os.path.join(msg.errdir, "boot.pkl")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(boot, fh)
        os.execv(msg.mpi_command[0], [*msg.mpi_command, path])

    def _exec_fresh(self, msg: Spawn, setup: _call.TaskSetup | None) -> None:
        """Become a fresh worker interpreter; it reads (and removes) a private boot file."""
        # (imported here: tempfile imports random, whose at-fork hook would reseed it in
        # every forked worker, at some 40 page faults each)
        import tempfile

        directory = tempfile.mkdtemp(prefix="executorkit-worker-")  # mode 0o700
        path = os.path.join(directory, "boot.pkl")
        boot = {"address": self.address, "secret": self.secret, "worker_id": msg.worker_id,
                "persistent": msg.persistent, "init_payload": msg.init_payload,
                "setup": setup, "path": self.path, "remove": True}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(boot, fh)
        os.execv(sys.executable, [sys.executable, "-m", "executorkit.worker.loop", path])

    def _kill(self, worker_id: int, signum: int) -> None:
        pid = self.pids.get(worker_id)
        if pid is None:
            return  # already reaped: never signal a pid that may have been reused
        if pid in self.programs:
            self.programs[pid].killed = True
        _kill_group(pid, signum)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_id = self.children.pop(pid, None)
            if worker_id is None:
                continue
            self.pids.pop(worker_id, None)
            code = os.waitstatus_to_exitcode(status)
            # The worker's own children (e.g. mpiexec ranks) die with its group. (The engine
            # discards an MPI worker's directory once it has read its errors.)
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            self._report(Exited(worker_id, pid, code, program=self._program_end(pid, code)))

    def _program_end(self, pid: int, code: int) -> ProgramEnd | None:
        """A program's report, unless it was not one or it was stopped on request."""
        running = self.programs.pop(pid, None)
        if running is None:
            return None
        running.proc.returncode = code  # reaped: subprocess must never wait for it itself
        if running.killed:
            return None  # the driver fails the call as cancelled or timed out
        running.end.finished = time.time()
        return running.end

    def _kill_all(self) -> None:
        for pid in list(self.children):
            _kill_group(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        # The driver may be gone: nobody else will remove its MPI workers' directories, those
        # of workers reaped already included (ranks that saw the driver go exit on their
        # own, before this process reads the end of its connection).
        for parent in self.tmp_dirs:
            with contextlib.suppress(OSError):
                for name in os.listdir(parent):
                    if name.startswith("worker-"):
                        discard_worker_dir(os.path.join(parent, name))
            with contextlib.suppress(OSError):
                os.rmdir(parent)  # the engine's, once it is empty


def _kill_group(pid: int, signum: int) -> None:
    """Signal worker ``pid`` and its process group (the leader alone if the group is gone).
    A SIGKILL also takes the MPICH files in /dev/shm that the worker has mapped: one that
    initialised MPI itself never reaches the MPI_Finalize that would remove them."""
    segments = mapped_segments(pid) if signum == signal.SIGKILL else ()
    try:
        os.killpg(pid, signum)
    except OSError:  # (no group yet: the child sets it up itself, see _spawn)
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
    unlink_segments(segments)


def apply_env(environ: MutableMapping[str, str], env: tuple[tuple[str, str], ...],
              base: dict[str, str | None]) -> None:
    """``env`` over ``environ``; the spares' variables (``base``) that ``env`` does not name
    go back to what they were."""
    for key, value in env:
        if environ.get(key) != value:
            environ[key] = value
    if base:
        named = {key for key, _ in env}
        for key, before in base.items():
            if key in named:
                continue
            if before is None:
                environ.pop(key, None)
            else:
                environ[key] = before


EXIT_NICENESS = 10


def _exit_worker(code: int) -> NoReturn:
    """End a forked worker now, however deep in its stack: no frame is unwound and no
    object freed (each a write to a page it shares with this process)."""
    try:
        release_own()  # (a call that initialised MPI here: no MPI_Finalize follows)
        _step_aside()
    finally:
        os._exit(code)


def _step_aside() -> None:
    """Lower this worker's priority for its exit: its reply is sent, and tearing down its
    address space (a millisecond or two) must not hold up the call that takes its CPU
    next, which, pinned to that CPU, would otherwise wait for it (measured: the hand-over
    to the next call took 2 ms instead of 5 on a busy machine)."""
    try:
        os.nice(EXIT_NICENESS)
    except OSError:
        pass


class _NumpyEntropy:
    """New entropy for numpy's global random state before each fork, as the stdlib's
    ``random`` gets after one: numpy was imported here once for every worker, and a
    per-task call must draw its own numbers, as in a new process, not those every other
    call draws (a call that seeds it itself is unaffected).

    The global generator is the legacy MT19937, whose whole state is 624 words and a
    position: the kernel's ``getrandom`` fills the words in place and the position is set
    to regenerate from them at the first draw, a uniformly random state. That writes the
    state's page and a few small objects. ``numpy.random.seed(array)``, the documented way, ran
    numpy's array machinery in this process after every fork: some 80 pages written, each
    a copied page here while workers share it (with numpy and scipy preloaded, 0.55 ms of
    this process's 3 ms per call, and this process forks every call in turn).

    The documented way is still taken once per generator and after every Preload here (it
    also drops a normal deviate an import may have drawn and cached, which every worker
    would otherwise return first), and at every fork where the generator is not the
    MT19937 this was checked against, numpy has no ``get_bit_generator`` (before 1.25) or
    libc no ``getrandom``.
    """

    _WORDS = 624  # MT19937's state: uint32 key[624], then int pos

    def __init__(self) -> None:
        self.generator: Any = None  # the global bit generator the fast way was set up for
        self.key = 0  # its key's address (0: seed the documented way)
        self.pos: Any = None  # its position, as a ctypes int
        self.getrandom: Any = None

    def reset(self) -> None:
        """Imports ran here: look at the generator again (and seed it the documented way)."""
        self.generator = None

    def refill(self) -> None:
        """New state for the global generator, if this process has imported numpy.random
        (else a worker that imports it gets a fresh one anyway)."""
        random = sys.modules.get("numpy.random")
        if random is None:
            return
        try:
            generator = random.get_bit_generator() if hasattr(random, "get_bit_generator") \
                else None
            if generator is None or generator is not self.generator:
                self._seed(random)
                self._set_up(generator)
                return
            if self.key:
                with generator.lock:  # (as numpy's own seeding: a preloaded thread may draw)
                    if self.getrandom(self.key, self._WORDS * 4, 0) == self._WORDS * 4:
                        self.pos.value = self._WORDS  # (the first draw regenerates)
                        return
            self._seed(random)
        except Exception:
            pass

    def _seed(self, random: Any) -> None:
        numpy = sys.modules["numpy"]
        random.seed(numpy.frombuffer(os.urandom(16), dtype=numpy.uint32))

    def _set_up(self, generator: Any) -> None:
        """Use ``getrandom`` on ``generator``'s state if it is laid out as expected."""
        self.generator, self.key, self.pos = generator, 0, None
        if generator is None or type(generator).__name__ != "MT19937":
            return
        if self.getrandom is None:
            try:
                self.getrandom = ctypes.CDLL(None, use_errno=True).getrandom
            except (OSError, AttributeError):
                return
            self.getrandom.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            self.getrandom.restype = ctypes.c_ssize_t
        key = generator.ctypes.state_address
        pos = ctypes.c_int.from_address(key + self._WORDS * 4)
        state = generator.state["state"]
        words = ctypes.string_at(key, self._WORDS * 4)
        numpy = sys.modules["numpy"]
        if pos.value == state["pos"] and \
                words == numpy.asarray(state["key"], dtype=numpy.uint32).tobytes():
            self.key, self.pos = key, pos


_NUMPY_ENTROPY = _NumpyEntropy()


class _ImportGuard:
    """While active (a context), the first meta-path finder: the imports that ``refuses``
    names fail with an ImportError that says ``why``; every other one goes on as usual."""

    def __init__(self, refuses: Callable[[str], bool], why: str) -> None:
        self.refuses = refuses
        self.why = why

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if self.refuses(name):
            raise ImportError(f"{name} is not imported in the fork server ({self.why})",
                              name=name)
        return None

    def __enter__(self) -> None:
        sys.meta_path.insert(0, self)

    def __exit__(self, *exc: object) -> None:
        sys.meta_path.remove(self)


def _import(module: str) -> None:
    """Import ``module`` if it can be; a worker that needs it reports the failure itself.
    A module that would import one of ``FORK_UNSAFE`` (mpi4py.MPI initialises MPI, which no
    forked child may inherit) fails to import here; the workers that need it import it
    themselves."""
    if module == "__main__" or module in FORK_UNSAFE:
        return  # (the driver's script: importing it here would run it)
    with _ImportGuard(FORK_UNSAFE.__contains__, "unsafe to fork after"), \
            contextlib.suppress(Exception, SystemExit):
        importlib.import_module(module)


def _unpickle_function(blob: bytes) -> None:
    """Put the function pickled in ``blob`` into the workers' function cache, unless it
    cannot be unpickled here without importing a module (then each worker does it, and
    reports what fails). The modules a function needs were preloaded just before, if they
    may be (the engine learns them first); one kept out of the fork server on purpose
    (``mpi4py.MPI``, or one the preload could not import) must not come in this way."""
    with _ImportGuard(lambda name: True, "to unpickle a function"), \
            contextlib.suppress(Exception, SystemExit):
        _call.FUNCTIONS.loads(blob)


def _probe(x: int) -> int:
    return x + 1


_PROBE_KEY = b"probe" * 8  # (the probe's frames are never sent: any key will do)


@functools.cache
def _probe_frame() -> bytes:
    """The probe call as the engine would frame it, made once (a child only reads it, as
    it will read its own call)."""
    from executorkit.transport import RunTask, TaskSetup

    call = RunTask(0, cloudpickle.dumps(_probe), pickle.dumps(((1,), {})), TaskSetup(), None)
    return b"".join(encode(call, _PROBE_KEY))


def _probe_call() -> None:
    """One call through the worker's code path, from reading its frame to framing the reply:
    whatever it touches first is done with (in a spare, before its call arrives)."""
    with contextlib.suppress(Exception):
        (msg,) = FrameReader(_PROBE_KEY).feed(memoryview(_probe_frame()))
        encode(_call.run(msg), _PROBE_KEY)


_HUGE = 2 << 20  # x86-64's (and arm64's, with 4 KiB pages) PMD size
_MADV_COLLAPSE = 25  # Linux 6.1


def _huge_heap(budget: float = 0.1) -> None:
    """Back this process's resident heap with 2 MiB pages where whole windows of it allow
    (``MADV_COLLAPSE``), once its imports are done.

    Each fork copies, and each worker's exit tears down, one page-table entry per 4 KiB page
    of this process's private memory; the kernel handles a 2 MiB folio in one step, and
    still does once a write has split its mapping back into 4 KiB entries (only the written
    page is copied). With numpy and scipy preloaded, per-task calls ran 9 % faster here
    (alternating runs: 158, 145, 163 -> 172, 169, 176 calls/s). Only windows at least half
    resident are collapsed, so memory grows by at most what they hold; the work stops
    after ``budget`` seconds (a fragmented machine compacts memory for it). Where the
    kernel has no ``MADV_COLLAPSE`` or huge pages are off, nothing happens.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore = libc.madvise, libc.mincore
        with open("/proc/self/maps") as fh:
            maps = fh.read().splitlines()
    except (OSError, AttributeError):
        return
    madvise.argtypes = mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    vec = ctypes.create_string_buffer(_HUGE // page)
    deadline = time.monotonic() + budget
    for line in maps:
        fields = line.split()
        if fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
            continue  # private anonymous memory (and the brk heap) only
        low, high = (int(x, 16) for x in fields[0].split("-"))
        for start in range(-(-low // _HUGE) * _HUGE, high // _HUGE * _HUGE, _HUGE):
            if time.monotonic() > deadline:
                return
            if mincore(start, _HUGE, vec) != 0:
                continue
            if sum(vec.raw) * 2 >= len(vec.raw):  # (bit 0 of each byte: resident)
                madvise(start, _HUGE, _MADV_COLLAPSE)


def _warm_up() -> None:
    """Take one call through the worker's code path before forking anything.

    First use initialises caches all over the interpreter (cloudpickle's, the type caches,
    lazily imported helpers); done here once, every child starts with it done. Then
    freeze the heap so the garbage collector of a child does not write to (and so copy)
    every page it shares with this process.
    """
    import gc

    _probe_call()
    gc.collect()
    gc.freeze()
    _huge_heap()


def main() -> None:
    boot = pickle.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    if boot.get("bind_now"):
        # Set for this process only (see LocalLauncher): its libraries were bound when it
        # started, so no forked worker resolves a symbol (writing the page that holds it).
        os.environ.pop("LD_BIND_NOW", None)
    if boot.get("authkey"):
        # Every forked worker inherits it: the driver's Manager proxies authenticate.
        import multiprocessing.process

        multiprocessing.process.current_process().authkey = boot["authkey"]
    forker = _Forker()  # (before the heap is frozen: it looks for objects in it)
    for module in boot.get("preload", ()):
        # Warm what the executor's calls will need (h5py for the cache) once, not per fork.
        _import(module)
    _warm_up()
    with contextlib.suppress(ConnectionError, EOFError):
        ForkServer(boot["address"], boot["secret"], forker).run()


if __name__ == "__main__":
    main()
