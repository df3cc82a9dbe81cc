"""What runs inside a task's process: one call (``_call``), the worker loop (``loop``), and the
warm, pre-imported fork server that starts worker processes cheaply (``forkserver``)."""
