"""Tests of executorkit.resources: parse/merge of resource_dict and Capabilities.check."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

import executorkit.cache
from executorkit.errors import ExecutorkitError, ResourceError
from executorkit.resources import KEYS, Capabilities, Resources, merge, parse

ALL_KEYS = {
    "cores", "threads_per_core", "gpus_per_core", "cwd", "env", "cache_key",
    "cache_directory", "num_nodes", "exclusive", "error_log_file", "run_time_max",
    "priority", "slurm_cmd_args", "max_retries", "retry_escalation", "retry_on",
    "submission_template",
}


@contextlib.contextmanager
def raises_resource_error(key: str) -> Iterator[pytest.ExceptionInfo[ResourceError]]:
    """Expect a ResourceError (also a ValueError) whose ``key`` is ``key``."""
    with pytest.raises(ResourceError) as info:
        yield info
    exc = info.value
    assert isinstance(exc, ValueError)
    assert isinstance(exc, ExecutorkitError)
    assert exc.key == key, (exc.key, str(exc))
    assert exc.allowed


# --------------------------------------------------------------------------- parse: valid
def test_keys_constant() -> None:
    assert set(KEYS) == ALL_KEYS


def test_none_and_empty_give_the_base() -> None:
    base = parse({"cores": 2})
    assert parse(None) == Resources()
    assert parse({}) == Resources()
    assert parse(None, base) is base
    assert parse({}, base) is base


def test_accepts_a_full_valid_dict(tmp_path: Path) -> None:
    spec = {
        "cores": 2,
        "threads_per_core": 3,
        "gpus_per_core": 1,
        "cwd": str(tmp_path),
        "env": {"B": "2", "A": "1"},
        "cache_key": "result-1.v2_x",
        "cache_directory": tmp_path / "cache",
        "num_nodes": 1,
        "exclusive": True,
        "error_log_file": str(tmp_path / "err.log"),
        "run_time_max": 30,
        "priority": -4,
        "slurm_cmd_args": ["--mem=4G", "--partition=debug"],
    }
    res = parse(spec)
    assert res.cores == 2
    assert res.threads_per_core == 3
    assert res.gpus_per_core == 1
    assert res.cpus == 6
    assert res.gpus == 2
    assert res.cwd == str(tmp_path)
    assert res.env == (("A", "1"), ("B", "2"))  # sorted tuple: hashable
    assert res.cache_key == "result-1.v2_x"
    assert res.cache_directory == str(tmp_path / "cache")
    assert res.num_nodes == 1
    assert res.exclusive is True
    assert res.error_log_file == str(tmp_path / "err.log")
    assert res.run_time_max == 30.0
    assert isinstance(res.run_time_max, float)
    assert res.priority == -4
    assert res.slurm_cmd_args == ("--mem=4G", "--partition=debug")
    assert res.given == frozenset(spec)
    hash(res)  # frozen and hashable


def test_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = parse({"cwd": "sub", "error_log_file": Path("logs") / "e.txt"})
    assert res.cwd == os.path.join(str(tmp_path), "sub")
    assert res.error_log_file == os.path.join(str(tmp_path), "logs", "e.txt")


def test_accepts_any_mapping() -> None:
    res = parse(MappingProxyType({"cores": 3}))
    assert res.cores == 3
    res2 = parse({"env": MappingProxyType({"X": "y"})})
    assert res2.env == (("X", "y"),)


def test_float_run_time_and_zero_gpus() -> None:
    res = parse({"run_time_max": 0.5, "gpus_per_core": 0, "priority": 0})
    assert res.run_time_max == 0.5
    assert res.gpus_per_core == 0


def test_slurm_args_tuple_accepted() -> None:
    assert parse({"slurm_cmd_args": ("--a", "--b")}).slurm_cmd_args == ("--a", "--b")
    assert parse({"slurm_cmd_args": []}).slurm_cmd_args == ()


def test_as_dict_gives_back_the_explicit_keys() -> None:
    res = parse({"env": {"A": "1"}, "slurm_cmd_args": ["--x"], "cores": 2})
    assert res.as_dict() == {"cores": 2, "env": {"A": "1"}, "slurm_cmd_args": ["--x"]}


# --------------------------------------------------------------------------- parse: errors
def test_unknown_key_names_the_key_and_lists_allowed() -> None:
    with raises_resource_error("corez") as check:
        parse({"cores": 1, "corez": 2})
    message = str(check.value)
    assert "'corez'" in message
    for key in ALL_KEYS:
        assert key in message
        assert key in check.value.allowed


def test_unknown_non_str_key() -> None:
    with raises_resource_error("7"):
        parse({7: 1})


def test_not_a_mapping() -> None:
    with raises_resource_error("resource_dict"):
        parse([("cores", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cores", True),
        ("cores", False),
        ("cores", "2"),
        ("cores", 2.0),
        ("cores", 0),
        ("cores", -1),
        ("cores", None),
        ("threads_per_core", True),
        ("threads_per_core", 0),
        ("threads_per_core", "1"),
        ("gpus_per_core", -1),
        ("gpus_per_core", True),
        ("gpus_per_core", 1.0),
        ("num_nodes", 0),
        ("num_nodes", True),
        ("num_nodes", "1"),
        ("run_time_max", math.inf),
        ("run_time_max", -math.inf),
        ("run_time_max", math.nan),
        ("run_time_max", 0),
        ("run_time_max", -5),
        ("run_time_max", True),
        ("run_time_max", "10"),
        ("priority", True),
        ("priority", 1.5),
        ("priority", "high"),
        ("exclusive", 1),
        ("exclusive", "yes"),
        ("exclusive", None),
        ("env", {"A": 1}),
        ("env", {"A": None}),
        ("env", {"A=B": "x"}),
        ("env", {"": "x"}),
        ("env", {1: "x"}),
        ("env", [("A", "1")]),
        ("env", "A=1"),
        ("slurm_cmd_args", "--mem=4G --partition=debug"),
        ("slurm_cmd_args", ["--mem", 4]),
        ("slurm_cmd_args", {"--mem": "4G"}),
        ("cwd", ""),
        ("cwd", 5),
        ("cwd", b"/tmp"),
        ("cache_directory", ""),
        ("error_log_file", None),
        ("cache_key", ""),
        ("cache_key", 5),
    ],
)
def test_wrong_values_rejected(key: str, value: Any) -> None:
    spec = {key: value}
    before = copy.deepcopy(spec)
    with raises_resource_error(key):
        parse(spec)
    assert spec == before


def test_error_message_mentions_the_value() -> None:
    with raises_resource_error("cores") as check:
        parse({"cores": True})
    assert "True" in str(check.value)
    assert "cores" in str(check.value)


def test_single_string_slurm_args_explains_the_fix() -> None:
    with raises_resource_error("slurm_cmd_args") as check:
        parse({"slurm_cmd_args": "--mem=4G"})
    assert "list" in str(check.value)


def test_cache_key_path_traversal_rejected() -> None:
    for bad in ("../x", "a/../b", "/abs", ".hidden", "x" * 201, "sp ace"):
        with raises_resource_error("cache_key"):
            parse({"cache_key": bad})


def test_cache_key_validation_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_validate(key: str) -> str:
        seen.append(key)
        raise ResourceError("nope", key="cache_key", allowed="nothing")

    monkeypatch.setattr(executorkit.cache, "validate_cache_key", fake_validate)
    with raises_resource_error("cache_key"):
        parse({"cache_key": "perfectly-fine"})
    assert seen == ["perfectly-fine"]


def test_cache_key_not_validated_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(key: str) -> str:
        raise AssertionError("must not be called")

    monkeypatch.setattr(executorkit.cache, "validate_cache_key", fail)
    assert parse({"cores": 1}).cache_key is None


# --------------------------------------------------------------------------- merge / given
def test_merge_is_key_by_key() -> None:
    defaults = parse({"cores": 2, "env": {"A": "1"}, "priority": 3})
    res = merge(defaults, {"threads_per_core": 2, "priority": 5})
    assert res.cores == 2  # from the defaults
    assert res.env == (("A", "1"),)  # from the defaults
    assert res.threads_per_core == 2  # from the call
    assert res.priority == 5  # the call wins
    assert res.given == {"cores", "env", "priority", "threads_per_core"}
    # A key given per call replaces the default's value as a whole (no deep merge).
    res_env = merge(defaults, {"env": {"B": "2"}})
    assert res_env.env == (("B", "2"),)
    # The defaults object is unchanged.
    assert defaults.priority == 3
    assert defaults.threads_per_core == 1
    assert defaults.given == {"cores", "env", "priority"}


def test_merge_none_returns_the_defaults() -> None:
    defaults = parse({"cores": 2})
    assert merge(defaults, None) is defaults
    assert merge(defaults, {}) is defaults


def test_given_records_explicit_keys_even_when_equal_to_the_default() -> None:
    res = parse({"exclusive": False, "cores": 1})
    assert res == Resources()  # same values ...
    assert res.given == {"exclusive", "cores"}  # ... but known to be explicit
    assert Resources().given == frozenset()


def test_given_is_a_frozenset() -> None:
    res = parse({"cores": 2})
    assert isinstance(res.given, frozenset)


def test_user_dict_is_never_mutated(tmp_path: Path) -> None:
    spec: dict[str, Any] = {
        "cores": 2,
        "env": {"Z": "1", "A": "2"},
        "slurm_cmd_args": ["--b", "--a"],
        "cwd": "relative/dir",
        "cache_key": "k1",
        "run_time_max": 3,
    }
    before = copy.deepcopy(spec)
    env, args = spec["env"], spec["slurm_cmd_args"]
    defaults = parse({"priority": 1, "env": {"D": "d"}})
    res = merge(defaults, spec)
    assert spec == before
    assert list(spec["env"]) == ["Z", "A"]  # not re-ordered either
    assert spec["env"] is env
    assert spec["slurm_cmd_args"] is args
    assert spec["cwd"] == "relative/dir"
    # Nor does the result alias the user's containers.
    env["NEW"] = "x"
    args.append("--c")
    assert res.env == (("A", "2"), ("Z", "1"))
    assert res.slurm_cmd_args == ("--b", "--a")


def test_user_dict_not_mutated_when_parse_fails() -> None:
    spec = {"cores": 2, "env": {"A": "1"}, "bogus": 1}
    before = copy.deepcopy(spec)
    with pytest.raises(ResourceError):
        parse(spec)
    assert spec == before


def test_resources_is_frozen() -> None:
    res = parse({"cores": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.cores = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- Capabilities
def caps(**kwargs: Any) -> Capabilities:
    base: dict[str, Any] = {"backend": "TestExecutor", "max_cpus": 8, "max_gpus": 2}
    base.update(kwargs)
    return Capabilities(**base)


def test_check_accepts_what_fits() -> None:
    c = caps()
    for spec in (
        {"cores": 8},
        {"cores": 2, "threads_per_core": 4},
        {"cores": 2, "gpus_per_core": 1},
        {"num_nodes": 1},
        {},
    ):
        res = parse(spec)
        assert c.check(res) is res


def test_unsupported_key_rejected_with_reason() -> None:
    c = caps(unsupported={"slurm_cmd_args": "it is for Slurm executors only"})
    with raises_resource_error("slurm_cmd_args") as check:
        c.check(parse({"slurm_cmd_args": ["--x"]}))
    assert "it is for Slurm executors only" in str(check.value)
    assert "TestExecutor" in str(check.value)


def test_unsupported_key_rejected_even_with_default_value() -> None:
    c = caps(unsupported={"exclusive": "workers have a fixed size"})
    with raises_resource_error("exclusive"):
        c.check(parse({"exclusive": False}))
    # Not given explicitly: fine.
    res = parse({"cores": 1})
    assert c.check(res) is res


def test_cpus_are_cores_times_threads() -> None:
    c = caps(max_cpus=8)
    with raises_resource_error("cores") as check:
        c.check(parse({"cores": 3, "threads_per_core": 3}))  # 9 > 8
    assert "9" in str(check.value)
    with raises_resource_error("cores"):
        c.check(parse({"cores": 9}))
    assert c.check(parse({"cores": 4, "threads_per_core": 2})).cpus == 8


def test_gpus_are_cores_times_gpus_per_core() -> None:
    c = caps(max_gpus=2)
    with raises_resource_error("gpus_per_core"):
        c.check(parse({"cores": 3, "gpus_per_core": 1}))  # 3 > 2
    with raises_resource_error("gpus_per_core"):
        c.check(parse({"gpus_per_core": 3}))
    assert c.check(parse({"cores": 2, "gpus_per_core": 1})).gpus == 2


def test_gpus_rejected_on_a_cpu_only_executor() -> None:
    c = caps(max_gpus=0)
    with raises_resource_error("gpus_per_core"):
        c.check(parse({"gpus_per_core": 1}))


def test_per_task_limits() -> None:
    c = caps(max_cpus=8, max_gpus=4, per_task_cpus=2, per_task_gpus=1)
    with raises_resource_error("cores") as check:
        c.check(parse({"cores": 3}))  # fits the pool, not one worker
    assert "one worker" in str(check.value)
    with raises_resource_error("cores"):
        c.check(parse({"threads_per_core": 3}))
    with raises_resource_error("gpus_per_core"):
        c.check(parse({"cores": 2, "gpus_per_core": 1}))  # 2 > 1 per worker
    res = parse({"cores": 2, "gpus_per_core": 0})
    assert c.check(res) is res


def test_num_nodes_limit() -> None:
    c = caps(max_nodes=2)
    with raises_resource_error("num_nodes"):
        c.check(parse({"num_nodes": 3}))
    assert c.check(parse({"num_nodes": 2})).num_nodes == 2
    with raises_resource_error("num_nodes"):
        caps().check(parse({"num_nodes": 2}))  # default max_nodes is 1


def test_check_uses_merged_defaults() -> None:
    c = caps(max_cpus=4)
    defaults = parse({"threads_per_core": 2})
    with raises_resource_error("cores"):
        c.check(merge(defaults, {"cores": 3}))  # 3 x 2 = 6 > 4
    assert c.check(merge(defaults, {"cores": 2})).cpus == 4


def test_capabilities_unsupported_is_a_mapping() -> None:
    assert isinstance(caps().unsupported, Mapping)
    assert dict(caps().unsupported) == {}


@pytest.mark.parametrize("seconds", [1e300, 366 * 86400, math.inf, 0])
def test_run_time_max_beyond_a_year_is_rejected(seconds: float) -> None:
    with raises_resource_error("run_time_max") as info:
        parse({"run_time_max": seconds})
    assert "365 days" in str(info.value) and "31536000" in info.value.allowed


def test_run_time_max_of_30_days_is_accepted() -> None:
    assert parse({"run_time_max": 30 * 86400}).run_time_max == 30 * 86400.0


@pytest.mark.parametrize("env", [{"GOOD": "x", "BAD": "a\0b"}, {"BAD\0": "x"}])
def test_env_with_a_nul_byte_is_rejected_naming_the_variable(env: dict) -> None:
    with raises_resource_error("env") as info:
        parse({"env": env})
    assert "BAD" in str(info.value) and "NUL" in str(info.value)
    assert "GOOD" not in str(info.value)
