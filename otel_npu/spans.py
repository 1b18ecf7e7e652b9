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

import collections.abc
import functools
import logging
import os
import random
from typing import Any, Callable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .record import DROPPED, Record
from .sampling import ATTR_KEPT, ATTR_SLOW_THRESHOLD

_log = logging.getLogger("otel_npu")

# -- attribute names (documented in the README) ----------------------------------------------------------
ATTR_DEVICE = "otel_npu.device"              # "npu:0", "cuda:0", "cpu"
ATTR_STREAM = "otel_npu.stream"              # the device stream (CPU: the thread)
ATTR_STEP = "otel_npu.step"                  # name of the enclosing step, if any
ATTR_KIND = "otel_npu.kind"                  # "step" on step spans (captures leave it out)
ATTR_LINKS = "otel_npu.batch_size"           # on step spans: how many links the step was given (exported or not)
ATTR_LINKS_OVER = "otel_npu.links_over_limit"  # on step spans, when > 0: of those, left out by the link limit
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
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class Limits:
    """The span limits of the OpenTelemetry specification, as the SDK's ``SpanLimits`` holds them (``None``:
    no limit). The application's provider's ``SpanLimits`` when spans go through it (``from_sdk``), else the
    ``OTEL_*_LIMIT`` variables as the SDK reads them (``Limits(**config.otel.OtelSettings.span_limits)``)."""

    __slots__ = ("span_attributes", "links", "link_attributes", "events", "event_attributes",
                 "span_value_length", "value_length")

    def __init__(self, span_attributes: int | None = 128, links: int | None = 128,
                 link_attributes: int | None = 128, events: int | None = 128, event_attributes: int | None = 128,
                 span_value_length: int | None = None, value_length: int | None = None) -> None:
        self.span_attributes = span_attributes
        self.links = links
        self.link_attributes = link_attributes
        self.events = events
        self.event_attributes = event_attributes
        self.span_value_length = span_value_length  # span attributes
        self.value_length = value_length  # link and event attributes (the SDK's max_attribute_length)

    @classmethod
    def from_sdk(cls, limits: Any) -> "Limits":
        """Of an SDK ``SpanLimits`` (a provider's ``_span_limits``); the defaults when there is none."""
        if limits is None:
            return cls()
        get = functools.partial(getattr, limits)
        return cls(get("max_span_attributes", 128), get("max_links", 128), get("max_link_attributes", 128),
                   get("max_events", 128), get("max_event_attributes", 128), get("max_span_attribute_length", None),
                   get("max_attribute_length", None))


class CleanAttributes(dict):
    """A capture's or link's attributes once checked and limited (``dropped``: how many were left out)."""

    __slots__ = ("dropped",)

    def __bool__(self) -> bool:  # something to encode: attributes, or a count of dropped ones
        return len(self) > 0 or self.dropped > 0


class LinkList(list):
    """A step's links once converted and limited: ``Link`` objects (``total``: valid links before the limit)."""

    __slots__ = ("total", "dropped")


