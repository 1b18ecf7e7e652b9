"""The one small protocol every device kind implements, and the pool of timing events.

A backend wraps one device of one kind (``npu:0``, ``cuda:0``, ``cpu``). Its methods fall in three groups by
*who* calls them, which is what decides what they may cost:

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

    @abc.abstractmethod
    def label(self) -> str:
        """The device as spans name it: ``"npu:0"``, ``"cuda:1"``, ``"cpu"``."""

    # -- hot path -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def current_stream(self) -> Any:
        """The calling thread's current stream. Hot path: cheap, never waits."""

    @abc.abstractmethod
    def record(self, event: Any, stream: Any) -> None:
        """Enqueue ``event`` on ``stream``. Hot path: never waits for the device."""

    # -- resolver -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def new_event(self) -> Any:
        """A timing event, ready to record (already created on the device). Never on the hot path."""

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
    def record_anchor(self, event: Any) -> None:
        """Record ``event`` on the backend's own idle stream (used only for clock references)."""

    def close(self) -> None:
        """Release what the backend holds (threads, streams). Idempotent."""


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
