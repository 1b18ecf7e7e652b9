"""CUDA backend over ``torch.cuda`` events.

Facts it relies on (PyTorch, checked in ``../shared/NOTES.md``):

* ``Event.record(stream)`` only enqueues (≈ 1-2.5 µs of host time); ``query()`` and ``elapsed_time()`` never
  wait; ``elapsed_time`` raises unless both events completed and returns float32 milliseconds (resolution
  ≈ 0.5 µs), so durations are read directly between a capture's own two events and offsets are taken from a
  recent anchor (see ``clock.py``);
* torch creates the underlying ``cudaEvent_t`` lazily on the first ``record``: ``new_event`` records each
  new event once on the backend's own stream so that the hot path never triggers a ``cudaEventCreate``;
* current streams are per thread, so the hot path asks for the capturing thread's stream itself.

Several devices: the primary is the device current when otel-npu starts (vLLM runs one worker per device);
a capture on a stream of another device (``device_map="auto"``) uses events, an anchor stream and a clock of
that device, made by the resolver thread the first time one is seen (see ``runtime.py``).
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
                from .base import import_torch

                torch = import_torch()
            except Exception as exc:  # pragma: no cover - torch is a dependency
                raise DeviceUnavailable(f"CUDA timing needs torch, which failed to import: {exc}") from exc
            cuda = torch.cuda
        if not cuda.is_available():
            raise DeviceUnavailable(
                "torch.cuda.is_available() is False (no NVIDIA GPU or driver, or a CPU-only torch build)")
        self.index = self._index = cuda.current_device()
        self._label = label or f"cuda:{self._index}"
        self._Event = cuda.Event
        self._Stream = cuda.Stream
        self._set_device = cuda.set_device
        self._current_stream = cuda.current_stream
        self._anchor_stream = cuda.Stream(device=self._index)
        self._anchor_streams = {self._index: self._anchor_stream}
        graphs.watch(cuda=cuda)  # no device call while a graph capture is in progress: see graphs.py

    def label(self) -> str:
        return self._label

    def current_stream(self) -> Any:
        return self._current_stream()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def _anchor_on(self, device: int | None) -> Any:
        if device is None or device == self._index:
            return self._anchor_stream
        stream = self._anchor_streams.get(device)
        if stream is None:
            stream = self._anchor_streams[device] = self._Stream(device=device)
        return stream

    def new_event(self, device: int | None = None) -> Any:
        event = self._Event(enable_timing=True)
        # creates the cudaEvent_t now, on this thread and on that device, not on the hot path
        event.record(self._anchor_on(device))
        return event

    def use_device(self, index: int) -> None:
        self._set_device(index)

    def device_label(self, index: int) -> str:
        return self._label if index == self._index else f"cuda:{index}"

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
        label = str(getattr(stream, "stream_id", stream.cuda_stream))
        device = stream.device_index
        return label if device == self._index else f"cuda:{device}/{label}"  # otel_npu.device names the primary

    def record_anchor(self, event: Any, device: int | None = None) -> None:
        event.record(self._anchor_on(device))
