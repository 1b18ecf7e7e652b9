"""A resolved capture becomes a span: ids, parent, sampling, attributes, links, status.

Runs on the resolver thread. Knows nothing of devices: it is given a ``stream_label`` function and the
host-to-wall conversion. Two renderings share this module's decisions:

* ``to_readable()``: an SDK ``ReadableSpan``, for a ``TracerProvider``'s span processors (the application's,
  or otel-npu's own console exporter). Built directly rather than through ``Tracer.start_span``/``end``:
  the spans are complete when we learn of them (start and end are in the past), and the SDK's live-span
  machinery costs 25-60 µs per span on a 2-core machine against ≈ 3 µs for this (``benchmarks/``). Span
  processors therefore see ``on_end`` only, never ``on_start``.
* ``otlp.SpanEncoder``: OTLP protobuf bytes straight from the same decisions (otel-npu's own pipeline).

Sampling: the sampler is asked once per *root* of a capture tree (an outermost capture or step), with the
OTel context that was current at its entry as parent context; nested captures inherit the decision, as every
standard sampler would decide for a child of a local sampled parent. A capture under an unsampled parent
produces no span (it still resolves, feeds the compat pop, the log line and the metrics).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from typing import Any, Callable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .resolver import DROPPED

_log = logging.getLogger("otel_npu")

# -- attribute names (documented in the README) ----------------------------------------------------------
ATTR_DEVICE = "otel_npu.device"              # "npu:0", "cuda:0", "cpu"
ATTR_STREAM = "otel_npu.stream"              # the device stream (CPU: the thread)
ATTR_STEP = "otel_npu.step"                  # name of the enclosing step, if any
ATTR_KIND = "otel_npu.kind"                  # "step" on step spans (captures leave it out)
ATTR_LINKS = "otel_npu.batch_size"           # on step spans: how many requests the step linked
# How far the host ran ahead of the device: device start - the host's entry into the capture point. The
# host entered at ``span start - host_lead_us``. (One small int rather than an absolute timestamp as well:
# a 9-byte varint per span costs the resolver more than the rest of the span's attributes together.)
ATTR_HOST_LEAD = "otel_npu.host_lead_us"      # float, µs
ATTR_CLOCK_ERROR = "otel_npu.clock_error_us"  # float, µs: bound on the error of start/end (clock.py)
ATTR_TIMED_OUT = "otel_npu.timed_out"        # the device events did not complete in time
ATTR_PID = "process.pid"
ATTR_RANK = "otel_npu.rank"                  # $RANK, when set
ATTR_LOCAL_RANK = "otel_npu.local_rank"      # $LOCAL_RANK, when set
ATTR_ERROR_TYPE = "error.type"               # semantic convention: the exception's type

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_VALID_SCALARS = (str, bool, int, float)


def process_attributes(device_label: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The attributes every span of this process carries: device, pid, and rank where known."""
    env = os.environ if env is None else env
    attrs: dict[str, Any] = {ATTR_DEVICE: device_label, ATTR_PID: os.getpid()}
    for var, key in (("RANK", ATTR_RANK), ("LOCAL_RANK", ATTR_LOCAL_RANK)):
        raw = env.get(var, "").strip()
        if raw.lstrip("-").isdigit():
            attrs[key] = int(raw)
    return attrs


def _root_context(r: Any) -> Any:
    """The OTel context current when the outermost capture of ``r``'s chain (dropped ones included) began."""
    while r.parent is not None:
        r = r.parent
    return r.otel_ctx


