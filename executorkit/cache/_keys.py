"""Stable cache keys for tasks.

A key is ``<name>_<sha256>``: ``<name>`` is the task function's ``__name__`` reduced to
``[A-Za-z0-9_]`` (for humans listing the cache directory), the digest covers a canonical,
type-tagged byte encoding of the function's identity and of the call's arguments.

What the function identity covers
    module, qualname and the code (bytecode, constants, names, argument counts, flags,
    recursively for nested code), defaults, closure cells, and the referenced module
    globals: plain data by value, functions by their own identity, modules by name, classes
    by module, qualname and method code, instances of user classes by class and attributes,
    anything else by its type name only.  Attributes of user modules the code names (a
    module global, or a module imported in the body) are keyed like globals.  Source
    positions (file name, line numbers) are never hashed, so the same source gives the same
    key in a notebook, a script and a fresh session.  Functions that live in the standard
    library or in site-packages are identified by module and qualname only when they are
    *referenced* (not when they are the task itself): installed code does not change under a
    running session, and recursing into a library's call graph would cost more than the task.

What the argument encoding covers
    builtin scalars, strings and containers (dicts in insertion order, sets independent of
    hash order, keyword arguments independent of their order), ranges, enums, dataclasses,
    numpy arrays and scalars, paths, callables, and
    ``concurrent.futures.Future`` objects, which contribute the key of the task producing
    them (``future_key``), so keys chain like a Merkle tree. An object whose class defines
    ``__executorkit_cache_state__()`` is keyed by its type and what that returns (a
    Command call adds the contents of its input files).

Fallback
    Any other object is pickled (``pickle`` protocol 5, then ``cloudpickle``) and the bytes
    are hashed together with the object's qualified type name.  Pickles are value-complete,
    so two arguments that would behave differently never share a pickle: the fallback can
    only cause *spurious misses* (for instance when a pickle contains a set whose order
    depends on ``PYTHONHASHSEED``, or memoizes shared objects differently), never wrong hits.
    Note that objects pickled by reference (instances of a class) are identified by the
    class's name and their state, not by the code of the class.

Keys never depend on ``hash()`` or ``id()``, so they are identical across processes with
different ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import os
import pathlib
import pickle
import re
import site
import struct
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from executorkit._pickling import FunctionMemo
from executorkit.errors import ResourceError, SerializationError

__all__ = ["FutureKey", "compute_key", "validate_cache_key"]

FutureKey = Callable[["Future[Any]"], str]

# Bumped whenever the encoding changes, so old and new keys can never collide.
_FORMAT = b"executorkit-cache-key-v2\0"
_USER_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_NAME_JUNK = re.compile(r"[^A-Za-z0-9_]")
_SAFE_NAME_MAX = 40

_BUILTIN_CALLABLES = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)
_STATELESS_BASES: tuple[type, ...] = (tuple, list, dict, set, frozenset)


class _NotEncodable(Exception):
    """An object has no canonical encoding (strict mode) and could not be pickled."""

    def __init__(self, obj: object, reason: str):
        super().__init__(reason)
        self.type_name = _type_name(type(obj))
        self.reason = reason


class _CycleError(Exception):
    """A container contains itself."""


def validate_cache_key(key: str) -> str:
    """Return ``key`` if it is usable as a user-given ``cache_key``, else raise ResourceError.

    ``"name"`` or, to file the entry in a sub-directory of the cache, ``"subdir/name"``.
    """
    if isinstance(key, str) and len(key) <= 200 and \
            all(_USER_KEY.fullmatch(part) for part in key.split("/")):
        return key
    raise ResourceError(
        f"cache_key {key!r} is invalid: it must be 1 to 200 characters from A-Z, a-z, 0-9, "
        "'.', '_' and '-', starting with a letter or digit; '/' separates sub-directories "
        "(each part follows the same rules: no '..', no absolute paths)",
        key="cache_key",
        allowed="[A-Za-z0-9][A-Za-z0-9._-]*, optionally joined by '/', 200 at most",
    )


# The function's part of a key costs more than a cache hit; it only changes when the
# function or something it captured changes, which FunctionMemo detects (including the
# attributes of user modules it reads, which a reload replaces).
_function_digests = FunctionMemo(
    also_captured=lambda fn: [value for _, _, value in module_attributes_read(fn)]
)


def compute_key(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    future_key: FutureKey,
) -> str:
    """Return the cache key of the call ``fn(*args, **kwargs)``.

    ``future_key(fut)`` must return the key of the task whose result ``fut`` will hold.
    Raises :class:`SerializationError` when an argument can neither be encoded nor pickled.
    """
    if not callable(fn):
        raise TypeError(f"the task function must be callable, got {type(fn).__name__}")
    encoder = _Encoder(future_key, _task_name(fn))
    out = hashlib.sha256(_FORMAT)
    out.update(_function_digests.get(fn, lambda f: encoder.callable_digest(f, root=True)))
    out.update(b"A" + _u64(len(args)))
    for index, value in enumerate(args):
        encoder.encode_labeled(value, out, f"positional argument {index}")
    encoder.encode_dict(kwargs, out, label="keyword argument")
    return f"{_safe_name(fn)}_{out.hexdigest()}"


# ---------------------------------------------------------------------------------------------
# small helpers


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _put_bytes(out: Any, data: bytes) -> None:
    # Length prefixes make the concatenation of encodings unambiguous.
    out.update(_u64(len(data)))
    out.update(data)


def _put_str(out: Any, text: str) -> None:
    _put_bytes(out, text.encode("utf-8", "surrogatepass"))


def _type_name(cls: type) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"


def _unwrap_partials(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _task_name(fn: Any) -> str:
    fn = _unwrap_partials(fn)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else type(fn).__qualname__


def _safe_name(fn: Any) -> str:
    fn = _unwrap_partials(fn)
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        name = type(fn).__name__
    return _NAME_JUNK.sub("", name)[:_SAFE_NAME_MAX] or "task"


@functools.lru_cache(maxsize=1)
def _installed_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    candidates = [paths.get(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")]
    candidates += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    candidates.append(site.getusersitepackages())
    real = {os.path.realpath(path) for path in candidates if path}
    return tuple(sorted(path.rstrip(os.sep) + os.sep for path in real))


_installed_cache: dict[str, bool] = {}


def _is_installed(module_name: object) -> bool:
    """True for modules of the standard library or of site-packages (code that cannot change)."""
    if not isinstance(module_name, str) or module_name == "__main__":
        return False
    cached = _installed_cache.get(module_name)
    if cached is not None:
        return cached
    module = sys.modules.get(module_name)
    if module is None:
        return False  # not cached: the module may be imported later
    file = getattr(module, "__file__", None)
    if file is None:
        result = module_name in sys.builtin_module_names or module_name in _stdlib_names()
    else:
        result = os.path.realpath(file).startswith(_installed_prefixes())
    _installed_cache[module_name] = result
    return result


def _stdlib_names() -> frozenset[str]:
    return frozenset(getattr(sys, "stdlib_module_names", ()))


def _stateless_subclass_base(obj: object) -> type | None:
    """Base builtin of a subclass that adds no instance state (e.g. a namedtuple), else None."""
    if hasattr(obj, "__dict__"):
        return None
    for base in _STATELESS_BASES:
        if isinstance(obj, base):
            mro = type(obj).__mro__
            own = mro[: mro.index(base)]
            if all(vars(cls).get("__slots__", None) in ((), []) for cls in own):
                return base
            return None
    return None


def _pickled(obj: object) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle

        try:
            return cloudpickle.dumps(obj, protocol=5)
        except Exception as exc:
            raise _NotEncodable(obj, f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# the encoder


class _Encoder:
    """Writes canonical encodings into hashlib objects.

    In strict mode (used for module globals) objects without a canonical encoding raise
    :class:`_NotEncodable` instead of being pickled, and futures are not accepted.
    """

    def __init__(self, future_key: FutureKey, task_name: str):
        self._future_key = future_key
        self._task_name = task_name
        self._strict = False
        self._containers: set[int] = set()
        self._functions_active: set[int] = set()
        self._function_digests: dict[int, bytes] = {}
        # Keeps objects whose id() is used as a cache key alive for the whole computation.
        self._pinned: list[object] = []

    # -- entry points with error reporting ----------------------------------------------------

    def encode_labeled(self, obj: object, out: Any, label: str) -> None:
        """Encode ``obj``, turning internal failures into a SerializationError naming ``label``."""
        try:
            self.encode(obj, out)
        except _CycleError:
            raise SerializationError(
                f"cannot compute the cache key of {self._task_name!r}: {label} "
                f"({_type_name(type(obj))}) contains itself; pass an explicit cache_key"
            ) from None
        except _NotEncodable as exc:
            raise SerializationError(
                f"cannot compute the cache key of {self._task_name!r}: {label} "
                f"({_type_name(type(obj))}) holds an object of type {exc.type_name} that cannot "
                f"be pickled ({exc.reason}); pass an explicit cache_key"
            ) from exc
        except RecursionError:
            raise SerializationError(
                f"cannot compute the cache key of {self._task_name!r}: {label} "
                f"({_type_name(type(obj))}) is nested too deeply; pass an explicit cache_key"
            ) from None

    def encode_dict(self, mapping: dict[Any, Any], out: Any, label: str | None = None) -> None:
        """Encode a dict independently of its insertion order (keyword arguments: their
        order never reaches the function as a difference a parameter can see)."""
        pair_digests = []
        for key, value in mapping.items():
            pair = hashlib.sha256()
            if label is None:
                self.encode(key, pair)
                self.encode(value, pair)
            else:
                self.encode_labeled(key, pair, f"the name of a {label}")
                self.encode_labeled(value, pair, f"{label} {key!r}")
            pair_digests.append(pair.digest())
        out.update(b"d" + _u64(len(pair_digests)))
        for digest in sorted(pair_digests):
            out.update(digest)

    # -- values --------------------------------------------------------------------------------

    def encode(self, obj: object, out: Any) -> None:
        writer = _EXACT_WRITERS.get(type(obj))
        if writer is not None:
            writer(self, obj, out)
            return
        for predicate, special in _SPECIAL_WRITERS:
            if predicate(obj):
                special(self, obj, out)
                return
        self._fallback(obj, out)

    def _fallback(self, obj: object, out: Any) -> None:
        if self._strict:
            raise _NotEncodable(obj, "no canonical encoding")
        out.update(b"P")
        _put_str(out, _type_name(type(obj)))
        _put_bytes(out, _pickled(obj))

    def _sequence(self, tag: bytes, items: Iterable[object], obj: object, out: Any) -> None:
        with self._visiting(obj):
            values = list(items)
            out.update(tag + _u64(len(values)))
            for value in values:
                self.encode(value, out)

    def _unordered(self, tag: bytes, items: Iterable[object], obj: object, out: Any) -> None:
        with self._visiting(obj):
            digests = []
            for value in items:
                element = hashlib.sha256()
                self.encode(value, element)
                digests.append(element.digest())
        out.update(tag + _u64(len(digests)))
        for digest in sorted(digests):
            out.update(digest)

    def _ordered_dict(self, obj: Any, out: Any) -> None:
        # Insertion order is part of a dict's value (list(d), json.dumps(d) and iteration
        # see it), so it is part of the key; it does not depend on PYTHONHASHSEED.
        with self._visiting(obj):
            out.update(b"o" + _u64(len(obj)))
            for key, value in obj.items():
                self.encode(key, out)
                self.encode(value, out)

    def _visiting(self, obj: object) -> _Visit:
        return _Visit(self._containers, obj)

    def _future(self, fut: Any, out: Any) -> None:
        if self._strict:
            raise _NotEncodable(fut, "futures are not plain data")
        out.update(b"U")
        _put_str(out, str(self._future_key(fut)))

    def _enum(self, member: Any, out: Any) -> None:
        out.update(b"e")
        _put_str(out, _type_name(type(member)))
        _put_str(out, member.name)
        self.encode(member.value, out)

    def _custom_state(self, obj: Any, out: Any) -> None:
        # Objects that define their own cache state (a Command call: its input files'
        # contents) are keyed by their type and that state.
        with self._visiting(obj):
            out.update(b"C")
            _put_str(out, _type_name(type(obj)))
            self.encode(obj.__executorkit_cache_state__(), out)

    def _dataclass(self, obj: Any, out: Any) -> None:
        with self._visiting(obj):
            out.update(b"D")
            _put_str(out, _type_name(type(obj)))
            names = [field.name for field in dataclasses.fields(obj)]
            # Attributes set outside the fields are state too; leaving them out could make two
            # different objects share a key.
            extra = sorted(set(getattr(obj, "__dict__", {})) - set(names))
            out.update(_u64(len(names) + len(extra)))
            for name in names + extra:
                _put_str(out, name)
                self.encode(getattr(obj, name), out)

    def _stateless_subclass(self, obj: Any, out: Any) -> None:
        base = _stateless_subclass_base(obj)
        assert base is not None
        with self._visiting(obj):
            out.update(b"z")
            _put_str(out, _type_name(type(obj)))
            _EXACT_WRITERS[base](self, base(obj), out)

    def _module(self, module: Any, out: Any) -> None:
        out.update(b"M")
        _put_str(out, module.__name__)

    def _path(self, obj: Any, out: Any) -> None:
        out.update(b"p")
        _put_str(out, _type_name(type(obj)))
        _put_str(out, str(obj))

    def _numpy_array(self, arr: Any, out: Any) -> None:
        out.update(b"a")
        _put_str(out, _dtype_text(arr.dtype))
        out.update(_u64(arr.ndim) + b"".join(_u64(n) for n in arr.shape))
        if arr.dtype.hasobject:
            self._sequence(b"O", arr.ravel(order="C").tolist(), arr, out)
            return
        flat = arr.reshape(-1) if arr.flags.c_contiguous else arr.ravel(order="C")
        out.update(_u64(flat.nbytes))
        out.update(flat.view("u1").data if flat.size else b"")

    def _numpy_scalar(self, value: Any, out: Any) -> None:
        if value.dtype.hasobject:
            self._fallback(value, out)
            return
        out.update(b"n")
        _put_str(out, _dtype_text(value.dtype))
        _put_bytes(out, value.tobytes())

    def _callable(self, fn: Any, out: Any) -> None:
        out.update(b"f")
        out.update(self.callable_digest(fn, root=False))

    # -- functions -----------------------------------------------------------------------------

    def callable_digest(self, fn: Any, *, root: bool) -> bytes:
        """Digest of a callable's identity (see the module docstring)."""
        # A callable's defaults, closure and bound state are arguments of every call, so they
        # are encoded in full even when the callable was reached through a strict global.
        saved, self._strict = self._strict, False
        try:
            return self._callable_digest(fn, root=root)
        finally:
            self._strict = saved

    def _callable_digest(self, fn: Any, *, root: bool) -> bytes:
        if isinstance(fn, types.FunctionType):
            return self._function_digest(fn, root=root)
        out = hashlib.sha256()
        if isinstance(fn, types.MethodType):
            out.update(b"m" + self.callable_digest(fn.__func__, root=root))
            self.encode_labeled(fn.__self__, out, f"the object bound to {fn.__name__!r}")
        elif isinstance(fn, _BUILTIN_CALLABLES):
            self._builtin_identity(fn, out)
        elif type(fn) is functools.partial:
            out.update(b"q" + self.callable_digest(fn.func, root=root))
            self.encode_labeled(fn.args, out, "the arguments bound by functools.partial")
            self.encode_labeled(fn.keywords, out, "the keywords bound by functools.partial")
        elif isinstance(fn, type):
            self._class_identity(fn, out)
        else:
            # A callable instance: its class and its state.
            self._class_identity(type(fn), out)
            self.encode_labeled(fn, out, "the callable object")
        return out.digest()

    def _builtin_identity(self, fn: Any, out: Any) -> None:
        owner = getattr(fn, "__objclass__", None)
        module = getattr(fn, "__module__", None) or getattr(owner, "__module__", "")
        out.update(b"b")
        _put_str(out, str(module))
        _put_str(out, str(getattr(fn, "__qualname__", fn.__name__)))
        bound = getattr(fn, "__self__", None)
        if bound is not None and not isinstance(bound, types.ModuleType):
            self.encode_labeled(bound, out, f"the object bound to {fn.__name__!r}")

    def _class_identity(self, cls: type, out: Any) -> None:
        out.update(b"t")
        _put_str(out, _type_name(cls))
        if _is_installed(cls.__module__):
            return
        members = []
        for name, member in sorted(vars(cls).items()):
            inner = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            if isinstance(inner, types.FunctionType):
                members.append((name, inner))
        out.update(_u64(len(members)))
        for name, member in members:
            _put_str(out, name)
            out.update(self._function_digest(member, root=True))

    def _function_digest(self, fn: types.FunctionType, *, root: bool) -> bytes:
        if not root and _is_installed(fn.__module__):
            return _name_digest(b"i", fn)
        cached = self._function_digests.get(id(fn))
        if cached is not None:
            return cached
        if id(fn) in self._functions_active:
            return _name_digest(b"r", fn)  # recursion: the outer frame covers the code
        self._functions_active.add(id(fn))
        try:
            digest = self._function_body_digest(fn)
        finally:
            self._functions_active.discard(id(fn))
        self._function_digests[id(fn)] = digest
        self._pinned.append(fn)
        return digest

    def _function_body_digest(self, fn: types.FunctionType) -> bytes:
        out = hashlib.sha256(b"F")
        _put_str(out, str(fn.__module__))
        _put_str(out, fn.__qualname__)
        self._code(fn.__code__, out)
        # Defaults and closures take part in every call, so they are hashed like arguments.
        self.encode_labeled(fn.__defaults__, out, f"the default values of {fn.__qualname__!r}")
        self.encode_labeled(fn.__kwdefaults__, out, f"the keyword defaults of {fn.__qualname__!r}")
        cells = fn.__closure__ or ()
        out.update(b"c" + _u64(len(cells)))
        for name, cell in zip(fn.__code__.co_freevars, cells, strict=False):
            _put_str(out, name)
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                out.update(b"-")
                continue
            out.update(b"+")
            label = f"the closure variable {name!r} of {fn.__qualname__!r}"
            self.encode_labeled(content, out, label)
        self._globals(fn, out)
        return out.digest()

    def _globals(self, fn: types.FunctionType, out: Any) -> None:
        namespace = fn.__globals__
        referenced = _referenced_names(fn.__code__)
        names = sorted(name for name in referenced if name in namespace)
        out.update(b"g" + _u64(len(names)))
        for name in names:
            _put_str(out, name)
            out.update(self._global_digest(namespace[name]))
        attributes = module_attributes_read(fn, referenced)
        out.update(b"a" + _u64(len(attributes)))
        for module_name, attribute, value in attributes:
            _put_str(out, module_name)
            _put_str(out, attribute)
            out.update(self._global_digest(value))

    def _global_digest(self, value: object) -> bytes:
        out = hashlib.sha256()
        if isinstance(value, types.ModuleType):
            out.update(b"M")
            _put_str(out, value.__name__)
        elif _is_identity_callable(value):
            try:
                out.update(b"f" + self.callable_digest(value, root=False))
            except SerializationError:
                # Globals are best effort: an unencodable bound state must not make every task
                # using this helper uncacheable.
                out.update(b"x" + _name_digest(b"x", value))
        else:
            self._plain_or_type_name(value, out)
        return out.digest()

    def _plain_or_type_name(self, value: object, out: Any) -> None:
        data = hashlib.sha256()
        saved, self._strict = self._strict, True
        try:
            if _is_user_instance(value):
                self._user_instance(value, data)
            else:
                self.encode(value, data)
        except (_NotEncodable, _CycleError, RecursionError, SerializationError):
            out.update(b"T")
            _put_str(out, _type_name(type(value)))
            return
        finally:
            self._strict = saved
        out.update(b"V" + data.digest())

    def _user_instance(self, value: Any, out: Any) -> None:
        """An instance of a class defined in user code, reached as a global: its class (with
        the code of its methods) and its attributes, when those are plain data."""
        with self._visiting(value):
            self._class_identity(type(value), out)
            state = vars(value)
            out.update(b"I" + _u64(len(state)))
            for name in sorted(state):
                _put_str(out, name)
                self.encode(state[name], out)

    def _code(self, code: types.CodeType, out: Any) -> None:
        out.update(b"C")
        _put_str(out, code.co_name)
        counts = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)
        out.update(b"".join(_u64(n) for n in counts))
        _put_bytes(out, code.co_code)
        # The exception table holds bytecode offsets only, no source positions.
        _put_bytes(out, getattr(code, "co_exceptiontable", b""))
        for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
            out.update(_u64(len(names)))
            for name in names:
                _put_str(out, name)
        out.update(_u64(len(code.co_consts)))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self._code(const, out)
            else:
                self._plain_or_type_name(const, out)


