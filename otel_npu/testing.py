"""A simulated asynchronous device, for otel-npu's tests and for testing your own instrumentation.

``SimDevice`` behaves like an accelerator seen from the host: work queued on a ``SimStream`` runs *later*, in
order, on a thread of its own, and timing events complete when the stream reaches them. Unlike real
hardware, every event's time is known exactly (``event.exec_mono_ns``, on the host's ``perf_counter_ns``
clock), so a test can check the spans otel-npu made against the truth::

    sim = SimDevice()
    otel_npu.configure(enabled=True, device=sim, tracer_provider=provider)
    with otel_npu.capture("forward"):
        sim.current_stream().launch(0.005)   # a 5 ms "kernel": returns at once
    otel_npu.flush()

The model: an op submitted at host time ``s`` starts at ``max(s + launch latency, end of the previous op)``;
a kernel (``launch(seconds)``) ends ``seconds`` later; an event record takes no time; ``call(fn)`` runs ``fn``
on the stream's thread and ends when it returns. Where the schedule is known at submit time (no ``call``
queued ahead), event times are fixed then; ``query()`` turns True once the host clock passes them, exactly as
a device's would. The device's own clock runs at ``1 + drift_ppm/1e6`` of the host's, from an arbitrary epoch.

Two API faces: ``sim.torch_cuda`` (``torch.cuda``-like: ``elapsed_time`` in float32 ms, raising unless both
events completed) and ``sim.torch_npu`` (a stand-in for the ``torch_npu`` module: ``elapsed_time`` and
``recorded_time`` block until the event completes, like the real ones). Every timing read is logged in
``sim.timing_calls`` with the calling thread and whether the event had completed, so tests can prove that
otel-npu never reads an unfinished event nor reads anything on the capturing thread.
"""

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

from .devices.base import DeviceBackend

__all__ = ["SimDevice", "SimStream", "SimEvent", "TimingCall", "VirtualClock"]

_ids = itertools.count(1)


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


TimingCall = collections.namedtuple("TimingCall", "method thread completed")


