"""Tests of executorkit.transport: framing, authentication before unpickling, channels."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import dial

from executorkit import transport
from executorkit.transport import (
    MAX_FRAME,
    AuthenticationError,
    BlockingChannel,
    CacheSpec,
    ErrorInfo,
    Exited,
    FrameReader,
    Hello,
    InitFailed,
    Kill,
    RunTask,
    Spawn,
    SpawnFailed,
    Stop,
    TaskDone,
    TaskSetup,
    encode,
)

SECRET = bytes(range(32))
WRONG = bytes(range(1, 33))
WAIT = 30  # seconds; only reached if something hangs

ERROR_INFO = ErrorInfo(b"\x80\x05N.", "ValueError", "bad", "Traceback ...\n", "raised")
MESSAGES: list[Any] = [
    Hello(3, 1234, "node-1"),
    Hello(0, os.getpid(), "localhost"),
    TaskSetup(),
    TaskSetup("/tmp/work", (("A", "1"), ("B", "2"))),
    CacheSpec("/tmp/cache", "key-1", "fn", {"cores": 2}),
    RunTask(7, b"fn-bytes", b"args-bytes"),
    RunTask(8, b"\x00" * 10, b"\xff", TaskSetup("/x", (("K", "V"),)),
            CacheSpec("/c", "k", "f")),
    TaskDone(7, True, b"result", 1.5, 2.25),
    TaskDone(9, False, pickle.dumps(ERROR_INFO), 0.0, 0.1),
    ERROR_INFO,
    ErrorInfo(None, "Weird", "cannot pickle", "tb", "serialization"),
    InitFailed(ERROR_INFO),
    Stop(),
    Spawn(4, (("X", "y"),), "/cwd", (0, 2), True, b"init"),
    Spawn(5, (), None, None, False),
    Kill(4),
    Kill(4, 15),
    Exited(4, 999, -9),
    Exited(5, 1000, 0),
    SpawnFailed(6, "fork: out of memory"),
]
IDS = [f"{type(m).__name__}-{i}" for i, m in enumerate(MESSAGES)]


def frame(message: object, secret: bytes = SECRET) -> bytes:
    header, body = encode(message, secret)
    return header + body


def raw_frame(body: bytes, key: bytes) -> bytes:
    """A frame around arbitrary ``body`` bytes, signed with ``key``."""
    mac = hashlib.blake2b(body, key=key, digest_size=32).digest()
    return struct.pack("!Q", len(body)) + mac + body


class MakeDir:
    """Unpickling this object creates a directory: a visible side effect of pickle.loads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.path),)


SIDE_EFFECTS: list[str] = []


def _record_side_effect(tag: str) -> str:
    SIDE_EFFECTS.append(tag)
    return tag


