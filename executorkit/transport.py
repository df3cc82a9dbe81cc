"""Typed messages between the driver and its worker processes, authenticated.

Wire format of one frame::

    +----------------+-----------------------------+------------------+
    | length (8 B BE)| BLAKE2b-256(key=secret,body)| body (pickle)    |
    +----------------+-----------------------------+------------------+

Every executor draws a fresh 32-byte secret. The MAC is BLAKE2b in its keyed mode (a MAC
by design, like HMAC-SHA256, and four times cheaper per frame here: OpenSSL's one-shot HMAC
costs about 4 us, which every call paid four times). A frame whose MAC does not verify is dropped
together with its connection *before* the body is unpickled, so nobody else on a shared
node can make the driver or a worker unpickle (that is, run) anything. Bodies are pickles of
the small message classes below; user objects inside them are already ``bytes`` produced by
cloudpickle, so the frame itself is cheap to encode.

Local work listens on a local socket (SingleNodeExecutor on Linux: an abstract Unix socket
that only this user's processes may connect to) or on 127.0.0.1; the address is handed to
workers through their standard input or a private boot file (never on a command line,
where ``ps`` would show it with the secret).
"""

from __future__ import annotations

import contextlib
import operator
import pickle
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

try:  # the C modules behind hashlib.blake2b and hmac.compare_digest, without OpenSSL:
    # loading libcrypto (hashlib, hmac) would add 3 MB and a dozen mappings to the fork
    # server, which every fork copies and every worker's exit tears down
    from _blake2 import blake2b
    from _operator import _compare_digest as compare_digest
except ImportError:  # pragma: no cover (another Python implementation)
    from hashlib import blake2b
    from hmac import compare_digest

__all__ = [
    "AuthenticationError", "BlockingChannel", "Cancel", "Dropped", "Exited", "FrameReader",
    "GaveBack", "Hello", "Kill", "Preload", "ProgramEnd", "RunProgram", "RunTask", "Spawn",
    "Started", "Stop", "TaskDone", "encode",
]

_HEADER = struct.Struct("!Q32s")
MAX_FRAME = 1 << 40  # refuse absurd lengths from a confused or hostile peer


class AuthenticationError(ConnectionError):
    """A frame failed authentication; the connection must be dropped."""


# --------------------------------------------------------------------------- messages
class _Message:
    """Pickles as (class, field values): about 4x cheaper than the default for slots."""

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # by name: ``dataclass(slots=True)`` makes a new class, which replaces the first
        _MESSAGES[cls.__name__] = cls

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        cls = type(self)
        try:
            return cls, _FIELDS[cls](self)
        except KeyError:
            _FIELDS[cls] = _field_getter(cls.__slots__)
            return cls, _FIELDS[cls](self)


_FIELDS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
_MESSAGES: dict[str, type] = {}  # the message classes by name, for encode() and _decode()


def _field_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The field values of a message as a tuple, in one C call where there are several."""
    if len(names) > 1:
        return operator.attrgetter(*names)
    return lambda message: tuple(getattr(message, name) for name in names)


@dataclass(slots=True)
class Hello(_Message):
    """First frame of a worker (or the fork server, ``worker_id`` 0) on a new connection.
    ``lingers``: a one-call worker that, once it has replied, waits for the engine to shut
    its connection before it exits (see ``executorkit.worker.loop``)."""

    worker_id: int
    pid: int
    host: str
    lingers: bool = False


@dataclass(slots=True)
class TaskSetup(_Message):
    """Per-call process settings applied by a persistent worker around one call."""

    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    unset: tuple[str, ...] = ()  # worker-level variables this call's env replaces
    cpus: tuple[int, ...] | None = None  # CPU affinity (a warm spare given its call)


@dataclass(slots=True)
class CacheSpec(_Message):
    """Where and how the worker records a finished call in the cache."""

    directory: str
    key: str
    function_name: str
    resource_dict: dict[str, Any] = field(default_factory=dict)
    slot: int | None = None  # the first CPU slot (block: worker slot) the call ran on


@dataclass(slots=True)
class RunTask(_Message):
    """Run the call: ``fn`` is the pickled function, ``args`` the pickled (args, kwargs).

    ``queued``: sent while earlier calls had no reply yet (block allocation); the worker
    reports when it starts it, and until then it may be cancelled (:class:`Cancel`) or given
    back (:class:`GaveBack`). ``overrun_after``: seconds after which, if this call still
    runs, the worker gives back the calls queued behind it (0: never).
    """

    task_id: int
    fn: bytes
    args: bytes
    setup: TaskSetup | None = None
    cache: CacheSpec | None = None
    path: tuple[str, ...] | None = None  # the driver's sys.path, when the worker's is older
    queued: bool = False
    overrun_after: float = 0.0


@dataclass(slots=True)
class TaskDone(_Message):
    """``ok``: payload is the pickled result; else a pickled :class:`ErrorInfo`.

    ``elapsed``: seconds spent in the function itself (not unpickling, so not importing its
    module; -1 if not measured). ``next_task``: the queued call the worker starts right
    after this reply (0: none), so the engine knows it runs without another frame.
    """

    task_id: int
    ok: bool
    payload: bytes
    started: float
    finished: float
    elapsed: float = -1.0
    next_task: int = 0


@dataclass(slots=True)
class Started(_Message):
    """Worker report: the queued call ``task_id`` starts now (it had no reply to ride on)."""

    task_id: int


@dataclass(slots=True)
class Cancel(_Message):
    """Ask a worker not to start these queued calls; it answers with :class:`Dropped`."""

    task_ids: tuple[int, ...]


@dataclass(slots=True)
class Dropped(_Message):
    """Worker report: these queued calls were cancelled before they started."""

    task_ids: tuple[int, ...]


@dataclass(slots=True)
class GaveBack(_Message):
    """Worker report: call ``running`` has run ``elapsed`` seconds, past its
    ``overrun_after``; the queued calls ``task_ids`` were not started and go back to the
    engine, which places them again."""

    running: int
    elapsed: float
    task_ids: tuple[int, ...]


@dataclass(slots=True)
class ErrorInfo(_Message):
    """An exception as it crosses back: the pickled object if possible, always its text."""

    exc: bytes | None
    type_name: str
    message: str
    traceback: str
    kind: str = "raised"  # "raised" | "serialization"


@dataclass(slots=True)
class InitFailed(_Message):
    """A persistent worker's ``init_function`` raised: ``info`` says what."""

    info: ErrorInfo


