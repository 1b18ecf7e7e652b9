"""The one small protocol every device kind implements, and the pool of timing events.

A backend wraps the devices of one kind (``npu``, ``cuda``, ``cpu``); its *primary* device is the one current
on the thread that started otel-npu (``label()``: ``npu:0``). Event pools and clock anchors are per device
(a CUDA/ACL event can only be recorded on a stream of its own device): ``for_device(index)`` gives a view
bound to one device, which is what ``EventPool`` and ``clock.DeviceClock`` take. Its methods fall in three
groups by *who* calls them, which is what decides what they may cost:

* hot path, on the capturing thread: ``current_stream`` and ``record``. They must not allocate device
  events, wait, or take locks;
* resolver thread: ``query``, ``reference``/``offset_ns``/``place``, ``new_event``, ``stream_label``/``stream_key``.
  The timing reads may block (torch_npu's ``elapsed_time`` does) but are only ever called for events whose
  ``query()`` was True;
* clock calibration, resolver thread: ``record_anchor`` records a reference event on a stream of the
  backend's own that nothing else uses, so the event executes as soon as it is submitted.

Backends know nothing of OpenTelemetry.
"""

from __future__ import annotations

import abc
import collections
from typing import Any, Hashable


class DeviceUnavailable(RuntimeError):
    """The requested device kind cannot be used here; the message says why and what to do."""


class DeviceBackend(abc.ABC):
    """One device behind the event/stream protocol otel-npu needs."""

    #: ``"cpu"``, ``"cuda"``, ``"npu"`` or ``"sim"``.
    kind: str = ""
    #: True when "events" are host ``perf_counter_ns`` readings (the CPU backend): no pool, no anchors.
    host_timed: bool = False
    #: How the clock estimates when an anchor event ran within ``[host before record, host seen done]``:
    #: ``"submit"`` (right after the record call returned: true where an idle stream executes a record at
    #: once, as CUDA does) or ``"midpoint"`` (the middle of the window: where the record is queued first).
    anchor_estimate: str = "midpoint"
    #: The device timer's resolution as read (CUDA ``elapsed_time``: ≈ 0.5 µs; NPU: whole µs): part of every
    #: span's stated error bound.
    timer_resolution_ns: int = 500

    @abc.abstractmethod
    def label(self) -> str:
        """The primary device as spans name it: ``"npu:0"``, ``"cuda:1"``, ``"cpu"``."""

    #: The primary device's index (the device current when the backend was made).
    index: int = 0

    def device_label(self, index: int) -> str:
        return f"{self.kind}:{index}"

    def for_device(self, index: int) -> "DeviceBackend":
        """This backend bound to device ``index`` (itself for the primary device): its ``new_event`` and
        ``record_anchor`` use that device. Resolver thread; never the hot path."""
        if index == self.index:
            return self
        return _DeviceView(self, index)

    def use_device(self, index: int) -> None:
        """Make ``index`` the calling thread's current device (resolver thread, before reading its events)."""

    # -- hot path -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def current_stream(self) -> Any:
        """The calling thread's current stream. Hot path: cheap, never waits."""

    @abc.abstractmethod
    def record(self, event: Any, stream: Any) -> None:
        """Enqueue ``event`` on ``stream``. Hot path: never waits for the device."""

    # -- resolver -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def new_event(self, device: int | None = None) -> Any:
        """A timing event of device ``device`` (default: the primary), ready to record (already created on
        the device). Never on the hot path."""

    @abc.abstractmethod
    def query(self, event: Any) -> bool:
        """Whether ``event`` has completed on the device. Never waits."""

    @abc.abstractmethod
    def reference(self, event: Any) -> Any:
        """What ``offset_ns`` needs of a completed anchor event; computed once per anchor."""

    @abc.abstractmethod
    def offset_ns(self, reference: Any, event: Any) -> float:
        """Device nanoseconds from an anchor's ``reference`` to the completed ``event``."""

    def place(self, reference: Any, start: Any, end: Any) -> tuple[float, float]:
        """``(offset of start from reference, duration start->end)`` in device ns, both events completed.

        Backends override this where measuring the duration directly is more precise than subtracting
        two offsets (CUDA: ``elapsed_time`` is float32 ms, coarser the farther apart the events).
        """
        begin = self.offset_ns(reference, start)
        return begin, self.offset_ns(reference, end) - begin

    def stream_key(self, stream: Any) -> Hashable:
        """A hashable identity of ``stream``: captures on one stream complete in order."""
        return stream

    def stream_label(self, stream: Any) -> str:
        """The stream as spans name it."""
        return str(stream)

    # -- clock calibration ----------------------------------------------------------------------------
    @abc.abstractmethod
    def record_anchor(self, event: Any, device: int | None = None) -> None:
        """Record ``event`` on the backend's own idle stream of ``device`` (default: the primary; used only
        for clock references)."""

    def close(self) -> None:
        """Release what the backend holds (threads, streams). Idempotent."""


