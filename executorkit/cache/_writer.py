"""Worker side: record a finished call in the cache, before its result is sent back."""

from __future__ import annotations

import os
import pickle
import socket

import cloudpickle

from executorkit.transport import CacheSpec, ErrorInfo, RunTask, TaskDone


def record_call(spec: CacheSpec, msg: RunTask, done: TaskDone) -> None:
    from executorkit.cache._store import CacheRecord, CacheStore

    try:
        args, kwargs = pickle.loads(msg.args)
        args_blob, kwargs_blob = cloudpickle.dumps(args), cloudpickle.dumps(kwargs)
    except Exception:
        args_blob, kwargs_blob = msg.args, cloudpickle.dumps({})
    if done.ok:
        output, error, error_text = done.payload, None, None
    else:
        info: ErrorInfo = pickle.loads(done.payload)
        output, error, error_text = None, info.exc, info.traceback
    record = CacheRecord(
        key=spec.key, function_name=spec.function_name, function=msg.fn, args=args_blob,
        kwargs=kwargs_blob, resource_dict=spec.resource_dict,
        status="done" if done.ok else "failed", output=output, error=error,
        error_text=error_text, started=done.started, finished=done.finished,
        hostname=socket.gethostname(), pid=os.getpid(), slot=spec.slot,
    )
    CacheStore(spec.directory).write(record)
