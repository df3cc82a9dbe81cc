"""A warm Flux job: started before its call exists, it waits, imported and connected.

``python -m executorkit.worker.flux_warm BOOTFILE`` runs as a one-core Flux job that the
Flux launcher submits ahead of demand. It imports the worker, connects to the launcher and
says hello; when a call is due, the launcher answers with the worker's identity
(:class:`~executorkit.transport.Spawn`: worker id, environment, working directory) and the
process becomes that per-task worker: it applies the environment, connects to the driver
and serves the one call. A Flux job per call, without the job's start-up on the call's path.

If the launcher closes the connection instead (the job is no longer wanted), it exits.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys

from executorkit.transport import Hello, Spawn, TaskSetup, connect
from executorkit.worker.loop import serve


def main(bootfile: str) -> int:
    with open(bootfile, "rb") as fh:
        boot = pickle.load(fh)
    chan = connect(boot["launcher"], boot["secret"])
    chan.send(Hello(boot["warm_id"], os.getpid(), socket.gethostname()))
    try:
        spawn = chan.recv()
    except (EOFError, ConnectionError):
        return 0  # not needed after all
    finally:
        chan.sock.close()
    assert isinstance(spawn, Spawn), f"unexpected message {type(spawn).__name__}"
    # Before any user code runs, so thread variables reach numpy & co. as in a fresh job
    os.environ.update(dict(spawn.env))
    setup = TaskSetup(cwd=spawn.cwd) if spawn.cwd else None
    return serve(boot["address"], boot["secret"], spawn.worker_id, persistent=False,
                 setup=setup)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