class Records:
    """Unpickling this object appends to a module-level list."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _record_side_effect, (self.tag,)


@contextlib.contextmanager
def channel_pair(
    secret_a: bytes = SECRET, secret_b: bytes = SECRET
) -> Iterator[tuple[BlockingChannel, BlockingChannel]]:
    a, b = socket.socketpair()
    a.settimeout(WAIT)
    b.settimeout(WAIT)
    ca, cb = BlockingChannel(a, secret_a), BlockingChannel(b, secret_b)
    try:
        yield ca, cb
    finally:
        ca.close()
        cb.close()


# --------------------------------------------------------------------------- encode/decode
@pytest.mark.parametrize("message", MESSAGES, ids=IDS)
def test_round_trip(message: Any) -> None:
    reader = FrameReader(SECRET)
    (out,) = reader.feed(frame(message))
    assert type(out) is type(message)
    assert out == message
    assert out is not message


def test_encode_layout() -> None:
    header, body = encode(Kill(1), SECRET)
    assert len(header) == 40
    length, mac = struct.unpack("!Q32s", header)
    assert length == len(body)
    # keyed BLAKE2b-256 of the body: a MAC that needs the secret
    assert mac == hashlib.blake2b(body, key=SECRET, digest_size=32).digest()
    assert mac != hashlib.blake2b(body, key=b"x" * 32, digest_size=32).digest()
    # the body: the message's class name and field values, as plain data
    assert pickle.loads(body) == ("Kill", (1, 9))
    assert FrameReader(SECRET).feed(header + body) == [Kill(1)]


def test_messages_pickle_compactly_as_class_and_fields() -> None:
    # _Message.__reduce__ pickles (class, field values); the round trip must keep all fields.
    msg = Spawn(4, (("X", "y"),), "/cwd", (0, 2), True, b"init")
    values = (4, (("X", "y"),), "/cwd", (0, 2), True, b"init")
    defaults = tuple(f.default for f in dataclasses.fields(Spawn)[len(values):])
    assert msg.__reduce__() == (Spawn, values + defaults)
    assert pickle.loads(pickle.dumps(msg, protocol=5)) == msg


def test_frames_split_at_every_byte_boundary() -> None:
    messages = [
        Hello(1, 2, "h"),
        RunTask(11, b"f" * 50, b"a" * 30, TaskSetup("/d", (("A", "B"),))),
        Stop(),
    ]
    data = b"".join(frame(m) for m in messages)
    for cut in range(len(data) + 1):
        reader = FrameReader(SECRET)
        first = reader.feed(data[:cut])
        second = reader.feed(data[cut:])
        assert first + second == messages, cut
        if cut < len(data):
            assert len(first) < len(messages)


def test_one_byte_at_a_time() -> None:
    messages = [Hello(1, 2, "h"), Stop(), Exited(1, 2, 3)]
    data = b"".join(frame(m) for m in messages)
    reader = FrameReader(SECRET)
    out: list[Any] = []
    for i in range(len(data)):
        out += reader.feed(data[i:i + 1])
    assert out == messages


def test_several_frames_in_one_feed_and_a_partial_tail() -> None:
    messages = MESSAGES[:6]
    data = b"".join(frame(m) for m in messages)
    tail = frame(Kill(99))
    reader = FrameReader(SECRET)
    assert reader.feed(data + tail[:17]) == messages
    assert reader.feed(b"") == []
    assert reader.feed(tail[17:]) == [Kill(99)]


def test_large_body_through_reader() -> None:
    big = TaskDone(1, True, os.urandom(3 << 20), 0.0, 1.0)
    data = frame(big)
    reader = FrameReader(SECRET)
    out: list[Any] = []
    for start in range(0, len(data), 65536):
        out += reader.feed(data[start:start + 65536])
    assert out == [big]


# --------------------------------------------------------------------------- authentication
def test_wrong_secret_raises_before_unpickling(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    body = pickle.dumps(MakeDir(target), protocol=5)
    reader = FrameReader(SECRET)
    with pytest.raises(AuthenticationError):
        reader.feed(raw_frame(body, WRONG))
    assert not target.exists()
    # Control: the payload really would have run if it had been unpickled.
    pickle.loads(body)
    assert target.is_dir()


def test_wrong_secret_no_side_effect_in_module_state() -> None:
    SIDE_EFFECTS.clear()
    body = pickle.dumps((None, Records("evil")), protocol=5)  # a frame body: (None, object)
    with pytest.raises(AuthenticationError):
        FrameReader(SECRET).feed(raw_frame(body, WRONG))
    assert SIDE_EFFECTS == []
    # Signed with the right secret the same body does get unpickled (the control).
    assert FrameReader(SECRET).feed(raw_frame(body, SECRET)) == ["evil"]
    assert SIDE_EFFECTS == ["evil"]
    SIDE_EFFECTS.clear()


def test_authentication_error_is_a_connection_error() -> None:
    assert issubclass(AuthenticationError, ConnectionError)


def test_good_frame_followed_by_forged_frame(tmp_path: Path) -> None:
    target = tmp_path / "second"
    data = frame(Hello(1, 2, "h")) + raw_frame(pickle.dumps(MakeDir(target)), WRONG)
    with pytest.raises(AuthenticationError):
        FrameReader(SECRET).feed(data)
    assert not target.exists()


def test_tampered_body_rejected(tmp_path: Path) -> None:
    data = bytearray(frame(Hello(1, 2, "host")))
    data[-3] ^= 0x01
    with pytest.raises(AuthenticationError):
        FrameReader(SECRET).feed(bytes(data))
    # A forged MAC is rejected the same way.
    target = tmp_path / "x"
    body = pickle.dumps(MakeDir(target))
    forged = struct.pack("!Q32s", len(body), b"\x00" * 32) + body
    with pytest.raises(AuthenticationError):
        FrameReader(SECRET).feed(forged)
    assert not target.exists()


def test_reader_with_wrong_secret_rejects_genuine_frames() -> None:
    with pytest.raises(AuthenticationError):
        FrameReader(WRONG).feed(frame(Stop(), SECRET))


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2**64 - 1])
def test_implausible_length_raises(length: int) -> None:
    header = struct.pack("!Q32s", length, b"\x00" * 32)
    with pytest.raises(AuthenticationError, match="implausible"):
        FrameReader(SECRET).feed(header)


def test_implausible_length_on_blocking_channel() -> None:
    with channel_pair() as (a, b):
        a.sock.sendall(struct.pack("!Q32s", MAX_FRAME + 1, b"\x00" * 32))
        with pytest.raises(AuthenticationError, match="implausible"):
            b.recv()


def test_blocking_channel_wrong_secret_does_not_unpickle(tmp_path: Path) -> None:
    target = tmp_path / "chan"
    with channel_pair(WRONG, SECRET) as (a, b):
        a.sock.sendall(raw_frame(pickle.dumps(MakeDir(target)), WRONG))
        with pytest.raises(AuthenticationError):
            b.recv()
    assert not target.exists()


# --------------------------------------------------------------------------- BlockingChannel
def test_blocking_channel_send_recv_both_ways() -> None:
    with channel_pair() as (a, b):
        a.send(Hello(1, 2, "h"))
        a.send(Stop())
        assert b.recv() == Hello(1, 2, "h")
        assert b.recv() == Stop()
        b.send(Exited(1, 2, 0))
        assert a.recv() == Exited(1, 2, 0)


def test_blocking_channel_interoperates_with_frame_reader() -> None:
    with channel_pair() as (a, b):
        a.send(Kill(3))
        data = b.sock.recv(4096)
        assert FrameReader(SECRET).feed(data) == [Kill(3)]
        b.sock.sendall(frame(Exited(3, 4, 5)))
        assert a.recv() == Exited(3, 4, 5)


def test_blocking_channel_large_body() -> None:
    payload = os.urandom(5 * 1024 * 1024)
    message = TaskDone(42, True, payload, 1.0, 2.0)
    errors: list[BaseException] = []
    with channel_pair() as (a, b):

        def sender() -> None:
            try:
                a.send(message)
                a.send(Stop())
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=sender, name="test-sender")
        thread.start()
        try:
            got = b.recv()
            tail = b.recv()
        finally:
            thread.join(WAIT)
        assert not thread.is_alive()
    assert errors == []
    assert got == message
    assert got.payload == payload
    assert tail == Stop()


def test_concurrent_sends_do_not_interleave() -> None:
    payloads = [bytes([i]) * (200_000 + i) for i in range(4)]
    errors: list[BaseException] = []
    with channel_pair() as (a, b):

        def sender(i: int) -> None:
            try:
                for _ in range(3):
                    a.send(TaskDone(i, True, payloads[i], 0.0, 0.0))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            got = [b.recv() for _ in range(12)]
        finally:
            for t in threads:
                t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(m.task_id for m in got) == sorted(list(range(4)) * 3)
    for m in got:
        assert m.payload == payloads[m.task_id]


def test_eof_on_close() -> None:
    with channel_pair() as (a, b):
        a.send(Stop())
        a.close()
        assert b.recv() == Stop()
        with pytest.raises(EOFError):
            b.recv()


def test_eof_in_the_middle_of_a_frame() -> None:
    with channel_pair() as (a, b):
        data = frame(Hello(1, 2, "host"))
        a.sock.sendall(data[:-5])
        a.close()
        with pytest.raises(EOFError):
            b.recv()


def test_close_twice_is_harmless() -> None:
    with channel_pair() as (a, _b):
        a.close()
        a.close()


def test_connect_helper() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        listener.settimeout(WAIT)
        chan = transport.connect(listener.getsockname()[:2], SECRET)
        try:
            server_sock, _ = listener.accept()
            with server_sock:
                server_sock.settimeout(WAIT)
                server = BlockingChannel(server_sock, SECRET)
                chan.send(Hello(1, 2, "h"))
                assert server.recv() == Hello(1, 2, "h")
        finally:
            chan.close()


# --------------------------------------------------------------------------- end to end
def _wait_for_drop(sock: socket.socket) -> None:
    """Block until the peer closes the connection (EOF or reset)."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


