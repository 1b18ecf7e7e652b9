"""Ascend NPU backend over ``torch_npu.npu`` events. The only module that imports torch_npu.

Facts it relies on (torch_npu's ``NPUEvent.cpp`` and ``NPUQueue.cpp``, and CANN's runtime API):

* ``Event.record(stream)`` is queued on torch_npu's host task queue; ``query()`` stays False until the
  queue thread has issued it, and never waits;
* **``elapsed_time()`` and ``recorded_time()`` block and hold the GIL**: they call ``emptyAllNPUStream()``
  (wait until every stream's host task queue, up to 4096 tasks, was handed to the device) and synchronize
  the events (``NPUEvent.cpp``), even for an event that ``query()`` says is complete. So otel-npu reads a
  completed event's time with CANN's ``aclrtEventGetTimestamp`` itself, through ``ctypes`` on the event's
  ACL handle (``event.npu_event``): no drain, and ctypes releases the GIL for the call. ``query()`` is True
  only once the record was issued from the task queue and ran (``IsEventRecorded`` + the ACL status), so the
  event is final when it is read. It is used only after it agreed with ``recorded_time()`` on the first
  completed event (one drain, once); otherwise ``recorded_time()`` (torch_npu 7.0.0 line on: whole µs), else
  ``elapsed_time()`` (float32 ms). ``stats()["timing_reads"]`` says which, how many, and what they cost;
* timestamps are whole microseconds: ``timer_resolution_ns`` (1 µs) is in every span's stated error bound;
* events are created lazily on the first ``record``: ``new_event`` records each new event once on the
  backend's own stream, so the hot path never creates one.

Without CANN, ``import torch_npu`` fails (``libhccl.so``/``libascend_hal.so`` not found). We import it only
when asked for the NPU, and turn the failure into a message that says what is wrong and what to do.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import sys
import time
from typing import Any, Callable, Hashable

from . import graphs
from .base import DeviceUnavailable, TorchEventBackend


_log = logging.getLogger("otel_npu")

#: A stand-in torch_npu module (``otel_npu.testing``) brings its own ``aclrtEventGetTimestamp`` under this name.
SIM_ACL_ATTR = "otel_npu_acl_event_get_timestamp"


def load_acl_timestamp(torch_npu: Any = None) -> Callable[[int], int] | None:
    """``read(handle) -> µs``: CANN's ``aclrtEventGetTimestamp`` through ctypes (GIL released during the
    call), or ``None`` where libascendcl cannot be loaded or lacks it (older CANN)."""
    stand_in = getattr(torch_npu, SIM_ACL_ATTR, None)
    if callable(stand_in):
        return stand_in
    try:
        lib = ctypes.CDLL("libascendcl.so")  # already loaded by torch_npu: the same library
        fn = lib.aclrtEventGetTimestamp
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64)]
    fn.restype = ctypes.c_int

    def read(handle: int) -> int:
        out = ctypes.c_uint64()
        rc = fn(handle, ctypes.byref(out))
        if rc != 0:
            raise RuntimeError(f"aclrtEventGetTimestamp returned error {rc}")
        return out.value

    return read


def graph_classes(torch_npu: Any = None) -> list[tuple[str, Any]]:
    """The NPU graph-capture class to watch (``graphs.py``): ``torch_npu``'s (a stand-in, e.g. a simulated
    device's), else the imported torch_npu's (never imports it)."""
    module = torch_npu if torch_npu is not None else sys.modules.get("torch_npu")
    if module is None:
        return []
    npu_graphs = getattr(getattr(module, "npu", None), "graphs", None)
    return [("torch_npu.npu.graphs.NPUGraph", getattr(npu_graphs, "NPUGraph", None))]


def stream_capturing() -> bool:
    """Whether the calling thread's current NPU stream is capturing a graph (asked of torch_npu only if
    imported)."""
    npu = getattr(sys.modules.get("torch_npu"), "npu", None)
    return npu is not None and bool(npu.is_current_stream_capturing())


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
        from .base import import_torch

        import_torch()  # first, without its NumPy warning (see there)
        return importlib.import_module("torch_npu")
    except Exception as exc:
        hint = ""
        text = str(exc)
        if ".so" in text or "libascend" in text or "libhccl" in text or "CANN" in text:
            hint = (" - the Ascend CANN libraries were not found: install CANN and source its set_env.sh "
                    "(e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh) before starting Python")
        raise DeviceUnavailable(f"torch_npu is installed but unusable: {type(exc).__name__}: {text}{hint}") from exc


class NpuBackend(TorchEventBackend):
    kind = "npu"
    # Records go through torch_npu's task queue before reaching the device: the anchor ran somewhere
    # between the call and the moment we saw it complete.
    anchor_estimate = "midpoint"

    #: NPU timestamps are whole microseconds.
    timer_resolution_ns = 1000
    @property
    def min_anchor_interval_s(self) -> float:
        """Anchors at most twice a second unless reads go through aclrtEventGetTimestamp: a read by
        recorded_time()/elapsed_time() drains the task queue holding the GIL (0.1 s otherwise, as on CUDA)."""
        return 0.1 if self.read_method == "acl" else 0.5

    def __init__(self, torch_npu: Any | None = None, *, label: str | None = None,
                 acl_timestamp: Callable[[int], int] | None | bool = True) -> None:
        """Use the installed torch_npu (or ``torch_npu``, a stand-in with its API: see ``otel_npu.testing``).
        ``acl_timestamp``: True (load CANN's ``aclrtEventGetTimestamp``), False (never use it), or a
        ``read(handle) -> µs`` callable."""
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
        graphs.watch(graph_classes(torch_npu))  # no device call while a graph capture is in progress: graphs.py
        self._torch_npu = torch_npu
        self._acl_option = acl_timestamp
        self._acl: Callable[[int], int] | None = None
        #: "acl", "recorded_time" or "elapsed_time": decided by the first timing read (resolver thread)
        self.read_method: str | None = None
        self._reads = 0
        self._read_ns = 0
        self._read_max_ns = 0

    def _choose(self, completed_event: Any) -> str:
        """Decide once, on a completed event, how times are read (see the module docstring)."""
        if self.read_method is not None:
            return self.read_method
        method, why = "elapsed_time", ""
        try:
            recorded = completed_event.recorded_time()  # needs torch_npu >= 7.0.0 and CANN support
            method = "recorded_time"
        except Exception as exc:
            recorded, why = None, f"recorded_time() failed: {exc}"
        if recorded is not None and self._acl_option is not False:
            acl = self._acl_option if callable(self._acl_option) else load_acl_timestamp(self._torch_npu)
            if acl is None:
                why = "aclrtEventGetTimestamp is not available (libascendcl.so or the symbol missing)"
            else:
                try:
                    direct = acl(completed_event.npu_event)
                    if direct == recorded:
                        method, self._acl = "acl", acl
                    else:
                        why = f"aclrtEventGetTimestamp gave {direct} µs where recorded_time() gave {recorded}"
                except Exception as exc:
                    why = f"aclrtEventGetTimestamp failed: {exc}"
        self.read_method = method
        _log.info("otel-npu: NPU event times are read with %s%s", method, f" ({why})" if why else "")
        return method

    def _us(self, event: Any) -> int:
        """A completed event's device timestamp in µs, timed (the cost is reported in stats())."""
        t0 = time.perf_counter_ns()
        value = self._acl(event.npu_event) if self._acl is not None else event.recorded_time()
        took = time.perf_counter_ns() - t0
        self._reads += 1
        self._read_ns += took
        if took > self._read_max_ns:
            self._read_max_ns = took
        return value

    def timing_read_stats(self) -> dict[str, Any]:
        """How event times are read, how many reads, their mean and longest host cost (µs)."""
        return {"method": self.read_method, "reads": self._reads,
                "mean_us": round(self._read_ns / self._reads / 1000, 2) if self._reads else None,
                "max_us": round(self._read_max_ns / 1000, 2)}

    def current_stream(self) -> Any:
        return self._current_stream()

    def reference(self, event: Any) -> Any:
        if self._choose(event) != "elapsed_time":
            return self._us(event) * 1000  # µs -> ns
        return event

    def offset_ns(self, reference: Any, event: Any) -> float:
        if self.read_method != "elapsed_time":
            return float(self._us(event) * 1000 - reference)
        return reference.elapsed_time(event) * 1e6

    def place(self, reference: Any, start: Any, end: Any) -> tuple[float, float]:
        if self.read_method != "elapsed_time":
            begin = self._us(start)
            return float(begin * 1000 - reference), float((self._us(end) - begin) * 1000)
        return reference.elapsed_time(start) * 1e6, start.elapsed_time(end) * 1e6

    def stream_key(self, stream: Any) -> Hashable:
        return (getattr(stream, "device_index", self._index), getattr(stream, "npu_stream", id(stream)))

    def stream_label(self, stream: Any) -> str:
        label = str(getattr(stream, "stream_id", getattr(stream, "npu_stream", stream)))
        device = getattr(stream, "device_index", self._index)
        return label if device == self._index else f"npu:{device}/{label}"  # otel_npu.device names the primary
