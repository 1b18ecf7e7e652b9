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
* ``export_like_engine``/``metrics_follow_traces``: before otel-npu starts, send where the engine's own
  tracing sends (an engine with ``--otlp-traces-endpoint`` puts it into ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``).

Uses otel-npu's public API (``otel_npu.step``/``capture``/``flush``/``configure``) and ``config`` only: an
engine integration built on it sees nothing of otel-npu's internals. Everything here runs on the engine's
threads and costs what the public calls it makes cost. Nothing here wakes another thread per step: an engine
killed soon after its last request (a common shutdown) loses nothing it had already run because otel-npu's
resolver tells the exporters to send as soon as the process goes idle (``resolve/resolver.py``).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Iterable, Mapping, MutableMapping

from opentelemetry import trace
from opentelemetry.propagate import extract

import otel_npu

from .. import config

_log = logging.getLogger("otel_npu")

#: Requests remembered at most (their trace context and what the engine keeps with it); past it the oldest
#: are forgotten (their steps lose the link).
MAX_REQUESTS = 65536


def client_context(headers: Mapping[str, str] | None) -> Any:
    """The SpanContext of the client's span in ``headers`` (W3C ``traceparent``), or None."""
    if not headers:
        return None
    ctx = trace.get_current_span(extract(dict(headers))).get_span_context()
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

    def open_step(self, name: str, *, links: Any = (), attributes: dict[str, Any] | None = None) -> Any:
        """Enter a step named ``name`` on this thread (``otel_npu.step``: never blocks); returns it."""
        step = otel_npu.step(name, links=links, attributes=attributes)
        step.__enter__()
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
