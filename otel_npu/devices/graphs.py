"""Whether a CUDA/ACL graph capture is in progress anywhere in this process, and for how long there was one.

Why: ``torch.cuda.graph`` and ``torch.npu.graph`` capture in ``capture_error_mode="global"`` by default. In
that mode a CUDA/ACL call from *another* thread while the capture runs (even ``cudaEventQuery``) invalidates
the capture and fails the program's ``capture_end``. PyTorch had exactly this bug with its NCCL watchdog
thread, and serving engines (vLLM's ``CUDAGraphWrapper``, vllm-ascend's ``acl_graph.py``) capture in that
mode at start-up. So while a capture is in progress, otel-npu's resolver makes no device call at all (no
``query``, no clock anchor, no pool refill), and that time does not count toward a capture's event timeout;
and a ``capture()`` entered then is a counted no-op (``graph_capture``): an event recorded on a capturing
stream is not a timing record (replays record nothing into it).

How we know: ``watch()`` wraps ``capture_begin``/``capture_end`` of each device kind's graph class
(``registry.py``: torch's ``CUDAGraph``, torch_npu's ``NPUGraph``; what ``torch.cuda.graph``/``torch.npu.graph``, ``make_graphed_callables``,
torch.compile's CUDA graph trees, vLLM and vllm-ascend all go through), counting the captures in progress
in ``active``. The wrappers cost a lock and a counter per capture begin/end (captures are rare: start-up,
new shapes).

Limits (documented in the README): a capture begun *without* those Python classes (a C++ extension calling
``cudaStreamBeginCapture`` itself, CuPy, TensorRT) is not seen; a capture begun before otel-npu started and
ended after is seen only from the moment ``watch()`` ran (``registry.graph_capture_in_progress()`` also asks
each kind whether the calling thread's current stream is capturing, which covers the common case of the
first capture being entered inside a graph capture). Wrapping classes that are already instantiated is
fine: Python looks methods up on the class at call time.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

#: Graph captures in progress in this process (read without a lock: a plain int under the GIL).
active = 0

_lock = threading.Condition()
_calls = 0                # device-call sections of otel-npu's threads in progress (see device_calls())
_open: set[int] = set()  # id() of the graph objects between capture_begin and capture_end
_since = 0                # perf_counter_ns at which ``active`` went from 0 to 1
_total_ns = 0             # capturing time of the periods that ended
_mono = time.perf_counter_ns
_MARK = "_otel_npu_watched"


#: Longest wait of a ``capture_begin`` for otel-npu's device calls in progress to end (they are short: a
#: few queries, or one resolver pass cut short as soon as a capture is waiting).
BEGIN_WAIT_S = 5.0


def begun(graph: Any) -> None:
    """A capture starts on ``graph`` (called by the wrapped ``capture_begin``, or by a simulated device).

    Counts it first (so that no new device-call section starts, and the hot path sees it), then waits until
    the sections already running on otel-npu's threads have ended: a ``query()`` issued a moment after the
    capture began would invalidate it."""
    global active, _since
    with _lock:
        if id(graph) in _open:
            return
        _open.add(id(graph))
        if active == 0:
            _since = _mono()
        active += 1
        if _calls:
            _lock.wait_for(lambda: not _calls, BEGIN_WAIT_S)


def enter_device_calls() -> bool:
    """Start a section of device calls on an otel-npu thread; False (do not call the device) while a graph
    capture is in progress or about to begin. Pair a True with ``exit_device_calls()``."""
    global _calls
    with _lock:
        if active:
            return False
        _calls += 1
        return True


def exit_device_calls() -> None:
    global _calls
    with _lock:
        _calls -= 1
        if not _calls:
            _lock.notify_all()


def ended(graph: Any) -> None:
    """The capture on ``graph`` ended (successfully or not)."""
    global active, _total_ns
    with _lock:
        if id(graph) not in _open:
            return
        _open.discard(id(graph))
        active -= 1
        if active == 0:
            _total_ns += _mono() - _since


def capturing_ns(now: int | None = None) -> int:
    """Host ns spent so far with at least one graph capture in progress (monotone; ``now``: perf_counter_ns)."""
    with _lock:
        if active:
            return _total_ns + ((_mono() if now is None else now) - _since)
        return _total_ns


def _wrap(cls: Any) -> bool:
    """Wrap ``cls.capture_begin``/``cls.capture_end`` once. Returns True if they are watched now."""
    if cls is None or not isinstance(cls, type):
        return False
    if cls.__dict__.get(_MARK):
        return True
    begin = getattr(cls, "capture_begin", None)
    end = getattr(cls, "capture_end", None)
    if not callable(begin) or not callable(end):
        return False

    @functools.wraps(begin)
    def capture_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        begun(self)
        try:
            return begin(self, *args, **kwargs)
        except BaseException:
            ended(self)
            raise

    @functools.wraps(end)
    def capture_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return end(self, *args, **kwargs)
        finally:
            ended(self)

    try:
        cls.capture_begin = capture_begin
        cls.capture_end = capture_end
        setattr(cls, _MARK, True)
    except (TypeError, AttributeError):  # a C type that refuses new attributes: cannot watch it
        return False
    return True


def watch(candidates: list[tuple[str, Any]]) -> list[str]:
    """Watch each ``(name, graph class)`` of ``candidates`` (``registry.watch_graphs`` gathers them, per device
    kind, from the modules already imported: never imports one). Returns the names of the classes watched
    now. Idempotent and cheap."""
    watched = []
    for name, cls in candidates:
        try:
            if _wrap(cls):
                watched.append(name)
        except Exception:  # never let watching break start-up
            pass
    return watched
