"""The hot path: ``capture()`` and ``step()``, the capture classes' entry and exit, and the state they read.

Everything here runs on the capturing thread, per capture. The state is module globals (one ``LOAD_GLOBAL``
each), bound by ``capturing.install`` when otel-npu starts; the start itself (first capture) is ``_start``,
bound by the ``capturing`` package, so that nothing here imports the runtime or anything above it.

What a capture costs the capturing thread, and nothing more:

* **disabled**: one call returning a shared do-nothing object (a dict lookup by name, after one attribute
  read for torch.compile tracing; no allocation), and an ``__enter__``/``__exit__`` that each read one module
  global (has otel-npu been enabled since the object was made?): about a ``contextlib.nullcontext()``. No
  events, no threads, no environment reads;
* **enabled, CPU backend**: two ``perf_counter_ns()`` reads, a context-variable get/set at entry and get/reset
  at exit (nesting; the get at exit checks that the capture ending is the current one), one attribute store
  that claims the object, one OpenTelemetry context read (only for an outermost capture: its parent is the
  span current at entry), and a ``deque.append``. No locks, no OTel objects, no allocation besides the
  capture object itself;
* **enabled, device backend**: the same, plus the stream's device index, a dict lookup for that device's
  pool of pre-created events, two ``deque.pop`` from it and two ``Event.record(stream)`` calls (≈ 1-2.5 µs
  each on CUDA: the driver's cost, enqueue only). A capture on a device otel-npu has not seen before is not
  timed (a ``device_starting`` drop) while the resolver prepares that device's events and clock.

Never: a synchronize, a wait for the device or for export, a lock held across a device call, an env read.

Two states make a capture do nothing, each read as one attribute on the hot path:

* **a CUDA/ACL graph capture in progress** anywhere in the process (``devices/graphs.py`` watches
  ``capture_begin``/``capture_end``): an event recorded on a capturing stream is not a timing record, and a
  device call may invalidate the capture. The capture is counted as a ``graph_capture`` drop; a replay of the
  graph is then timed as one unit by a capture around the replay;
* **torch.compile tracing** (``torch.compiler.is_compiling()``; read as the flag it returns): under
  ``fullgraph=True`` a ``ContextVar.set`` makes Dynamo fail, and with graph breaks allowed each capture
  would split the graph. Nothing is counted (a counter update would itself be traced); a capture around the
  compiled call still times it, per-layer timings need eager mode (``compile_guard.py``).

Captures are handed to the resolver thread (``resolve/resolver.py``) through an unbounded-by-type but size-checked
``deque``: a capture *entered* while ``max_pending`` captures wait there is not timed, and is counted as a
``pending_limit`` drop (a lock is taken on that rare path only). The decision is made at entry, before any
capture inside it exists, so that those re-parent to the nearest timed ancestor, as under a pool-empty drop:
decided at exit, a dropped capture's children would already be spans pointing at a parent that never comes
(and a dropped step would leave the resolver waiting for it). So the deque may hold more than ``max_pending``
by the captures that were open when it filled: at most one per nesting level per thread.

Each ``capture()``/``step()`` call returns a context manager that is also a decorator. One object may be
entered again while in use, nested or by several threads at once (a module-level ``FORWARD = capture("forward")``
shared by threads): the first use claims the object itself (one attribute store, which the GIL makes atomic: no
call runs between the test and the store), every other use is timed by a fresh capture made for it and found
again at exit as the current capture of the exiting thread/task. Each use becomes its own span. An object made
while otel-npu was disabled (``FORWARD = capture("forward")`` at import, before ``configure(enabled=True)``)
does nothing while otel-npu stays disabled; once it is enabled, each use is timed the same way, by a fresh
capture made for it (so are its uses as a decorator; ``off.py``).

Exits that do not match their entry are detected at exit, by comparing the capture with the current one (one
``ContextVar.get``): a capture exited on another thread or task than the one that entered it, or exited while a
capture entered inside it is still open, is still timed and exported, counted in ``stats()["misnested_exits"]``,
and marked so that it stops being the parent of what its entering thread captures next (the next capture
entered there skips it, at the cost of one attribute read for nested captures). Exiting a capture that was never
entered, or exiting one use twice, raises ``RuntimeError`` saying so (unless an exception is already
propagating: that exception is never replaced).

How parents are found: the enclosing capture (a ``ContextVar``: per thread and per asyncio task), else the
OpenTelemetry span current at entry, else a new trace (decided later, on the resolver thread).

The entry of the two backends' classes (``_HostCapture``, ``_EventCapture``) is written out in each rather than
shared through a helper: a shared helper is one more Python call per capture (≈ 0.1 µs, a tenth of an
enabled capture on the CPU backend). The rare paths (re-entry, misnesting, drops) are shared functions.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from opentelemetry import context as _otel_context

from ..devices import graphs as _graphs
from ..record import DROPPED as _DROPPED
from ..record import STEP_SLOTS, Record
from . import compile_guard, off
from .compile_guard import COMPILING as _COMPILING
from .decorate import decorate
from .errors import describe_error as _describe_error
from .off import OffDetail, OffStep, off_capture, skipped

_log = logging.getLogger("otel_npu")

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("otel_npu.capture", default=None)
_get_current = _current.get
_set_current = _current.set
_reset_current = _current.reset
_otel_current = _otel_context.get_current
try:  # the same read without two Python frames: ContextVarsRuntimeContext.get_current is _current_context.get
    from opentelemetry.context import _RUNTIME_CONTEXT
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    if type(_RUNTIME_CONTEXT) is ContextVarsRuntimeContext:
        _otel_current = _RUNTIME_CONTEXT._current_context.get
except (ImportError, AttributeError):  # another OTEL_PYTHON_CONTEXT, or a changed SDK: the public call
    pass
_now = time.perf_counter_ns
_current_thread = threading.current_thread
_tls = threading.local()
_new = object.__new__
# Bound by assignment, not imported by name: Python 3.11 compiles ``name.get(...)`` on an imported name without
# the method-call optimization (a bound method object per call), which the disabled capture would pay.
_OFF_CACHE = off.OFF_CACHE

_GONE = object()  # ``_token`` of a capture exited elsewhere or out of order: not a parent for later captures

# Bound by capturing.install() from the running runtime's Parts; read as module globals by the hot path.
_parts: Any = None
_pending_len: Callable[[], int] = lambda: 0
_pending_append: Callable[[Any], None] = lambda item: None
_max_pending = 0
_pools: dict = {}  # device index -> EventPool (the runtime's dict: devices are added by the resolver)
_record: Callable[[Any, Any], None] = lambda event, stream: None
_current_stream: Callable[[], Any] = lambda: None
#: OTEL_NPU_DETAIL_EVERY's budget (``spans.sampling.DetailBudget``), or None when every step may take detail.
_detail_budget: Any = None

# What capture()/step() make: None while disabled; _LAZY while enabled but not started (the next call starts
# otel-npu through _start); the Capture subclass for the running backend once started.
_LAZY = object()
_capture_cls: Any = None
_step_cls: Any = None
#: The first capture's start (bound by the capturing package): returns (capture class, step class).
_start: Callable[[], tuple[Any, Any]] = lambda: (None, None)


def _set_compiler(flag: Any) -> None:
    global _compiler
    _compiler = flag


#: ``torch.compiler`` (or a stand-in): ``_compiler._is_compiling_flag`` is True while torch.compile traces.
_compiler: Any = compile_guard.Pending(_set_compiler)


class Capture(Record):
    """A timed region: two device events and what is needed to turn them into a span later. Its fields are
    the ``Record``'s (``record.py`` says which thread writes each); this class adds the context manager and
    decorator behaviour of the capturing thread."""

    __slots__ = ()

    def __init__(self, name: str, attributes: Mapping[str, Any] | None, stream: Any) -> None:
        self.name = name
        self.attributes = attributes
        self.stream = stream
        self.start = None
        self.sampled = None  # read by spans.identify: set here, reading an unset slot would raise (slow)

    def __call__(self, fn: Any) -> Any:
        name, attributes, extra = self.name, self.attributes, self._extra()
        if self.is_step:
            def make() -> Any:
                return step(name, links=extra, attributes=attributes)
        else:
            detail = getattr(self, "detail", False) is True

            def make() -> Any:
                return capture(name, attributes=attributes, stream=extra, detail=detail)
        return decorate(fn, make, "step" if self.is_step else "capture", name)

    def _extra(self) -> Any:
        """The ``stream`` given to ``capture()`` (not the one the first use filled in: each use has its own)."""
        stream = self.stream
        return None if stream is not None and getattr(self, "auto_stream", None) is stream else stream

    def _fresh(self) -> "Capture":
        return type(self)(self.name, self.attributes, self._extra())

    def __repr__(self) -> str:
        return f"<otel_npu {'step' if self.is_step else 'capture'} {self.name!r}>"


class _HostCapture(Capture):
    """CPU backend: the "events" are host monotonic timestamps."""

    __slots__ = ()

    def __enter__(self) -> "Capture":
        if self.start is not None:
            return _enter_again(self)
        self.start = _DROPPED  # claims this object (see the module's docstring); "not timed" until timed
        parent = _get_current()
        if parent is None:
            self.otel_ctx = _otel_current()
        elif parent._token is _GONE:
            parent = _skip_gone(self, parent)
        self.parent = parent
        self._token = _set_current(self)
        if _pending_len() >= _max_pending or _graphs.active:  # decided at entry: see the module's docstring
            _parts.stats.drop("graph_capture" if _graphs.active else "pending_limit")
            return self
        if self.stream is None:  # the CPU's "stream" is the thread (its Thread object, for the name)
            try:
                self.stream = self.auto_stream = _tls.thread
            except AttributeError:
                self.stream = self.auto_stream = _tls.thread = _current_thread()
        self.start = self.host_start = _now()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        now = _now()
        if _get_current() is not self:
            return _exit_unusual(self, exc_type, exc, tb, now)
        try:
            _reset_current(self._token)
        except ValueError:  # a copy of the entering context (a task or thread started inside): see there
            _left_behind(self)
        # What _finish does, inlined: one Python frame less on the hot path.
        if self.start is not _DROPPED:
            self.end = self.host_end = now
            self.error = None if exc_type is None else _describe_error(exc_type, exc, tb)
            _pending_append(self)
        else:
            self.error = None
        return False

    def _finish(self, exc_type: Any, exc: Any, tb: Any, now: int) -> None:
        if self.start is not _DROPPED:
            self.end = self.host_end = now
            self.error = None if exc_type is None else _describe_error(exc_type, exc, tb)
            _pending_append(self)
        else:
            self.error = None


class _EventCapture(Capture):
    """Device backends: two pooled events recorded on the capture's stream."""

    __slots__ = ()

    def __enter__(self) -> "Capture":
        if self.start is not None:
            return _enter_again(self)
        self.start = _DROPPED  # claims this object (see the module's docstring); "not timed" until timed
        parent = _get_current()
        if parent is None:
            self.otel_ctx = _otel_current()
        elif parent._token is _GONE:
            parent = _skip_gone(self, parent)
        self.parent = parent
        self._token = _set_current(self)
        if _pending_len() >= _max_pending or _graphs.active:  # decided at entry: see the module's docstring
            _parts.stats.drop("graph_capture" if _graphs.active else "pending_limit")
            return self
        try:
            stream = self.stream
            if stream is None:
                stream = self.stream = self.auto_stream = _current_stream()
            pool = _pools.get(stream.device_index)  # events are per device: see devices/base.py
            if pool is None:  # a device not seen before: the resolver prepares it; this capture is not timed
                _parts.want_device(stream.device_index)
                return self
            take = pool.take
            start = take()
            try:
                end = take()
            except IndexError:
                pool.give(start)
                raise
            self.host_start = _now()
            _record(start, stream)
        except Exception as exc:  # pool empty, or the device refused the record: never into the program
            if isinstance(exc, IndexError):
                _parts.stats.drop("event_pool_empty")
                _parts.wake()  # rare path: have the pool refilled now rather than at the next poll
            else:
                _parts.stats.drop("record_failed", exc)
            return self
        self.start = start
        self.end = end
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if _get_current() is not self:
            return _exit_unusual(self, exc_type, exc, tb, 0)
        # What _finish does, inlined: one Python frame less on the hot path.
        timed = self.start is not _DROPPED
        if timed:
            self.host_end = _now()
            try:
                _record(self.end, self.stream)
            except Exception as record_exc:
                timed = False
                self.start = _DROPPED
                _parts.stats.drop("record_failed", record_exc)
        try:
            _reset_current(self._token)
        except ValueError:  # a copy of the entering context (a task or thread started inside): see there
            _left_behind(self)
        if timed:
            self.error = None if exc_type is None else _describe_error(exc_type, exc, tb)
            _pending_append(self)
        else:
            self.error = None
        return False

    def _finish(self, exc_type: Any, exc: Any, tb: Any, now: int) -> None:
        if self.start is not _DROPPED:
            self.host_end = _now()
            try:
                _record(self.end, self.stream)
            except Exception as record_exc:
                self.start = _DROPPED
                self.error = None
                _parts.stats.drop("record_failed", record_exc)
                return
            self.error = None if exc_type is None else _describe_error(exc_type, exc, tb)
            _pending_append(self)
        else:
            self.error = None


