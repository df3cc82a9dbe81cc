"""The public names of DESIGN §2 and the lazy import of optional dependencies."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_design_import_line_and_flux_says_why(monkeypatch):
    from executorkit import (  # noqa: F401
        FluxClusterExecutor,
        FluxJobExecutor,
        SingleNodeExecutor,
        SlurmClusterExecutor,
        SlurmJobExecutor,
        as_completed,
        get_cache_data,
        get_future_from_cache,
        get_item_from_future,
        split_future,
        terminate_tasks_in_cache,
    )
    from executorkit.errors import ExecutorkitError

    monkeypatch.delenv("FLUX_URI", raising=False)
    with pytest.raises(ExecutorkitError, match="Flux broker"):
        FluxJobExecutor()


def test_import_is_light():
    code = ("import sys, executorkit; "
            "print([m for m in ('h5py', 'pandas', 'mpi4py', 'flux', 'numpy') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]"
