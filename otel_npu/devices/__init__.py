"""Device backends (npu, cuda, cpu) behind one protocol (``base.py``), their table (``registry.py``), and the
graph-capture watch (``graphs.py``).

``select("auto")`` prefers npu > cuda > cpu and remembers why each better kind was not taken, so that
``otel-npu doctor`` and the start-up log can say it. torch and torch_npu are imported only by the backends,
lazily. Nothing here knows OpenTelemetry.
"""

from __future__ import annotations

from .base import DeviceBackend, DeviceUnavailable, EventPool
from .registry import select

__all__ = ["DeviceBackend", "DeviceUnavailable", "EventPool", "select"]
