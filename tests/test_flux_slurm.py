"""Flux inside Slurm, the way many centres run it: ``srun ... flux start`` in an allocation.

Runs outside any Flux instance (in the main test run), so it is marked ``slurm`` only.
"""

from __future__ import annotations

import os
import subprocess
import sys

import capabilities
import pytest


@pytest.mark.slurm
def test_flux_inside_a_slurm_allocation(tmp_path):
    """The recipe of docs/backends/flux.md: ``srun ... flux start`` inside an allocation, and a
    FluxJobExecutor script in that instance."""
    capabilities.require("slurm")
    capabilities.require("flux")
    script = tmp_path / "campaign.py"
    script.write_text(
        "from executorkit import FluxJobExecutor\n"
        "import taskfuncs as tf\n"
        "with FluxJobExecutor() as exe:\n"
        "    print('RESULT', exe.max_cores, [f.result(timeout=120) for f in\n"
        "          [exe.submit(tf.inc, i) for i in range(4)]])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    cmd = ["salloc", "-n", "2", "--quiet", "srun", "-n", "1", "-c", "2",
           "flux", "start", sys.executable, str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "RESULT 2 [1, 2, 3, 4]" in out.stdout
