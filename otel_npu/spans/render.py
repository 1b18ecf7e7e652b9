"""A resolved record becomes a span: its attributes, links, status and exception event, and the SDK
rendering (``to_readable``). ``SpanFactory`` holds every decision one pipeline's sinks share: identity
(``identity.py``), attribute checks (``attributes.py``), and the rest here.

Runs on the resolver thread. Knows nothing of devices: it is given a ``stream_label`` function and the
host-to-wall conversion. Two renderings share these decisions:

* ``to_readable()``: an SDK ``ReadableSpan``, for a ``TracerProvider``'s span processors (the application's,
  or otel-npu's own console exporter). Built directly rather than through ``Tracer.start_span``/``end``:
  the spans are complete when we learn of them (start and end are in the past), and the SDK's live-span
  machinery costs 25-60 µs per span against ≈ 3 µs for this (measured on 2 CPU cores, ``benchmarks/``).
  Span processors therefore see ``on_end`` only, never ``on_start``.
* ``export/encoding/``: OTLP protobuf bytes and OTLP/JSON text straight from the same decisions (otel-npu's
  own pipeline).

A capture under an unsampled parent produces no span (it still resolves, feeds the compat pop, the log line
and the metrics).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ..accounting import Stats
from ..record import Record
from .attributes import (ATTR_CLOCK_ERROR, ATTR_ERROR_TYPE, ATTR_HOST_LEAD, ATTR_KIND, ATTR_LINKS, ATTR_LINKS_OVER,
                         ATTR_STEP, ATTR_STREAM, ATTR_TIMED_OUT, AttributeCleaner, Limits, kept_attributes)
from .identity import Identity

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)

#: Stream labels remembered at most (the CPU backend's streams are threads, which may come and go).
LABEL_CACHE_LIMIT = 1024
STACKTRACE_CHARS = 8192
_TRACEBACK_HEAD = "Traceback (most recent call last):\n"


class SpanFactory:
    """The decisions that make a span of a resolved capture, shared by every sink of one pipeline.

    ``identify(r)``/``rekey(records)`` (``identity.py``), ``user_attributes(r)``/``links(r)``
    (``attributes.py``) are the bound methods of its parts: no extra call per record."""

    def __init__(self, *, sampler: Any, id_generator: Any, stream_label: Callable[[Any], str],
                 to_wall: Callable[[int], int], const_attributes: Mapping[str, Any], stats: Stats,
                 event_timeout_s: float, limits: Limits | None = None) -> None:
        self.sampler = sampler
        self._stream_label = stream_label
        self._labels: dict[Any, str] = {}
        self.to_wall = to_wall
        # The host clock's current mono->wall offset, without a call per span where to_wall is a HostClock's.
        host = getattr(to_wall, "__self__", None)
        self.host_offset = (lambda: host.offset_ns) if hasattr(host, "offset_ns") else (lambda: to_wall(0))
        self.const_attributes = dict(const_attributes)
        self._own_keys: dict[tuple, frozenset[str]] = {}  # own_keys(), by the span's shape
        self._timeout_text = f"device events did not complete within {event_timeout_s:g} s"
        self.limits = limits or Limits()
        self.cleaner = AttributeCleaner(self.limits, stats, self.own_keys)
        self.user_attributes = self.cleaner.user_attributes
        self.links = self.cleaner.links
        self.identity = Identity(sampler=sampler, id_generator=id_generator,
                                 start_attributes=self.start_attributes, sampler_links=self.sampler_links)
        self.identify = self.identity.identify
        self.rekey = self.identity.rekey

    def start_attributes(self, r: Record) -> dict[str, Any]:
        """What the sampler is shown as the span's attributes: those given when the capture or step began
        (``attributes=``), as the SDK passes the sampler only the attributes given to ``start_span``. otel-npu's
        own (device, stream, step, kind, batch size, process) are added to the span afterwards, like attributes
        set on a live span after it started, and the sampler does not see them."""
        attrs: dict[str, Any] = {}
        if r.attributes:
            # As given. Not user_attributes(): that cleans once for good and needs what only resolution sets,
            # and a step is asked about when its first capture resolves, maybe while the step is still open.
            try:
                attrs.update(r.attributes)
            except Exception:  # not a mapping: user_attributes() warns about it when the span is made
                pass
        return attrs

    def sampler_links(self, r: Record) -> Sequence[Link]:
        """A step's links as ``Link`` objects (as the SDK passes them to the sampler); ``()`` otherwise."""
        if not r.is_step:
            return ()
        return self.links(r)

    # -- content ------------------------------------------------------------------------------------
    # -- content ------------------------------------------------------------------------------------
    def stream_label(self, stream: Any) -> str:
        label = self._labels.get(stream)
        if label is None:
            labels = self._labels
            if len(labels) >= LABEL_CACHE_LIMIT:  # streams come and go (a thread per request): start over
                labels.clear()
            label = labels[stream] = self._stream_label(stream)
        return label

    def own_keys(self, r: Record) -> frozenset[str]:
        """The keys of the attributes otel-npu itself sets on ``r``'s span. They depend only on the span's
        shape (in a step or not, a step or not, links over the limit, timed out, failed): one set per shape,
        made once."""
        is_step = r.is_step
        shape = (r.step is not None, is_step, bool(is_step and self.links(r).dropped), r.timed_out,
                 r.error is not None)
        keys = self._own_keys.get(shape)
        if keys is None:
            in_step, _, over, timed_out, failed = shape
            made = list(self.const_attributes) + [ATTR_STREAM, ATTR_HOST_LEAD, ATTR_CLOCK_ERROR]
            made += [ATTR_STEP] * in_step + [ATTR_KIND, ATTR_LINKS] * is_step + [ATTR_LINKS_OVER] * over
            made += [ATTR_TIMED_OUT] * timed_out + [ATTR_ERROR_TYPE] * failed
            keys = self._own_keys[shape] = frozenset(made)
        return keys

    def attributes(self, r: Record) -> dict[str, Any]:
        """Every attribute of ``r``'s span, as a dict (the SDK rendering)."""
        attrs = dict(self.const_attributes)
        attrs[ATTR_STREAM] = self.stream_label(r.stream)
        attrs[ATTR_HOST_LEAD] = (r.start_ns - self.to_wall(r.host_start)) / 1000.0
        attrs[ATTR_CLOCK_ERROR] = r.clock_error_ns / 1000.0
        if r.step is not None:
            attrs[ATTR_STEP] = r.step.name
        if r.is_step:
            attrs[ATTR_KIND] = "step"
            links = self.links(r)
            attrs[ATTR_LINKS] = links.total
            if links.dropped:
                attrs[ATTR_LINKS_OVER] = links.dropped
            kept = getattr(r, "kept", None)  # steps made by otel-npu have it; test doubles may not
            if kept is not None:
                attrs.update(kept_attributes(kept))
        if r.timed_out:
            attrs[ATTR_TIMED_OUT] = True
        if r.error is not None:
            attrs[ATTR_ERROR_TYPE] = r.error[0]
        attrs.update(self.user_attributes(r))
        return attrs

    def status(self, r: Record) -> tuple[StatusCode, str | None]:
        if r.timed_out:
            return StatusCode.ERROR, self._timeout_text
        if r.error is not None:
            kind, message = r.error[0], r.error[1]
            return StatusCode.ERROR, f"{kind}: {message}" if message else kind
        return StatusCode.UNSET, None

    def to_readable(self, r: Record, resource: Any, scope: Any) -> Any:
        """The SDK rendering: a finished ``ReadableSpan``."""
        from opentelemetry.sdk.trace import Event, ReadableSpan

        code, description = self.status(r)
        events: Sequence[Any] = ()
        if r.error is not None:
            events = (Event("exception", self.exception_attributes(r), r.end_ns),)
        attributes: Any = self.attributes(r)
        dropped = r.attributes.dropped
        if dropped:  # the SDK reads a span's dropped count from its BoundedAttributes
            attributes = _bounded(attributes, dropped)
        links: Any = ()
        if r.is_step:
            links = [Link(link.context, _bounded(link.attributes, link.attributes.dropped)
                          if link.attributes and link.attributes.dropped else link.attributes)
                     for link in self.links(r)]
            if r.links.dropped:
                from opentelemetry.sdk.util import BoundedList

                links = BoundedList.from_seq(None, links)
                links.dropped = r.links.dropped
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
            attributes=attributes,
            events=events,
            links=links,
            kind=SpanKind.INTERNAL,
            status=Status(code, description),
            start_time=r.start_ns,
            end_time=r.end_ns,
            instrumentation_scope=scope,
        )

    def exception_attributes(self, r: Record) -> dict[str, str]:
        """The ``exception`` event's attributes of a capture whose block raised: ``exception.type``,
        ``exception.message`` and, as the semantic conventions recommend, ``exception.stacktrace`` in Python's
        own format — bounded: the innermost ``capturing.errors.STACK_FRAMES`` frames between the capture and the
        raise, at most ``STACKTRACE_CHARS`` characters (the end kept: it names the raise), and the event
        attribute value-length limit when one is set."""
        kind, message = r.error[0], r.error[1]
        attrs = {"exception.type": kind, "exception.message": message}
        stack = r.error[2] if len(r.error) > 2 else None
        if stack is not None:
            attrs["exception.stacktrace"] = _stacktrace(stack, kind, message, self.limits.value_length)
        return attrs


