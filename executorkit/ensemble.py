"""Parameter sweeps: parameters and a relation in, one dict of arguments per call out.

The same sweep a spec file describes (``executorkit run SPEC``), from Python::

    from executorkit.ensemble import expand, linspace, submit_ensemble
    calls = expand({"a": linspace(0, 10, 5), "b": [1, 2]}, relation="many-to-many")
    futures = submit_ensemble(exe, "./exe -a {a} -b {b}", calls, resource_dict={"cores": 2})

``relation="one-to-one"`` zips the parameter lists (all of one length); ``"many-to-many"``
takes every combination (their product), first parameter slowest. Generators in spec files
are strings: ``"linspace(start, stop, num)"``, ``"logspace(start, stop, num)"`` (powers of
ten, as numpy's) and ``"range(start, stop[, step])"``.
"""

from __future__ import annotations

import ast
import itertools
import re
import shlex
import string
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any

from executorkit.command import Command

__all__ = ["RELATIONS", "expand", "generate", "linspace", "logspace", "render_command",
           "submit_ensemble"]

RELATIONS = ("one-to-one", "many-to-many")
GENERATORS = ("linspace", "logspace", "range")
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)
_NAME = re.compile(r"\w*")


def linspace(start: float, stop: float, num: int) -> list[float]:
    """``num`` evenly spaced values from ``start`` to ``stop`` inclusive (numpy's linspace)."""
    if num < 1:
        raise ValueError(f"linspace needs num >= 1, got {num}")
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    return [float(start + i * step) if i < num - 1 else float(stop) for i in range(num)]


def logspace(start: float, stop: float, num: int) -> list[float]:
    """``10 ** linspace(start, stop, num)`` (numpy's logspace)."""
    return [10.0 ** x for x in linspace(start, stop, num)]


_MAKERS: dict[str, Callable[..., list[Any]]] = {
    "linspace": linspace, "logspace": logspace, "range": lambda *a: list(range(*a)),
}


def generate(value: Any) -> list[Any]:
    """A parameter's values: a list as it is, a generator string expanded, a scalar alone.

    Raises ValueError naming the problem for an unknown generator or bad arguments.
    """
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty list of values")
        return list(value)
    if isinstance(value, str):
        match = _CALL.match(value)
        if match is None:
            return [value]
        name, text = match.groups()
        maker = _MAKERS.get(name)
        if maker is None:
            raise ValueError(f"unknown generator {name!r} in {value!r}; allowed: "
                             f"{', '.join(GENERATORS)}")
        try:
            args = ast.literal_eval(f"({text},)") if text.strip() else ()
            values = maker(*args)
        except (ValueError, TypeError, SyntaxError) as exc:
            raise ValueError(f"bad arguments in {value!r}: {exc}") from None
        if not values:
            raise ValueError(f"{value!r} gives no values")
        return values
    return [value]


def expand(parameters: Mapping[str, Any], relation: str = "many-to-many") -> list[dict[str, Any]]:
    """One dict of parameter values per call (see the module docstring)."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {', '.join(RELATIONS)}, got {relation!r}")
    names = list(parameters)
    columns = [generate(parameters[n]) for n in names]
    if not names:
        return [{}]
    if relation == "one-to-one":
        lengths = {n: len(c) for n, c in zip(names, columns, strict=True)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"relation 'one-to-one' needs parameters of one length, got "
                             f"{lengths}")
        rows = zip(*columns, strict=True)
    else:
        rows = itertools.product(*columns)
    return [dict(zip(names, row, strict=True)) for row in rows]


def template_fields(template: str) -> set[str]:
    """Names a command template refers to (``{a}``, ``{a:.3f}``, ``{a[0]}``); ``{{`` and
    ``}}`` are literal braces (``awk '{{print $1}}'``).

    Raises ValueError for unbalanced braces or a positional field (``{}``, ``{0}``): a
    template is filled in by name only.
    """
    names = set()
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{exc} in the template {template!r} (write {{{{ and }}}} for "
                         "literal braces)") from None
    for text in fields:
        name = _NAME.match(text).group()  # type: ignore[union-attr]  # \w* always matches
        if not name or name.isdigit():
            raise ValueError(f"the template {template!r} has a positional field "
                             f"{{{text}}}; name the parameter, as in {{a}}")
        names.add(name)
    return names


def render_command(template: str, values: Mapping[str, Any]) -> Command:
    """The Command of one call: the template split like a shell would, then filled in per
    argument (so a value with spaces stays one argument)."""
    return Command([word.format(**values) for word in shlex.split(template)])


def submit_ensemble(exe: Executor, what: str | Callable[..., Any],
                    calls: Sequence[Mapping[str, Any]],
                    resource_dict: Mapping[str, Any] | None = None) -> list[Future]:
    """Submit one call per dict of ``calls``: a command template filled in with the values,
    or a function called with them as keyword arguments."""
    futures = []
    for values in calls:
        if isinstance(what, str):
            futures.append(exe.submit(render_command(what, values),  # type: ignore[call-arg]
                                      resource_dict=resource_dict))
        else:
            futures.append(exe.submit(what, resource_dict=resource_dict,  # type: ignore[call-arg]
                                      **values))
    return futures
