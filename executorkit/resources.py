"""The validated, frozen form of ``resource_dict`` and the merge of defaults.

A user's dict is read once, at ``submit``, into a :class:`Resources` object that nothing can
change afterwards; every later layer receives that object. The dicts themselves are never
mutated or kept.

Validation has two halves. :func:`parse` checks what any backend would reject: unknown keys,
wrong types, zero or negative counts. :class:`Capabilities` (one per executor) then checks
what *this* executor can grant: keys it cannot honour and requests larger than its pool. Both
raise :class:`~executorkit.errors.ResourceError` naming the key and the allowed values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from executorkit.errors import GpuPoolError, ResourceError

__all__ = ["ALIASES", "ESCALATABLE", "EXECUTOR_SETTINGS", "KEYS", "Capabilities", "Resources",
           "merge", "parse"]


@dataclass(frozen=True, slots=True)
class Resources:
    """What one call asks for. ``env`` and ``slurm_cmd_args`` are tuples so the object hashes."""

    cores: int = 1
    threads_per_core: int = 1
    gpus_per_core: int = 0
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cache_key: str | None = None
    cache_directory: str | None = None
    num_nodes: int | None = None
    exclusive: bool = False
    error_log_file: str | None = None
    run_time_max: float | None = None
    priority: int = 0
    slurm_cmd_args: tuple[str, ...] = ()
    max_retries: int = 0
    retry_escalation: tuple[tuple[str, float], ...] = ()
    retry_on: tuple[type[BaseException], ...] = ()
    submission_template: str | None = None
    # Keys the user set explicitly, so a backend can reject what it cannot honour even when
    # the value equals the default (``exclusive=False`` is harmless, ``num_nodes=1`` is not
    # always).
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def cpus(self) -> int:
        """CPUs this call occupies: one per thread of every rank."""
        return self.cores * self.threads_per_core

    @property
    def gpus(self) -> int:
        return self.cores * self.gpus_per_core

    def as_dict(self) -> dict[str, Any]:
        """The explicitly given keys as a plain dict (for the cache record and for display)."""
        out: dict[str, Any] = {}
        for name in sorted(self.given):
            value = getattr(self, name)
            if name in ("env", "retry_escalation"):
                value = dict(value)
            elif name == "retry_on":
                value = [f"{c.__module__}.{c.__qualname__}" for c in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResourceError(
            f"resource_dict[{key!r}] must be a positive int, got {value!r} "
            f"({type(value).__name__})",
            key=key, allowed="a positive int",
        )
    if value < 1:
        raise ResourceError(
            f"resource_dict[{key!r}] must be >= 1, got {value}", key=key, allowed="a positive int"
        )
    return value


def _non_negative_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ResourceError(
            f"resource_dict[{key!r}] must be an int >= 0, got {value!r}",
            key=key, allowed="an int >= 0",
        )
    return value


def _path(key: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ResourceError(
            f"resource_dict[{key!r}] must be a non-empty path (str or os.PathLike), "
            f"got {value!r}",
            key=key, allowed="a path",
        )
    return os.path.abspath(os.fspath(value))


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ResourceError(
            f"resource_dict[{key!r}] must be True or False, got {value!r}",
            key=key, allowed="True or False",
        )
    return value


_ENV_ALLOWED = "a dict[str, str]: names non-empty, without '=' or NUL; values without NUL"


def _env(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str)
        for k, v in value.items()
    ):
        raise ResourceError(
            f"resource_dict[{key!r}] must map variable names (no '=') to str values, "
            f"got {value!r}",
            key=key, allowed=_ENV_ALLOWED,
        )
    for name, text in value.items():
        # execve() cannot pass a NUL: the task's process would fail to start, far from here.
        if "\0" in name or "\0" in text:
            where = "name" if "\0" in name else "value"
            raise ResourceError(
                f"resource_dict[{key!r}][{name!r}]: the variable's {where} contains a NUL "
                "byte, which no environment variable can hold",
                key=key, allowed=_ENV_ALLOWED,
            )
    return tuple(sorted(value.items()))


# One year. A wait longer than the OS timers allow (about 24.8 days for epoll) is split by
# the engine; beyond a year (and Slurm's --time in minutes) a limit is surely a mistake.
RUN_TIME_MAX_LIMIT = 365 * 24 * 3600.0


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        value > 0 and math.isfinite(value) and value <= RUN_TIME_MAX_LIMIT
    ):
        raise ResourceError(
            f"resource_dict[{key!r}] must be a positive number of seconds up to "
            f"{RUN_TIME_MAX_LIMIT:.0f} (365 days), got {value!r}",
            key=key, allowed=f"a number of seconds in (0, {RUN_TIME_MAX_LIMIT:.0f}]",
        )
    return float(value)


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResourceError(
            f"resource_dict[{key!r}] must be an int, got {value!r}", key=key, allowed="an int"
        )
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ResourceError(
            f"resource_dict[{key!r}] must be a non-empty str, got {value!r}",
            key=key, allowed="a non-empty str",
        )
    return value


def _args(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ResourceError(
            f"resource_dict[{key!r}] must be a list of separate arguments, not one str "
            f"({value!r}); write e.g. ['--mem=4G', '--partition=debug']",
            key=key, allowed="a list of str",
        )
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise ResourceError(
            f"resource_dict[{key!r}] must be a list of str, got {value!r}",
            key=key, allowed="a list of str",
        )
    return tuple(value)


ESCALATABLE = ("cores", "threads_per_core", "gpus_per_core", "run_time_max")


def _escalation(key: str, value: Any) -> tuple[tuple[str, float], ...]:
    allowed = f"a dict mapping {', '.join(ESCALATABLE)} to a factor >= 1"
    if not isinstance(value, Mapping):
        raise ResourceError(f"resource_dict[{key!r}] must be a dict, got {value!r}", key=key,
                            allowed=allowed)
    for name, factor in value.items():
        if name not in ESCALATABLE:
            raise ResourceError(
                f"resource_dict[{key!r}] cannot escalate {name!r}; escalatable keys: "
                f"{', '.join(ESCALATABLE)}", key=key, allowed=allowed)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
                factor >= 1 and math.isfinite(factor)):
            raise ResourceError(
                f"resource_dict[{key!r}][{name!r}] must be a factor >= 1, got {factor!r}",
                key=key, allowed=allowed)
    return tuple(sorted((name, float(f)) for name, f in value.items()))


def _exception_types(key: str, value: Any) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, (list, tuple)) else (value,)
    if not all(isinstance(c, type) and issubclass(c, BaseException) for c in items):
        raise ResourceError(
            f"resource_dict[{key!r}] must be an exception class or a tuple of them, got "
            f"{value!r}", key=key, allowed="a tuple of exception classes")
    return tuple(items)


_CHECKS = {
    "cores": _positive_int,
    "threads_per_core": _positive_int,
    "gpus_per_core": _non_negative_int,
    "cwd": _path,
    "env": _env,
    "cache_key": _str,
    "cache_directory": _path,
    "num_nodes": _positive_int,
    "exclusive": _bool,
    "error_log_file": _path,
    "run_time_max": _seconds,
    "priority": _int,
    "slurm_cmd_args": _args,
    "max_retries": _non_negative_int,
    "retry_escalation": _escalation,
    "retry_on": _exception_types,
    "submission_template": _str,
}
KEYS = frozenset(_CHECKS)
assert {f.name for f in fields(Resources)} - {"given"} == KEYS

# executorlib's names for the same thing (its newer versions): read as our key, so a
# migrated script keeps working. "timeout" fails the call with a TimeoutError after that
# many seconds there too (executorlib stops waiting; executorkit also stops the process).
ALIASES = {"timeout": "run_time_max", "run_time_limit": "run_time_max"}
# Keys of executorlib's resource_dict that are executor settings here (see BaseExecutor).
EXECUTOR_SETTINGS = ("restart_limit",)


def _unknown_key_error(key: object) -> ResourceError:
    allowed = ", ".join(sorted(KEYS))
    if key in EXECUTOR_SETTINGS:
        return ResourceError(
            f"resource_dict[{key!r}] is a setting of the whole executor (its workers serve "
            f"every call): give it in the executor's resource_dict or as {key}=..., not per "
            f"call", key=str(key), allowed="the executor's resource_dict or parameter")
    return ResourceError(
        f"unknown resource_dict key {key!r}; allowed keys: {allowed}", key=str(key),
        allowed=allowed,
    )


def parse(resource_dict: Mapping[str, Any] | None, base: Resources = Resources()) -> Resources:
    """Check ``resource_dict`` and lay it over ``base``, key by key."""
    if resource_dict is None:
        return base
    if not isinstance(resource_dict, Mapping):
        raise ResourceError(
            f"resource_dict must be a dict, got {type(resource_dict).__name__}",
            key="resource_dict", allowed="a dict or None",
        )
    if not resource_dict:
        return base
    changes: dict[str, Any] = {}
    for alias, value in resource_dict.items():
        key = ALIASES.get(alias, alias)
        if key in changes or (key != alias and key in resource_dict):
            raise ResourceError(
                f"resource_dict gives {key!r} twice (as {alias!r} and another of its names, "
                f"executorlib's or ours); give one of them", key=alias,
                allowed=f"one of {key!r}, " + ", ".join(repr(a) for a in ALIASES
                                                       if ALIASES[a] == key))
        check = _CHECKS.get(key)
        if check is None:
            raise _unknown_key_error(key)
        changes[key] = check(alias, value)  # errors name the key as the user wrote it
    if "cache_key" in changes:
        # Imported here: the key rules live with the cache, and the cache imports this module.
        from executorkit.cache import validate_cache_key

        validate_cache_key(changes["cache_key"])
    return replace(base, **changes, given=base.given | frozenset(changes))


def merge(defaults: Resources, resource_dict: Mapping[str, Any] | None) -> Resources:
    """Per-call dict over executor defaults (an alias that reads well at call sites)."""
    return parse(resource_dict, defaults)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one executor can grant; ``check`` rejects everything else at ``submit``.

    ``unsupported`` maps a key to the reason this backend cannot honour it.
    ``max_cpus``/``max_gpus`` are the whole pool; ``per_task_cpus`` (block allocation) is the
    most one call can get, the size of one worker.
    """

    backend: str
    max_cpus: int
    max_gpus: int
    unsupported: Mapping[str, str] = field(default_factory=dict)
    per_task_cpus: int | None = None
    per_task_gpus: int | None = None
    max_nodes: int = 1
    batch_scripts: bool = False  # the backend writes a batch script (submission_template)

    def check(self, res: Resources) -> Resources:
        if "submission_template" in res.given and not self.batch_scripts:
            raise ResourceError(
                f"{self.backend} cannot honour resource_dict['submission_template']: only "
                "executors that submit batch jobs (SlurmClusterExecutor) write a job script",
                key="submission_template", allowed="SlurmClusterExecutor only")
        for key in res.given:
            reason = self.unsupported.get(key)
            if reason is not None:
                raise ResourceError(
                    f"{self.backend} cannot honour resource_dict[{key!r}]: {reason}", key=key,
                    allowed=f"keys other than {key!r} on {self.backend}",
                )
        if self.per_task_cpus is not None:
            _check_fixed_size_escalation(self.backend, res)
        limit = self.per_task_cpus if self.per_task_cpus is not None else self.max_cpus
        if res.cpus > limit:
            what = "one worker has" if self.per_task_cpus is not None else "the executor has"
            raise ResourceError(
                f"the call asks for cores x threads_per_core = {res.cores} x "
                f"{res.threads_per_core} = {res.cpus} CPUs but {what} {limit}",
                key="cores", allowed=f"cores * threads_per_core <= {limit}",
            )
        glimit = self.per_task_gpus if self.per_task_gpus is not None else self.max_gpus
        if res.gpus > glimit:
            raise GpuPoolError(
                f"the call asks for cores x gpus_per_core = {res.cores} x {res.gpus_per_core} "
                f"= {res.gpus} GPUs but {glimit} can be granted (declare the pool with "
                f"max_gpus=...)",
                key="gpus_per_core", allowed=f"cores * gpus_per_core <= {glimit}",
            )
        if res.num_nodes is not None and res.num_nodes > self.max_nodes:
            raise ResourceError(
                f"resource_dict['num_nodes']={res.num_nodes} but {self.backend} has "
                f"{self.max_nodes} node(s)",
                key="num_nodes", allowed=f"1..{self.max_nodes}",
            )
        return res


def _check_fixed_size_escalation(backend: str, res: Resources) -> None:
    """Block-allocation workers have a fixed size: a retry can get more time, never more
    cores, threads or GPUs (escalating them would silently run the same attempt again)."""
    sized = [key for key, _ in res.retry_escalation if key != "run_time_max"]
    if sized:
        raise ResourceError(
            f"{backend} with block_allocation=True cannot escalate {', '.join(sized)} on a "
            f"retry: its workers have a fixed size (escalate run_time_max only, or use "
            f"per-task processes)", key="retry_escalation",
            allowed="{'run_time_max': factor} with block_allocation=True")
