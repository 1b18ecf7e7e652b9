"""What every serving-engine integration needs besides its hook table (``_patch.py``), for any engine:

* ``EngineStep``: the step open *between* engine calls. An engine's step is rarely one function: one hook
  opens it (vLLM: ``execute_model``), a later one closes it (``sample_tokens``), on the engine's thread.
  ``open_step``/``end`` enter and leave an ``otel_npu.step`` across those calls; ``in_step()`` says whether the
  calling thread is inside it, for hooks that make stages (``stage_capture()``: a capture, or ``None``); and
  ``open_stage``/``close_stage`` keep one stage open from one hook to the next, for engines whose stages are
  cut at seams rather than wrapped by one function.
* ``RequestContexts``: the trace context each request came with (``traceparent`` headers), kept until the
  engine says the request finished, bounded (a lost "finished" cannot grow memory); ``links(req_ids)`` gives
  a step's links.
* ``SchedulerStep``/``parent_context``: one trace per engine step across processes. Where
  the engine schedules (its scheduler's process), each step gets its ids and its sampling decision when it is
  scheduled (``SchedulerStep.open``: a few integers, no OpenTelemetry object), which travel to every worker
  with the step's work; a worker's step becomes the child of that context (``EngineStep.open_step(parent=)``);
  the scheduler's own step span, host-timed, is handed over when the step's outputs are processed
  (``SchedulerStep.close``, ``otel_npu.host_step``).
* ``export_like_engine``/``metrics_follow_traces``: before otel-npu starts, send where the engine's own
  tracing sends (an engine with ``--otlp-traces-endpoint`` puts it into ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``).

Uses otel-npu's public API (``otel_npu.step``/``capture``/``flush``/``configure``), ``config``, and two names
otel-npu writes, from where they are defined (``ATTR_RANK``, for an engine's ``process_attributes``; the
trace-state entry above): an engine integration built on it sees nothing else of otel-npu's internals. Everything here runs on the engine's
threads and costs what the public calls it makes cost. Nothing here wakes another thread per step: an engine
killed soon after its last request (a common shutdown) loses nothing it had already run because otel-npu's
resolver tells the exporters to send as soon as the process goes idle (``resolve/resolver.py``).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from typing import Any, Callable, Iterable, Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation import _SPAN_KEY

import otel_npu

from .. import config
from ..spans import attributes as _attributes
from ..spans.sampling import PARENT_EXPORTED as _PARENT_EXPORTED_ENTRY

_log = logging.getLogger("otel_npu")

#: otel-npu's own rank attribute (the stage metrics carry it): where an engine module puts the process's global
#: rank in ``process_attributes``.
ATTR_RANK = _attributes.ATTR_RANK

#: Requests remembered at most (their trace context and what the engine keeps with it); past it the oldest
#: are forgotten (their steps lose the link).
MAX_REQUESTS = 65536


_extract: Any = None


def _extractor() -> Any:
    """The propagators' ``extract`` (``OTEL_PROPAGATORS``), loaded at first use: ``opentelemetry.propagate``
    raises at import for a propagator name it cannot load, which at this module's import would keep the whole
    integration from loading. Then W3C trace context alone, said once."""
    global _extract
    if _extract is None:
        try:
            from opentelemetry.propagate import extract
        except Exception as exc:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            _log.warning("otel-npu: the OpenTelemetry propagators cannot be loaded (%s: %s; check "
                         "OTEL_PROPAGATORS, which accepts installed propagator names such as tracecontext, "
                         "baggage, b3); request contexts are read as W3C traceparent only",
                         type(exc).__name__, exc)
            extract = TraceContextTextMapPropagator().extract
        _extract = extract
    return _extract


def client_context(headers: Mapping[str, str] | None) -> Any:
    """The SpanContext of the client's span in ``headers`` (``OTEL_PROPAGATORS``; W3C ``traceparent`` by
    default), or None."""
    if not headers:
        return None
    ctx = trace.get_current_span(_extractor()(dict(headers))).get_span_context()
    return ctx if ctx.is_valid else None


class RequestContexts:
    """req_id -> (the client's SpanContext or None, what the integration keeps with it), in arrival order,
    at most ``limit`` (the oldest forgotten first). Engine thread only."""

    def __init__(self, limit: int = MAX_REQUESTS) -> None:
        self._requests: collections.OrderedDict[str, tuple[Any, Any]] = collections.OrderedDict()
        self.limit = limit

    def learn(self, req_id: str, headers: Mapping[str, str] | None, info: Any = None) -> None:
        requests = self._requests
        requests[req_id] = (client_context(headers), info)
        while len(requests) > self.limit:
            requests.popitem(last=False)

    def forget(self, req_ids: Iterable[str] | None) -> None:
        requests = self._requests
        for req_id in req_ids or ():
            requests.pop(req_id, None)

    def get(self, req_id: str) -> tuple[Any, Any] | None:
        return self._requests.get(req_id)

    def links(self, req_ids: Iterable[str]) -> list[Any]:
        """The client contexts of ``req_ids`` that came with one (a step's links)."""
        requests = self._requests
        out = []
        for req_id in req_ids:
            known = requests.get(req_id)
            if known is not None and known[0] is not None:
                out.append(known[0])
        return out

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Any:
        return iter(self._requests)


def _exc_args(exc: BaseException | None) -> tuple[Any, Any, Any]:
    return (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)


class EngineStep:
    """The engine step open between two engine calls, and the stage open between two hooks (see the module
    docstring). One per engine process; the engine's thread opens and closes it."""

    def __init__(self) -> None:
        self.step: Any = None  # the open step's context manager
        self.attributes: dict[str, Any] | None = None  # its attributes, which hooks may still add to
        self.thread: int | None = None  # the thread that opened it
        self.stage: Any = None  # the open stage capture, entered by one hook, left by the next
        self.stage_name: str | None = None

    def open_step(self, name: str, *, links: Any = (), attributes: dict[str, Any] | None = None,
                  parent: "RemoteParent | None" = None) -> Any:
        """Enter a step named ``name`` on this thread (``otel_npu.step``: never blocks); returns it. ``parent``:
        the scheduler's step this one belongs to (``parent_context``), else the context current here."""
        step = otel_npu.step(name, links=links, attributes=attributes)
        if parent is None:
            step.__enter__()
        else:
            token = otel_context.attach(parent)  # type: ignore[arg-type]
            try:
                step.__enter__()
            finally:
                otel_context.detach(token)
        self.step, self.attributes, self.thread = step, attributes, threading.get_ident()
        return step

    def in_step(self) -> bool:
        """A step is open, on this thread (the engine's)."""
        return self.step is not None and self.thread == threading.get_ident()

    def stage_capture(self, name: str) -> Any:
        """A capture named ``name`` when a step is open on this thread (to enter around the stage), else None."""
        if self.step is None or self.thread != threading.get_ident():
            return None
        return otel_npu.capture(name)

    def open_stage(self, name: str) -> None:
        """Leave the open stage (if any) and enter ``name``: for stages that follow one another across hooks."""
        self.close_stage()
        stage = otel_npu.capture(name)
        stage.__enter__()
        self.stage, self.stage_name = stage, name

    def close_stage(self, exc: BaseException | None = None) -> None:
        stage, self.stage, self.stage_name = self.stage, None, None
        if stage is not None:
            stage.__exit__(*_exc_args(exc))

    def end(self, exc: BaseException | None = None) -> None:
        """Leave the open stage and step (``exc``: the exception the engine call raised, if any)."""
        self.close_stage(exc)
        step, self.step, self.attributes, self.thread = self.step, None, None, None
        if step is not None:
            step.__exit__(*_exc_args(exc))


# -- one trace per engine step, across processes ----------------------------------------------------------

#: Where a step context travels on the engine's own message to its workers (an attribute of it): a tuple
#: ``(trace id, span id, flags)``, pickled with it.
STEP_CONTEXT_ATTR = "otel_npu_step"
#: ``flags`` of a step context: bit 0, sampled (the W3C flag); bit 1, the scheduler's step span is exported
#: whatever the sampler decided, so a worker may keep a step the sampler dropped (slow, with detail) as its
#: child without leaving it an orphan.
SAMPLED = 1
PARENT_EXPORTED = 2
#: The trace state a worker's parent context carries when ``PARENT_EXPORTED`` is set: the entry the pipeline
#: reads (``spans.sampling.PARENT_EXPORTED``) to keep such a child as it keeps a step that begins a trace.
PARENT_EXPORTED_STATE = TraceState([_PARENT_EXPORTED_ENTRY])
_NO_STATE = TraceState()

#: The scheduler's ids: an RNG of its own, seeded from the OS (the application seeds ``random``; a forked
#: child re-seeds), as otel-npu's own spans' ids are.
_rng = random.Random(os.urandom(32))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))

