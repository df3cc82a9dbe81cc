"""Sweep spec files: TOML, JSON (YAML when PyYAML is installed) -> :class:`Ensemble` objects.

Our layout (TOML shown; JSON and YAML have the same structure)::

    [ensembles.sweep]
    command = "./exe -a {a} -b {b}"        # or: function = "package.module:name"
    relation = "many-to-many"              # or "one-to-one"; default many-to-many
    cores = 2                              # any resource_dict key
    max_retries = 1
    retry_escalation = {run_time_max = 2}
    [ensembles.sweep.parameters]
    a = "linspace(0, 10, 5)"               # linspace, logspace, range, or a list
    b = [1, 2]

Ensemble Launcher's JSON layout is accepted as it is: an ensemble with ``cmd_template``
takes its parameters from the keys the template names, ``nnodes`` -> ``num_nodes`` and
``ppn`` (ranks per node) -> ``cores = nnodes * ppn``; its top-level scheduler settings
(``poll_interval``, ``update_interval``, ``sys_info``) are ignored.

Every problem is a :class:`SpecError` naming the file, the ensemble and the key.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from executorkit.ensemble import RELATIONS, expand, render_command, template_fields
from executorkit.errors import ExecutorkitError, ResourceError
from executorkit.resources import KEYS, parse

__all__ = ["Ensemble", "SpecError", "load_spec"]

_OWN_KEYS = {"command", "function", "parameters", "relation"}
_EL_KEYS = {"cmd_template", "relation", "nnodes", "ppn", "ngpus_per_process", "run_dir", "env"}
_EL_TOP = {"poll_interval", "update_interval", "sys_info"}


class SpecError(ExecutorkitError, ValueError):
    """A spec file is invalid; ``path``, ``ensemble`` and ``key`` say where."""

    def __init__(self, path: str, message: str, *, ensemble: str | None = None,
                 key: str | None = None) -> None:
        where = path
        if ensemble is not None:
            where += f": ensemble {ensemble!r}"
        if key is not None:
            where += f", key {key!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.ensemble, self.key = path, ensemble, key


@dataclass
class Ensemble:
    """One named sweep: a command template or a function, its calls and resources."""

    name: str
    calls: list[dict[str, Any]]
    command: str | None = None
    function: str | None = None
    resource_dict: dict[str, Any] = field(default_factory=dict)

    def target(self) -> Any:
        """The command template, or the imported function."""
        if self.command is not None:
            return self.command
        assert self.function is not None
        module, _, name = self.function.partition(":")
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj


def read_file(path: str) -> dict[str, Any]:
    """The file's top-level table, by its extension."""
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise SpecError(path, f"cannot read it: {exc.strerror}") from None
    try:
        if ext == ".toml":
            data = _toml().loads(raw.decode())
        elif ext == ".json":
            data = json.loads(raw)
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise SpecError(path, "YAML spec files need PyYAML (pip install pyyaml); or "
                                "write TOML or JSON") from None
            data = yaml.safe_load(raw)
        else:
            raise SpecError(path, f"unknown spec format {ext or '(no extension)'!r}; allowed: "
                            ".toml, .json, .yaml, .yml")
    except SpecError:
        raise
    except Exception as exc:  # each parser has its own error class
        raise SpecError(path, f"not valid {ext[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(path, "the top level must be a table/object with 'ensembles'")
    return data


def _toml() -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def load_spec(path: str) -> list[Ensemble]:
    data = read_file(path)
    unknown = set(data) - {"ensembles"} - _EL_TOP
    if unknown:
        raise SpecError(path, f"unknown top-level key(s) {sorted(unknown)}; allowed: "
                        "'ensembles' (and Ensemble Launcher's poll_interval, update_interval, "
                        "sys_info, which are ignored)", key=sorted(unknown)[0])
    ensembles = data.get("ensembles")
    if not isinstance(ensembles, dict) or not ensembles:
        raise SpecError(path, "needs a non-empty table 'ensembles' of named ensembles",
                        key="ensembles")
    base = os.path.dirname(os.path.abspath(path))
    return [_ensemble(path, base, name, body) for name, body in ensembles.items()]


def _ensemble(path: str, base: str, name: str, body: Any) -> Ensemble:
    if not isinstance(body, dict):
        raise SpecError(path, f"must be a table/object, got {type(body).__name__}",
                        ensemble=name)
    if "cmd_template" in body:
        command, function, parameters, resources = _launcher_layout(path, name, body)
    else:
        command, function, parameters, resources = _own_layout(path, name, body)
    relation = body.get("relation", "many-to-many")
    if relation not in RELATIONS:
        raise SpecError(path, f"must be one of {', '.join(RELATIONS)}, got {relation!r}",
                        ensemble=name, key="relation")
    if command is not None:
        _check_template(path, name, command, parameters)
    calls = []
    for key, value in parameters.items():  # checked one by one to name the bad key
        try:
            expand({key: value})
        except ValueError as exc:
            raise SpecError(path, str(exc), ensemble=name, key=key) from None
    try:
        calls = expand(parameters, relation)
    except ValueError as exc:
        raise SpecError(path, str(exc), ensemble=name, key="relation") from None
    if command is not None:
        key = "cmd_template" if "cmd_template" in body else "command"
        _check_rendering(path, name, key, command, calls)
    resources = _resources(path, base, name, resources)
    if command is not None:
        resources.setdefault("cwd", base)  # so "./exe" means the program beside the spec
    return Ensemble(name, calls, command, function, resources)


def _own_layout(path: str, name: str, body: dict[str, Any]) -> tuple[Any, ...]:
    allowed = _OWN_KEYS | KEYS
    for key in body:
        if key not in allowed:
            raise SpecError(path, f"unknown key; allowed: command or function, parameters, "
                            f"relation, and the resource keys {', '.join(sorted(KEYS))}",
                            ensemble=name, key=key)
    command, function = body.get("command"), body.get("function")
    if (command is None) == (function is None):
        raise SpecError(path, "give exactly one of 'command' (a template such as "
                        "\"./exe -a {a}\") and 'function' (\"package.module:name\")",
                        ensemble=name, key="command")
    if command is not None and (not isinstance(command, str) or not command.strip()):
        raise SpecError(path, "must be a non-empty command template string", ensemble=name,
                        key="command")
    if function is not None and (not isinstance(function, str) or ":" not in function):
        raise SpecError(path, f"must be \"package.module:name\", got {function!r}",
                        ensemble=name, key="function")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise SpecError(path, "must be a table mapping names to lists or generators",
                        ensemble=name, key="parameters")
    resources = {k: v for k, v in body.items() if k in KEYS}
    return command, function, parameters, resources


def _launcher_layout(path: str, name: str, body: dict[str, Any]) -> tuple[Any, ...]:
    command = body["cmd_template"]
    if not isinstance(command, str) or not command.strip():
        raise SpecError(path, "must be a non-empty command template string", ensemble=name,
                        key="cmd_template")
    named = _fields(path, name, "cmd_template", command)
    for key in body:
        if key not in _EL_KEYS and key not in named:
            raise SpecError(
                path, f"neither an Ensemble Launcher key ({', '.join(sorted(_EL_KEYS))}) nor "
                f"a parameter the cmd_template uses ({', '.join(sorted(named))})",
                ensemble=name, key=key)
    parameters = {k: v for k, v in body.items() if k in named}
    resources: dict[str, Any] = {}
    nnodes, ppn = body.get("nnodes", 1), body.get("ppn", 1)
    for key, value in (("nnodes", nnodes), ("ppn", ppn)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(path, f"must be a positive int, got {value!r}", ensemble=name,
                            key=key)
    if "nnodes" in body:
        resources["num_nodes"] = nnodes
    resources["cores"] = nnodes * ppn
    if "ngpus_per_process" in body:
        resources["gpus_per_core"] = body["ngpus_per_process"]
    if "run_dir" in body:
        resources["cwd"] = body["run_dir"]
    if "env" in body:
        resources["env"] = body["env"]
    return command, None, parameters, resources


def _fields(path: str, name: str, key: str, command: str) -> set[str]:
    try:
        return template_fields(command)
    except ValueError as exc:
        raise SpecError(path, str(exc), ensemble=name, key=key) from None


def _check_template(path: str, name: str, command: str, parameters: dict[str, Any]) -> None:
    named = _fields(path, name, "command", command) - {"index"}
    missing = named - set(parameters)
    if missing:
        raise SpecError(path, f"the command template uses {sorted(missing)} but no such "
                        f"parameter is defined (defined: {sorted(parameters)})",
                        ensemble=name, key=sorted(missing)[0])
    unused = set(parameters) - named
    if unused:
        raise SpecError(path, "parameter is not used by the command template "
                        f"{command!r}", ensemble=name, key=sorted(unused)[0])


def _check_rendering(path: str, name: str, key: str, command: str,
                     calls: list[dict[str, Any]]) -> None:
    """Fill the template in for every call now, so a field that does not fit its values
    (``{a[0]}`` of a number, ``{a:d}`` of a float, an unclosed quote) is an error of the
    spec before anything runs, not a crash halfway through the submissions."""
    for index, values in enumerate(calls):
        try:
            render_command(command, {**values, "index": index})
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise SpecError(path, f"the command template {command!r} cannot be filled in "
                            f"for call {index} {values}: {type(exc).__name__}: {exc}",
                            ensemble=name, key=key) from None


def _resources(path: str, base: str, name: str, resources: dict[str, Any]) -> dict[str, Any]:
    out = dict(resources)
    if "retry_on" in out:
        out["retry_on"] = tuple(_exception(path, name, n) for n in _as_list(out["retry_on"]))
    if isinstance(out.get("cwd"), str):
        out["cwd"] = os.path.join(base, out["cwd"])  # relative to the spec file
    try:
        parse(out)
    except ResourceError as exc:
        raise SpecError(path, str(exc), ensemble=name, key=exc.key) from None
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _exception(path: str, name: str, text: Any) -> type[BaseException]:
    """``"TimeoutError"`` (a builtin) or ``"package.module:Name"``."""
    import builtins

    if isinstance(text, str):
        module, _, attr = text.rpartition(":")
        try:
            obj = getattr(importlib.import_module(module) if module else builtins, attr)
        except (ImportError, AttributeError):
            obj = None
        if isinstance(obj, type) and issubclass(obj, BaseException):
            return obj
    raise SpecError(path, f"{text!r} is not an exception class; write a builtin name "
                    "(\"OSError\") or \"package.module:Name\"", ensemble=name, key="retry_on")