class _StepMixin:
    __slots__ = ()
    is_step = True

    def __init__(self, name: str, links: Iterable[Any], attributes: Mapping[str, Any] | None) -> None:
        Capture.__init__(self, name, attributes, None)
        # Copied: engines reuse their batch lists, and the resolver reads this later.
        try:
            self.links = tuple(links) if links else ()
        except TypeError:
            _bad_links(links)
        # Detail captures inside: 0 not taken (over budget), 1 allowed, 2 allowed and taken (set by capture()).
        budget = _detail_budget
        self.detail = 1 if budget is None else budget.take(name)
        self.kept = None  # resolver: why exported although the sampler dropped it ("slow", "detail")

    def _extra(self) -> Any:
        return self.links

    def _fresh(self) -> "Capture":
        return type(self)(self.name, self.links, self.attributes)


class _HostStep(_StepMixin, _HostCapture):
    __slots__ = STEP_SLOTS


class _EventStep(_StepMixin, _EventCapture):
    __slots__ = STEP_SLOTS


def _enter_again(cm: Capture) -> Capture:
    """``with c:`` on an object already in use (or used): time this use with a fresh capture, which its exit
    finds again as the current capture of the exiting thread/task (``origin`` is ``cm``)."""
    fresh = cm._fresh()
    fresh.origin = cm
    return fresh.__enter__()