_MASK64 = (1 << 64) - 1


def root_sampler(name: str, ratio: float) -> Callable[[int], bool]:
    """The decision ``OTEL_TRACES_SAMPLER`` (``name``, ``ratio``) makes for a span that begins a trace, as a
    function of its trace id: the SDK's rule (``TraceIdRatioBased``: the low 64 bits below ``ratio * 2**64``),
    without its objects. Each name of ``config.otel.SAMPLERS``."""
    if name.endswith("always_off"):
        return lambda trace_id: False
    if name.endswith("traceidratio"):
        bound = round(ratio * (_MASK64 + 1))
        return lambda trace_id: (trace_id & _MASK64) < bound
    return lambda trace_id: True


class RemoteParent(dict):
    """An OpenTelemetry ``Context`` holding only the scheduler's step as the (remote) current span, made on
    the resolver thread when first read (``get``): the engine's thread pays for one small object per step."""

    __slots__ = ("ids",)

    def __init__(self, ids: tuple[int, int, int]) -> None:
        super().__init__()
        self.ids = ids

    def get(self, key: Any, default: Any = None) -> Any:
        if key != _SPAN_KEY:
            return default
        span = dict.get(self, key)
        if span is None:
            trace_id, span_id, flags = self.ids
            span = NonRecordingSpan(SpanContext(
                trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & SAMPLED),
                trace_state=PARENT_EXPORTED_STATE if flags & PARENT_EXPORTED else _NO_STATE))
            dict.__setitem__(self, key, span)
        return span

    def __getitem__(self, key: Any) -> Any:
        span = self.get(key)
        if span is None:
            raise KeyError(key)
        return span

    def __contains__(self, key: Any) -> bool:
        return key == _SPAN_KEY

    def __repr__(self) -> str:
        trace_id, span_id, flags = self.ids
        return f"RemoteParent(trace {trace_id:032x}, span {span_id:016x}, flags {flags})"