class _Visit:
    """Context manager marking a container as being encoded, to detect cycles."""

    __slots__ = ("_active", "_id")

    def __init__(self, active: set[int], obj: object):
        self._active = active
        self._id = id(obj)

    def __enter__(self) -> None:
        if self._id in self._active:
            raise _CycleError
        self._active.add(self._id)

    def __exit__(self, *exc: object) -> None:
        self._active.discard(self._id)


def _name_digest(tag: bytes, fn: Any) -> bytes:
    out = hashlib.sha256(tag)
    _put_str(out, str(getattr(fn, "__module__", "")))
    _put_str(out, str(getattr(fn, "__qualname__", "")))
    return out.digest()


def module_attributes_read(
    fn: types.FunctionType, referenced: frozenset[str] | None = None
) -> list[tuple[str, str, Any]]:
    """``(module, attribute, value)`` for what ``fn`` may read from user modules: modules it
    holds as globals (``helpmod.g(x)``) or imports in its body (``import helpmod`` or
    ``from helpmod import g`` inside the function), sorted.

    A name counts when the function's code mentions it anywhere; an unrelated name that
    happens to match can only cause a spurious miss. Installed modules (standard library,
    site-packages) are left out, like installed functions.
    """
    if referenced is None:
        referenced = _referenced_names(fn.__code__)
    namespace = fn.__globals__
    modules: dict[str, types.ModuleType] = {}
    for name in referenced:
        module = namespace.get(name)
        if not isinstance(module, types.ModuleType):
            module = sys.modules.get(name)  # imported in the body (IMPORT_NAME)
        if isinstance(module, types.ModuleType) and not _is_installed(module.__name__):
            modules[module.__name__] = module
    found = []
    for module_name in sorted(modules):
        attributes = vars(modules[module_name])
        found += [(module_name, name, attributes[name])
                  for name in sorted(referenced & attributes.keys())
                  if not name.startswith("__")]
    return found