def _skip_gone(cm: Capture, parent: Capture) -> Capture | None:
    """The current capture was exited elsewhere or out of order: parent ``cm`` to its nearest ancestor still
    open here, and make that one current again (``cm``'s exit then restores it, not the exited one)."""
    while parent is not None and parent._token is _GONE:
        parent = parent.parent
    _set_current(parent)
    if parent is None:
        cm.otel_ctx = _otel_current()
    return parent


def _left_behind(cm: Capture) -> None:
    """``cm`` was exited where its entering context cannot be restored: that context still has ``cm`` as its
    current capture. Mark it, so that the next capture entered there skips it; count it."""
    cm._token = _GONE
    stats = getattr(_parts, "stats", None)
    if stats is not None:
        stats.add("misnested_exits")


def _exit_unusual(cm: Capture, exc_type: Any, exc: Any, tb: Any, now: int) -> bool:
    """An exit where ``cm`` is not the current capture (rare: a slow path). Finds which use of ``cm`` ends."""
    if cm.start is None:
        return _misuse(cm, exc_type, "was exited without being entered (__exit__ before __enter__)")
    # A use of cm open in this thread/task: cm itself, or a capture made for a re-entry of cm.
    node = _get_current()
    depth = 0
    while node is not None and node is not cm and getattr(node, "origin", None) is not cm:
        node = node.parent
        depth += 1
    if node is not None:
        if depth == 0:  # the innermost re-entry of cm: the common case of a shared object
            return node.__exit__(exc_type, exc, tb)
        # Exited while captures entered inside it are still open: time it, leave the context to them.
        _left_behind(node)
        node._finish(exc_type, exc, tb, now or _now())
        return False
    token = cm._token
    if token is _GONE:
        return _misuse(cm, exc_type, "was exited twice")
    try:
        _reset_current(token)
    except RuntimeError:  # the token was used: this use already ended
        return _misuse(cm, exc_type, "was exited twice")
    except ValueError:  # entered in another thread or task than this one
        _left_behind(cm)
    cm._finish(exc_type, exc, tb, now or _now())
    return False