def parent_context(message: Any) -> RemoteParent | None:
    """The scheduler's step context that came with ``message`` (``STEP_CONTEXT_ATTR``), or None."""
    ids = getattr(message, STEP_CONTEXT_ATTR, None)
    if ids.__class__ is tuple and len(ids) == 3:
        return RemoteParent(ids)
    return None


class _Open:
    __slots__ = ("ids", "start", "links", "attributes")

    def __init__(self, ids: tuple[int, int, int], start: int, links: Any, attributes: dict[str, Any]) -> None:
        self.ids, self.start, self.links, self.attributes = ids, start, links, attributes


class SchedulerStep:
    """The scheduler's side of a step trace (see the module docstring): ``open(message, ...)`` when a step is
    scheduled puts its context on the message sent to the workers; ``close(message)`` when its outputs are
    processed hands the step's span over. Steps may overlap (an engine that schedules the next step before the
    previous one's outputs are back): each is found again by its message. Engine thread only."""

    NAME = "engine step"
    #: Steps open at once at most (a message whose outputs never come back is forgotten past it).
    MAX_OPEN = 64

    def __init__(self) -> None:
        self.sample: Callable[[int], bool] | None = None  # None: not set up yet (``setup``)
        self.promise = False  # the scheduler's step span is exported whatever the sampler says (PARENT_EXPORTED)
        self._open: collections.OrderedDict[int, _Open] = collections.OrderedDict()
        self.requests = RequestContexts(MAX_REQUESTS)

    def setup(self, env: Mapping[str, str] | None = None) -> None:
        """Read the sampler and the workers' keep rules (``OTEL_TRACES_SAMPLER[_ARG]``,
        ``OTEL_NPU_KEEP_SLOW_STEPS``, ``OTEL_NPU_DETAIL_EVERY``) once: the workers read the same environment."""
        self.sample = root_sampler(*config.otel.read(env).sampler)
        settings = config.from_env(env)
        self.promise = config.parse_keep_slow(settings.keep_slow_steps) is not None or settings.detail_every > 1

    def open(self, message: Any, start_ns: int, req_ids: Iterable[str], attributes: dict[str, Any]) -> None:
        """Step ``message`` was scheduled (its scheduling began at host monotonic ``start_ns``): give it ids and a
        sampling decision, put them on ``message``, and keep what its span needs until ``close``."""
        if self.sample is None:
            self.setup()
        getrandbits = _rng.getrandbits
        trace_id = getrandbits(128) or 1
        span_id = getrandbits(64) or 1
        sampled = self.sample(trace_id)  # type: ignore[misc]
        flags = (SAMPLED if sampled else 0) | (PARENT_EXPORTED if self.promise else 0)
        ids = (trace_id, span_id, flags)
        setattr(message, STEP_CONTEXT_ATTR, ids)
        opened = self._open
        opened[id(message)] = _Open(ids, start_ns, self.requests.links(req_ids), attributes)
        if len(opened) > self.MAX_OPEN:
            opened.popitem(last=False)

    def close(self, message: Any, end_ns: int | None = None) -> bool:
        """Step ``message``'s outputs are processed: hand its span over (``otel_npu.host_step``)."""
        entry = self._open.pop(id(message), None)
        if entry is None or getattr(message, STEP_CONTEXT_ATTR, None) is not entry.ids:
            return False
        trace_id, span_id, flags = entry.ids
        sampled = bool(flags & SAMPLED)
        kept = None if sampled or not flags & PARENT_EXPORTED else "ranks"
        return otel_npu.host_step(
            self.NAME, entry.start, time.perf_counter_ns() if end_ns is None else end_ns, trace_id=trace_id,
            span_id=span_id, sampled=sampled, kept=kept,
            trace_state=PARENT_EXPORTED_STATE if flags & PARENT_EXPORTED else None, links=entry.links,
            attributes=entry.attributes)


