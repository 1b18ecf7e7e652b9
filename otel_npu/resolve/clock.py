"""Device time -> host monotonic time -> wall clock (epoch ns), with a stated error bound.

Devices give either durations between two events (CUDA ``elapsed_time``: float32 ms) or an absolute device
timestamp on a clock of their own (torch_npu ``recorded_time``: µs since the device booted). Spans need Unix
epoch nanoseconds. The conversion, in two steps:

1. **Device -> host monotonic** with *anchors*. An anchor is an event recorded on an idle stream of the
   backend's own, with the host monotonic time read just before the record call (``t0``), just after it
   (``t1``) and when the event was first seen complete (``t2``). The event ran inside ``[t0, t2]``; the
   backend says where to put the estimate (``"submit"``: at ``t1``, where an idle stream runs a record at once;
   ``"midpoint"``: the middle, where records are queued first). The error bound of an anchor is the
   distance from the estimate to the far end of the window; the narrowest of several tries is kept
   (Cristian's method). A captured event is then placed at ``anchor + offset * rate``, where ``offset`` is the
   device time from the anchor to the event and ``rate`` corrects the drift between the device's oscillator
   and the host's: the slope between the newest anchor and the oldest one kept (up to a minute back), used
   once they are ``MIN_DRIFT_BASELINE_S`` apart.
2. **Host monotonic -> wall clock** by an offset ``time_ns() - perf_counter_ns()`` sampled between two
   monotonic reads (error below 1 µs), refreshed every 2 s so that NTP steps are followed.

Error budget of a placed event: the anchor's bound + ``|offset| x rate uncertainty`` + the device timer's
resolution (CUDA: 0.5 µs, and float32 ms loses ≈ 6e-8 of the offset: ≈ 0.13 µs at 2 s, ≈ 1 µs at 10 s, ≈ 8 µs
at 100 s, ≈ 250 µs at an hour). So anchors are taken for as long as otel-npu runs, and each capture uses the
newest anchor seen complete *before* the capture was entered (its offset is positive and short). How often:
often enough that the drift still unknown cannot move an event by more than ``DRIFT_ERROR_NS`` (or the
anchor's own bound, if wider) between two anchors — every 0.1 s at start (the drift is only assumed to be
within ``ASSUMED_DRIFT``; NPU without ``aclrtEventGetTimestamp``: every 0.5 s, since each read then
drains the task queue holding the GIL), every ``ANCHOR_INTERVAL_S`` (2 s)
once it is measured.

On a busy device whose streams share one queue (``CUDA_DEVICE_MAX_CONNECTIONS=1``; the NPU host task queue)
an anchor waits behind the queued work: its window, hence its bound, includes that wait, so the stated bound
still holds (the "submit" estimate is then off by up to the wait, which the bound covers). The resolver
does not wait for such an anchor (``calibrate(wait_s=...)``: a try not complete after ``ANCHOR_SPIN_NS`` is
looked at again next pass), and an anchor much wider than the one in use is not taken. Causality tightens it further: an event cannot have run
before the host enqueued it nor after the resolver saw it complete; estimates outside are moved inside.
``benchmarks/clock_accuracy.py`` measures the result over an hour of simulated time.

Everything here runs on the resolver thread, except the first calibration at start-up.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable

from ..devices import graphs as _graphs
from ..devices.base import DeviceBackend

#: Longest time between anchors (once the drift is measured).
ANCHOR_INTERVAL_S = 2.0
#: Shortest time between anchors (at start, while the drift is unknown).
MIN_ANCHOR_INTERVAL_S = 0.1
#: Anchors are spaced so that the drift uncertainty moves an event by at most this much between two.
DRIFT_ERROR_NS = 5_000
#: Drift is estimated from anchors at least this far apart (anchor error / baseline = rate error).
MIN_DRIFT_BASELINE_S = 1.0
#: A calibration attempt that has not seen its event complete after this long is abandoned.
ANCHOR_WAIT_S = 1.0
#: Anchors wider than this do not slow re-anchoring down further (a narrower one is wanted soon).
WIDE_ANCHOR_NS = 50_000
#: How long the resolver waits (spinning on query()) for an anchor event in one pass (see ``calibrate``).
ANCHOR_SPIN_NS = 200_000
#: A new anchor this many times wider than the one in use is not taken (a busy device): it would only make
#: the bounds of the spans placed from it worse. The drift keeps being tracked from the anchors kept.
BUSY_ANCHOR_FACTOR = 4
#: Until drift is measured, the bound assumes the device and host oscillators differ by up to this much
#: (crystal oscillators are specified at ±50-100 ppm).
ASSUMED_DRIFT = 100e-6


class HostClock:
    """Host monotonic ns (``perf_counter_ns``) to Unix epoch ns."""

    def __init__(self, mono: Callable[[], int] = time.perf_counter_ns,
                 wall: Callable[[], int] = time.time_ns) -> None:
        self.mono = mono
        self._wall = wall
        self.offset_ns = 0
        self.error_ns = 0
        self.refresh()

    def refresh(self) -> None:
        """Sample ``wall - mono`` bracketed by two monotonic reads; keep the tightest of five."""
        best = None
        for _ in range(5):
            before = self.mono()
            wall = self._wall()
            after = self.mono()
            if best is None or after - before < best[0]:
                best = (after - before, wall - (before + after) // 2)
        self.error_ns = best[0] // 2 + 1
        self.offset_ns = best[1]

    def to_wall(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns


class Anchor:
    """A reference event whose host monotonic time is known within ``bound_ns``."""

    __slots__ = ("event", "reference", "mono_ns", "bound_ns", "seen_ns", "device_ns")

    def __init__(self, event: Any, reference: Any, mono_ns: int, bound_ns: int, seen_ns: int,
                 device_ns: float) -> None:
        self.event = event
        self.reference = reference
        self.mono_ns = mono_ns      # estimated host monotonic time at which the event ran
        self.bound_ns = bound_ns    # |estimate - truth| <= bound_ns
        self.seen_ns = seen_ns      # host monotonic time at which the event was seen complete
        self.device_ns = device_ns  # position on the device's own timeline (chained offsets)


class CalibrationError(RuntimeError):
    """No anchor event completed in time: the device (or its driver queue) is not making progress."""


class DeviceClock:
    """Places completed device events on the host monotonic clock (see the module docstring)."""

    def __init__(self, backend: DeviceBackend, take_event: Callable[[], Any], give_event: Callable[[Any], None],
                 mono: Callable[[], int] = time.perf_counter_ns, keep_s: float = 70.0) -> None:
        self._backend = backend
        self._take = take_event
        self._give = give_event
        self._mono = mono
        self._keep_ns = int(keep_s * 1e9)
        self.anchors: collections.deque[Anchor] = collections.deque()
        self.rate = 1.0                   # host ns per device ns
        self.rate_error = ASSUMED_DRIFT   # bound on |rate - truth|, until measured
        self._pending: tuple[Any, int, int] | None = None  # an anchor try still waiting for its event
        self._last_try_ns = 0             # when a try last ended without a new anchor (see due())


    # -- calibration ----------------------------------------------------------------------------------
    def _sample(self, wait_ns: int) -> tuple[Any, int, int, int] | None:
        """Record an anchor event and wait up to ``wait_ns`` (query() only) for it: ``(event, t0, t1, t2)``,
        or ``None`` when it has not completed by then (it is then kept in ``self._pending`` and looked at
        again by the next ``calibrate``)."""
        backend, mono = self._backend, self._mono
        event = self._take()
        t0 = mono()
        backend.record_anchor(event)
        t1 = mono()
        return self._wait(event, t0, t1, wait_ns)

    def _wait(self, event: Any, t0: int, t1: int, wait_ns: int) -> tuple[Any, int, int, int] | None:
        backend, mono = self._backend, self._mono
        # Spin briefly without sleeping: a sleep would widen the window (and the bound) by the timer slack.
        deadline_spin = mono() + min(wait_ns, ANCHOR_SPIN_NS)
        deadline = mono() + wait_ns
        while not backend.query(event):
            if _graphs.active:  # a graph capture waits to begin: no more device calls (devices/graphs.py)
                raise CalibrationError("a graph capture began while an anchor was being taken")
            now = mono()
            if now - t0 > ANCHOR_WAIT_S * 1e9:
                self._pending = None
                raise CalibrationError(f"an anchor event on {backend.label()} did not complete within "
                                       f"{ANCHOR_WAIT_S:.0f} s")  # abandoned: the event may still run
            if now > deadline:
                self._pending = (event, t0, t1)
                return None
            if now > deadline_spin:
                time.sleep(50e-6)
        self._pending = None
        return event, t0, t1, mono()

    def calibrate(self, tries: int = 3, good_ns: int = 10_000, max_tries: int = 8, *,
                  read_now: bool = True, wait_s: float = ANCHOR_WAIT_S) -> Anchor | None:
        """Take a new anchor: wait, with ``query()`` only, for an event on the backend's own idle stream.

        Keeps the narrowest of ``tries`` windows, trying up to ``max_tries`` times while none is under
        ``good_ns`` (a preempted sample has a wide window; a later one usually does not). With
        ``read_now=False`` the anchor's device time is read later, by ``place`` on the resolver thread:
        at start-up the first anchor is taken on the capturing thread, which must not do timing reads
        (torch_npu's block and drain every stream's queue).

        ``wait_s``: how long one try may wait for its event. At start-up, up to ``ANCHOR_WAIT_S``. The
        resolver passes ``ANCHOR_SPIN_NS``: on a busy device whose streams share one queue
        (``CUDA_DEVICE_MAX_CONNECTIONS=1``, the NPU task queue) an anchor waits behind the queued work, and
        waiting for it would stall the resolver (no captures resolved, the event pool running dry). An event
        not complete by then stays pending and the next call looks at it again (its window, and bound, then
        includes the wait: it is kept only if it is the best there is). Returns the new anchor, or ``None``
        while the try is pending. Raises ``CalibrationError`` when an anchor has not completed after
        ``ANCHOR_WAIT_S``.
        """
        wait_ns = int(wait_s * 1e9)
        best = None
        attempt = 0
        if self._pending is not None:
            done = self._wait(*self._pending, wait_ns=0)
            if done is None:
                return None
            best = self._candidate(done, best)
            attempt = tries  # a busy device: this one sample is all we take now
        while attempt < tries or (attempt < max_tries and best[2] > good_ns):
            attempt += 1
            sample = self._sample(wait_ns)
            if sample is None:
                if best is None:
                    return None
                break
            best = self._candidate(sample, best)
        event, estimate, bound, seen = best
        if self.anchors and bound > BUSY_ANCHOR_FACTOR * max(self._error_now(seen), good_ns):
            # much wider than the anchor in use (a busy device): not worth replacing it; try again later
            self._give(event)
            self._last_try_ns = seen
            return None
        anchor = Anchor(event, None, estimate, bound, seen, 0.0)
        self.anchors.append(anchor)
        if read_now:
            self._read(anchor)
        self._retire(seen)
        return anchor

    @property
    def min_interval_s(self) -> float:
        """Shortest time between anchors for this backend (NPU without direct reads: 0.5 s)."""
        return getattr(self._backend, "min_anchor_interval_s", MIN_ANCHOR_INTERVAL_S)

    def _error_now(self, now: int) -> float:
        """The error bound of the newest anchor, carried to ``now`` (its bound + the drift uncertainty)."""
        newest = self.anchors[-1]
        return newest.bound_ns + (now - newest.seen_ns) * self.rate_error

    def _candidate(self, sample: tuple[Any, int, int, int], best: tuple | None) -> tuple:
        event, t0, t1, t2 = sample
        if self._backend.anchor_estimate == "submit":
            estimate, bound = t1, max(t1 - t0, t2 - t1)
        else:
            estimate, bound = (t0 + t2) // 2, (t2 - t0 + 1) // 2
        if best is None or bound < best[2]:
            if best is not None:
                self._give(best[0])
            return (event, estimate, bound, t2)
        self._give(event)
        return best

    def _read(self, anchor: Anchor) -> None:
        """Read the anchor's device time (resolver thread) and chain it to the one before for drift."""
        anchor.reference = self._backend.reference(anchor.event)
        index = self.anchors.index(anchor)
        if index > 0:
            previous = self.anchors[index - 1]
            if previous.reference is None:
                self._read(previous)
            anchor.device_ns = previous.device_ns + self._backend.offset_ns(previous.reference, anchor.event)
        self._update_rate(anchor)

    def _update_rate(self, newest: Anchor) -> None:
        """Slope between ``newest`` and the oldest anchor kept (the longest baseline: the smallest error)."""
        base = self.anchors[0]
        if base is newest or base.reference is None:
            return
        device_span = newest.device_ns - base.device_ns
        if device_span < MIN_DRIFT_BASELINE_S * 1e9:
            return
        rate_error = (newest.bound_ns + base.bound_ns) / device_span
        if rate_error < self.rate_error or device_span >= 10 * MIN_DRIFT_BASELINE_S * 1e9:
            self.rate = (newest.mono_ns - base.mono_ns) / device_span
            self.rate_error = rate_error

    def _retire(self, now: int) -> None:
        anchors = self.anchors
        while len(anchors) > 2 and now - anchors[1].seen_ns > self._keep_ns:
            self._give(anchors.popleft().event)

    def interval_ns(self) -> int:
        """Time to the next anchor: short while the drift is uncertain, ANCHOR_INTERVAL_S once it is known.

        Often enough that the unknown drift moves an event by no more than ``DRIFT_ERROR_NS`` or the anchor's
        own bound, whichever is larger (wide anchors, as on NPU, gain nothing from frequent re-anchoring),
        and never more often than the backend's ``min_anchor_interval_s``."""
        budget = max(DRIFT_ERROR_NS, min(self.anchors[-1].bound_ns if self.anchors else 0, WIDE_ANCHOR_NS))
        seconds = budget / 1e9 / max(self.rate_error, 1e-12)
        return int(min(ANCHOR_INTERVAL_S, max(self.min_interval_s, seconds)) * 1e9)

    def due(self, now: int) -> bool:
        if not self.anchors or self._pending is not None:
            return True
        return now - max(self.anchors[-1].seen_ns, self._last_try_ns) >= self.interval_ns()

    # -- placing events -------------------------------------------------------------------------------
    def anchor_for(self, host_ns: int) -> Anchor:
        """The newest anchor seen complete before ``host_ns`` (else the oldest one kept)."""
        for anchor in reversed(self.anchors):
            if anchor.seen_ns <= host_ns:
                return anchor
        return self.anchors[0]

    def place(self, start: Any, end: Any, host_start: int, host_end: int, seen: int) -> tuple[int, int, int]:
        """Host monotonic ``(start, end, error bound)`` of a capture whose two events completed.

        ``host_start``/``host_end``: host monotonic times just before each event was recorded (an event
        cannot run earlier); ``seen``: when the resolver saw the end event complete (it cannot run later).
        """
        anchor = self.anchor_for(host_start)
        if anchor.reference is None:
            self._read(anchor)
        offset, duration = self._backend.place(anchor.reference, start, end)
        rate = self.rate
        begin = anchor.mono_ns + int(offset * rate)
        finish = begin + int(duration * rate)
        # anchor + drift over the distance covered + float32 ms rounding + the timer's resolution (CUDA
        # 0.5 µs; NPU timestamps are whole µs)
        error = (anchor.bound_ns + int((abs(offset) + abs(duration)) * (self.rate_error + 6e-8))
                 + self._backend.timer_resolution_ns)
        # Causality: the anchor may be off by its bound, the measured duration is not. Shift the whole
        # span (keeping its duration) into [enqueued, seen complete]; clamp only if it cannot fit.
        late = max(host_start - begin, host_end - finish)
        if late > 0:
            begin += late
            finish += late
        if finish > seen:
            begin = max(host_start, begin - (finish - seen))
            finish = seen
        return begin, finish, error