def _misuse(cm: Capture, exc_type: Any, what: str) -> bool:
    text = (f"otel_npu: {cm!r} {what}; use it as `with otel_npu.capture(...):` or as a decorator, or call "
            f"__enter__() once before each __exit__()")
    if exc_type is not None:  # the program's own exception is propagating: never replace it
        _log.warning("%s", text)
        return False
    raise RuntimeError(text)


def _bad_links(links: Any) -> None:
    raise TypeError(f"otel_npu.step(links=...) takes an iterable of the batch's request SpanContexts, spans or "
                    f"Links, got {type(links).__name__} {links!r}")


def _bad_name(what: str, name: Any) -> None:
    raise TypeError(f"otel_npu.{what}(name=...) takes a non-empty str as the span name, got {type(name).__name__}"
                    f" {name!r}")


def capture(name: str, *, attributes: Mapping[str, Any] | None = None, stream: Any = None,
            detail: bool = False) -> Any:
    """Time a region on the device; the region becomes a span named ``name``. Context manager and decorator.

    Entry records a start event on the capturing thread's current device stream (or ``stream``), exit an
    end event. **Never blocks**: it neither synchronizes nor waits for the device, the resolver or export,
    and creates no OpenTelemetry object. The span is produced later by the resolver thread with the
    device-measured start/end. Its parent: the enclosing capture or step; else the OpenTelemetry span
    current at entry (a request span, say); else a new trace. An exception inside propagates unchanged; the
    span gets status ERROR and the exception type. ``attributes`` are added to the span (read later on the
    resolver thread: do not mutate the mapping afterwards).

    ``detail=True`` marks a fine-grained capture (per layer, as ``instrument_module`` makes): under
    ``OTEL_NPU_DETAIL_EVERY=N`` it is taken only inside one step in N of each step name, and elsewhere is the
    shared do-nothing object (no device events; see ``spans/sampling.py``). Costs nothing extra when False.
    """
    # The compile check comes first: Dynamo (torch 2.11) does not see a str constant's __class__ as str, so the
    # name check would raise inside a fullgraph compile; the check does nothing there anyway.
    if _compiler._is_compiling_flag:  # torch.compile is tracing this: do nothing (see the module's docstring)
        return _COMPILING
    if name.__class__ is not str or not name:
        _bad_name("capture", name)
    cls = _capture_cls
    if cls is None:  # disabled: a shared do-nothing object for the common call
        if attributes is None and stream is None and not detail:
            cm = _OFF_CACHE.get(name)
            if cm is not None:
                return cm
        return OffDetail(name, attributes, stream) if detail else off_capture(name, attributes, stream)
    if cls is _LAZY:
        cls = _start()[0]
        if cls is None or cls is _LAZY:
            return off_capture(name, attributes, stream)
    if detail:
        return _detail_capture(cls, name, attributes, stream)
    # Capture.__init__, inlined: one Python frame less on the hot path.
    cm = _new(cls)
    cm.name = name
    cm.attributes = attributes
    cm.stream = stream
    cm.start = None
    cm.sampled = None
    return cm


