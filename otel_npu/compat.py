"""``ProfileExecuteDuration``: a drop-in for the vllm-ascend class of that name (removed there in 2026).

Same calls, same log line, without its flaws::

    with ProfileExecuteDuration().capture_async("forward"):   # non-blocking, as before
        hidden = model(...)
    durations = ProfileExecuteDuration().pop_captured_sync()  # blocking, as before: {"forward": 4.14}

Differences a migrating user may notice: durations come back in capture order, repeated tags are kept as
``tag``, ``tag#2``, ...; nothing synchronizes per capture (the pop waits once for the resolver); captures that
never resolve (dropped, or timed out) are left out instead of blocking forever; and every capture is also a
span. Enabled by ``OTEL_NPU_ENABLED`` or the seed's own ``VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE``.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from . import capturing as _capture
from .capturing.off import Off
from . import durations, runtime
from .record import DROPPED

_log = logging.getLogger("otel_npu")


class ProfileExecuteDuration:
    """Process-wide singleton with ``capture_async(tag)`` and ``pop_captured_sync()``."""

    _instance: "ProfileExecuteDuration | None" = None
    _instance_lock = threading.Lock()
    _captured: collections.deque

    def __new__(cls) -> "ProfileExecuteDuration":
        instance = cls._instance
        if instance is None:
            with cls._instance_lock:
                instance = cls._instance
                if instance is None:
                    instance = super().__new__(cls)
                    instance._captured = collections.deque()
                    cls._instance = instance
        return instance

    def capture_async(self, duration_tag: str) -> Any:
        """A capture named ``duration_tag`` (context manager). Non-blocking: records two device events."""
        cm = _capture.capture(duration_tag)
        if not isinstance(cm, Off):
            cm.compat = "pending"
            self._captured.append(cm)
        return cm

    def pop_captured_sync(self, label: str | None = None, timeout_s: float | None = None) -> dict[str, float]:
        """Durations (ms, device-measured) of the captures made since the last pop, in capture order.

        **Blocks** until the resolver has resolved them (at most ``timeout_s``, default the event time-out
        plus 5 s); it does not synchronize the device itself. With ``OTEL_NPU_LOG_DURATIONS=1`` it logs the
        seed's line, labelled with the enclosing step's name, else ``label``, else ``"-"``.
        """
        captured = self._captured
        items = []
        while captured:
            items.append(captured.popleft())
        rt = runtime.current()
        if not items or rt is None:
            return {}
        if timeout_s is None:
            timeout_s = rt.settings.event_timeout_s + 5.0
        if not rt.resolver.wait(timeout_s):
            _log.warning("otel-npu: pop_captured_sync gave up waiting after %.1f s; unresolved captures are "
                         "left out", timeout_s)
        done = [c for c in items if c.start is not None and c.start is not DROPPED and getattr(c, "done", False)]
        done.sort(key=lambda c: c.host_start)
        tags = durations.unique_tags(c.name for c in done)
        result = {tag: durations.duration_ms(c) for tag, c in zip(tags, done)}
        if rt.settings.log_durations:
            records = durations.claim(done)
            if records:
                step_name = _enclosing_step_name()
                line_tags = durations.unique_tags(c.name for c in records)
                durations.log.info("%s", durations.format_line(step_name or label or "-", zip(
                    line_tags, (durations.duration_ms(c) for c in records))))
        return result


def _enclosing_step_name() -> str | None:
    node = _capture.current()
    while node is not None:
        if node.is_step:
            return node.name
        node = node.parent
    return None