class Both:
    """An engine's own scope (a profiler range, when its profiling is on) around otel-npu's capture."""

    __slots__ = ("outer", "inner")

    def __init__(self, outer: Any, inner: Any) -> None:
        self.outer = outer
        self.inner = inner

    def __enter__(self) -> Any:
        self.outer.__enter__()
        try:
            return self.inner.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            self.inner.__exit__(exc_type, exc, tb)
        finally:
            return bool(self.outer.__exit__(exc_type, exc, tb))


# -- where spans go ------------------------------------------------------------------------------------------

def metrics_follow_traces(env: MutableMapping[str, str] | None = None, default_protocol: str = "grpc") -> None:
    """Stage metrics go where the traces go when no metrics endpoint is configured (``config.otel``). Call it
    before otel-npu starts in the process."""
    config.otel.metrics_follow_traces(config.process_env() if env is None else env, default_protocol)


def process_attributes(attributes: Mapping[str, Any]) -> None:
    """Before otel-npu starts in an engine process: ``attributes`` (its ranks, say) on every span and stage
    metric of the process (replacing any given to ``configure(attributes=)`` before)."""
    if attributes:
        otel_npu.configure(attributes=attributes)


def export_like_engine(*, traces_endpoint_set: bool, default_protocol: str = "grpc",
                       env: MutableMapping[str, str] | None = None) -> None:
    """Before otel-npu starts in an engine process whose own tracing sends to
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (``traces_endpoint_set``) over ``default_protocol`` unless
    ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` says otherwise: otel-npu's own pipeline sends its spans there the same
    way, and its stage metrics too when no metrics endpoint is set. ``OTEL_NPU_PIPELINE`` set: as it says."""
    env = config.process_env() if env is None else env
    if traces_endpoint_set:
        env.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", default_protocol)  # the engine's, made explicit
    metrics_follow_traces(env, default_protocol)
    if not config.env.get(env, config.ENV_PIPELINE):
        otel_npu.configure(pipeline="own")
