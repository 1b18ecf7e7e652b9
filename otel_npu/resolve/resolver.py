"""The resolver: one background thread per process that turns finished captures into timed records.

Why it looks the way it does (measured, see ``benchmarks/``): the serving loop's own thread competes with
this one for the GIL, and every wake-up or long stretch of Python here is time the loop may spend waiting.
So the resolver

* **wakes rarely**: every ``poll_interval_s`` (100 ms) by default while captures are in flight or were taken
  in during the last ``IDLE_POLL_S``, every ``IDLE_POLL_S`` (1 s) once none have been for that long; the hot
  path never signals it (except on the rare empty-pool path). It starts busy (otel-npu starts at a first
  capture), so a burst that follows a second of idleness waits up to ``IDLE_POLL_S`` to be taken in, and no
  other burst does.
  It wakes at once, and then polls every millisecond, only while someone waits on it (``flush()``, the
  compat pop);
* **works in slices of time, not of records**: it gives the GIL up (``time.sleep(0)``) once it has held it
  for ``SLICE_NS`` (1 ms) of resolving, so a serving thread that asked for the GIL meanwhile waits at most about
  that long instead of the interpreter's 5 ms switch interval. Not more often: each release is a hand-off the
  serving thread pays for when it asks for the GIL back (it must wait until this thread is scheduled again,
  which on a saturated host is a scheduler time slice), so a pass of ordinary size (a few hundred records)
  runs in one piece;
* **tells the exporters when the process went idle** (``on_idle``): after a pass that found nothing new and
  nothing in flight, once per burst of work: a poll interval after the burst ends, or up to ``IDLE_POLL_S``
  after it began when it followed a second of idleness. Engines may end their workers abruptly (vLLM SIGKILLs them soon
  after its API server gets SIGTERM), and exporters batch for seconds; an idle moment is when sending what
  waits costs the serving loop nothing. Said from this thread, which wakes anyway: no thread is woken per
  step for it;
* **never waits for the device**: it only asks ``query()``, and reads timings (which may block on torch_npu)
  only for events already complete;
* **makes no device call while a CUDA/ACL graph capture is in progress** anywhere in the process
  (``devices/graphs.py``): in the default ``"global"`` capture mode, a query from this thread would
  invalidate the program's capture. It only takes captures in then; the time spent capturing does not count
  toward ``event_timeout_s``;
* **survives any one capture's failure**: a ``query()`` that raises (an event recorded during a capture
  that was not seen, a device error) gives that capture host times and counts a ``query_failed`` drop; a
  failure of a whole pass is counted (``resolver_pass_failed``), logged once, and the thread goes on.

Captures arrive through ``pending`` (a deque the hot path appends to). They are taken in into one FIFO per
device stream: on a stream events complete in order, so the first incomplete capture ends the look at that
stream. A capture whose end event has not completed ``event_timeout_s`` after it was recorded is resolved
with host times and ``timed_out`` set (an ERROR span), and its events are abandoned, never reused. A step
waits for the captures inside it so that its span covers them all.

Resolved records go to ``emit`` (spans and metrics) and finished steps to ``on_step`` (the duration log
line). Drops are counted in ``accounting.Stats`` and reported by one warning at most every
``accounting.REPORT_EVERY_S``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from ..accounting import Stats
from ..devices import graphs as _graphs
from ..devices.base import DeviceBackend, EventPool
from ..record import DROPPED, Record
from ..threads import name_os_thread
from .clock import ANCHOR_SPIN_NS, CalibrationError, DeviceClock, HostClock

_log = logging.getLogger("otel_npu")
#: The clock of the periodic loss report (``Stats.report``: at most every ``REPORT_EVERY_S``). A module global
#: so that a test can drive the rate limit with a clock of its own.
_monotonic = time.monotonic

_HOST_TIMED = -1  # "seen" of a host-timed capture: nothing to wait for or to place
_FAILED = -2      # "seen" of a capture whose query() raised: host times, its events abandoned

#: Resolving time (ns) between two voluntary GIL releases (see the module docstring).
SLICE_NS = 1_000_000
#: Free timing events kept ready at least (a capture takes two); more when passes take in more.
POOL_MIN_FREE = 1024

#: Poll interval while nothing is in flight (captures arriving then wait at most this long for their span).
IDLE_POLL_S = 1.0

#: Poll interval while a flush or a blocking pop waits.
URGENT_POLL_S = 0.001


class _StepState:
    __slots__ = ("unresolved", "children", "start_ns", "end_ns", "ready")

    def __init__(self) -> None:
        self.unresolved = 0
        self.children: list[Record] = []
        self.start_ns = 1 << 63  # earliest start / latest end among the step's captures so far
        self.end_ns = -1
        self.ready = False


class _LateStep:
    """Stands for the state of a step already resolved when a capture inside it is taken in (an asyncio task
    that inherited the step and outlived it): counted nowhere, kept nowhere."""

    __slots__ = ()

    @property
    def unresolved(self) -> int:
        return 0

    @unresolved.setter
    def unresolved(self, value: int) -> None:
        pass


_LATE = _LateStep()


class _FlushMarker:
    """Put in ``pending`` by ``wait()``: done once everything taken in before it is resolved."""

    __slots__ = ("floor", "done")

    def __init__(self) -> None:
        self.floor = -1  # intake sequence number below which everything must be resolved
        self.done = False


class Resolver:
    """The background thread. ``start()``, ``wake()``, ``wait(timeout)``, ``stop(timeout)``."""

    def __init__(self, *, pending: collections.deque, backend: DeviceBackend, pool: EventPool | None,
                 clock: DeviceClock | None, host_clock: HostClock, stats: Stats,
                 emit: Callable[[Record], None], on_step: Callable[[Record, list[Record]], None] | None,
                 poll_interval_s: float, event_timeout_s: float, pools: dict | None = None,
                 clocks: dict | None = None, wanted_devices: set | None = None,
                 make_device: Callable[[int], tuple[EventPool, DeviceClock]] | None = None,
                 max_pending: int | None = None, on_room: Callable[[int], None] | None = None,
                 on_idle: Callable[[], None] | None = None) -> None:
        self._pending = pending
        self._backend = backend
        self._query = backend.query
        self._pool = pool
        self._clock = clock
        # per device (devices/base.py): the primary's are ``pool``/``clock``; others are made by make_device
        self._primary = getattr(backend, "index", 0)
        self._pools = pools if pools is not None else ({} if pool is None else {self._primary: pool})
        self._clocks = clocks if clocks is not None else ({} if clock is None else {self._primary: clock})
        self._wanted = wanted_devices if wanted_devices is not None else set()
        self._make_device = make_device
        self._preparing: dict[int, tuple[EventPool, DeviceClock]] = {}  # made, waiting for a first anchor
        self._device: int | None = None  # the resolver thread's current device, as last set by use_device
        self._host = host_clock
        self._mono = host_clock.mono
        self._stats = stats
        self._emit = emit
        self._on_step = on_step
        self._interval = poll_interval_s
        self._last_intake_ns = 0  # host monotonic time of the last pass that took captures in
        self._timeout_ns = int(event_timeout_s * 1e9)
        self._queues: dict[Any, collections.deque] = {}
        self._steps: dict[Record, _StepState] = {}
        self._markers: list[_FlushMarker] = []
        self._intake_seq = 0
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._waiters = 0
        self._stopping = False
        self._last_host_refresh = 0
        self._graph_ns = 0  # graphs.capturing_ns() at the start of the current pass
        # The pending limit covers every capture not yet turned into a span: those in ``pending`` and those
        # taken in (``_in_flight``). Intake takes only what fits, and ``on_room`` tells the hot path how many
        # may wait in ``pending`` now (its limit), so that the sum stays within ``max_pending``.
        self._max_pending = max_pending
        self._on_room = on_room
        self._room = max_pending
        self._in_flight = 0
        self._abandoned = False
        self._on_idle = on_idle
        self._worked = False  # took captures in since ``on_idle`` was last called
        self.thread = threading.Thread(target=self._run, name="otel-npu-resolver", daemon=True)
        self.alive = False

    # -- control (any thread) -------------------------------------------------------------------------
    def start(self) -> None:
        # otel-npu starts at a process's first capture: poll at the busy interval from the start, as if work
        # had just been taken in. Starting in the idle poll would leave that first burst waiting up to
        # IDLE_POLL_S, and a process killed soon after one short burst would lose all of it.
        self._last_intake_ns = self._mono()
        self.alive = True
        self.thread.start()

    def wake(self) -> None:
        self._wake.set()

    def wait(self, timeout_s: float) -> bool:
        """Block until every capture handed over before this call is resolved (or ``timeout_s`` passed).

        Returns True when all were resolved. Blocks the caller, never the device.
        """
        if not self.alive:
            return not self._pending
        marker = _FlushMarker()
        self._pending.append(marker)
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._waiters += 1
            try:
                self._wake.set()
                while not marker.done:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.alive:
                        return False
                    self._cond.wait(min(left, 0.05))
                    self._wake.set()
                return True
            finally:
                self._waiters -= 1

    def stop(self, timeout_s: float) -> None:
        """Stop the thread (waiting at most ``timeout_s``) and count every capture it did not turn into a span:
        ``device_unfinished`` (its device work was still running), ``resolver_stopped`` (never taken in), or,
        when the thread is held up (in an exporter that does not answer, say), ``shutdown_timeout`` for all of
        them; such a thread then emits nothing more (what it held was counted as lost)."""
        self._stopping = True
        self._wake.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(max(0.0, timeout_s))
        waiting = sum(1 for item in list(self._pending) if item.__class__ is not _FlushMarker)
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self._abandoned = True
            lost = waiting + self._in_flight
            if lost:
                self._stats.drop("shutdown_timeout", n=lost)
        else:
            if self._in_flight:
                self._stats.drop("device_unfinished", n=self._in_flight)
            if waiting:
                self._stats.drop("resolver_stopped", n=waiting)
        self._in_flight = 0
        self._pending.clear()

    # -- the thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread("otel-npu-resolver")
        if not self._backend.host_timed:
            self._use_device(self._primary)  # this thread's current device starts as device 0
        try:
            while not self._stopping and not self._abandoned:
                if self._waiters:
                    timeout = URGENT_POLL_S
                elif (self._pending or self._queues or self._steps or self._preparing
                      or self._mono() - self._last_intake_ns < IDLE_POLL_S * 1e9):
                    timeout = self._interval
                else:  # nothing in flight, nor taken in for IDLE_POLL_S: wake up less (each wake-up can
                    # preempt a busy torch thread). Not sooner: a loop pausing between bursts would find
                    # the event pool empty before the next wake-up (the hot path signals only then).
                    timeout = max(self._interval, IDLE_POLL_S)
                self._wake.wait(timeout)
                self._wake.clear()
                self._guarded_pass()
            if not self._abandoned:
                self._guarded_pass()
        except BaseException:  # a bug here must not go unnoticed, nor take the program down
            _log.exception("otel-npu: the resolver thread failed; captures will no longer be resolved")
        finally:
            self.alive = False
            with self._cond:
                self._cond.notify_all()

    def _guarded_pass(self) -> None:
        try:
            self._pass()
        except Exception as exc:  # a bug or a device error outside any one capture: count it, go on
            self._stats.note_error("resolver_pass_failed", exc)
            if self._stats.counts["resolver_pass_failed"] == 1:
                _log.exception("otel-npu: a resolver pass failed (counted as resolver_pass_failed; "
                               "the resolver goes on)")

    def _pass(self) -> None:
        mono = self._mono
        now = mono()
        self._graph_ns = _graphs.capturing_ns(now)
        taken = self._take_in()
        if taken:
            self._last_intake_ns = now
            self._worked = True
        elif self._worked and self._on_idle is not None and not (self._queues or self._steps or self._pending):
            self._worked = False
            try:
                self._on_idle()
            except Exception as exc:  # an exporter's problem: counted, the resolver goes on
                self._stats.note_error("on_idle_failed", exc)
        # No device call while a graph capture is in progress; one that begins waits for this section,
        # which stops early once one is waiting (``_graphs.active`` is set first): see the docstring.
        if _graphs.enter_device_calls():
            try:
                if self._wanted or self._preparing:
                    self._add_wanted_devices()
                self._calibrate(now)
                self._resolve_ready(now)
                if not _graphs.active:
                    self._refill_pool(taken)
            finally:
                _graphs.exit_device_calls()
        if self._max_pending is not None:
            self._set_room(self._max_pending - self._in_flight)
        self._stats.report(_monotonic())
        if self._markers:
            self._settle_markers()
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def _set_room(self, room: int) -> None:
        """Tell the hot path how many captures may wait in ``pending`` now."""
        room = max(0, room)
        if room != self._room and self._on_room is not None:
            self._room = room
            self._on_room(room)

    def _take_in(self) -> int:
        pending, queues, steps = self._pending, self._queues, self._steps
        stream_key = None if type(self._backend).stream_key is DeviceBackend.stream_key else self._backend.stream_key
        seq = self._intake_seq
        popleft = pending.popleft
        taken = 0
        # What is there now, and no more than fits under the limit: producers refilling ``pending`` meanwhile
        # wait for the next pass (a loop that kept taking would hold ever more, and resolve nothing).
        budget = len(pending)
        if self._max_pending is not None:
            budget = min(budget, self._max_pending - self._in_flight)
            # Room for new captures counted as if all of these were taken in already: set first, so that
            # producers refilling ``pending`` during the loop below cannot push the sum past the limit.
            self._set_room(self._max_pending - self._in_flight - budget)
        while budget > 0 and pending and not self._abandoned:
            item = popleft()
            if item.__class__ is _FlushMarker:
                item.floor = seq
                self._markers.append(item)
                continue
            item.intake = seq
            item.graph_ns = self._graph_ns
            seq += 1
            item.done = False
            item.timed_out = False
            # The enclosing step: the nearest ancestor that is a step and was timed.
            step = item.parent
            while step is not None and (not step.is_step or step.start is DROPPED):
                step = step.parent
            item.step = step
            if step is not None:
                state = steps.get(step)
                if state is None:
                    if getattr(step, "done", False):  # resolved already (a task outlived it): nothing to wait for
                        state = _LATE
                    else:
                        state = steps[step] = _StepState()
                state.unresolved += 1
            key = item.stream if stream_key is None else stream_key(item.stream)
            queue = queues.get(key)
            if queue is None:
                queue = queues[key] = collections.deque()
            queue.append(item)
            taken += 1
            budget -= 1
        self._intake_seq = seq
        self._in_flight += taken
        return taken

    def _use_device(self, index: int) -> None:
        """Make ``index`` this thread's current device before calling into it (ACL contexts are per thread)."""
        if index != self._device:
            self._device = index
            try:
                self._backend.use_device(index)
            except Exception as exc:
                self._stats.note_error("use_device_failed", exc)

    def _add_wanted_devices(self) -> None:
        """Make the events and clock of each device a capture asked for; publish them once the clock has a
        first anchor (taken without waiting: a busy device's anchor may take several passes)."""
        for index in sorted(self._wanted):
            self._wanted.discard(index)
            if index in self._pools or index in self._preparing or self._make_device is None:
                continue
            self._use_device(index)
            try:
                self._preparing[index] = self._make_device(index)
            except Exception as exc:  # captures on it stay untimed (device_starting); tried again on the next
                self._device_failed(index, exc)
        for index, (pool, clock) in list(self._preparing.items()):
            if _graphs.active:
                return
            self._use_device(index)
            try:
                clock.calibrate(wait_s=ANCHOR_SPIN_NS / 1e9)
            except Exception as exc:
                del self._preparing[index]
                self._device_failed(index, exc)
                continue
            if clock.anchors:
                del self._preparing[index]
                self._clocks[index] = clock
                self._pools[index] = pool  # published last: the hot path looks here

    def _device_failed(self, index: int, exc: Exception) -> None:
        self._stats.note_error("add_device_failed", exc)
        if self._stats.counts["add_device_failed"] == 1:
            _log.warning("otel-npu: preparing device %s failed (captures on it are not timed; retried): %s: %s",
                         index, type(exc).__name__, exc)

    def _calibrate(self, now: int) -> None:
        if now - self._last_host_refresh > 2e9:
            self._host.refresh()
            self._last_host_refresh = now
        for index, clock in list(self._clocks.items()):
            self._calibrate_one(index, clock, now)

    def _calibrate_one(self, index: int, clock: DeviceClock, now: int) -> None:
        if not _graphs.active and clock.due(now):
            self._use_device(index)
            try:
                clock.calibrate(wait_s=ANCHOR_SPIN_NS / 1e9)  # never stalls the resolver: see DeviceClock
            except CalibrationError as exc:
                if not _graphs.active:  # cut short by a graph capture beginning: not a failure
                    self._stats.drop("calibration_failed", exc)
            except Exception as exc:  # a device error: keep the old anchor, say so once per report
                self._stats.drop("calibration_failed", exc)

    def _resolve_ready(self, now: int) -> int:
        query, timeout_ns, mono = self._query, self._timeout_ns, self._mono
        host_timed = self._backend.host_timed
        finish = self._finish
        graph_ns = self._graph_ns
        perf = time.perf_counter_ns
        give_up_at = perf() + SLICE_NS
        count = 0
        several = len(self._pools) > 1
        for key in list(self._queues):
            queue = self._queues[key]
            if several and queue and not host_timed:
                self._use_device(queue[0].stream.device_index)
            while queue:
                if _graphs.active:  # a graph capture waits to begin: stop calling the device now
                    break
                r = queue[0]
                if host_timed:
                    seen = _HOST_TIMED
                else:
                    try:
                        done = query(r.end)
                    except Exception as exc:  # this capture's events are unusable; the others are not
                        self._stats.drop("query_failed", exc)
                        done = None
                    if done:
                        seen = mono()
                    elif done is None:
                        seen = _FAILED
                    # time spent in graph captures (no queries then) does not count toward the timeout
                    elif now - r.host_end - (graph_ns - r.graph_ns) > timeout_ns:
                        seen = None  # timed out
                    else:
                        break
                queue.popleft()
                finish(r, seen)
                count += 1
                if not count & 15 and perf() >= give_up_at:  # the clock read every 16 records: ≈ 20 µs apart
                    time.sleep(0)  # let a serving thread that asked for the GIL have it
                    give_up_at = perf() + SLICE_NS
            if not queue:
                del self._queues[key]
        self._stats.resolved += count
        return count

    def _finish(self, r: Record, seen: int | None) -> None:
        """Place ``r`` in time (``seen is None``: it timed out), then emit it or hold it for its step."""
        host = self._host
        if seen is None:
            r.timed_out = True
            begin, finish, error = r.host_start, r.host_end, 0
            self._stats.timed_out += 1
        elif seen == _FAILED:  # counted by the caller; its events are not given back to the pool
            begin, finish, error = r.host_start, r.host_end, 0
        elif seen == _HOST_TIMED:  # the events are the host's own readings
            begin, finish, error = r.start, r.end, 0
        else:
            if len(self._pools) == 1:
                pool, clock = self._pool, self._clock
            else:  # several devices: the capture's events and anchors are its stream's device's
                index = r.stream.device_index
                pool, clock = self._pools[index], self._clocks[index]
            try:
                begin, finish, error = clock.place(r.start, r.end, r.host_start, r.host_end, seen)
            except Exception as exc:  # a device error reading times: keep the span, with host times
                self._stats.note_error("timing_read_failed", exc)
                begin, finish, error = r.host_start, r.host_end, 0
            pool.give(r.start)
            pool.give(r.end)
        offset = host.offset_ns
        r.start_ns = begin + offset
        r.end_ns = finish + offset
        r.clock_error_ns = error + host.error_ns
        if r.is_step:
            state = self._steps.get(r)
            if state is not None and state.unresolved:
                state.ready = True  # waits for the captures inside it
                return
            self._finish_step(r, state)
        else:
            self._complete(r)

    def _finish_step(self, r: Record, state: _StepState | None) -> None:
        children: list = []
        if state is not None:
            del self._steps[r]
            children = state.children
            if state.end_ns >= 0:
                r.start_ns = min(r.start_ns, state.start_ns)
                r.end_ns = max(r.end_ns, state.end_ns)
        self._complete(r)
        if self._on_step is not None:
            children.sort(key=_by_host_start)
            try:
                self._on_step(r, children)
            except Exception:
                _log.exception("otel-npu: reporting step %r failed", r.name)

    def _complete(self, r: Record) -> None:
        """``r`` has its final times: emit it, and count it as done in its step."""
        r.done = True
        if self._abandoned:  # stop() gave up on this thread and counted what it held as lost
            return
        try:
            self._emit(r)
        except Exception as exc:
            self._stats.drop("emit_failed", exc)
            if self._stats.drops["emit_failed"] == 1:
                _log.exception("otel-npu: turning capture %r into a span failed", r.name)
        self._in_flight -= 1
        step = r.step
        if step is not None:
            state = self._steps.get(step)
            if state is None:  # the step was resolved before this capture was taken in
                return
            state.unresolved -= 1
            if self._on_step is not None:  # the children are only needed for the duration log line
                state.children.append(r)
            if r.start_ns < state.start_ns:
                state.start_ns = r.start_ns
            if r.end_ns > state.end_ns:
                state.end_ns = r.end_ns
            if state.ready and not state.unresolved:
                self._finish_step(step, state)

    def _refill_pool(self, taken: int) -> None:
        # Enough free events for the busiest pass seen lately, twice over (two per capture).
        target = max(POOL_MIN_FREE, 4 * taken)
        for index, pool in list(self._pools.items()):
            if len(pool) < target and not _graphs.active:
                self._use_device(index)
                try:
                    pool.refill(target)
                except Exception as exc:
                    self._stats.note_error("pool_refill_failed", exc)

    # -- flush bookkeeping (resolver thread) ------------------------------------------------------------
    def _settle_markers(self) -> None:
        """Mark done the flush markers whose predecessors are all resolved."""
        floor = self._intake_seq  # intake number of the oldest unresolved record
        for queue in self._queues.values():
            if queue and queue[0].intake < floor:
                floor = queue[0].intake
        for step, state in self._steps.items():
            if state.ready and step.intake < floor:
                floor = step.intake
        keep = []
        for marker in self._markers:
            if marker.floor <= floor:
                marker.done = True
            else:
                keep.append(marker)
        self._markers = keep


def _by_host_start(r: Record) -> int:
    return r.host_start