@pytest.mark.timeout(120)
def test_executor_drops_unauthenticated_peer_and_stays_usable(tmp_path: Path) -> None:
    from executorkit import SingleNodeExecutor

    target = tmp_path / "created-by-attacker"
    body = pickle.dumps(MakeDir(target), protocol=5)
    with SingleNodeExecutor(max_workers=1) as exe:
        with dial(exe._engine.address, timeout=WAIT) as sock:
            sock.sendall(raw_frame(body, os.urandom(32)))
            # The engine closes the connection once it has rejected the frame: after this,
            # the frame has certainly been processed.
            _wait_for_drop(sock)
        assert not target.exists()
        assert exe.submit(pow, 2, 5).result(timeout=WAIT) == 32
    assert not target.exists()


def test_connect_by_name_keeps_the_general_path() -> None:
    # "localhost" is resolved (create_connection) and gets keep-alive; 127.x skips both.
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        port = listener.getsockname()[1]
        named = transport.connect(("localhost", port), SECRET)
        direct = transport.connect(("127.0.0.1", port), SECRET)
        try:
            keepalive = socket.SOL_SOCKET, socket.SO_KEEPALIVE
            assert named.sock.getsockopt(*keepalive) == 1
            assert direct.sock.getsockopt(*keepalive) == 0
            assert direct.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            named.close()
            direct.close()


