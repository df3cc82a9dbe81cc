"""The engine's configuration: everything it needs, built once by the public executor."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from executorkit.resources import Resources


@dataclass
class EngineConfig:
    """Everything the engine needs, built once by the public executor."""

    launcher: Any
    cpus: tuple[int, ...]  # CPU slot ids of the pool
    gpus: tuple[int, ...]
    real_cpus: bool  # slot ids are CPUs this process may run on (so pin to them)
    gpu_variable: str = "CUDA_VISIBLE_DEVICES"
    max_running: int | None = None
    block_workers: int = 0  # > 0: block allocation with that many persistent workers
    worker_res: Resources = field(default_factory=Resources)
    init_function: Callable[[], Mapping[str, Any]] | None = None
    restart_limit: int = 10
    disable_dependencies: bool = False
    # cores -> launcher prefix for an MPI call; None: this executor cannot run cores > 1
    mpi_command: Callable[[int], tuple[str, ...]] | None = None
    progress: Any = None  # executorkit._progress.Progress, or None
    bind_host: str = "127.0.0.1"  # where workers connect (loopback for local work)
    advertise_host: str | None = None  # the host workers connect to (default: bind_host)
    # every worker runs on this machine: listen on a local socket, not TCP (where there are
    # abstract local sockets: Linux)
    local_socket: bool = False
    tmp_dir: str | None = None  # parent of private worker directories (shared for Slurm)
    log_obj_size: bool = False  # log pickled sizes of calls and results (INFO)
    preload: tuple[str, ...] = ()  # modules the fork server imports before forking workers
    status_file: str | None = None  # keep a live status.json there (engine._status)
    backend: str = "executor"  # the public class's name, for the status file