class SpanFactory:
    """The decisions that make a span of a resolved capture, shared by every sink of one pipeline."""

    def __init__(self, *, sampler: Any, id_generator: Any, stream_label: Callable[[Any], str],
                 to_wall: Callable[[int], int], const_attributes: Mapping[str, Any], stats: Any,
                 event_timeout_s: float) -> None:
        self._sampler = sampler
        self._ids = id_generator
        self._new_span_id = id_generator.generate_span_id
        if type(id_generator) is RandomIdGenerator:
            # The same draw without the Python method around it (that loops only to avoid 0, which
            # random.getrandbits(64) returns once in 2**64 draws).
            self._new_span_id = functools.partial(random.getrandbits, 64)
        self._stream_label = stream_label
        self._labels: dict[Any, str] = {}
        self.to_wall = to_wall
        # The host clock's current mono->wall offset, without a call per span where to_wall is a HostClock's.
        host = getattr(to_wall, "__self__", None)
        self.host_offset = (lambda: host.offset_ns) if hasattr(host, "offset_ns") else (lambda: to_wall(0))
        self.const_attributes = dict(const_attributes)
        self._stats = stats
        self._timeout_text = f"device events did not complete within {event_timeout_s:g} s"
        self._warned: set[str] = set()

    # -- identity -----------------------------------------------------------------------------------
    def identify(self, r: Any) -> bool:
        """Give ``r`` (and, lazily, its ancestors) trace/span ids; return whether it is sampled."""
        sampled = r.sampled
        if sampled is not None:
            return sampled
        parent = r.parent
        while parent is not None and parent.start is DROPPED:
            parent = parent.parent
        if parent is not None:
            sampled = parent.sampled
            if sampled is None:
                sampled = self.identify(parent)
            r.trace_id = parent.trace_id
            r.parent_span_id = parent.span_id
            r.trace_state = parent.trace_state
            r.parent_remote = False
        else:
            ctx = _root_context(r)
            parent_ctx = trace.get_current_span(ctx).get_span_context()
            r.parent_remote = parent_ctx.is_remote
            if parent_ctx.is_valid:
                r.trace_id = parent_ctx.trace_id
                r.parent_span_id = parent_ctx.span_id
            else:
                r.trace_id = self._ids.generate_trace_id()
                r.parent_span_id = 0
            result = self._sampler.should_sample(ctx, r.trace_id, r.name, SpanKind.INTERNAL, None,
                                                 self.links(r) if r.is_step else None)
            sampled = result.decision.is_sampled()
            r.trace_state = result.trace_state
        r.span_id = self._new_span_id()
        r.sampled = sampled
        return sampled

    # -- content ------------------------------------------------------------------------------------
    def stream_label(self, stream: Any) -> str:
        label = self._labels.get(stream)
        if label is None:
            label = self._labels[stream] = self._stream_label(stream)
        return label

    def user_attributes(self, r: Any) -> Mapping[str, Any]:
        """The capture's own attributes, with values OTLP cannot carry dropped (warned once per key)."""
        attrs = r.attributes
        if not attrs:
            return {}
        try:
            items = list(attrs.items())
        except AttributeError:
            self._warn_once("attributes", f"capture {r.name!r}: attributes must be a mapping of str to "
                            f"str/bool/int/float (or sequences of one of them), got {type(attrs).__name__}")
            return {}
        clean = {}
        for key, value in items:
            if isinstance(key, str) and (isinstance(value, _VALID_SCALARS) or _valid_sequence(value)):
                clean[key] = list(value) if isinstance(value, (list, tuple)) else value
            else:
                self._stats.add("attributes_dropped")
                self._warn_once(f"attr:{key!r}", f"capture {r.name!r}: attribute {key!r} = {value!r} "
                                f"dropped: keys must be str, values str/bool/int/float or sequences of one of them")
        return clean

    def attributes(self, r: Any) -> dict[str, Any]:
        """Every attribute of ``r``'s span, as a dict (the SDK rendering)."""
        attrs = dict(self.const_attributes)
        attrs[ATTR_STREAM] = self.stream_label(r.stream)
        attrs[ATTR_HOST_LEAD] = (r.start_ns - self.to_wall(r.host_start)) / 1000.0
        attrs[ATTR_CLOCK_ERROR] = r.clock_error_ns / 1000.0
        if r.step is not None:
            attrs[ATTR_STEP] = r.step.name
        if r.is_step:
            attrs[ATTR_KIND] = "step"
            attrs[ATTR_LINKS] = len(self.links(r))
        if r.timed_out:
            attrs[ATTR_TIMED_OUT] = True
        if r.error is not None:
            attrs[ATTR_ERROR_TYPE] = r.error[0]
        attrs.update(self.user_attributes(r))
        return attrs

    def links(self, r: Any) -> list[SpanContext]:
        """The valid SpanContexts among a step's ``links`` (spans, SpanContexts or Links accepted).

        Converted once: the step's tuple is replaced by the resulting list."""
        if r.links.__class__ is list:
            return r.links
        out = []
        for item in r.links:
            if isinstance(item, SpanContext):
                ctx = item
            elif isinstance(item, Link):
                ctx = item.context
            elif callable(getattr(item, "get_span_context", None)):
                ctx = item.get_span_context()
            else:
                self._stats.add("links_dropped")
                self._warn_once(f"link:{type(item).__name__}", f"step {r.name!r}: a link must be a Span, "
                                f"SpanContext or Link, got {type(item).__name__}: {item!r}")
                continue
            if ctx.is_valid:
                out.append(ctx)
        r.links = out
        return out

    def status(self, r: Any) -> tuple[StatusCode, str | None]:
        if r.timed_out:
            return StatusCode.ERROR, self._timeout_text
        if r.error is not None:
            kind, message = r.error
            return StatusCode.ERROR, f"{kind}: {message}" if message else kind
        return StatusCode.UNSET, None

    def to_readable(self, r: Any, resource: Any, scope: Any) -> Any:
        """The SDK rendering: a finished ``ReadableSpan``."""
        from opentelemetry.sdk.trace import Event, ReadableSpan

        code, description = self.status(r)
        events: Sequence[Any] = ()
        if r.error is not None:
            events = (Event("exception", {"exception.type": r.error[0], "exception.message": r.error[1]},
                            r.end_ns),)
        parent = None
        if r.parent_span_id:
            parent = SpanContext(r.trace_id, r.parent_span_id, is_remote=r.parent_remote,
                                 trace_flags=_SAMPLED)
        return ReadableSpan(
            name=r.name,
            context=SpanContext(r.trace_id, r.span_id, is_remote=False, trace_flags=_SAMPLED,
                                trace_state=r.trace_state),
            parent=parent,
            resource=resource,
            attributes=self.attributes(r),
            events=events,
            links=[Link(ctx) for ctx in self.links(r)] if r.is_step else (),
            kind=SpanKind.INTERNAL,
            status=Status(code, description),
            start_time=r.start_ns,
            end_time=r.end_ns,
            instrumentation_scope=scope,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and len(self._warned) < 1000:
            self._warned.add(key)
            _log.warning("otel-npu: %s", message)


def _valid_sequence(value: Any) -> bool:
    if not isinstance(value, (list, tuple)) or not value:
        return isinstance(value, (list, tuple))
    kind = type(value[0])
    return kind in _VALID_SCALARS and all(type(v) is kind for v in value)