def _stacktrace(stack: Any, kind: str, message: str, length: int | None) -> str:
    frames, omitted = stack
    try:
        body = "".join(frames.format())
    except Exception:  # pragma: no cover - a source file that cannot be read: the frames without lines
        body = "".join(f'  File "{f.filename}", line {f.lineno}, in {f.name}\n' for f in frames)
    head = _TRACEBACK_HEAD + (f"  [{omitted} outer frames omitted]\n" if omitted else "")
    tail = f"{kind}: {message}\n" if message else f"{kind}\n"
    text = head + body + tail
    bound = STACKTRACE_CHARS if length is None else min(STACKTRACE_CHARS, length)
    if len(text) > bound:
        cut = _TRACEBACK_HEAD + "  [... frames omitted]\n"
        text = (cut + text[len(text) - max(0, bound - len(cut)):])[-bound:] if bound > len(cut) else text[-bound:]
    return text


def _bounded(attributes: Mapping[str, Any], dropped: int) -> Any:
    """``attributes`` as an SDK ``BoundedAttributes`` whose ``dropped`` is ``dropped`` (how exporters read it)."""
    from opentelemetry.attributes import BoundedAttributes

    bounded = BoundedAttributes(None, attributes, immutable=True)
    bounded.dropped = dropped
    return bounded


