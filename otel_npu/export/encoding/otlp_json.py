"""OTLP/JSON encoding of resolved captures, written by hand for speed: the ``OTEL_NPU_TRACES_FILE`` sink.

Why: the file sink used to encode spans as protobuf and turn each batch into JSON through protobuf's
``MessageToDict`` — ≈ 90-180 µs of CPU per span (measured on 2 CPU cores, ``benchmarks/``), under the GIL the
serving loop needs. Here a span is one ``str`` formatting operation on a cached template for the common span
(same name, stream, step: only ids, times and two doubles differ), and a small dict through the C JSON encoder
otherwise (steps, attributes, errors), ≈ 2-6 µs.

Output: one ``ExportTraceServiceRequest`` per line, as the OTLP/JSON encoding says (trace and span ids as
hex, enums as integers, 64-bit integers as strings, lowerCamelCase keys) — the same document, key for key,
as ``request_to_json_line`` makes of ``otlp_proto.SpanEncoder``'s bytes for the same span (checked in
``tests/test_otlp_json.py``, over the cases of ``tests/test_otlp_encoding.py``).
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Iterable, Mapping

from ...spans import attributes as _attrs
from ...spans.render import SpanFactory
from ...record import Record

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

_FLAGS_LOCAL = 0x100   # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE = 0x300  # ... | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def _double(value: float) -> Any:
    if math.isfinite(value):
        return value
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def any_value(value: Any) -> dict:
    """An ``AnyValue`` as OTLP/JSON."""
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": _double(value)}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [any_value(v) for v in value]} if value else {}}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode()}
    return {"stringValue": str(value)}


def key_values(attrs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list:
    items = attrs.items() if isinstance(attrs, Mapping) else attrs
    return [{"key": k, "value": any_value(v)} for k, v in items]


def _number(value: float) -> str:
    """One of the two timing doubles (whole ns in µs: three decimals are exact) as OTLP/JSON writes it: a JSON
    number, or "NaN"/"Infinity"/"-Infinity" as strings."""
    if math.isfinite(value):
        return "%.3f" % value
    return _dumps(_double(value))


_TIMING = (',{"key":"' + _attrs.ATTR_HOST_LEAD + '","value":{"doubleValue":%s}}'
           ',{"key":"' + _attrs.ATTR_CLOCK_ERROR + '","value":{"doubleValue":%s}}')


class JsonSpanEncoder:
    """``encode(r)`` -> one span as OTLP/JSON text; ``request(spans)`` -> one line (an export request)."""

    _CACHE_LIMIT = 4096

    def __init__(self, factory: SpanFactory, resource: Any, scope_name: str, scope_version: str) -> None:
        self._f = factory
        self._templates: dict[tuple, str] = {}
        self._names: dict[str, str] = {}
        self._consts: dict[tuple, str] = {}
        resource_json: dict[str, Any] = {}
        attrs = getattr(resource, "attributes", {}) or {}
        if attrs:
            resource_json["attributes"] = key_values(attrs)
        scope: dict[str, Any] = {"name": scope_name} if scope_name else {}
        if scope_version:
            scope["version"] = scope_version
        head: dict[str, Any] = {"resource": resource_json, "scopeSpans": [{"scope": scope, "spans": []}]}
        schema = getattr(resource, "schema_url", "") or ""
        if schema:
            head["schemaUrl"] = schema
        text = _dumps({"resourceSpans": [head]})
        cut = text.index('"spans":[]') + len('"spans":[')
        self._prefix, self._suffix = text[:cut], text[cut:] + "\n"

    def encode(self, r: Record) -> str:
        """One span (``r`` identified). The common span from a cached template; others field by field."""
        if r.attributes or r.trace_state or r.timed_out or r.error is not None or r.is_step:
            return self._encode_general(r)
        step = r.step
        parent = r.parent_span_id
        key = (r.name, r.stream, None if step is None else step.name, not parent, r.parent_remote)
        template = self._templates.get(key)
        if template is None:
            template = self._template(key, r)
        start_ns = r.start_ns
        # The two doubles are whole nanoseconds in µs: three decimals are exact (and 2-3x cheaper than repr).
        lead = (start_ns - self._f.host_offset() - r.host_start) / 1000.0
        error = r.clock_error_ns / 1000.0
        if parent:
            return template % (r.trace_id.to_bytes(16, "big").hex(), r.span_id.to_bytes(8, "big").hex(),
                               parent.to_bytes(8, "big").hex(), start_ns, r.end_ns, lead, error)
        return template % (r.trace_id.to_bytes(16, "big").hex(), r.span_id.to_bytes(8, "big").hex(), start_ns,
                           r.end_ns, lead, error)

    def _template(self, key: tuple, r: Record) -> str:
        name, _, step_name, root, remote = key

        def esc(text: str) -> str:
            return text.replace("%", "%%")

        const = [{"key": k, "value": any_value(v)} for k, v in self._f.const_attributes.items()]
        const.append({"key": _attrs.ATTR_STREAM, "value": any_value(self._f.stream_label(r.stream))})
        if step_name is not None:
            const.append({"key": _attrs.ATTR_STEP, "value": any_value(step_name)})
        const_text = esc(_dumps(const)[1:-1])
        template = ('{"traceId":"%s","spanId":"%s",' + ("" if root else '"parentSpanId":"%s",')
                    + '"name":' + esc(_dumps(name)) + ',"kind":1,"startTimeUnixNano":"%d","endTimeUnixNano":"%d",'
                    + '"attributes":[' + const_text
                    + ',{"key":"' + _attrs.ATTR_HOST_LEAD + '","value":{"doubleValue":%.3f}}'
                    + ',{"key":"' + _attrs.ATTR_CLOCK_ERROR + '","value":{"doubleValue":%.3f}}],'
                    + '"status":{},"flags":' + str(_FLAGS_REMOTE if remote else _FLAGS_LOCAL) + "}")
        if len(self._templates) < self._CACHE_LIMIT:
            self._templates[key] = template
        return template

    def _encode_general(self, r: Record) -> str:
        """Any span: constant pieces cached (per name, and per stream and step), JSON work only for the
        parts a span has of its own (user attributes, links, an error)."""
        f = self._f
        parts = ['{"traceId":"%s","spanId":"%s"' % (r.trace_id.to_bytes(16, "big").hex(),
                                                     r.span_id.to_bytes(8, "big").hex())]
        if r.trace_state:
            parts.append(',"traceState":' + _dumps(r.trace_state.to_header()))
        if r.parent_span_id:
            parts.append(',"parentSpanId":"%s"' % r.parent_span_id.to_bytes(8, "big").hex())
        name = self._names.get(r.name)
        if name is None:
            name = ',"name":' + _dumps(r.name) + ',"kind":1'
            if len(self._names) < self._CACHE_LIMIT:
                self._names[r.name] = name
        step = r.step
        key = (r.stream, None if step is None else step.name)
        const = self._consts.get(key)
        if const is None:
            entries = key_values(f.const_attributes)
            entries.append({"key": _attrs.ATTR_STREAM, "value": any_value(f.stream_label(r.stream))})
            if step is not None:
                entries.append({"key": _attrs.ATTR_STEP, "value": any_value(step.name)})
            const = _dumps(entries)[1:-1]
            if len(self._consts) < self._CACHE_LIMIT:
                self._consts[key] = const
        parts.append(name)
        parts.append(',"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":[' % (r.start_ns, r.end_ns))
        parts.append(const)
        parts.append(_TIMING % (_number((r.start_ns - f.host_offset() - r.host_start) / 1000.0),
                                _number(r.clock_error_ns / 1000.0)))
        own: list = []
        dropped = 0
        if r.attributes:
            clean = f.user_attributes(r)
            own += key_values(clean)
            dropped = getattr(clean, "dropped", 0)
        if r.timed_out:
            own.append({"key": _attrs.ATTR_TIMED_OUT, "value": {"boolValue": True}})
        if r.error is not None:
            own.append({"key": _attrs.ATTR_ERROR_TYPE, "value": {"stringValue": r.error[0]}})
        links = None
        if r.is_step:
            links = f.links(r)
            own.append({"key": _attrs.ATTR_KIND, "value": {"stringValue": "step"}})
            own.append({"key": _attrs.ATTR_LINKS, "value": {"intValue": str(links.total)}})
            if links.dropped:
                own.append({"key": _attrs.ATTR_LINKS_OVER, "value": {"intValue": str(links.dropped)}})
            kept = getattr(r, "kept", None)
            if kept is not None:
                own += key_values(_attrs.kept_attributes(kept))
        if own:
            parts.append("," + _dumps(own)[1:-1])
        parts.append("]")
        if dropped:
            parts.append(',"droppedAttributesCount":%d' % dropped)
        if r.error is not None:
            parts.append(',"events":' + _dumps([{"timeUnixNano": str(r.end_ns), "name": "exception",
                                                 "attributes": key_values(f.exception_attributes(r))}]))
        if links:
            out = []
            for link in links:
                ctx = link.context
                item: dict[str, Any] = {"traceId": f"{ctx.trace_id:032x}", "spanId": f"{ctx.span_id:016x}"}
                if ctx.trace_state:
                    item["traceState"] = ctx.trace_state.to_header()
                if link.attributes:
                    item["attributes"] = key_values(link.attributes)
                    if getattr(link.attributes, "dropped", 0):
                        item["droppedAttributesCount"] = link.attributes.dropped
                item["flags"] = _FLAGS_REMOTE if ctx.is_remote else _FLAGS_LOCAL
                out.append(item)
            parts.append(',"links":' + _dumps(out))
        if links is not None and links.dropped:
            parts.append(',"droppedLinksCount":%d' % links.dropped)
        if r.timed_out or r.error is not None:
            code, description = f.status(r)
            status: dict[str, Any] = {"message": description} if description else {}
            status["code"] = code.value
            parts.append(',"status":' + _dumps(status))
        else:
            parts.append(',"status":{}')
        parts.append(',"flags":%d}' % (_FLAGS_REMOTE if r.parent_remote else _FLAGS_LOCAL))
        return "".join(parts)

    def request(self, encoded_spans: Iterable[str]) -> str:
        """One OTLP/JSON line (an ``ExportTraceServiceRequest``) holding ``encoded_spans``."""
        return self._prefix + ",".join(encoded_spans) + self._suffix


def request_to_json_line(request: Any) -> str:
    """An ``ExportTraceServiceRequest`` as one line of OTLP/JSON: trace and span ids in hex (as the OTLP/JSON
    encoding requires, not protobuf-JSON's base64), enums as integers, int64 as strings."""
    from google.protobuf import json_format

    message = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rs in message.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                for obj in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in obj:
                            obj[key] = base64.b64decode(obj[key]).hex()
    return json.dumps(message, separators=(",", ":")) + "\n"