@dataclass(slots=True)
class Stop(_Message):
    """Ask a worker (or the fork server) to exit."""


@dataclass(slots=True)
class Spawn(_Message):
    """Fork-server request: start worker ``worker_id`` with these process settings."""

    worker_id: int
    env: tuple[tuple[str, str], ...]
    cwd: str | None
    cpus: tuple[int, ...] | None  # CPU affinity, None = inherit
    persistent: bool
    init_payload: bytes | None = None  # cloudpickled init_function (persistent workers)
    mpi_command: tuple[str, ...] = ()  # run under this launcher prefix (cores > 1)
    errdir: str | None = None  # private directory of this worker (MPI error reports)
    res: Any = None  # the Resources of the call (launchers that ask a scheduler need them)
    spare: bool = False  # a warm per-task worker that gets its call later
    # a spare runs a probe call while it waits (False: its call is due at once, see Engine)
    probe: bool = True
    program: bool = False  # the call runs a program (executorkit.command), see Engine
    path: tuple[str, ...] | None = None  # the driver's sys.path (see executorkit._syspath)
    # launchers that run programs themselves (``runs_programs``): the call's CommandCall and
    # task id; such a worker is the program, never a Python process (stays in the driver)
    call: Any = None
    task_id: int = 0


@dataclass(slots=True)
class RunProgram(_Message):
    """Fork-server request: start a Command's program itself, as worker ``worker_id``, with
    no Python worker in between (see executorkit.worker.program).

    ``argv`` is final (any MPI launcher prefix included) and is looked up on the ``PATH`` of
    the call's environment. The program gets ``env`` on top of the fork server's
    environment, ``cwd`` (created if missing; the fork server's own if None), the CPUs
    ``cpus`` (None: inherit), its own process group, ``stdin`` (None: /dev/null), and new
    files ``<stem>.<pid>.out``/``.err`` in ``cwd`` as its stdout and stderr.
    """

    worker_id: int
    task_id: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str | None
    cpus: tuple[int, ...] | None
    stem: str
    stdin: bytes | None = None
    outputs: tuple[str, ...] = ()  # files it promises to write (relative to cwd)


@dataclass(slots=True)
class ProgramEnd(_Message):
    """In the :class:`Exited` of a :class:`RunProgram`'s program that ran to its own end
    (or never started): what the driver builds the call's outcome from. ``error``: why it
    could not be started (the ``OSError`` a worker would have raised)."""

    task_id: int
    argv: tuple[str, ...]
    cwd: str
    files: tuple[str, str]  # stdout, stderr
    outputs: tuple[str, ...]  # absolute
    started: float
    finished: float
    error: ErrorInfo | None = None


@dataclass(slots=True)
class Preload(_Message):
    """Fork-server request: import ``modules`` now, so the workers forked from here on
    start with them. ``env`` (the thread variables of a default call) is set first, as
    libraries such as OpenBLAS size their thread pools when they are imported.
    ``functions``: pickled functions sent by value, unpickled once there for every worker
    forked after."""

    modules: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    functions: tuple[bytes, ...] = ()


@dataclass(slots=True)
class Kill(_Message):
    """Fork-server request: kill worker ``worker_id``'s process group."""

    worker_id: int
    signum: int = 9


