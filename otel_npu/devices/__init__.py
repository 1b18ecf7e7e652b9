"""Device backends (npu, cuda, cpu) behind one protocol, and their detection.

``select("auto")`` prefers npu > cuda > cpu and remembers why each better kind was not taken, so that
``otel-npu doctor`` and the start-up log can say it. torch and torch_npu are imported only here, lazily.
"""

from __future__ import annotations

from typing import Any

from .base import DeviceBackend, DeviceUnavailable, EventPool

__all__ = ["DeviceBackend", "DeviceUnavailable", "EventPool", "select"]


def _make(kind: str) -> DeviceBackend:
    if kind == "npu":
        from .npu import NpuBackend

        return NpuBackend()
    if kind == "cuda":
        from .cuda import CudaBackend

        return CudaBackend()
    if kind == "cpu":
        from .cpu import CpuBackend

        return CpuBackend()
    raise ValueError(f"unknown device kind {kind!r}; accepted: auto, npu, cuda, cpu")


def select(device: Any) -> tuple[DeviceBackend, list[str]]:
    """Return ``(backend, reasons)``: the backend to use and why better kinds were passed over.

    ``device`` is ``"auto"``, a kind name, a ``DeviceBackend``, or an object with ``otel_npu_backend()``
    (``otel_npu.testing.SimDevice``). Raises ``DeviceUnavailable`` when an explicitly named kind is unusable.
    """
    if isinstance(device, DeviceBackend):
        return device, []
    factory = getattr(device, "otel_npu_backend", None)
    if callable(factory):
        return factory(), []
    if device != "auto":
        return _make(device), []
    reasons = []
    for kind in ("npu", "cuda"):
        try:
            return _make(kind), reasons
        except DeviceUnavailable as exc:
            reasons.append(f"{kind}: {exc}")
    return _make("cpu"), reasons
