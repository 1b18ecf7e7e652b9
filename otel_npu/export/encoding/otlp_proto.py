"""OTLP protobuf encoding of resolved captures, written by hand for speed.

Why not the SDK's encoder: it builds a protobuf object per span, attribute and value, ≈ 75-90 µs per span
(measured on 2 CPU cores, ``benchmarks/``) — more than everything else otel-npu does per capture, and all of it
under the GIL the serving loop needs. otel-npu's spans are regular (same resource, scope and most attribute
keys), so most bytes are encoded once and reused: a span costs a few ``bytes`` joins (≈ 3 µs).

Wire format: ``opentelemetry/proto/trace/v1/trace.proto`` and ``collector/trace/v1/trace_service.proto``.
The output is checked against the official protobuf classes in ``tests/test_otlp_encoding.py`` (decoded
and compared field by field with what the SDK encoder makes of the same span).
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Mapping

from ...spans import attributes as _attrs
from ...spans.render import SpanFactory
from ...record import Record

_pack_u64 = struct.Struct("<Q").pack
_pack_u32 = struct.Struct("<I").pack
_pack_f64 = struct.Struct("<d").pack
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Span.flags: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK when remote.
_FLAGS_LOCAL = b"\x85\x01" + _pack_u32(0x100)
_FLAGS_REMOTE = b"\x85\x01" + _pack_u32(0x300)
_LINK_FLAGS_LOCAL = b"\x35" + _pack_u32(0x100)  # Span.Link.flags is field 6
_LINK_FLAGS_REMOTE = b"\x35" + _pack_u32(0x300)
_KIND_INTERNAL = b"\x30\x01"  # field 6 (kind), varint 1


_BYTE = tuple(bytes((i,)) for i in range(256))


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (negative int64 values: pass ``n & (2**64-1)``)."""
    if n < 0x80:
        return _BYTE[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = []
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def any_value(value: Any) -> bytes:
    """An ``AnyValue`` message body."""
    if isinstance(value, str):
        return field(1, value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)
        return field(1, str(value).encode())  # OTLP ints are int64: keep the digits rather than fail
    if isinstance(value, float):
        return b"\x21" + _pack_f64(value)
    if isinstance(value, (list, tuple)):
        return field(5, b"".join(field(1, any_value(v)) for v in value))
    if isinstance(value, bytes):
        return field(7, value)
    return field(1, str(value).encode("utf-8", "replace"))


def key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message body."""
    return field(1, key.encode("utf-8", "replace")) + field(2, any_value(value))


def attributes(number: int, attrs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> bytes:
    """Repeated ``KeyValue`` field ``number`` holding ``attrs``."""
    items = attrs.items() if isinstance(attrs, Mapping) else attrs
    return b"".join(field(number, key_value(k, v)) for k, v in items)


_pack_kind_times = struct.Struct("<BBBQBQ").pack  # kind (field 6) = INTERNAL, start (7), end (8)
_STATUS_UNSET = b"\x7a\x00"  # an empty Status, as the SDK encoder writes it


def _double_attr_prefix(key: str) -> bytes:
    """Everything of a ``Span.attributes`` entry with a double value but the 8 value bytes."""
    key_field = field(1, key.encode())
    return b"\x4a" + varint(len(key_field) + 11) + key_field + b"\x12\x09\x21"


def _length_prefix(n: int) -> bytes:
    return _BYTE[n] if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7)) if n < 0x4000 else varint(n)


class SpanEncoder:
    """Encodes resolved captures as ``Span`` messages and wraps batches in an ``ExportTraceServiceRequest``."""

    _CACHE_LIMIT = 4096  # names/streams/steps remembered; beyond it, encoded each time

    def __init__(self, factory: SpanFactory, resource: Any, scope_name: str, scope_version: str) -> None:
        self._f = factory
        self._const = attributes(9, factory.const_attributes)
        self._names: dict[str, bytes] = {}
        self._streams: dict[Any, bytes] = {}
        self._steps: dict[str, bytes] = {}
        self._templates: dict[tuple, bytes] = {}
        # A step's links and attributes repeat from step to step: a request is linked from every step that
        # serves it, and an engine's step attributes are small counts. Their encodings are kept here (the
        # links' emptied when full: requests end, new ones come; attributes kept up to the limit).
        self._link_fields: dict[tuple, bytes] = {}
        self._attr_fields: dict[tuple, bytes] = {}
        self._lead = _double_attr_prefix(_attrs.ATTR_HOST_LEAD)
        self._error = _double_attr_prefix(_attrs.ATTR_CLOCK_ERROR)
        self._timed_out = field(9, key_value(_attrs.ATTR_TIMED_OUT, True))
        self._step_kind = field(9, key_value(_attrs.ATTR_KIND, "step"))
        resource_body = attributes(1, getattr(resource, "attributes", {}) or {})
        schema = getattr(resource, "schema_url", "") or ""
        self._resource = field(1, resource_body) + (field(3, schema.encode()) if schema else b"")
        self._scope = field(1, field(1, scope_name.encode()) + (field(2, scope_version.encode()) if scope_version else b""))

    def _cached(self, cache: dict, key: Any, make: Any) -> bytes:
        encoded = cache.get(key)
        if encoded is None:
            encoded = make()
            if len(cache) < self._CACHE_LIMIT:
                cache[key] = encoded
        return encoded

    def encode(self, r: Record) -> bytes:
        """One span as a ``ScopeSpans.spans`` field (ready to concatenate). ``r`` must be identified.

        Hot for the resolver (once per sampled capture). Most spans differ from the last one of the same
        name, stream and step only in ids, times and two doubles, all fixed-width: for them the whole
        message — its length prefix included — is a cached bytes template with holes for those values,
        filled by one formatting operation. Anything else (attributes, trace state, an error, a time-out,
        a step's links) takes the general path below.
        """
        if r.attributes or r.trace_state or r.timed_out or r.error is not None or r.is_step:
            return self._encode_general(r)
        step = r.step
        parent = r.parent_span_id
        key = (r.name, r.stream, None if step is None else step.name, not parent, r.parent_remote)
        template = self._templates.get(key)
        if template is None:
            template = self._template(key, r)
        start_ns = r.start_ns
        ids = (r.trace_id.to_bytes(16, "big"), r.span_id.to_bytes(8, "big"))
        values = (_pack_u64(start_ns), _pack_u64(r.end_ns),
                  _pack_f64((start_ns - self._f.host_offset() - r.host_start) / 1000.0),
                  _pack_f64(r.clock_error_ns / 1000.0))
        if parent:
            return template % (*ids, parent.to_bytes(8, "big"), *values)
        return template % (*ids, *values)

    def _template(self, key: tuple, r: Record) -> bytes:
        """The bytes-format template of ``key``'s spans (see ``encode``): constants escaped, ``%b`` holes."""
        name, _, step_name, root, remote = key
        hole8, hole16 = b"\0" * 8, b"\0" * 16
        step_attr = b"" if step_name is None else field(9, key_value(_attrs.ATTR_STEP, step_name))
        stream = field(9, key_value(_attrs.ATTR_STREAM, self._f.stream_label(r.stream)))

        def esc(constant: bytes) -> bytes:
            return constant.replace(b"%", b"%%")

        pieces = [(b"\x0a\x10", hole16), (b"\x12\x08", hole8)]
        if not root:
            pieces.append((b"\x22\x08", hole8))
        pieces += [(field(5, name.encode("utf-8", "replace")) + _KIND_INTERNAL + b"\x39", hole8), (b"\x41", hole8),
                   (self._const + stream + step_attr + self._lead, hole8), (self._error, hole8)]
        tail = _STATUS_UNSET + (_FLAGS_REMOTE if remote else _FLAGS_LOCAL)
        length = sum(len(c) + len(h) for c, h in pieces) + len(tail)
        template = (esc(b"\x12" + _length_prefix(length)) + b"".join(esc(c) + b"%b" for c, _ in pieces) + esc(tail))
        if len(self._templates) < self._CACHE_LIMIT:
            self._templates[key] = template
        return template

    def _encode_general(self, r: Record) -> bytes:
        """Any span, field by field (constant pieces cached)."""
        f = self._f
        start_ns = r.start_ns
        name = self._names.get(r.name)
        if name is None:
            name = self._cached(self._names, r.name, lambda: field(5, r.name.encode("utf-8", "replace")))
        stream = self._streams.get(r.stream)
        if stream is None:
            stream = self._cached(self._streams, r.stream,
                                  lambda: field(9, key_value(_attrs.ATTR_STREAM, f.stream_label(r.stream))))
        step = r.step
        if step is None:
            step_attr = b""
        else:
            step_attr = self._steps.get(step.name)
            if step_attr is None:
                step_name = step.name
                step_attr = self._cached(self._steps, step_name,
                                         lambda: field(9, key_value(_attrs.ATTR_STEP, step_name)))
        parent = r.parent_span_id
        body = b"\x0a\x10%b\x12\x08%b%b%b%b%b%b%b%b%b%b%b" % (
            r.trace_id.to_bytes(16, "big"), r.span_id.to_bytes(8, "big"),
            b"\x22\x08" + parent.to_bytes(8, "big") if parent else b"",
            name, _pack_kind_times(0x30, 1, 0x39, start_ns, 0x41, r.end_ns), self._const, stream, step_attr,
            self._lead, _pack_f64((start_ns - f.host_offset() - r.host_start) / 1000.0),
            self._error, _pack_f64(r.clock_error_ns / 1000.0))
        if r.trace_state or r.attributes or r.timed_out or r.error is not None or r.is_step:
            body += self._uncommon(r)
        else:
            body += _STATUS_UNSET
        body += _FLAGS_REMOTE if r.parent_remote else _FLAGS_LOCAL
        return b"\x12" + _length_prefix(len(body)) + body

    def _uncommon(self, r: Record) -> bytes:
        """Trace state, user attributes, error/time-out, status and links: what most spans do not have."""
        f = self._f
        out = []
        if r.trace_state:
            out.append(field(3, r.trace_state.to_header().encode()))
        if r.attributes:
            clean = f.user_attributes(r)
            out.append(self._span_attributes(clean))
            if clean.dropped:
                out.append(b"\x50" + varint(clean.dropped))  # field 10: dropped_attributes_count
        if r.timed_out or r.error is not None:
            out.append(self._problem(r))
        else:
            out.append(_STATUS_UNSET)
        if r.is_step:
            links = f.links(r)
            out.append(self._step_kind)
            out.append(field(9, key_value(_attrs.ATTR_LINKS, links.total)))
            if links.dropped:
                out.append(field(9, key_value(_attrs.ATTR_LINKS_OVER, links.dropped)))
            kept = getattr(r, "kept", None)  # steps made by otel-npu have it; test doubles may not
            if kept is not None:
                out.append(attributes(9, _attrs.kept_attributes(kept)))
            cache = self._link_fields
            for link in links:
                ctx = link.context
                attrs = link.attributes
                if attrs or ctx.trace_state:
                    out.append(self._link_field(ctx, attrs))
                    continue
                key = (ctx.trace_id, ctx.span_id, ctx.is_remote)
                encoded = cache.get(key)
                if encoded is None:
                    encoded = self._link_field(ctx, attrs)
                    if len(cache) >= self._CACHE_LIMIT:
                        cache.clear()
                    cache[key] = encoded
                out.append(encoded)
            if links.dropped:
                out.append(b"\x70" + varint(links.dropped))  # field 14: dropped_links_count
        return b"".join(out)

    @staticmethod
    def _link_field(ctx: Any, attrs: Any) -> bytes:
        """One ``Span.links`` entry (field 13)."""
        body = (b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big") + b"\x12\x08" + ctx.span_id.to_bytes(8, "big")
                + (field(3, ctx.trace_state.to_header().encode()) if ctx.trace_state else b""))
        if attrs:
            body += attributes(4, attrs)
            if attrs.dropped:
                body += b"\x28" + varint(attrs.dropped)  # Link field 5: dropped_attributes_count
        return field(13, body + (_LINK_FLAGS_REMOTE if ctx.is_remote else _LINK_FLAGS_LOCAL))

    def _span_attributes(self, attrs: Mapping[str, Any]) -> bytes:
        """``Span.attributes`` (field 9) of ``attrs``; an int, bool or short str value's entry encoded once."""
        cache = self._attr_fields
        out = []
        for key, value in attrs.items():
            kind = value.__class__
            if kind is int or kind is bool or (kind is str and len(value) <= 64):
                entry = (key, kind, value)
                encoded = cache.get(entry)
                if encoded is None:
                    encoded = field(9, key_value(key, value))
                    if len(cache) < self._CACHE_LIMIT:
                        cache[entry] = encoded
                out.append(encoded)
            else:
                out.append(field(9, key_value(key, value)))
        return b"".join(out)

    def _problem(self, r: Record) -> bytes:
        """Attributes, event and status of a span that timed out or whose block raised."""
        out = []
        if r.timed_out:
            out.append(self._timed_out)
        if r.error is not None:
            out.append(field(9, key_value(_attrs.ATTR_ERROR_TYPE, r.error[0])))
            event = (b"\x09" + _pack_u64(r.end_ns) + field(2, b"exception")  # as record_exception adds
                     + attributes(3, self._f.exception_attributes(r)))
            out.append(field(11, event))
        code, description = self._f.status(r)
        status = (field(2, description.encode("utf-8", "replace")) if description else b"") + b"\x18" + varint(code.value)
        out.append(field(15, status))
        return b"".join(out)

    def request(self, encoded_spans: Iterable[bytes]) -> bytes:
        """An ``ExportTraceServiceRequest`` holding ``encoded_spans`` (outputs of ``encode``)."""
        scope_spans = self._scope + b"".join(encoded_spans)
        resource_spans = self._resource + field(2, scope_spans)
        return field(1, resource_spans)