@dataclass(slots=True)
class Exited(_Message):
    """Fork-server report: worker ``worker_id`` (``pid``) ended with ``status``.

    ``status`` follows ``subprocess``: the exit code, or minus the signal number.
    """

    worker_id: int
    pid: int
    status: int
    reason: str | None = None  # the launcher's account of an abnormal end (Flux's reason)
    # a program the launcher ran itself (Spawn.call) ended on its own: its outcome, as a
    # worker would have sent it (driver side only, never on a wire)
    done: TaskDone | None = None
    # the fork server's report of such a program (RunProgram); the driver reads its
    # outcome from it (so the fork server never holds a program's output)
    program: ProgramEnd | None = None


@dataclass(slots=True)
class SpawnFailed(_Message):
    """Fork-server report: ``fork()`` itself failed for ``worker_id``."""

    worker_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Upstream:
    """In a batch job's input: stands for the result of the task with cache key ``key``."""

    key: str


# --------------------------------------------------------------------------- framing
def encode(message: object, secret: bytes) -> tuple[bytes, bytes]:
    """Header and body of one frame (kept apart so large bodies are never copied).

    A message is pickled as its class name and field values, a plain tuple: pickling the
    class itself (a global looked up by module and name on every dump) cost 3 of the 4 us
    a reply took.
    """
    cls = type(message)
    if _MESSAGES.get(cls.__name__) is cls:
        fields = _FIELDS.get(cls) or _FIELDS.setdefault(cls, _field_getter(cls.__slots__))
        body = pickle.dumps((cls.__name__, fields(message)), protocol=5)
    else:
        body = pickle.dumps((None, message), protocol=5)
    return _HEADER.pack(len(body), _mac(secret, body)), body


def _decode(body: bytes | bytearray | memoryview) -> Any:
    name, value = pickle.loads(body)
    return value if name is None else _MESSAGES[name](*value)


def _mac(secret: bytes, body: bytes | bytearray | memoryview) -> bytes:
    return blake2b(body, key=secret, digest_size=32).digest()


def _verify(secret: bytes, mac: bytes, body: bytes | bytearray | memoryview) -> Any:
    if not compare_digest(mac, _mac(secret, body)):
        raise AuthenticationError("frame failed authentication (wrong secret?); dropping peer")
    return _decode(body)


class FrameReader:
    """Incremental decoder for bytes arriving on a non-blocking or select()ed socket."""

    __slots__ = ("_buf", "_secret", "limit")

    def __init__(self, secret: bytes, limit: int = MAX_FRAME) -> None:
        self._secret = secret
        self._buf = bytearray()
        self.limit = limit  # the engine keeps it small until a peer has said hello

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        self._buf += data
        out = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            length, mac = _HEADER.unpack_from(buf, pos)
            if length > self.limit:
                raise AuthenticationError(f"frame length {length} is implausible")
            end = pos + _HEADER.size + length
            if len(buf) < end:
                break
            out.append(_verify(self._secret, mac, memoryview(buf)[pos + _HEADER.size:end]))
            pos = end
        if pos:
            del buf[:pos]
        return out


class BlockingChannel:
    """A framed, authenticated, blocking connection (worker side, and driver-side sends).

    ``send`` may be called from several threads; frames are never interleaved.
    """

    def __init__(self, sock: socket.socket, secret: bytes) -> None:
        import threading

        self.sock = sock
        self.secret = secret
        self._send_lock = threading.Lock()
        self._header = bytearray(_HEADER.size)

    def send(self, message: object) -> None:
        header, body = encode(message, self.secret)
        with self._send_lock:
            if len(body) < 65536:
                self.sock.sendall(header + body)
            else:
                self.sock.sendall(header)
                self.sock.sendall(body)

    def recv(self) -> Any:
        """Next message; raises EOFError when the peer closed the connection."""
        header = self._recv_exact(_HEADER.size)
        length, mac = _HEADER.unpack(header)
        if length > MAX_FRAME:
            raise AuthenticationError(f"frame length {length} is implausible")
        return _verify(self.secret, mac, self._recv_exact(length))

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise EOFError("connection closed by peer")
            got += k
        return buf

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# Where a worker reaches its driver: a TCP host and port, or (a str) the name of a local
# socket in Linux's abstract namespace, for workers on the driver's own machine.
Address = tuple[str, int] | str


def connect(address: Address, secret: bytes) -> BlockingChannel:
    if isinstance(address, str):
        # The driver's machine, through a local socket: no TCP stack in between (a call's
        # connection, sends and close cost half the CPU they cost over loopback TCP).
        return BlockingChannel(_dial(socket.AF_UNIX, address), secret)
    if address[0].startswith("127."):
        # This machine (a forked per-task worker, thousands of times): no name lookup and no
        # keep-alive, as the kernel closes a loopback connection however its peer dies.
        sock = _dial(socket.AF_INET, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return BlockingChannel(sock, secret)
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A driver whose node is lost sends no FIN: keep-alive probes find out in ~2 minutes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return BlockingChannel(sock, secret)


def _dial(family: int, address: Address) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock
