"""Source lines for a worker's traceback that only the driver can show.

A function defined in a notebook cell (or at a prompt, or by ``exec``) has no file a worker
could read: its source lives in the driver's ``linecache``. The worker prints such frames
without source, and the driver fills the lines in.

cloudpickle >= 3.1.3 pickles every code object sent by value with
``co_filename = "<dynamic-code>"`` (so the bytes do not depend on where it was defined), while
older releases keep the original name. Line numbers and function names survive either way.
So a frame ``File "<dynamic-code>", line 7, in f`` is mapped back through the code objects
the task could have run: the task function, and the functions, closures, defaults and class
methods it reaches (a few levels deep). A ``<dynamic-code>`` frame is filled only when
exactly one of those code objects named ``f`` spans line 7, so a wrong line is never shown.

This runs only when a task failed; nothing is recorded on the submit path.
"""

from __future__ import annotations

import linecache
import re
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["DYNAMIC_FILENAME", "fill_source_lines"]

DYNAMIC_FILENAME = "<dynamic-code>"
_FRAME = re.compile(r'^  File "(?P<file>.+)", line (?P<line>\d+), in (?P<name>.+)$')
_MAX_DEPTH = 3


def fill_source_lines(text: str, fn: Any = None) -> str:
    """Return the traceback ``text`` with each frame's missing source line added.

    ``fn`` is what the task ran (its function, or any callable); it resolves the frames
    cloudpickle renamed to ``<dynamic-code>``.
    """
    lines = text.splitlines(keepends=True)
    resolver = _Resolver(fn)
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line.rstrip("\n"))
        if match is None:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith("    "):
            continue  # the worker already showed the source
        source = resolver.source(match["file"], int(match["line"]), match["name"])
        if source:
            out.append(f"    {source}\n")
    return "".join(out)


class _Resolver:
    """Finds the driver's source line of a frame, looking at the task's code lazily."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._codes: list[types.CodeType] | None = None

    def source(self, filename: str, lineno: int, name: str) -> str:
        if filename == DYNAMIC_FILENAME:
            original = self._original_filename(lineno, name)
            if original is None:
                return ""
            filename = original
        return linecache.getline(filename, lineno).strip()

    def _original_filename(self, lineno: int, name: str) -> str | None:
        if self._codes is None:
            self._codes = list(_reachable_codes(self._fn))
        files = {code.co_filename for code in self._codes
                 if code.co_name == name and lineno in _line_span(code)}
        return files.pop() if len(files) == 1 else None


def _line_span(code: types.CodeType) -> range:
    numbers = [line for _, _, line in code.co_lines() if line is not None]
    numbers.append(code.co_firstlineno)
    return range(min(numbers), max(numbers) + 1)


def _reachable_codes(root: Any) -> Iterator[types.CodeType]:
    """Code objects of ``root`` and of the functions it reaches (globals, closures, defaults,
    class methods, bound methods, partials), without repeats."""
    seen: set[int] = set()
    pending: list[tuple[Any, int]] = [(root, 0)]
    while pending:
        obj, depth = pending.pop()
        if id(obj) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            yield from _nested_codes(obj.__code__)
            pending.extend((value, depth + 1) for value in _captured(obj))
        elif isinstance(obj, type) and obj.__module__ not in ("builtins",):
            pending.extend((value, depth + 1) for value in vars(obj).values())
        elif isinstance(obj, (staticmethod, classmethod, types.MethodType)):
            pending.append((obj.__func__, depth))
        elif isinstance(obj, property):
            pending.extend((f, depth) for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif hasattr(obj, "func") and callable(obj):  # functools.partial and friends
            pending.append((obj.func, depth))
        elif callable(obj) and not isinstance(obj, types.BuiltinFunctionType):
            pending.append((type(obj), depth))  # a callable instance: its class's methods


def _nested_codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested_codes(const)


def _captured(fn: types.FunctionType) -> Iterator[Any]:
    namespace = fn.__globals__
    for code in _nested_codes(fn.__code__):
        for name in code.co_names:
            if name in namespace:
                yield namespace[name]
    for cell in fn.__closure__ or ():
        try:
            yield cell.cell_contents
        except ValueError:  # an empty cell
            continue
    yield from fn.__defaults__ or ()
    yield from (fn.__kwdefaults__ or {}).values()
