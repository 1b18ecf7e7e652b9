"""The attributes of otel-npu's spans and metrics: their names (defined here only), the span limits, and
how a capture's own attributes and a step's links are checked and limited as the SDK would.

Runs on the resolver thread (``AttributeCleaner``), except ``process_attributes`` (once, at start-up).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping

from opentelemetry.trace import Link, SpanContext

from ..accounting import Stats
from ..record import Record

_log = logging.getLogger("otel_npu")

# -- attribute names (documented in docs/how-it-works.md and docs/export.md) ------------------------------
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
ATTR_CLOCK_ERROR = "otel_npu.clock_error_us"  # float, µs: bound on the error of start/end (resolve/clock.py)
ATTR_TIMED_OUT = "otel_npu.timed_out"        # the device events did not complete in time
ATTR_PID = "process.pid"
ATTR_RANK = "otel_npu.rank"                  # $RANK, when set
ATTR_LOCAL_RANK = "otel_npu.local_rank"      # $LOCAL_RANK, when set
ATTR_ERROR_TYPE = "error.type"               # semantic convention: the exception's type

#: On a step exported although the sampler dropped it: why ("slow", "detail"); see ``spans/sampling.py``.
ATTR_KEPT = "otel_npu.kept"
#: On a step kept as slow: the threshold it exceeded, in ms.
ATTR_SLOW_THRESHOLD = "otel_npu.slow_threshold_ms"
#: On a module hook's capture (``instrument_module``): the module's class name.
ATTR_MODULE = "otel_npu.module"
#: On stage metrics: the capture's name (a step is recorded with ``otel_npu.stage == otel_npu.step``).
ATTR_STAGE = "otel_npu.stage"
#: On the drop counters: why (``accounting.DROP_REASONS``).
ATTR_REASON = "otel_npu.reason"

_VALID_SCALARS = (str, bool, int, float)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INVALID = object()


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


def process_attributes(device_label: str, ranks: Mapping[str, int] | None = None,
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The attributes every span of this process carries: device, pid, ``ranks`` (``RANK``,
    ``LOCAL_RANK``: ``config.otel.OtelSettings.ranks``) where known, and ``extra`` (``configure(attributes=)``:
    an engine's ranks, say; they never replace otel-npu's own)."""
    attrs: dict[str, Any] = {ATTR_DEVICE: device_label, ATTR_PID: os.getpid()}
    for var, key in (("RANK", ATTR_RANK), ("LOCAL_RANK", ATTR_LOCAL_RANK)):
        if ranks and var in ranks:
            attrs[key] = ranks[var]
    for key, value in (extra or {}).items():
        attrs.setdefault(key, value)
    return attrs


#: Process attributes that are not a stage metric's: the pid changes at every restart (a new series each time).
NOT_METRIC_ATTRIBUTES = (ATTR_PID, ATTR_LOCAL_RANK)


def kept_attributes(kept: tuple[str, float | None]) -> dict[str, Any]:
    """The attributes of a step exported although the sampler dropped it (``spans/sampling.py``)."""
    reason, threshold_ms = kept
    out: dict[str, Any] = {ATTR_KEPT: reason}
    if threshold_ms is not None:
        out[ATTR_SLOW_THRESHOLD] = threshold_ms
    return out


class AttributeCleaner:
    """Checks and limits what the user gave: a capture's attributes and a step's links (resolver thread).
    Each invalid key or value is warned about once."""

    def __init__(self, limits: Limits, stats: Stats, own_keys: Callable[[Record], frozenset[str]]) -> None:
        self.limits = limits
        self._stats = stats
        self._own_keys = own_keys  # the keys otel-npu sets itself on a record's span (reserved), a frozenset
        self._warned: set[str] = set()
        self._link_window = 0  # how many over-full steps so far: where the next one's kept window starts

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
            self.warn_once("attributes", f"capture {r.name!r}: attributes must be a mapping of str to "
                            f"str/bool/int/float (or sequences of one of them), got {type(attrs).__name__}")
            r.attributes = clean
            return clean
        own = self._own_keys(r)
        room = self.limits.span_attributes
        room = None if room is None else max(0, room - len(own))
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
            self.warn_once(f"key:{key!r}", f"{what} {owner!r}: attribute key {key!r} dropped: keys must be "
                            "non-empty strings")
            return _INVALID
        if key in reserved:
            self.warn_once(f"own:{key}", f"{what} {owner!r}: attribute {key!r} dropped: otel-npu sets this key "
                            "on the span itself (its own value is kept; keys are unique)")
            return _INVALID
        if isinstance(value, _VALID_SCALARS) or _valid_sequence(value):
            if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
                self.warn_once(f"int:{key}", f"{what} {owner!r}: attribute {key!r} = {value!r} dropped: "
                                "integers must fit in int64 (OTLP's type)")
                return _INVALID
            if isinstance(value, (list, tuple)):
                value = list(value)
                if value and type(value[0]) is int and not all(_INT64_MIN <= v <= _INT64_MAX for v in value):
                    self.warn_once(f"int:{key}", f"{what} {owner!r}: attribute {key!r} dropped: integers must "
                                    "fit in int64 (OTLP's type)")
                    return _INVALID
                if length is not None and value and type(value[0]) is str:
                    value = [v[:length] for v in value]
            elif length is not None and isinstance(value, str):
                value = value[:length]
            return value
        self.warn_once(f"attr:{key!r}", f"{what} {owner!r}: attribute {key!r} = {value!r:.80} dropped: values "
                        "must be str/bool/int/float or sequences of one of them")
        return _INVALID

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
                    self.warn_once(f"link-raised:{type(item).__name__}", f"step {r.name!r}: a link's "
                                    f"get_span_context() raised {type(exc).__name__}; that link is dropped")
                    continue
            else:
                self._stats.add("links_dropped")
                self.warn_once(f"link:{type(item).__name__}", f"step {r.name!r}: a link must be a Span, "
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

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and len(self._warned) < 1000:
            self._warned.add(key)
            _log.warning("otel-npu: %s", message)


def _valid_sequence(value: Any) -> bool:
    if not isinstance(value, (list, tuple)) or not value:
        return isinstance(value, (list, tuple))
    kind = type(value[0])
    return kind in _VALID_SCALARS and all(type(v) is kind for v in value)
