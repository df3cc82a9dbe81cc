"""Misbehaving functions and objects for tests/test_faults.py (imported by name in workers)."""

from __future__ import annotations

import os
import resource
import sys


def _address_space() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def allocate_past_limit(headroom_mb, restore):
    """Cap this process's address space ``headroom_mb`` above what it uses, then allocate
    until MemoryError (a safe stand-in for running out of memory: the machine's memory is
    never at risk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + (headroom_mb << 20), hard))
    hoard = []
    try:
        while True:
            hoard.append(bytearray(16 << 20))
    finally:
        hoard.clear()
        if restore:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class ReduceRaises(Exception):
    """An exception that cannot be pickled: its __reduce__ raises."""

    def __reduce__(self):
        raise RuntimeError("no pickling for ReduceRaises")


class ReduceExits(Exception):
    """An exception whose pickling calls sys.exit (a BaseException, not an Exception)."""

    def __reduce__(self):
        sys.exit(5)


class StrRaises(Exception):
    """An exception that cannot even be printed."""

    def __str__(self):
        raise RuntimeError("no str for StrRaises")


def raise_(cls, *args):
    raise cls(*args)


class ResultReduceRaises:
    def __reduce__(self):
        raise ValueError("this result refuses to be pickled")


def return_(cls):
    return cls()


class DelRaises:
    """Raises in __del__ in any process but its creator's (Python prints "Exception
    ignored" and carries on): the worker's copies raise, the test's own does not."""

    def __init__(self, size=0):
        self.payload = b"x" * size
        self.creator = os.getpid()

    def __del__(self):
        if os.getpid() != self.creator:
            raise RuntimeError("DelRaises.__del__")


def payload_size(obj):
    return len(obj.payload)


def drop_del_raises(n):
    """Create and drop objects that raise in __del__, inside the call."""
    for _ in range(n):
        obj = DelRaises()
        obj.creator = -1
        del obj
    return n


def nbytes(blob):
    return len(blob)


def blob(size):
    return b"y" * size


def store(mapping, key, value):
    mapping[key] = value


def close_all_descriptors():
    """Sabotage the worker's own connection to the driver."""
    os.closerange(3, 65536)
    return "unreachable"
