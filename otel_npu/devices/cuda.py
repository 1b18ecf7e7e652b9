"""CUDA backend over ``torch.cuda`` events.

Facts it relies on (PyTorch's ``CUDAEvent.h`` and ``torch/cuda/streams.py``, and the CUDA runtime API):

* ``Event.record(stream)`` only enqueues (≈ 1-2.5 µs of host time); ``query()`` and ``elapsed_time()`` never
  wait; ``elapsed_time`` raises unless both events completed and returns float32 milliseconds (resolution
  ≈ 0.5 µs), so durations are read directly between a capture's own two events and offsets are taken from a
  recent anchor (see ``resolve/clock.py``);
* torch creates the underlying ``cudaEvent_t`` lazily on the first ``record``: ``new_event`` records each
  new event once on the backend's own stream so that the hot path never triggers a ``cudaEventCreate``;
* current streams are per thread, so the hot path asks for the capturing thread's stream itself.

Several devices: the primary is the device current when otel-npu starts (vLLM runs one worker per device);
a capture on a stream of another device (``device_map="auto"``) uses events, an anchor stream and a clock of
that device, made by the resolver thread the first time one is seen (see ``runtime.py``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Hashable

from . import graphs
from .base import DeviceUnavailable, TorchEventBackend


def graph_classes(cuda: Any = None) -> list[tuple[str, Any]]:
    """The CUDA graph-capture class to watch (``graphs.py``): ``cuda``'s (a ``torch.cuda``-shaped object, e.g. a
    simulated device's), else torch's if torch is imported (never imports it)."""
    if cuda is not None:
        return [("cuda.graphs.CUDAGraph", getattr(getattr(cuda, "graphs", None), "CUDAGraph", None))]
    if sys.modules.get("torch") is None:
        return []
    return [("torch.cuda.graphs.CUDAGraph", getattr(sys.modules.get("torch.cuda.graphs"), "CUDAGraph", None))]


def stream_capturing() -> bool:
    """Whether the calling thread's current CUDA stream is capturing a graph (asked of torch only if imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CudaBackend(TorchEventBackend):
    kind = "cuda"
    # An idle CUDA stream executes an event record a few microseconds after the call: "submit".
    anchor_estimate = "submit"

    def __init__(self, cuda: Any | None = None, *, label: str | None = None) -> None:
        """Use ``torch.cuda`` (or ``cuda``, an object with the same API: ``otel_npu.testing`` has one)."""
        torch_c = None
        if cuda is None:
            try:
                from .base import import_torch

                torch = import_torch()
            except Exception as exc:  # pragma: no cover - torch is a dependency
                raise DeviceUnavailable(f"CUDA timing needs torch, which failed to import: {exc}") from exc
            cuda = torch.cuda
            torch_c = getattr(torch, "_C", None)
        if not cuda.is_available():
            raise DeviceUnavailable(
                "torch.cuda.is_available() is False (no NVIDIA GPU or driver, or a CPU-only torch build)")
        self.index = self._index = cuda.current_device()
        self._label = label or f"cuda:{self._index}"
        self._Event = cuda.Event
        self._Stream = cuda.Stream
        self._set_device = cuda.set_device
        # an instance attribute, not a method: one Python frame less on the hot path
        self.current_stream = cached_current_stream(cuda, torch_c) or cuda.current_stream
        self._anchor_stream = cuda.Stream(device=self._index)
        self._anchor_streams = {self._index: self._anchor_stream}
        graphs.watch(graph_classes(cuda))  # no device call while a graph capture is in progress: see graphs.py

    def current_stream(self) -> Any:  # pragma: no cover - replaced in __init__
        raise NotImplementedError

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



#: Distinct streams whose Stream objects ``cached_current_stream`` keeps (beyond, each call builds one).
STREAM_CACHE_LIMIT = 1024


def cached_current_stream(cuda: Any, torch_c: Any) -> Callable[[], Any] | None:
    """``torch.cuda.current_stream()`` without building a ``Stream`` object per call; ``None`` if unusable.

    ``torch.cuda.current_stream()`` reads the current device and the calling thread's current stream, a
    ``(stream_id, device_index, device_type)`` triple, and wraps them in a new ``Stream``: 6.5 µs a call on a
    lent H200 machine's host (``benchmarks/cuda_breakdown.py``), the largest part of an enabled capture's
    15.5 µs there. The triple is the stream's identity, so one ``Stream`` per triple is kept and handed out
    again (``Stream`` objects are immutable values). Same two reads as torch's, no lock, never blocks.

    Checked once here against ``cuda.current_stream()``; where this torch lacks the two private calls or
    the check fails, ``None`` (the caller uses ``cuda.current_stream`` itself).
    """
    get_device = getattr(torch_c, "_cuda_getDevice", None)
    get_stream = getattr(torch_c, "_cuda_getCurrentStream", None)
    if get_device is None or get_stream is None:
        return None
    stream_cls = cuda.Stream
    cache: dict[tuple, Any] = {}

    def current_stream() -> Any:
        key = get_stream(get_device())
        stream = cache.get(key)
        if stream is None:
            stream = stream_cls(stream_id=key[0], device_index=key[1], device_type=key[2])
            if len(cache) < STREAM_CACHE_LIMIT:
                cache[key] = stream
        return stream

    try:
        ours, theirs = current_stream(), cuda.current_stream()
        if ours != theirs or ours.cuda_stream != theirs.cuda_stream:
            return None
    except Exception:
        return None
    return current_stream