def _detail_capture(cls: Any, name: str, attributes: Any, stream: Any) -> Any:
    """``capture(..., detail=True)`` while enabled: a capture if the enclosing step's budget allows it, else
    the shared do-nothing object of this name (no allocation, no device events)."""
    if _detail_budget is not None and not _detail_allowed():
        return skipped(name, stream)
    cm = _new(cls)
    cm.name = name
    cm.attributes = attributes
    cm.stream = stream
    cm.start = None
    cm.sampled = None
    cm.detail = True
    return cm


def _detail_allowed() -> bool:
    """Whether a detail capture may be taken here: its enclosing step's budget (outside a step: yes)."""
    step = _get_current()
    while step is not None and not step.is_step:
        step = step.parent
    if step is None:
        return True
    if step.detail:
        step.detail = 2  # the step carries detail: it will be exported (sampling.py)
        return True
    return False


def step(name: str, *, links: Iterable[Any] = (), attributes: Mapping[str, Any] | None = None) -> Any:
    """Group the captures of one engine step (``"Decode"``, ``"Prefill"``) under a step span named ``name``.

    ``links``: the SpanContexts (or spans) of the requests in the batch; each becomes a span link, so each
    request's trace finds the steps that served it. The step span starts at its first device event and ends
    at its last (its own and its captures'). Costs what a capture costs, plus copying ``links`` to a tuple.
    """
    if _compiler._is_compiling_flag:  # first: see capture()
        return _COMPILING
    if name.__class__ is not str or not name:
        _bad_name("step", name)
    cls = _step_cls
    if cls is _LAZY:
        cls = _start()[1]
    if cls is None or cls is _LAZY:
        if links:
            try:
                iter(links)
            except TypeError:
                _bad_links(links)
        return OffStep(name, attributes, links)
    return cls(name, links, attributes)


