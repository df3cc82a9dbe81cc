"""Module-level functions for the workflow export tests (importable by run_workflow)."""

from __future__ import annotations

from typing import Any


def add(x: Any, y: Any) -> Any:
    return x + y


def mul(x: Any, y: Any) -> Any:
    return x * y


def echo(value: Any) -> Any:
    return value


def scale(x: float, *, factor: float = 2.0) -> float:
    return x * factor


def combine(first: Any, /, second: Any, *rest: Any, **extra: Any) -> tuple[Any, ...]:
    return first, second, rest, extra


def split(x: float) -> dict[str, float]:
    return {"half": x / 2, "double": x * 2}


def fail(message: str) -> None:
    raise ValueError(message)


def collect(values: list[Any], scale: int = 1) -> list[Any]:
    return [v * scale for v in values]


# The Python Workflow Definition's arithmetic example (its functions return a dict of
# named outputs, which other nodes take with get_item_from_future).
def get_prod_and_div(x: float, y: float) -> dict[str, float]:
    return {"prod": x * y, "div": x / y}


def get_sum(x: float, y: float) -> float:
    return x + y


def get_square(x: float) -> float:
    return x**2


def min_max(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def array_stats(data: Any) -> list[Any]:
    return [type(data).__name__, str(data.dtype), list(data.shape), data.sum().item()]
