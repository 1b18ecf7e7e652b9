"""The simulated device (``SimDevice``) and its parts; see the ``otel_npu.testing`` package docstring."""

from __future__ import annotations

import collections
import contextlib
import importlib.machinery
import itertools
import struct
import threading
import time
import types
from typing import Any, Callable, Iterator

from ..devices.base import DeviceBackend

_ids = itertools.count(1)


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


TimingCall = collections.namedtuple("TimingCall", "method thread completed")
#: A device call that broke a graph capture: what was called, on which thread, and the capture's mode.
CaptureViolation = collections.namedtuple("CaptureViolation", "call thread capture_thread mode")


def _hold_gil(seconds: float) -> None:
    """Keep the GIL for about ``seconds`` (one C-level call per ~0.1 ms: the interpreter cannot switch
    threads inside it), as a blocking read in a C extension that does not release the GIL does."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    chunk = itertools.repeat(0, 20_000)
    while time.perf_counter() < end:
        sum(itertools.islice(chunk, 20_000))
        chunk = itertools.repeat(0, 20_000)


class SimEvent:
    """A timing event. ``exec_mono_ns`` is the truth: host monotonic ns at which the stream ran it."""

    def __init__(self, device: "SimDevice", enable_timing: bool = True, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self._device = device
        self.enable_timing = enable_timing
        self.exec_mono_ns: int | None = None  # set at submit when predictable, else by the stream thread
        self.stream: SimStream | None = None
        self.device_index: int | None = None  # the device of its first record (torch creates it then)
        self.records = 0          # records that are timing records
        self.captured_records = 0  # records made on a capturing stream (not timing records)
        self.issued = True        # False while its latest record waits in the NPU-style host task queue
        self.npu_event = 0        # the ACL handle, once created (torch_npu exposes it so)
        #: The latest timing records, oldest first: ``[host mono ns when recorded, exec_mono_ns once the
        #: stream ran it, else None]``. Kept when the event is recorded again, so that a record's truth can be
        #: read after otel-npu has reused the event (``ran_at``). Bounded.
        self.history: collections.deque[list] = collections.deque(maxlen=16)

    # -- torch.cuda.Event / torch_npu.npu.Event API -----------------------------------------------------
    def record(self, stream: "SimStream | None" = None) -> None:
        stream = stream or self._device.current_stream()
        self._device.records_made[threading.get_ident(), stream] += 1  # who records where (tests count)
        if self.device_index is None:
            self.device_index = stream.device_index
            self.npu_event = 0x5000_0000 + next(_ids)
            self._device._handles[self.npu_event] = self
        elif self.device_index != stream.device_index:
            raise RuntimeError(f"Event device {self.device_index} does not match recording stream's device "
                               f"{stream.device_index}.")
        stream._submit_record(self)

    def query(self) -> bool:
        self._device._device_call("event query")
        return self._complete()

    def _complete(self) -> bool:
        if self.records == 0:
            return True  # never recorded (a record during a capture does not count): CUDA and torch_npu say True
        if not self.issued:
            return False
        t = self.exec_mono_ns
        return t is not None and self._device.mono() >= t

    def synchronize(self) -> None:
        self._device._device_call("event synchronize")
        self._wait()

    def _wait(self) -> None:
        while not self._complete():
            t = self.exec_mono_ns
            wait = 50e-6 if t is None or not self.issued else max(0.0, (t - self._device.mono()) / 1e9)
            time.sleep(min(wait, 0.01) or 1e-6)

    def _read(self, method: str, *others: "SimEvent") -> None:
        dev = self._device
        dev._device_call(method)
        events = (self, *others)
        completed = all(e._complete() for e in events)
        dev.timing_calls.append(TimingCall(method, threading.get_ident(), completed))
        if any(e.records == 0 for e in events):
            raise RuntimeError("Both events must be recorded before calculating elapsed time."
                               if others else "Event must be recorded before getting recorded timestamp.")
        if others and any(e.device_index != self.device_index for e in others):
            raise RuntimeError("Both events must be on the same device to calculate elapsed time.")
        if dev.api == "cuda":
            if not completed:
                raise RuntimeError("CUDA error: device not ready (event not completed)")
            return
        # torch_npu: emptyAllNPUStream() (waits for every host task queue), synchronize, with the GIL held
        dev._drain_task_queue()
        for e in events:
            e._wait()
        _hold_gil(dev.read_gil_hold_s)

    def elapsed_time(self, end: "SimEvent") -> float:
        """Milliseconds from this event to ``end``, rounded to float32 like CUDA/ACL."""
        self._read("elapsed_time", end)
        dev = self._device
        index = self.device_index
        return _float32((dev.device_ns(end.exec_mono_ns, index) - dev.device_ns(self.exec_mono_ns, index)) / 1e6)

    def recorded_time(self) -> int:
        """Device timestamp in microseconds (torch_npu >= 7.0.0 ``recorded_time``)."""
        self._read("recorded_time")
        return self._device.device_ns(self.exec_mono_ns, self.device_index) // 1000

    # -- truth, for tests ----------------------------------------------------------------------------
    def ran_at(self, recorded_after_ns: int) -> int | None:
        """When the stream ran this event's first timing record made at or after host mono
        ``recorded_after_ns`` (``None``: not run yet). Unlike ``exec_mono_ns`` (its latest record's), this
        stays right after the event is recorded again, as otel-npu does once a capture is resolved (its
        events go back to the pool; the next capture or clock anchor records them)."""
        for recorded, ran in self.history:
            if recorded >= recorded_after_ns:
                return ran
        raise LookupError(f"no record of this event at or after {recorded_after_ns} among its latest "
                          f"{len(self.history)}")

    @property
    def device_ns(self) -> int:
        return self._device.device_ns(self.exec_mono_ns, self.device_index or 0)


class SimStream:
    """An in-order queue of simulated device work, executed by a thread of its own."""

    def __init__(self, device: "SimDevice", name: str, device_index: int | None = None) -> None:
        self.device = device
        self.name = name
        self.stream_id = next(_ids)
        self.cuda_stream = self.npu_stream = 0x7000 + self.stream_id  # what torch exposes as the raw handle
        self.device_index = device.index if device_index is None else device_index
        self._ops: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._tail: int | None = 0  # host mono ns at which queued work ends; None while unpredictable
        self._busy = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.capturing: SimGraph | None = None  # the graph being captured on this stream, if any

    def __repr__(self) -> str:
        return f"SimStream({self.name!r}, device={self.device_index})"

    # -- work ----------------------------------------------------------------------------------------
    def launch(self, seconds: float) -> None:
        """Queue a kernel that keeps the stream busy for ``seconds`` of device time. Returns at once."""
        if not seconds >= 0:
            raise ValueError(f"launch(seconds={seconds!r}): expected a number >= 0")
        if self.capturing is not None:
            self.capturing._kernels.append(seconds)
            return
        self.device._enqueue(self, "kernel", int(seconds * 1e9))

    def call(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn`` to run on the stream's thread when the stream reaches it. Returns at once."""
        self.device._enqueue(self, "call", fn)

    def synchronize(self) -> None:
        """Block until everything queued so far has run."""
        self.device._device_call("stream synchronize", self)
        self._sync()

    def _sync(self) -> None:
        self.device._drain_task_queue()
        with self._cond:
            while self._ops or self._busy:
                self._cond.wait(0.01)
        tail = self._tail
        if tail is not None:
            while self.device.mono() < tail:
                time.sleep(max(0.0, (tail - self.device.mono()) / 1e9))

    def query(self) -> bool:
        self.device._device_call("stream query", self)
        with self._cond:
            idle = not self._ops and not self._busy
        return idle and (self._tail is None or self.device.mono() >= self._tail)

    # -- internals -----------------------------------------------------------------------------------
    def _submit_record(self, event: SimEvent) -> None:
        if self.capturing is not None:  # a node in the graph, not a timing record; replays record nothing
            event.captured_records += 1
            return
        event.stream = self
        event.records += 1
        entry = [self.device.mono(), None]
        event.history.append(entry)
        self.device._enqueue(self, "record", (event, entry))

    def _submit(self, kind: str, arg: Any) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        dev = self.device
        now = dev.mono()
        planned = None
        with self._cond:
            start = None if self._tail is None else max(now + dev.launch_latency_ns, self._tail)
            if start is not None and dev.shared_queue:  # one hardware queue for all streams of the device
                with dev._queue_lock:
                    start = max(start, dev._queue_tail.get(self.device_index, 0))
                    if kind in ("record", "kernel"):
                        dev._queue_tail[self.device_index] = start + (arg if kind == "kernel" else 0)
            if kind == "record":
                event, entry = arg
                event.exec_mono_ns = entry[1] = start  # None: decided when the stream thread gets there
                event.issued = True
                if start is not None:
                    # Nothing to execute: the device reaches it at ``start``. No thread hand-off, so
                    # recording stays as cheap for the host as on real hardware.
                    self._tail = start
                    return
            elif kind == "kernel" and start is not None:
                self._tail = planned = start + arg
            else:
                self._tail = None
            self._ops.append((kind, arg, now, planned))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"sim-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        mono, latency = self.device.mono, self.device.launch_latency_ns
        end = 0  # when the previous op ended, host mono ns
        while True:
            with self._cond:
                while not self._ops:
                    if self._closed:
                        return
                    self._cond.wait()
                kind, arg, submitted, planned = self._ops.popleft()
                self._busy = 1
            start = max(submitted + latency, end)
            if kind == "kernel":
                end = planned if planned is not None else start + arg
                _sleep_until(mono, end)
            elif kind == "record":
                event, entry = arg
                if entry[1] is None:  # behind a call(): its time is known only now
                    # Where the schedule puts it (after the op before it), not when this thread got here: a
                    # thread woken late (a loaded host, the GIL) must not stretch device time.
                    entry[1] = start
                    if event.history and event.history[-1] is entry:  # not recorded again meanwhile
                        event.exec_mono_ns = start
                end = entry[1]
                _sleep_until(mono, end)
            else:
                _sleep_until(mono, start)
                try:
                    arg()
                finally:
                    end = mono()
            with self._cond:
                self._busy = 0
                if not self._ops and self._tail is None:
                    self._tail = end  # the schedule is predictable again
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _sleep_until(mono: Callable[[], int], t: int) -> None:
    while True:
        left = t - mono()
        if left <= 0:
            return
        time.sleep(left / 1e9)


class SimGraph:
    """A CUDA/ACL graph (``torch.cuda.CUDAGraph``/``torch_npu.npu.NPUGraph``-shaped) on a ``SimDevice``."""

    def __init__(self, device: "SimDevice", keep_graph: bool = False) -> None:
        self._device = device
        self._kernels: list[float] = []
        self._stream: SimStream | None = None
        self.thread: int | None = None
        self.mode = "global"
        self.invalidated: CaptureViolation | None = None
        self.captured = False

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global", **kwargs: Any) -> None:
        if capture_error_mode not in ("global", "thread_local", "relaxed"):
            raise ValueError(f"capture_error_mode={capture_error_mode!r}: expected 'global', 'thread_local' "
                             "or 'relaxed'")
        dev = self._device
        stream = dev.current_stream()
        if stream is dev._default_streams[stream.device_index]:
            raise RuntimeError("CUDA graphs must be captured on a non-default stream. (However, after capture, "
                               "it's ok to replay them on the default stream.)")
        if stream.capturing is not None:
            raise RuntimeError("Cannot capture: the stream is already capturing")
        self._kernels = []
        self.invalidated = None
        self.mode = capture_error_mode
        self.thread = threading.get_ident()
        self._stream = stream
        with dev._capture_lock:
            stream.capturing = self
            dev._captures.append(self)

    def capture_end(self) -> None:
        dev = self._device
        stream = self._stream
        with dev._capture_lock:
            if stream is not None:
                stream.capturing = None
            if self in dev._captures:
                dev._captures.remove(self)
        self._stream = None
        if self.invalidated is not None:
            v = self.invalidated
            raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing (the capture was "
                               f"invalidated by {v.call!r} on another thread in {v.mode!r} mode)"
                               if v.thread != v.capture_thread else
                               f"CUDA error: operation not permitted when stream is capturing ({v.call!r} "
                               f"on the capturing thread)")
        self.captured = True

    def replay(self) -> None:
        """Run the captured kernels on the current stream (event records captured in it record nothing)."""
        if not self.captured:
            raise RuntimeError("replay() of a graph that was not captured")
        stream = self._device.current_stream()
        for seconds in self._kernels:
            stream.launch(seconds)

    def reset(self) -> None:
        self._kernels = []
        self.captured = False


class _GraphContext:
    """``torch.cuda.graph(g, pool=None, stream=None, capture_error_mode="global")`` over a ``SimDevice``."""

    def __init__(self, device: "SimDevice", cuda_graph: SimGraph, pool: Any = None, stream: Any = None,
                 capture_error_mode: str = "global") -> None:
        self._device = device
        self.cuda_graph = cuda_graph
        self.pool = pool
        self.capture_stream = stream if stream is not None else device._side_stream()
        self.capture_error_mode = capture_error_mode
        self._stream_ctx: Any = None

    def __enter__(self) -> None:
        self._device.synchronize()  # torch.cuda.graph synchronizes before capturing
        self._stream_ctx = self._device.stream(self.capture_stream)
        self._stream_ctx.__enter__()
        self.cuda_graph.capture_begin(self.pool, capture_error_mode=self.capture_error_mode)

    def __exit__(self, *exc: Any) -> None:
        try:
            self.cuda_graph.capture_end()
        finally:
            self._stream_ctx.__exit__(*exc)


class VirtualClock:
    """A monotonic "host" clock for simulations that must cover hours in seconds: it moves only when read
    (by ``tick_ns`` per read, so that waiting loops make progress) or when ``advance``d. Pass it as
    ``SimDevice(mono=...)`` and to the component under test."""

    def __init__(self, tick_ns: int = 200, start_ns: int = 1_000_000_000) -> None:
        self.t = start_ns
        self.tick = tick_ns

    def __call__(self) -> int:
        self.t += self.tick
        return self.t

    def advance(self, ns: int) -> None:
        self.t += ns


class SimDevice:
    """A simulated accelerator (or several): streams that run work later, events with exactly known times.

    ``api``: ``"cuda"`` (otel-npu drives it through its CUDA backend: float32 ``elapsed_time``) or ``"npu"``
    (through its NPU backend, with ``recorded_time``). ``index``: the device current on every thread at
    first; ``device_count``: how many devices (indices ``0 .. device_count-1``). ``drift_ppm``: how much faster
    the device clocks run than the host's. ``launch_latency_us``: how long after submission an op can start
    at the earliest. ``shared_queue``: all streams of a device go through one hardware queue, so work on one
    stream waits for what was submitted earlier on any other (``CUDA_DEVICE_MAX_CONNECTIONS=1``; kernels and
    records). NPU style (see the module docstring): ``task_queue_us`` (``None``: no host task queue) and
    ``read_gil_hold_us``.
    """

    def __init__(self, *, api: str = "cuda", index: int = 0, drift_ppm: float = 0.0,
                 launch_latency_us: float = 5.0, device_epoch_s: float = 4242.0,
                 mono: Callable[[], int] = time.perf_counter_ns, device_count: int = 1,
                 task_queue_us: float | None = None, read_gil_hold_us: float = 0.0,
                 shared_queue: bool = False) -> None:
        if api not in ("cuda", "npu"):
            raise ValueError(f"SimDevice(api={api!r}): expected 'cuda' or 'npu'")
        if isinstance(device_count, bool) or not isinstance(device_count, int) or device_count < 1:
            raise ValueError(f"SimDevice(device_count={device_count!r}): expected an int >= 1")
        if not 0 <= index < max(device_count, index + 1):
            raise ValueError(f"SimDevice(index={index!r}): expected an int >= 0")
        self.api = api
        self.index = index
        self.device_count = max(device_count, index + 1)
        self.mono = mono
        self.launch_latency_ns = int(launch_latency_us * 1000)
        self.task_queue_ns = None if task_queue_us is None else int(task_queue_us * 1000)
        self.read_gil_hold_s = read_gil_hold_us / 1e6
        self.shared_queue = shared_queue
        self._queue_lock = threading.Lock()
        self._queue_tail: dict[int, int] = {}
        self._rate = 1.0 + drift_ppm * 1e-6
        self._origin = mono()
        self._epoch_ns = int(device_epoch_s * 1e9)
        # The latest timing reads (bounded: a long run must not grow without limit).
        self.timing_calls: collections.deque[TimingCall] = collections.deque(maxlen=100_000)
        self.events_created: collections.Counter[int] = collections.Counter()
        #: Event records issued, per (calling thread ident, stream): timing records and records into a graph
        #: capture alike.
        self.records_made: collections.Counter[int] = collections.Counter()
        self.capture_violations: list[CaptureViolation] = []
        self._handles: dict[int, SimEvent] = {}
        self._streams: list[SimStream] = []
        self._tls = threading.local()
        self._captures: list[SimGraph] = []
        self._capture_lock = threading.Lock()
        self._side: dict[int, SimStream] = {}
        self._default_streams = {i: self.new_stream("default" if i == 0 else f"default{i}", device=i)
                                 for i in range(self.device_count)}
        self.default_stream = self._default_streams[index]
        # NPU-style host task queue: (stream, kind, arg) issued by one thread, in order
        self._tasks: collections.deque = collections.deque()
        self._task_cond = threading.Condition()
        self._task_thread: threading.Thread | None = None
        self._closed = False
        self.torch_cuda = _cuda_api(self)
        self.torch_npu = _npu_module(self)

    def device_ns(self, mono_ns: int, device: int = 0) -> int:
        """Device ``device``'s clock reading at host monotonic time ``mono_ns`` (each device its own epoch)."""
        return self._epoch_ns + device * 1_000_000_000_000 + int((mono_ns - self._origin) * self._rate)

    # -- devices and streams --------------------------------------------------------------------------
    def current_device(self) -> int:
        """The calling thread's current device (per thread, like torch's)."""
        return getattr(self._tls, "device", self.index)

    def set_device(self, device: Any) -> None:
        self._tls.device = self._index_of(device)

    @contextlib.contextmanager
    def device(self, device: Any) -> Iterator[int]:
        """Make ``device`` current on this thread inside the block (like ``torch.cuda.device``)."""
        previous = self.current_device()
        self.set_device(device)
        try:
            yield self.current_device()
        finally:
            self._tls.device = previous

    def _index_of(self, device: Any) -> int:
        if device is None:
            return self.current_device()
        index = getattr(device, "index", device)
        if isinstance(device, str):
            index = int(device.rpartition(":")[2] or 0)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.device_count:
            raise RuntimeError(f"invalid device {device!r}: this SimDevice has {self.device_count} device(s)")
        return index

    def new_stream(self, name: str | None = None, device: Any = None) -> SimStream:
        """A new stream on ``device`` (default: the calling thread's current device)."""
        index = self._index_of(device) if self._streams or device is not None else self.index
        stream = SimStream(self, name or f"stream{len(self._streams)}", index)
        self._streams.append(stream)
        return stream

    def current_stream(self, device: Any = None) -> SimStream:
        """The calling thread's current stream on ``device`` (default: its current device); per thread."""
        index = self._index_of(device)
        streams = getattr(self._tls, "streams", None)
        stream = streams.get(index) if streams else None
        return stream or self._default_streams[index]

    @contextlib.contextmanager
    def stream(self, stream: SimStream) -> Iterator[SimStream]:
        """Make ``stream`` current on this thread (and its device current) inside the block, like
        ``torch.cuda.stream``."""
        streams = getattr(self._tls, "streams", None)
        if streams is None:
            streams = self._tls.streams = {}
        index = stream.device_index
        previous, previous_device = streams.get(index), self.current_device()
        streams[index] = stream
        self._tls.device = index
        try:
            yield stream
        finally:
            streams[index] = previous
            self._tls.device = previous_device

    def _side_stream(self) -> SimStream:
        index = self.current_device()
        side = self._side.get(index)
        if side is None:
            side = self._side[index] = self.new_stream(f"graph-capture{index}", device=index)
        return side

    def Event(self, enable_timing: bool = True, blocking: bool = False, interprocess: bool = False) -> SimEvent:
        self.events_created[threading.get_ident()] += 1  # which threads allocate events (tests check)
        return SimEvent(self, enable_timing, blocking, interprocess)

    def synchronize(self, device: Any = None) -> None:
        self._device_call("device synchronize")
        for stream in list(self._streams):
            stream._sync()

    def close(self) -> None:
        self._closed = True
        with self._task_cond:
            self._task_cond.notify_all()
        for stream in self._streams:
            stream.close()

    # -- graph capture rules --------------------------------------------------------------------------
    def is_current_stream_capturing(self) -> bool:
        return self.current_stream().capturing is not None

    def capturing(self) -> bool:
        """Whether a graph capture is in progress on any stream."""
        return bool(self._captures)

    def _device_call(self, call: str, stream: SimStream | None = None) -> None:
        """A device API call that a graph capture in progress may forbid: raise and invalidate it if so."""
        if not self._captures:
            return
        me = threading.get_ident()
        with self._capture_lock:
            for graph in self._captures:
                if graph.mode == "relaxed":
                    continue
                own_thread = graph.thread == me
                if graph.mode == "thread_local" and not own_thread:
                    continue
                violation = CaptureViolation(call, me, graph.thread, graph.mode)
                if graph.invalidated is None:
                    graph.invalidated = violation
                self.capture_violations.append(violation)
                raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing ({call} during "
                                   f"a graph capture in {graph.mode!r} mode"
                                   f"{'' if own_thread else ' from another thread'}; the capture is invalidated)")

    # -- NPU-style host task queue --------------------------------------------------------------------
    def _enqueue(self, stream: SimStream, kind: str, arg: Any) -> None:
        if self.task_queue_ns is None:
            stream._submit(kind, arg)
            return
        if kind == "record":
            arg[0].issued = False
        with self._task_cond:
            self._tasks.append((stream, kind, arg))
            if self._task_thread is None:
                self._task_thread = threading.Thread(target=self._issue_tasks, name="sim-task-queue", daemon=True)
                self._task_thread.start()
            self._task_cond.notify_all()

    def _issue_tasks(self) -> None:
        while True:
            with self._task_cond:
                while not self._tasks:
                    if self._closed:
                        return
                    self._task_cond.wait()
                stream, kind, arg = self._tasks[0]
            _sleep_until(self.mono, self.mono() + self.task_queue_ns)
            stream._submit(kind, arg)
            with self._task_cond:
                self._tasks.popleft()
                self._task_cond.notify_all()

    def _drain_task_queue(self) -> None:
        """Wait until the host task queue was handed to the device (torch_npu's ``emptyAllNPUStream``)."""
        if self.task_queue_ns is None:
            return
        with self._task_cond:
            while self._tasks and not self._closed:
                self._task_cond.wait(0.01)

    # -- CANN, without torch_npu's drain ---------------------------------------------------------------
    def acl_event_get_timestamp(self, handle: int) -> int:
        """``aclrtEventGetTimestamp``: device time of a completed event in whole µs, by its ACL handle. No
        drain of the task queue, no GIL held. Raises for an unknown handle or an event not complete."""
        self._device_call("aclrtEventGetTimestamp")
        event = self._handles.get(handle)
        if event is None:
            raise RuntimeError(f"aclrtEventGetTimestamp: invalid event handle {handle:#x} (error 107000)")
        if event.device_index != self.current_device():  # ACL contexts are per thread and per device
            raise RuntimeError(f"aclrtEventGetTimestamp: the event is on device {event.device_index}, the "
                               f"calling thread's context on device {self.current_device()} (error 107002)")
        completed = event._complete()
        self.timing_calls.append(TimingCall("aclrtEventGetTimestamp", threading.get_ident(), completed))
        if event.records == 0 or not completed:
            raise RuntimeError("aclrtEventGetTimestamp: the event has not completed (error 507011)")
        return self.device_ns(event.exec_mono_ns, event.device_index) // 1000

    def timing_reads(self, *, on_thread: int | None = None, incomplete: bool | None = None) -> list[TimingCall]:
        """The logged timing reads, filtered by calling thread and/or completion."""
        return [c for c in list(self.timing_calls)
                if (on_thread is None or c.thread == on_thread)
                and (incomplete is None or c.completed is not incomplete)]

    def otel_npu_backend(self) -> DeviceBackend:
        """The backend otel-npu drives this device with: its real CUDA or NPU backend over the stand-in."""
        if self.api == "cuda":
            from ..devices.cuda import CudaBackend

            return CudaBackend(self.torch_cuda, label=f"sim:{self.index}")
        from ..devices.npu import NpuBackend

        return NpuBackend(self.torch_npu, label=f"sim:{self.index}")


def _cuda_api(sim: SimDevice) -> types.SimpleNamespace:
    """A ``torch.cuda``-shaped namespace over ``sim`` (``graphs.CUDAGraph`` too, as torch has it)."""

    def Stream(device: Any = None, priority: int = 0, **kwargs: Any) -> SimStream:
        return sim.new_stream(device=device)

    class CUDAGraph(SimGraph):
        """``torch.cuda.CUDAGraph`` over this device (a class per device, so that wrapping it is per device)."""

        def __init__(self, keep_graph: bool = False) -> None:
            super().__init__(sim, keep_graph)

    def graph(cuda_graph: SimGraph, pool: Any = None, stream: Any = None, capture_error_mode: str = "global",
              **kwargs: Any) -> _GraphContext:
        return _GraphContext(sim, cuda_graph, pool, stream, capture_error_mode)

    graphs = types.SimpleNamespace(CUDAGraph=CUDAGraph, NPUGraph=CUDAGraph, graph=graph,
                                   is_current_stream_capturing=sim.is_current_stream_capturing)
    return types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: sim.device_count, current_device=sim.current_device,
        set_device=sim.set_device, device=sim.device,
        Event=sim.Event, Stream=Stream, current_stream=sim.current_stream,
        stream=sim.stream, synchronize=sim.synchronize, graphs=graphs, graph=graph,
        CUDAGraph=CUDAGraph, NPUGraph=CUDAGraph, is_current_stream_capturing=sim.is_current_stream_capturing,
    )


def _npu_module(device: SimDevice) -> types.ModuleType:
    """A stand-in for the ``torch_npu`` module (install it as ``sys.modules["torch_npu"]`` in tests)."""
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    module.__doc__ = "otel_npu.testing stand-in for torch_npu, over a SimDevice"
    module.npu = _cuda_api(device)
    module.__version__ = "7.0.0.sim"
    # what otel-npu's NPU backend loads from libascendcl.so through ctypes on a real host
    module.otel_npu_acl_event_get_timestamp = device.acl_event_get_timestamp
    return module