def host_step(name: str, start_ns: int, end_ns: int, *, trace_id: int, span_id: int, sampled: bool,
              kept: str | None = None, trace_state: Any = None, links: Iterable[Any] = (),
              attributes: Mapping[str, Any] | None = None) -> bool:
    """Hand over a finished step timed by the host, whose ids were decided by the caller: a span named
    ``name`` from ``start_ns`` to ``end_ns`` (host monotonic ns, ``time.perf_counter_ns()``), with trace id
    ``trace_id`` and span id ``span_id``, a root, exported when ``sampled`` (then ``kept``, when given, is
    why: its ``otel_npu.kept`` attribute). For a step opened and closed on different calls of an engine loop
    whose context was sent elsewhere before it ended (an engine's scheduler step, parent of its workers' steps):
    nothing is entered, no context variable is touched.

    Only where captures are host-timed (the ``cpu`` device): returns False and does nothing elsewhere (a
    device backend's spans are placed from events), when disabled, or when the pending limit is reached (a
    ``pending_limit`` drop). Never blocks (after otel-npu's start, which the first call may make)."""
    cls = _step_cls
    if cls is _LAZY:
        cls = _start()[1]
    if cls is not _HostStep:
        return False
    if _pending_len() >= _max_pending:
        _parts.stats.drop("pending_limit")
        return False
    r = cls(name, links, attributes)
    r.parent = r.otel_ctx = r.error = None
    r.detail = 0
    try:
        r.stream = _tls.thread
    except AttributeError:
        r.stream = _tls.thread = _current_thread()
    r.start = r.host_start = start_ns
    r.end = r.host_end = end_ns
    r.trace_id, r.span_id, r.parent_span_id, r.parent_remote = trace_id, span_id, 0, False
    r.trace_state = trace_state
    r.sampled = bool(sampled or kept)
    r.kept = (kept, None) if kept else None
    _pending_append(r)
    return True


off.bind(capture, step, _get_current)
