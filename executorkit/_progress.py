"""A progress bar for long campaigns (``progress=True``): done, running, waiting, failed.

The engine thread refreshes it at most ten times a second from counters it keeps anyway,
so a campaign of a million tiny calls pays nothing per call. In Jupyter the bar is a widget
when ipywidgets is installed, text otherwise.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any


def _bar_class() -> Any:
    try:
        from IPython import get_ipython

        in_notebook = get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except Exception:
        in_notebook = False
    if in_notebook:
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm

            return tqdm
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm


class Progress:
    INTERVAL = 0.1

    def __init__(self, file: Any = None) -> None:
        try:
            tqdm = _bar_class()
        except ImportError as exc:
            raise ImportError("progress=True needs tqdm (pip install tqdm)") from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.bar = tqdm(total=0, unit="task", file=file or sys.stderr, dynamic_ncols=True,
                            leave=True, smoothing=0.05)
        self._last = 0.0

    def update(self, counts: dict[str, int], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.INTERVAL:
            return
        self._last = now
        finished = counts["done"] + counts["failed"] + counts["cancelled"]
        self.bar.total = counts["submitted"]
        self.bar.n = finished
        self.bar.set_postfix_str(
            f"done={counts['done']} running={counts['running']} "
            f"waiting={counts['waiting']} failed={counts['failed']}", refresh=False)
        self.bar.refresh()

    def close(self, counts: dict[str, int]) -> None:
        self.update(counts, force=True)
        self.bar.close()