class SimEvent:
    """A timing event. ``exec_mono_ns`` is the truth: host monotonic ns at which the stream ran it."""

    def __init__(self, device: "SimDevice", enable_timing: bool = True, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self._device = device
        self.enable_timing = enable_timing
        self.exec_mono_ns: int | None = None  # set at submit when predictable, else by the stream thread
        self.stream: SimStream | None = None
        self.records = 0

    # -- torch.cuda.Event / torch_npu.npu.Event API -----------------------------------------------------
    def record(self, stream: "SimStream | None" = None) -> None:
        (stream or self._device.current_stream())._submit_record(self)

    def query(self) -> bool:
        t = self.exec_mono_ns
        return t is not None and self._device.mono() >= t

    def synchronize(self) -> None:
        while not self.query():
            t = self.exec_mono_ns
            wait = 50e-6 if t is None else max(0.0, (t - self._device.mono()) / 1e9)
            time.sleep(min(wait, 0.01) or 1e-6)

    def _read(self, method: str, *others: "SimEvent") -> None:
        completed = all(e.query() for e in (self, *others))
        self._device.timing_calls.append(TimingCall(method, threading.get_ident(), completed))
        if not completed:
            if self._device.api == "cuda":
                raise RuntimeError("CUDA error: device not ready (event not completed)")
            for e in (self, *others):  # torch_npu: synchronizes, blocking the caller
                e.synchronize()

    def elapsed_time(self, end: "SimEvent") -> float:
        """Milliseconds from this event to ``end``, rounded to float32 like CUDA/ACL."""
        self._read("elapsed_time", end)
        dev = self._device
        return _float32((dev.device_ns(end.exec_mono_ns) - dev.device_ns(self.exec_mono_ns)) / 1e6)

    def recorded_time(self) -> int:
        """Device timestamp in microseconds (torch_npu >= 7.0.0 ``recorded_time``)."""
        self._read("recorded_time")
        return self._device.device_ns(self.exec_mono_ns) // 1000

    # -- truth, for tests ----------------------------------------------------------------------------
    @property
    def device_ns(self) -> int:
        return self._device.device_ns(self.exec_mono_ns)


class SimStream:
    """An in-order queue of simulated device work, executed by a thread of its own."""

    def __init__(self, device: "SimDevice", name: str) -> None:
        self.device = device
        self.name = name
        self.stream_id = next(_ids)
        self.cuda_stream = self.npu_stream = 0x7000 + self.stream_id  # what torch exposes as the raw handle
        self.device_index = device.index
        self._ops: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._tail: int | None = 0  # host mono ns at which queued work ends; None while unpredictable
        self._busy = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SimStream({self.name!r})"

    # -- work ----------------------------------------------------------------------------------------
    def launch(self, seconds: float) -> None:
        """Queue a kernel that keeps the stream busy for ``seconds`` of device time. Returns at once."""
        if not seconds >= 0:
            raise ValueError(f"launch(seconds={seconds!r}): expected a number >= 0")
        self._submit("kernel", int(seconds * 1e9))

    def call(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn`` to run on the stream's thread when the stream reaches it. Returns at once."""
        self._submit("call", fn)

    def synchronize(self) -> None:
        """Block until everything queued so far has run."""
        with self._cond:
            while self._ops or self._busy:
                self._cond.wait(0.01)
        tail = self._tail
        if tail is not None:
            while self.device.mono() < tail:
                time.sleep(max(0.0, (tail - self.device.mono()) / 1e9))

    def query(self) -> bool:
        with self._cond:
            idle = not self._ops and not self._busy
        return idle and (self._tail is None or self.device.mono() >= self._tail)

    # -- internals -----------------------------------------------------------------------------------
    def _submit_record(self, event: SimEvent) -> None:
        event.stream = self
        event.records += 1
        self._submit("record", event)

    def _submit(self, kind: str, arg: Any) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        now = self.device.mono()
        with self._cond:
            start = None if self._tail is None else max(now + self.device.launch_latency_ns, self._tail)
            if kind == "record":
                arg.exec_mono_ns = start  # None: decided when the stream thread gets there
                if start is not None:
                    # Nothing to execute: the device reaches it at ``start``. No thread hand-off, so
                    # recording stays as cheap for the host as on real hardware.
                    self._tail = start
                    return
            elif kind == "kernel" and start is not None:
                self._tail = start + arg
            else:
                self._tail = None
            self._ops.append((kind, arg, now))
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
                kind, arg, submitted = self._ops.popleft()
                self._busy = 1
            start = max(submitted + latency, end)
            if kind == "kernel":
                end = start + arg
                _sleep_until(mono, end)
            elif kind == "record":
                if arg.exec_mono_ns is None:  # behind a call(): its time is known only now
                    arg.exec_mono_ns = max(start, mono())
                end = arg.exec_mono_ns
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
    """A simulated accelerator: streams that run work later, events with exactly known times.

    ``api``: ``"cuda"`` (otel-npu drives it through its CUDA backend: float32 ``elapsed_time``) or ``"npu"``
    (through its NPU backend, with ``recorded_time``). ``drift_ppm``: how much faster the device clock runs
    than the host's. ``launch_latency_us``: how long after submission an op can start at the earliest.
    """

    def __init__(self, *, api: str = "cuda", index: int = 0, drift_ppm: float = 0.0,
                 launch_latency_us: float = 5.0, device_epoch_s: float = 4242.0,
                 mono: Callable[[], int] = time.perf_counter_ns) -> None:
        if api not in ("cuda", "npu"):
            raise ValueError(f"SimDevice(api={api!r}): expected 'cuda' or 'npu'")
        self.api = api
        self.index = index
        self.mono = mono
        self.launch_latency_ns = int(launch_latency_us * 1000)
        self._rate = 1.0 + drift_ppm * 1e-6
        self._origin = mono()
        self._epoch_ns = int(device_epoch_s * 1e9)
        # The latest timing reads (bounded: a long run must not grow without limit).
        self.timing_calls: collections.deque[TimingCall] = collections.deque(maxlen=100_000)
        self.events_created: collections.Counter[int] = collections.Counter()
        self._streams: list[SimStream] = []
        self._tls = threading.local()
        self.default_stream = self.new_stream("default")
        self.torch_cuda = _cuda_api(self)
        self.torch_npu = _npu_module(self)

    def device_ns(self, mono_ns: int) -> int:
        """The device clock's reading at host monotonic time ``mono_ns``."""
        return self._epoch_ns + int((mono_ns - self._origin) * self._rate)

    def new_stream(self, name: str | None = None) -> SimStream:
        stream = SimStream(self, name or f"stream{len(self._streams)}")
        self._streams.append(stream)
        return stream

    def current_stream(self) -> SimStream:
        """The calling thread's current stream (per thread, like torch's)."""
        return getattr(self._tls, "stream", None) or self.default_stream

    @contextlib.contextmanager
    def stream(self, stream: SimStream) -> Iterator[SimStream]:
        """Make ``stream`` current on this thread inside the block (like ``torch.cuda.stream``)."""
        previous = getattr(self._tls, "stream", None)
        self._tls.stream = stream
        try:
            yield stream
        finally:
            self._tls.stream = previous

    def Event(self, enable_timing: bool = True, blocking: bool = False, interprocess: bool = False) -> SimEvent:
        self.events_created[threading.get_ident()] += 1  # which threads allocate events (tests check)
        return SimEvent(self, enable_timing, blocking, interprocess)

    def synchronize(self) -> None:
        for stream in list(self._streams):
            stream.synchronize()

    def close(self) -> None:
        for stream in self._streams:
            stream.close()

    def timing_reads(self, *, on_thread: int | None = None, incomplete: bool | None = None) -> list[TimingCall]:
        """The logged timing reads, filtered by calling thread and/or completion."""
        return [c for c in list(self.timing_calls)
                if (on_thread is None or c.thread == on_thread)
                and (incomplete is None or c.completed is not incomplete)]

    def otel_npu_backend(self) -> DeviceBackend:
        """The backend otel-npu drives this device with: its real CUDA or NPU backend over the stand-in."""
        if self.api == "cuda":
            from .devices.cuda import CudaBackend

            return CudaBackend(self.torch_cuda, label=f"sim:{self.index}")
        from .devices.npu import NpuBackend

        return NpuBackend(self.torch_npu, label=f"sim:{self.index}")


def _cuda_api(sim: SimDevice) -> types.SimpleNamespace:
    """A ``torch.cuda``-shaped namespace over ``sim``."""

    def Stream(device: Any = None, priority: int = 0, **kwargs: Any) -> SimStream:
        return sim.new_stream()

    return types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1, current_device=lambda: sim.index,
        Event=sim.Event, Stream=Stream, current_stream=lambda device=None: sim.current_stream(),
        stream=sim.stream, synchronize=lambda device=None: sim.synchronize(),
    )


def _npu_module(device: SimDevice) -> types.ModuleType:
    """A stand-in for the ``torch_npu`` module (install it as ``sys.modules["torch_npu"]`` in tests)."""
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    module.__doc__ = "otel_npu.testing stand-in for torch_npu, over a SimDevice"
    module.npu = _cuda_api(device)
    module.__version__ = "7.0.0.sim"
    return module
