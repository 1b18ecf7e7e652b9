"""CUDA backend over ``torch.cuda`` events.

Facts it relies on (PyTorch, checked in ``../shared/NOTES.md``):

* ``Event.record(stream)`` only enqueues (≈ 1-2.5 µs of host time); ``query()`` and ``elapsed_time()`` never
  wait; ``elapsed_time`` raises unless both events completed and returns float32 milliseconds (resolution
  ≈ 0.5 µs), so durations are read directly between a capture's own two events and offsets are taken from a
  recent anchor (see ``clock.py``);
* torch creates the underlying ``cudaEvent_t`` lazily on the first ``record``: ``new_event`` records each
  new event once on the backend's own stream so that the hot path never triggers a ``cudaEventCreate``;
* current streams are per thread, so the hot path asks for the capturing thread's stream itself.

One device per process: the device current when otel-npu starts (vLLM runs one worker per device).
"""

from __future__ import annotations

from typing import Any, Hashable

from . import graphs
from .base import DeviceBackend, DeviceUnavailable


class CudaBackend(DeviceBackend):
    kind = "cuda"
    # An idle CUDA stream executes an event record a few microseconds after the call: "submit".
    anchor_estimate = "submit"

    def __init__(self, cuda: Any | None = None, *, label: str | None = None) -> None:
        """Use ``torch.cuda`` (or ``cuda``, an object with the same API: ``otel_npu.testing`` has one)."""
        if cuda is None:
            try:
                import torch
            except Exception as exc:  # pragma: no cover - torch is a dependency
                raise DeviceUnavailable(f"CUDA timing needs torch, which failed to import: {exc}") from exc
            cuda = torch.cuda
        if not cuda.is_available():
            raise DeviceUnavailable(
                "torch.cuda.is_available() is False (no NVIDIA GPU or driver, or a CPU-only torch build)")
        self._index = cuda.current_device()
        self._label = label or f"cuda:{self._index}"
        self._Event = cuda.Event
        self._current_stream = cuda.current_stream
        self._anchor_stream = cuda.Stream(device=self._index)
        graphs.watch(cuda=cuda)  # no device call while a graph capture is in progress: see graphs.py

    def label(self) -> str:
        return self._label

    def current_stream(self) -> Any:
        return self._current_stream()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def new_event(self) -> Any:
        event = self._Event(enable_timing=True)
        event.record(self._anchor_stream)  # creates the cudaEvent_t now, on this thread, not on the hot path
        return event

    def query(self, event: Any) -> bool:
        return event.query()

    def reference(self, event: Any) -> Any:
        return event

    def offset_ns(self, reference: Any, event: Any) -> float:
        return reference.elapsed_time(event) * 1e6

    def place(self, reference: Any, start: Any, end: Any) -> tuple[float, float]:
        return reference.elapsed_time(start) * 1e6, start.elapsed_time(end) * 1e6

    def stream_key(self, stream: Any) -> Hashable:
        return (stream.device_index, stream.cuda_stream)

    def stream_label(self, stream: Any) -> str:
        return str(getattr(stream, "stream_id", stream.cuda_stream))

    def record_anchor(self, event: Any) -> None:
        event.record(self._anchor_stream)