def test_connect_to_a_local_socket_name() -> None:
    # A str address is a Unix socket (SingleNodeExecutor's engine: Linux's abstract
    # namespace): the channel works as over TCP, with no TCP option set on it.
    name = f"\0executorkit-test-{os.getpid()}-{os.urandom(8).hex()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        listener.bind(name)
        listener.listen(1)
        listener.settimeout(WAIT)
        chan = transport.connect(name, SECRET)
        try:
            server_sock, _ = listener.accept()
            with server_sock:
                assert chan.sock.family == socket.AF_UNIX
                chan.send(Hello(7, 123, "here"))
                reader = transport.FrameReader(SECRET)
                messages: list[object] = []
                while not messages:
                    messages = reader.feed(server_sock.recv(1 << 16))
                assert messages == [Hello(7, 123, "here")]
        finally:
            chan.close()


def test_single_node_workers_reach_the_driver_through_a_local_socket() -> None:
    # No TCP port is opened for local work: the engine listens on an abstract Unix socket
    # (no file to leave behind), and per-task and block workers (and their connections)
    # use it.
    import sys

    from executorkit import SingleNodeExecutor

    if not sys.platform.startswith("linux"):
        pytest.skip("abstract Unix sockets are Linux's")
    for block in (False, True):
        with SingleNodeExecutor(max_workers=1, block_allocation=block) as exe:
            address = exe._engine.address
            assert isinstance(address, str) and address.startswith("\0executorkit-")
            assert exe._engine.listener.family == socket.AF_UNIX
            assert exe.submit(peer_family).result(timeout=WAIT) == int(socket.AF_UNIX)


def peer_family() -> int:
    """In a worker: the family of the socket it holds to its driver."""
    import gc
    import socket as _socket

    families = {obj.family for obj in gc.get_objects()
                if isinstance(obj, _socket.socket) and obj.fileno() >= 0}
    assert len(families) == 1, families
    return int(families.pop())


def test_the_local_socket_refuses_other_users() -> None:
    # Anyone on the machine can reach an abstract socket: the engine drops a peer of
    # another user before reading anything from it, and goes on serving its own workers.
    import subprocess
    import sys

    from executorkit import SingleNodeExecutor

    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root")
    probe = (
        "import os, socket, sys\n"
        "os.setgid(65534)\n"
        "os.setuid(65534)  # (dropped here: this interpreter may sit where nobody may read)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.settimeout(20)\n"
        "s.connect(chr(0) + sys.argv[1])\n"
        "try:\n"
        "    print('dropped' if s.recv(1) == b'' else 'data')\n"
        "except ConnectionResetError:\n"
        "    print('dropped')\n"
        "except TimeoutError:\n"
        "    print('kept')\n"
    )
    with SingleNodeExecutor(max_workers=1) as exe:
        address = exe._engine.address
        assert isinstance(address, str)
        assert address.startswith("\0")  # (an argument cannot hold it: the probe adds it)
        out = subprocess.run([sys.executable, "-c", probe, address[1:]],
                             capture_output=True, text=True, timeout=WAIT)
        assert out.stdout.strip() == "dropped", out.stderr
        assert exe.submit(pow, 2, 5).result(timeout=WAIT) == 32


def test_local_socket_can_be_turned_off(monkeypatch) -> None:
    # EXECUTORKIT_LOCAL_SOCKET=0: loopback TCP, for machines whose security module refuses
    # abstract sockets.
    from executorkit import SingleNodeExecutor

    monkeypatch.setenv("EXECUTORKIT_LOCAL_SOCKET", "0")
    with SingleNodeExecutor(max_workers=1) as exe:
        host, _ = exe._engine.address
        assert host == "127.0.0.1"
        assert exe.submit(peer_family).result(timeout=WAIT) == int(socket.AF_INET)