def process_attributes(device_label: str, ranks: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The attributes every span of this process carries: device, pid, and ``ranks`` (``RANK``,
    ``LOCAL_RANK``: ``config.otel.OtelSettings.ranks``) where known."""
    attrs: dict[str, Any] = {ATTR_DEVICE: device_label, ATTR_PID: os.getpid()}
    for var, key in (("RANK", ATTR_RANK), ("LOCAL_RANK", ATTR_LOCAL_RANK)):
        if ranks and var in ranks:
            attrs[key] = ranks[var]
    return attrs


def kept_attributes(kept: tuple[str, float | None]) -> dict[str, Any]:
    """The attributes of a step exported although the sampler dropped it (``sampling.py``)."""
    reason, threshold_ms = kept
    out: dict[str, Any] = {ATTR_KEPT: reason}
    if threshold_ms is not None:
        out[ATTR_SLOW_THRESHOLD] = threshold_ms
    return out


class _LazyAttributes(collections.abc.Mapping):
    """The attributes shown to the sampler, built only if the sampler reads them: the SDK's ratio and
    parent-based samplers never do, and building them costs ≈ 2 µs per step on the sampled-out path."""

    __slots__ = ("_make", "_r", "_data")

    def __init__(self, make: Callable[[Any], dict], r: Record) -> None:
        self._make = make
        self._r = r
        self._data: dict | None = None

    def _get(self) -> dict:
        data = self._data
        if data is None:
            data = self._data = self._make(self._r)
        return data

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Any:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


def _root_context(r: Record) -> Any:
    """The OTel context current when the outermost capture of ``r``'s chain (dropped ones included) began."""
    while r.parent is not None:
        r = r.parent
    return r.otel_ctx


#: Stream labels remembered at most (the CPU backend's streams are threads, which may come and go).
LABEL_CACHE_LIMIT = 1024


class SpanFactory:
    """The decisions that make a span of a resolved capture, shared by every sink of one pipeline."""

    def __init__(self, *, sampler: Any, id_generator: Any, stream_label: Callable[[Any], str],
                 to_wall: Callable[[int], int], const_attributes: Mapping[str, Any], stats: Any,
                 event_timeout_s: float, limits: Limits | None = None) -> None:
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
        self.limits = limits or Limits()
        self._link_window = 0  # how many over-full steps so far: where the next one's kept window starts

    # -- identity -----------------------------------------------------------------------------------
    def identify(self, r: Record) -> bool:
        """Decide whether ``r`` is sampled; give a sampled ``r`` (and, lazily, its ancestors) trace/span ids.

        A capture under an unsampled parent gets no ids (its span is not made: the cheap path for the
        sampled-out majority); ``rekey`` gives them later if its step is exported after all. A root is
        always given ids (the sampler needs its trace id)."""
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
            if not sampled:
                r.sampled = False
                return False
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
            # As the SDK's Tracer.start_span asks: the span's attributes (those known at its start) and its
            # links as Link objects.
            result = self._sampler.should_sample(ctx, r.trace_id, r.name, SpanKind.INTERNAL,
                                                 _LazyAttributes(self.start_attributes, r), self.sampler_links(r))
            sampled = result.decision.is_sampled()
            r.trace_state = result.trace_state
        r.span_id = self._new_span_id()
        r.sampled = sampled
        return sampled

    def rekey(self, records: Sequence[Any]) -> None:
        """``records`` (captures of a step the sampler dropped) are exported after all: their step was set
        sampled; give them ids under it."""
        for r in records:
            r.sampled = None
        for r in records:
            self.identify(r)

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
    def stream_label(self, stream: Any) -> str:
        label = self._labels.get(stream)
        if label is None:
            labels = self._labels
            if len(labels) >= LABEL_CACHE_LIMIT:  # streams come and go (a thread per request): start over
                labels.clear()
            label = labels[stream] = self._stream_label(stream)
        return label

    def own_keys(self, r: Record) -> list[str]:
        """The keys of the attributes otel-npu itself sets on ``r``'s span (``attributes()`` order)."""
        keys = list(self.const_attributes)
        keys += (ATTR_STREAM, ATTR_HOST_LEAD, ATTR_CLOCK_ERROR)
        if r.step is not None:
            keys.append(ATTR_STEP)
        if r.is_step:
            keys += (ATTR_KIND, ATTR_LINKS)
            if self.links(r).dropped:
                keys.append(ATTR_LINKS_OVER)
        if r.timed_out:
            keys.append(ATTR_TIMED_OUT)
        if r.error is not None:
            keys.append(ATTR_ERROR_TYPE)
        return keys

    def user_attributes(self, r: Record) -> CleanAttributes:
        """The capture's own attributes as they go out, checked and limited once (the result replaces
        ``r.attributes``; ``.dropped`` says how many were left out).

        As the SDK does: an empty or non-str key, a value OTLP cannot carry and an int outside int64 are
        dropped with a warning (once per key); strings are cut at the span value-length limit; and the span
        keeps at most ``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT`` attributes. Unlike the SDK (which keeps the last
        ones set), otel-npu's own attributes are kept first and then the user's in their order; a user
        attribute with the key of one otel-npu sets on this span (``otel_npu.device``, ``error.type`` on a
        failed capture, ...) is dropped with a warning: keys are unique, and otel-npu's are what its tools
        and dashboards read."""
        attrs = r.attributes
        if attrs.__class__ is CleanAttributes:
            return attrs
        clean = CleanAttributes()
        clean.dropped = 0
        if not attrs:
            r.attributes = clean
            return clean
        try:
            items = list(attrs.items())
        except Exception:  # not a mapping, or one whose items() raises
            self._warn_once("attributes", f"capture {r.name!r}: attributes must be a mapping of str to "
                            f"str/bool/int/float (or sequences of one of them), got {type(attrs).__name__}")
            r.attributes = clean
            return clean
        own = self.own_keys(r)
        room = self.limits.span_attributes
        room = None if room is None else max(0, room - len(own))
        own = set(own)
        length = self.limits.span_value_length
        for key, value in items:
            value = self._clean_value(r.name, "capture", key, value, length, own)
            if value is _INVALID:
                clean.dropped += 1
            elif room is not None and len(clean) >= room:
                clean.dropped += 1
            else:
                clean[key] = value
        if clean.dropped:
            self._stats.add("attributes_dropped", clean.dropped)
        r.attributes = clean
        return clean

    def _clean_value(self, owner: str, what: str, key: Any, value: Any, length: int | None,
                     reserved: Any = ()) -> Any:
        """``value`` as it goes out, or ``_INVALID`` (warned once per key)."""
        if not isinstance(key, str) or not key:
            self._warn_once(f"key:{key!r}", f"{what} {owner!r}: attribute key {key!r} dropped: keys must be "
                            "non-empty strings")
            return _INVALID
        if key in reserved:
            self._warn_once(f"own:{key}", f"{what} {owner!r}: attribute {key!r} dropped: otel-npu sets this key "
                            "on the span itself (its own value is kept; keys are unique)")
            return _INVALID
        if isinstance(value, _VALID_SCALARS) or _valid_sequence(value):
            if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
                self._warn_once(f"int:{key}", f"{what} {owner!r}: attribute {key!r} = {value!r} dropped: "
                                "integers must fit in int64 (OTLP's type)")
                return _INVALID
            if isinstance(value, (list, tuple)):
                value = list(value)
                if value and type(value[0]) is int and not all(_INT64_MIN <= v <= _INT64_MAX for v in value):
                    self._warn_once(f"int:{key}", f"{what} {owner!r}: attribute {key!r} dropped: integers must "
                                    "fit in int64 (OTLP's type)")
                    return _INVALID
                if length is not None and value and type(value[0]) is str:
                    value = [v[:length] for v in value]
            elif length is not None and isinstance(value, str):
                value = value[:length]
            return value
        self._warn_once(f"attr:{key!r}", f"{what} {owner!r}: attribute {key!r} = {value!r:.80} dropped: values "
                        "must be str/bool/int/float or sequences of one of them")
        return _INVALID

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

    def links(self, r: Record) -> LinkList:
        """A step's links as ``Link``s (spans, SpanContexts or Links accepted; invalid contexts skipped), with
        their attributes checked and limited, at most ``OTEL_SPAN_LINK_COUNT_LIMIT`` of them.

        Which links a step over the limit keeps: a window of that many consecutive requests of the batch that
        moves along it from one over-full step to the next (wrapping around), so that in a batch larger than
        the limit every request is linked from some of the steps that served it. (The SDK keeps the last N
        added: in a stable batch the first requests would never be linked from any step.) The span's
        ``dropped_links_count`` and ``otel_npu.links_over_limit`` say how many were left out;
        ``otel_npu.batch_size`` stays the number of links given (the whole batch).

        Converted once: the step's tuple is replaced by the resulting list."""
        if r.links.__class__ is LinkList:
            return r.links
        valid = []
        for item in r.links:
            attrs = None
            if isinstance(item, SpanContext):
                ctx = item
            elif isinstance(item, Link):
                ctx = item.context
                attrs = item.attributes
            elif callable(getattr(item, "get_span_context", None)):
                try:
                    ctx = item.get_span_context()
                    ctx.is_valid  # noqa: B018  (a context that is no SpanContext costs this link only)
                except Exception as exc:
                    self._stats.add("links_dropped")
                    self._warn_once(f"link-raised:{type(item).__name__}", f"step {r.name!r}: a link's "
                                    f"get_span_context() raised {type(exc).__name__}; that link is dropped")
                    continue
            else:
                self._stats.add("links_dropped")
                self._warn_once(f"link:{type(item).__name__}", f"step {r.name!r}: a link must be a Span, "
                                f"SpanContext or Link, got {type(item).__name__}: {item!r}")
                continue
            if ctx.is_valid:
                valid.append((ctx, attrs))
        out = LinkList()
        out.total = len(valid)
        limit = self.limits.links
        if limit is not None and len(valid) > limit:
            start = (self._link_window * limit) % len(valid)
            self._link_window += 1
            valid = (valid[start:] + valid[:start])[:limit]
            self._stats.add("links_over_limit", out.total - limit)
        out.dropped = out.total - len(valid)
        for ctx, attrs in valid:
            out.append(Link(ctx, self._link_attributes(r.name, attrs) if attrs else None))
        r.links = out
        return out

    def _link_attributes(self, step_name: str, attrs: Any) -> CleanAttributes:
        clean = CleanAttributes()
        clean.dropped = 0
        try:
            items = list(attrs.items())
        except Exception:
            return clean
        room = self.limits.link_attributes
        length = self.limits.value_length
        for key, value in items:
            value = self._clean_value(step_name, "a link of step", key, value, length)
            if value is _INVALID or (room is not None and len(clean) >= room):
                clean.dropped += 1
            else:
                clean[key] = value
        return clean

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
        own format — bounded: the innermost ``capturing.STACK_FRAMES`` frames between the capture and the
        raise, at most ``STACKTRACE_CHARS`` characters (the end kept: it names the raise), and the event
        attribute value-length limit when one is set."""
        kind, message = r.error[0], r.error[1]
        attrs = {"exception.type": kind, "exception.message": message}
        stack = r.error[2] if len(r.error) > 2 else None
        if stack is not None:
            attrs["exception.stacktrace"] = _stacktrace(stack, kind, message, self.limits.value_length)
        return attrs

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and len(self._warned) < 1000:
            self._warned.add(key)
            _log.warning("otel-npu: %s", message)


_INVALID = object()
STACKTRACE_CHARS = 8192
_TRACEBACK_HEAD = "Traceback (most recent call last):\n"


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


def _valid_sequence(value: Any) -> bool:
    if not isinstance(value, (list, tuple)) or not value:
        return isinstance(value, (list, tuple))
    kind = type(value[0])
    return kind in _VALID_SCALARS and all(type(v) is kind for v in value)
