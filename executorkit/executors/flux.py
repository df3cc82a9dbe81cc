"""Flux executors: not available in this version.

They are part of the public API (so ``from executorkit import FluxJobExecutor`` works and
code can be written against it), but executorkit only ships executor code that is tested
against a real Flux broker, and none was reachable where this version was built.
"""

from __future__ import annotations

from typing import Any

from executorkit.errors import ExecutorkitError


class FluxUnavailableError(ExecutorkitError):
    """Raised when a Flux executor is created in this version."""


class _NotYet:
    _name = "FluxExecutor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise FluxUnavailableError(
            f"{self._name} is not available in this version of executorkit (it has not been "
            f"tested against a Flux broker yet); use SingleNodeExecutor, SlurmJobExecutor or "
            f"SlurmClusterExecutor")


class FluxJobExecutor(_NotYet):
    """Calls as jobs in the current Flux instance (not available yet)."""

    _name = "FluxJobExecutor"


# FluxClusterExecutor lives in its own module (file-based batch jobs, shared with Slurm).
from executorkit.executors.flux_cluster import FluxClusterExecutor  # noqa: E402

__all__ = ["FluxClusterExecutor", "FluxJobExecutor"]