def _is_user_instance(value: object) -> bool:
    cls = type(value)
    return (
        hasattr(value, "__dict__")
        and not isinstance(value, (type, types.ModuleType, types.FunctionType))
        and type(cls) is type
        and not _is_installed(cls.__module__)
        and not dataclasses.is_dataclass(value)
        and _special_writer(value) is None
    )


@functools.lru_cache(maxsize=4096)
def _referenced_names(code: types.CodeType) -> frozenset[str]:
    # Nested functions and comprehensions reach globals through their own code objects.
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_names(const)
    return frozenset(names)


def _dtype_text(dtype: Any) -> str:
    return str(dtype.descr) if dtype.fields else str(dtype.str)


def _is_identity_callable(value: object) -> bool:
    return isinstance(
        value, (types.FunctionType, types.MethodType, type, *_BUILTIN_CALLABLES)
    ) or type(value) is functools.partial


def _is_numpy_array(obj: object) -> bool:
    numpy = sys.modules.get("numpy")
    # Subclasses (masked arrays, matrices) carry extra state: they take the pickle fallback.
    return numpy is not None and type(obj) is numpy.ndarray


def _is_numpy_scalar(obj: object) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.generic)


def _is_dataclass_instance(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _write_int(_: _Encoder, value: Any, out: Any) -> None:
    size = (value.bit_length() + 8) // 8
    out.update(b"i")
    _put_bytes(out, value.to_bytes(size, "little", signed=True))


def _write_float(_: _Encoder, value: Any, out: Any) -> None:
    out.update(b"g" + struct.pack("<d", value))


def _write_complex(_: _Encoder, value: Any, out: Any) -> None:
    out.update(b"j" + struct.pack("<dd", value.real, value.imag))


def _write_str(_: _Encoder, value: Any, out: Any) -> None:
    out.update(b"s")
    _put_str(out, value)


def _write_bytes(_: _Encoder, value: Any, out: Any) -> None:
    out.update(b"y" if type(value) is bytes else b"Y")
    _put_bytes(out, bytes(value))


def _write_range(_: _Encoder, value: Any, out: Any) -> None:
    out.update(b"R")
    for number in (value.start, value.stop, value.step):
        _write_int(_, number, out)


_EXACT_WRITERS: dict[type, Callable[[_Encoder, Any, Any], None]] = {
    type(None): lambda _, __, out: out.update(b"N"),
    type(Ellipsis): lambda _, __, out: out.update(b"E"),
    bool: lambda _, value, out: out.update(b"T" if value else b"F"),
    int: _write_int,
    float: _write_float,
    complex: _write_complex,
    str: _write_str,
    bytes: _write_bytes,
    bytearray: _write_bytes,
    range: _write_range,
    list: lambda enc, value, out: enc._sequence(b"l", value, value, out),
    tuple: lambda enc, value, out: enc._sequence(b"t", value, value, out),
    dict: lambda enc, value, out: enc._ordered_dict(value, out),
    set: lambda enc, value, out: enc._unordered(b"S", value, value, out),
    frozenset: lambda enc, value, out: enc._unordered(b"Z", value, value, out),
}

# Checked in order for objects whose exact type is not above.
_SPECIAL_WRITERS: list[tuple[Callable[[object], bool], Callable[[_Encoder, Any, Any], None]]] = [
    (lambda obj: isinstance(obj, Future), _Encoder._future),
    (lambda obj: isinstance(obj, enum.Enum), _Encoder._enum),
    (_is_identity_callable, _Encoder._callable),
    (lambda obj: isinstance(obj, types.ModuleType), _Encoder._module),
    (_is_numpy_array, _Encoder._numpy_array),
    (_is_numpy_scalar, _Encoder._numpy_scalar),
    (lambda obj: hasattr(type(obj), "__executorkit_cache_state__"), _Encoder._custom_state),
    (_is_dataclass_instance, _Encoder._dataclass),
    (lambda obj: isinstance(obj, pathlib.PurePath), _Encoder._path),
    (lambda obj: _stateless_subclass_base(obj) is not None, _Encoder._stateless_subclass),
]


def _special_writer(value: object) -> Any:
    for predicate, writer in _SPECIAL_WRITERS:
        if predicate(value):
            return writer
    return None
