"""Ascend NPU backend over ``torch_npu.npu`` events. The only module that imports torch_npu.

Facts it relies on (torch_npu, checked in ``../shared/NOTES.md``):

* ``Event.record(stream)`` is queued on torch_npu's host task queue; ``query()`` stays False until the
  queue thread has issued it, and never waits;
* **``elapsed_time()`` and ``recorded_time()`` block and hold the GIL**: they drain the task queues of all
  streams and synchronize the events. otel-npu calls them only from the resolver thread, only for events
  whose ``query()`` already returned True, at most twice per capture (and once per clock anchor);
* ``recorded_time()`` (torch_npu 7.0.0 line on, CANN's ``aclrtEventGetTimestamp``) is an absolute device
  timestamp in microseconds; where it is missing or unsupported, ``elapsed_time()`` (float32 ms) is used;
* events are created lazily on the first ``record``: ``new_event`` records each new event once on the
  backend's own stream, so the hot path never creates one.

Without CANN, ``import torch_npu`` fails (``libhccl.so``/``libascend_hal.so`` not found). We import it only
when asked for the NPU, and turn the failure into a message that says what is wrong and what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Hashable

from . import graphs
from .base import DeviceBackend, DeviceUnavailable


def import_torch_npu() -> Any:
    """Import torch_npu, or raise ``DeviceUnavailable`` saying why in words a user can act on."""
    loaded = sys.modules.get("torch_npu")
    if loaded is not None:
        return loaded
    try:
        spec = importlib.util.find_spec("torch_npu")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DeviceUnavailable("torch_npu is not installed (pip install 'otel-npu[npu]' on an Ascend host)")
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:
        hint = ""
        text = str(exc)
        if ".so" in text or "libascend" in text or "libhccl" in text or "CANN" in text:
            hint = (" - the Ascend CANN libraries were not found: install CANN and source its set_env.sh "
                    "(e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh) before starting Python")
        raise DeviceUnavailable(f"torch_npu is installed but unusable: {type(exc).__name__}: {text}{hint}") from exc


class NpuBackend(DeviceBackend):
    kind = "npu"
    # Records go through torch_npu's task queue before reaching the device: the anchor ran somewhere
    # between the call and the moment we saw it complete.
    anchor_estimate = "midpoint"

    def __init__(self, torch_npu: Any | None = None, *, label: str | None = None) -> None:
        """Use the installed torch_npu (or ``torch_npu``, a stand-in with its API: see ``otel_npu.testing``)."""
        torch_npu = torch_npu if torch_npu is not None else import_torch_npu()
        npu = torch_npu.npu
        try:
            available = npu.is_available()
        except Exception as exc:
            raise DeviceUnavailable(f"torch_npu.npu.is_available() failed: {exc}") from exc
        if not available:
            raise DeviceUnavailable("torch_npu.npu.is_available() is False (no NPU visible to this process; "
                                    "check ASCEND_RT_VISIBLE_DEVICES and the driver)")
        self._npu = npu
        self.index = self._index = npu.current_device()
        self._label = label or f"npu:{self._index}"
        self._Event = npu.Event
        self._Stream = npu.Stream
        self._set_device = npu.set_device
        self._current_stream = npu.current_stream
        self._anchor_stream = npu.Stream()
        self._anchor_streams = {self._index: self._anchor_stream}
        graphs.watch(torch_npu=torch_npu)  # no device call while a graph capture is in progress: graphs.py
        self._use_recorded_time: bool | None = None  # decided by the first timing read (resolver thread)

    def _recorded_time_works(self, completed_event: Any) -> bool:
        """recorded_time() needs torch_npu >= 7.0.0 and CANN support: try it once, on a finished event."""
        if self._use_recorded_time is None:
            try:
                completed_event.recorded_time()
                self._use_recorded_time = True
            except Exception:
                self._use_recorded_time = False
        return self._use_recorded_time

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
        event.record(self._anchor_on(device))  # creates the device event here, not on the hot path
        return event

    def use_device(self, index: int) -> None:
        self._set_device(index)  # ACL contexts are per thread: reads of another device's events need its own

    def device_label(self, index: int) -> str:
        return self._label if index == self._index else f"npu:{index}"

    def query(self, event: Any) -> bool:
        return event.query()

    def reference(self, event: Any) -> Any:
        if self._recorded_time_works(event):
            return event.recorded_time() * 1000  # µs -> ns
        return event

    def offset_ns(self, reference: Any, event: Any) -> float:
        if self._use_recorded_time:
            return float(event.recorded_time() * 1000 - reference)
        return reference.elapsed_time(event) * 1e6

    def place(self, reference: Any, start: Any, end: Any) -> tuple[float, float]:
        if self._use_recorded_time:
            begin = start.recorded_time()
            return float(begin * 1000 - reference), float((end.recorded_time() - begin) * 1000)
        return reference.elapsed_time(start) * 1e6, start.elapsed_time(end) * 1e6

    def stream_key(self, stream: Any) -> Hashable:
        return (getattr(stream, "device_index", self._index), getattr(stream, "npu_stream", id(stream)))

    def stream_label(self, stream: Any) -> str:
        label = str(getattr(stream, "stream_id", getattr(stream, "npu_stream", stream)))
        device = getattr(stream, "device_index", self._index)
        return label if device == self._index else f"npu:{device}/{label}"  # otel_npu.device names the primary

    def record_anchor(self, event: Any, device: int | None = None) -> None:
        event.record(self._anchor_on(device))
