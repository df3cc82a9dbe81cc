"""The engine behind every executor: tasks, dependencies, the scheduler and the workers.

Threads and data flow::

    caller threads                       engine thread (owns every piece of state below)
    --------------                       -----------------------------------------------
    submit(): validate, Future,    --->  inbox (deque of callables) -> _dep_done / _ready
      find input futures,                   |
      add_done_callback on inputs           v
    Future.cancel()                --->  Scheduler (pure) -> Start decisions
    shutdown()                     --->     |
                                            v
                                         launcher.spawn / RunTask ---> worker processes
    input futures of other            selector: listener, worker channels, wake pipe,
    executors complete  ----------->    fork server output pipes, run_time_max timers
                                            |
    Future.result() <--------------------  TaskDone / Exited -> set_result / set_exception

Callers never touch the scheduler or the workers: they append a callable to ``inbox`` and
wake the engine thread, which runs it. Done-callbacks of input futures do the same, so a
chain of 10,000 failing tasks propagates iteratively, never by recursion, and an exception
in one handler can not kill the machinery: the guarded loop marks the executor broken and
fails every unfinished future instead of leaving them hanging.

Futures are completed outside of any lock the engine holds; the engine thread is the only
one that completes task futures.

The parts, each readable alone (``Engine`` inherits them, so the hot path stays plain
method calls on one object)::

    _engine.py    Engine: the parts put together; start, break, teardown
    _config.py    EngineConfig, built once by the public executor
    _records.py   task states, TaskFuture, the task / worker / connection records
    _loop.py      the engine thread: selector, accept, read/dispatch, batched writes,
                  wake pipe, deferred calls
    _tasks.py     submit, dependencies, cache, scheduler queue, start, finish, cancel,
                  run_time_max deadlines
    _workers.py   per-task workers and warm spares, environment, MPI ranks, exits and
                  the errors of dead workers
    _block.py     block allocation: persistent workers, placement, depth, runtimes
    _failures.py  worker errors rebuilt in the driver, unpicklable calls, error_log_file

Imports run one way: executors -> engine -> launchers -> worker -> transport
(``tests/test_layering.py`` checks it).
"""

from executorkit.engine._config import EngineConfig
from executorkit.engine._engine import Engine
from executorkit.engine._records import TaskFuture
from executorkit.engine._workers import THREAD_VARIABLES

__all__ = ["THREAD_VARIABLES", "Engine", "EngineConfig", "TaskFuture"]
