"""CPU backend: the "device" is the host, so a capture's times are the host's own monotonic clock.

For development and for CPU inference. There are no events to wait for; the "stream" is the capturing
thread, so the captures of different threads land on different tracks.
"""

from __future__ import annotations

import threading
from typing import Any

from .base import DeviceBackend


class CpuBackend(DeviceBackend):
    kind = "cpu"
    host_timed = True

    def label(self) -> str:
        return "cpu"

    # The capture hot path for this backend reads perf_counter_ns directly (see capturing.py); these
    # methods exist for completeness of the protocol.
    def current_stream(self) -> Any:
        return threading.current_thread()

    def record(self, event: Any, stream: Any) -> None:  # pragma: no cover - not used: see above
        raise TypeError("the CPU backend has no events")

    def new_event(self, device: int | None = None) -> Any:  # pragma: no cover - not used: no pool on the CPU backend
        raise TypeError("the CPU backend has no events")

    def query(self, event: Any) -> bool:
        return True

    def reference(self, event: Any) -> Any:
        return event

    def offset_ns(self, reference: Any, event: Any) -> float:
        return float(event - reference)

    def stream_label(self, stream: Any) -> str:
        return f"thread:{getattr(stream, 'name', stream)}"

    def record_anchor(self, event: Any, device: int | None = None) -> None:  # pragma: no cover - host-timed: no anchors
        raise TypeError("the CPU backend has no events")