class TorchEventBackend(DeviceBackend):
    """What the CUDA and NPU backends share: torch-style ``Event``/``Stream`` classes, a ``set_device``, and
    one anchor stream of otel-npu's own per device. A subclass's ``__init__`` sets ``_index``, ``_label``,
    ``_Event``, ``_Stream``, ``_set_device``, ``_anchor_stream`` (on the primary device) and
    ``_anchor_streams`` (device index -> anchor stream, the primary's included)."""

    def label(self) -> str:
        return self._label

    def device_label(self, index: int) -> str:
        return self._label if index == self._index else f"{self.kind}:{index}"

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
        # creates the device event (cudaEvent_t, aclrtEvent) now, on this thread and on that device: the
        # first record does, and the hot path must never
        event.record(self._anchor_on(device))
        return event

    def use_device(self, index: int) -> None:
        # current devices (CUDA) and ACL contexts (NPU) are per thread: reads of another device's events
        # need it current on the reading thread
        self._set_device(index)

    def query(self, event: Any) -> bool:
        return event.query()

    def record_anchor(self, event: Any, device: int | None = None) -> None:
        event.record(self._anchor_on(device))


class _DeviceView(DeviceBackend):
    """A backend bound to one of its non-primary devices (see ``DeviceBackend.for_device``)."""

    def __init__(self, backend: DeviceBackend, index: int) -> None:
        self._backend = backend
        self.index = index
        self.kind = backend.kind
        self.host_timed = backend.host_timed
        self.anchor_estimate = backend.anchor_estimate
        self.timer_resolution_ns = backend.timer_resolution_ns
        self.query = backend.query
        self.reference = backend.reference
        self.offset_ns = backend.offset_ns
        self.place = backend.place  # type: ignore[method-assign]
        self.current_stream = backend.current_stream
        self.record = backend.record

    def label(self) -> str:
        return self._backend.device_label(self.index)

    def current_stream(self) -> Any:  # pragma: no cover - replaced in __init__
        return self._backend.current_stream()

    def record(self, event: Any, stream: Any) -> None:  # pragma: no cover - replaced in __init__
        self._backend.record(event, stream)

    def new_event(self, device: int | None = None) -> Any:
        return self._backend.new_event(self.index if device is None else device)

    def query(self, event: Any) -> bool:  # pragma: no cover - replaced in __init__
        return self._backend.query(event)

    def reference(self, event: Any) -> Any:  # pragma: no cover - replaced in __init__
        return self._backend.reference(event)

    def offset_ns(self, reference: Any, event: Any) -> float:  # pragma: no cover - replaced in __init__
        return self._backend.offset_ns(reference, event)

    def record_anchor(self, event: Any, device: int | None = None) -> None:
        self._backend.record_anchor(event, self.index if device is None else device)

    def use_device(self, index: int) -> None:
        self._backend.use_device(index)

    @property
    def min_anchor_interval_s(self) -> float:
        return getattr(self._backend, "min_anchor_interval_s", 0.1)


class EventPool:
    """Pre-created timing events, so that the hot path never allocates one.

    The hot path takes events with ``take()`` (``deque.pop``: atomic under the GIL, no lock); the resolver
    gives them back with ``give()`` once read, and tops the pool up with ``refill()`` on its own thread.
    When the pool is empty the capture is dropped and counted rather than allocating on the hot path; the
    pool never holds more than ``limit`` events (about two per pending capture).
    """

    def __init__(self, backend: DeviceBackend, *, initial: int = 256, limit: int = 200_000) -> None:
        self._backend = backend
        self._free: collections.deque[Any] = collections.deque()
        self.limit = limit
        self.created = 0
        self.take = self._free.pop  # IndexError when empty: the caller counts a drop
        self.give = self._free.append
        self.refill(initial)

    def __len__(self) -> int:
        return len(self._free)

    def refill(self, target: int) -> int:
        """Create events until ``target`` are free (within ``limit``). Resolver thread only."""
        made = 0
        while len(self._free) < target and self.created < self.limit:
            self._free.append(self._backend.new_event())
            self.created += 1
            made += 1
        return made


def import_torch() -> Any:
    """``import torch`` for otel-npu's own use (device selection). Without NumPy installed, torch warns at
    import ("Failed to initialize NumPy"): otel-npu needs no NumPy, and a program that does not import torch
    itself should not see a warning it did not cause, so that one warning is silenced here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        import torch
    return torch
