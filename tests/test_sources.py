"""Source lines of driver-only code (notebook cells) in a worker's traceback."""

from __future__ import annotations

import functools
import linecache

import cloudpickle

from executorkit._sources import DYNAMIC_FILENAME, fill_source_lines

CELL = "<cell-executorkit-sources>"
SOURCE = (
    "def helper(x):\n"
    "    return 1 / x\n"
    "\n"
    "def task(x):\n"
    "    y = helper(x)\n"
    "    return y\n"
)


def _cell_functions(filename: str = CELL, source: str = SOURCE) -> dict:
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def _frame(filename: str, line: int, name: str) -> str:
    return f'  File "{filename}", line {line}, in {name}\n'


def test_cloudpickle_renames_dynamic_code_and_keeps_lines():
    """What the mapping relies on: line numbers and names survive; the file name may not."""
    ns = _cell_functions()
    rebuilt = cloudpickle.loads(cloudpickle.dumps(ns["task"]))
    assert rebuilt.__code__.co_firstlineno == 4
    assert rebuilt.__code__.co_name == "task"
    assert rebuilt.__code__.co_filename in (CELL, DYNAMIC_FILENAME)


def test_dynamic_code_frames_are_mapped_back_through_the_task_function():
    ns = _cell_functions()
    text = ("Traceback (most recent call last):\n" + _frame(DYNAMIC_FILENAME, 5, "task")
            + _frame(DYNAMIC_FILENAME, 2, "helper") + "ZeroDivisionError: division by zero\n")
    filled = fill_source_lines(text, ns["task"])
    assert "    y = helper(x)\n" in filled
    assert "    return 1 / x\n" in filled


def test_original_file_names_still_work_without_the_function():
    """cloudpickle < 3.1.3 keeps the cell's name: the driver's linecache alone suffices."""
    _cell_functions()
    filled = fill_source_lines(_frame(CELL, 2, "helper"))
    assert "    return 1 / x\n" in filled


def test_an_ambiguous_dynamic_frame_is_left_without_source():
    """Two cells define ``helper`` over the same lines: no guess."""
    first = _cell_functions()
    other = SOURCE.replace("1 / x", "2 / x")
    second = _cell_functions("<cell-executorkit-other>", other)

    def both(x):
        return first["task"](x) + second["task"](x)

    filled = fill_source_lines(_frame(DYNAMIC_FILENAME, 2, "helper"), both)
    assert filled == _frame(DYNAMIC_FILENAME, 2, "helper")


def test_frames_the_worker_showed_are_left_alone():
    ns = _cell_functions()
    text = _frame(DYNAMIC_FILENAME, 5, "task") + "    shown by the worker\n"
    assert fill_source_lines(text, ns["task"]) == text


def test_methods_closures_and_partials_are_reached():
    source = (
        "class Model:\n"
        "    def run(self, x):\n"
        "        return x.missing\n"
        "def make():\n"
        "    def inner(x):\n"
        "        return Model().run(x)\n"
        "    return inner\n"
    )
    ns = _cell_functions("<cell-executorkit-methods>", source)
    task = functools.partial(ns["make"](), 1)
    filled = fill_source_lines(_frame(DYNAMIC_FILENAME, 3, "run"), task)
    assert "    return x.missing\n" in filled
