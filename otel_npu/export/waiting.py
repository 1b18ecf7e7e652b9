"""Waiting for an export thread, bounded: what ``flush()`` does for the span and metrics exporters."""

from __future__ import annotations

import threading
import time
from typing import Callable


def wait_until(cond: threading.Condition, done: Callable[[], bool], deadline: float,
               worker: threading.Thread) -> bool:
    """With ``cond`` held: wait until ``done()``, the monotonic ``deadline`` passes, or ``worker`` dies.

    True when ``done()``. Wakes at least every 0.1 s to notice a worker that died without notifying."""
    while not done():
        left = deadline - time.monotonic()
        if left <= 0 or not worker.is_alive():
            return False
        cond.wait(min(left, 0.1))
    return True
