"""The hand-written OTLP encoder produces what the official SDK encoder produces for the same spans."""

from __future__ import annotations

import types

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, TraceFlags, TraceState

from otel_npu.export.encoding import otlp_proto as otlp
from otel_npu.accounting import Stats
from otel_npu.spans.render import SpanFactory


def factory() -> SpanFactory:
    return SpanFactory(sampler=DEFAULT_ON, id_generator=RandomIdGenerator(),
                       stream_label=lambda s: f"stream-{s}", to_wall=lambda mono: mono + 1_700_000_000_000_000_000,
                       const_attributes={"otel_npu.device": "npu:0", "process.pid": 4242, "otel_npu.rank": 0},
                       stats=Stats(), event_timeout_s=60.0)


def record(**fields):
    base = dict(name="forward", trace_id=0x0123456789ABCDEF0123456789ABCDEF, span_id=0x1122334455667788,
                parent_span_id=0, trace_state=TraceState(), parent_remote=False,
                start_ns=1_700_000_000_500_000_000, end_ns=1_700_000_000_504_000_000, stream=7,
                host_start=499_000_000, clock_error_ns=1234, step=None, timed_out=False, error=None,
                attributes=None, is_step=False, links=(), start=None, parent=None)
    base.update(fields)
    return types.SimpleNamespace(**base)


STEP = types.SimpleNamespace(name="Decode")
CASES = {
    "plain root": record(),
    "child in a step (the template path)": record(parent_span_id=0x77, step=STEP),
    "a name with a % in it": record(name="100% forward", parent_span_id=0x5, step=types.SimpleNamespace(name="50%")),
    "child in a step with attributes": record(
        parent_span_id=0x99, step=STEP,
        attributes={"s": "é✓", "b": False, "i": -42, "big": 2**62, "f": 0.25, "ls": ["a", "b"], "li": [1, 2, 3],
                    "lf": [1.5], "lb": [True, False]}),
    "remote parent and trace state": record(parent_span_id=0x77, parent_remote=True,
                                            trace_state=TraceState([("vendor", "v1")])),
    "error": record(error=("ValueError", "bad shape (3, 4)")),
    "timed out": record(timed_out=True),
    "step with links": record(name="Decode", is_step=True, links=[
        SpanContext(0xAAA, 0xBBB, is_remote=True, trace_flags=TraceFlags(1)),
        SpanContext(0xCCC, 0xDDD, is_remote=False, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v")])),
    ]),
    # link attributes, the link limit (128 of 200 kept), and dropped counts
    "step over the link limit, with link attributes": record(name="Prefill", is_step=True, links=[
        Link(SpanContext(0xA00 + n, 0xB00 + n, is_remote=True, trace_flags=TraceFlags(1)), {"request.id": f"r{n}"})
        for n in range(1, 201)]),
    "attributes dropped (empty key, outside int64, otel-npu's own key)": record(
        attributes={"": 1, "big": 2**64, "otel_npu.device": "mine", "ok": 1}),
}


def canonical(message) -> dict:
    data = json_format.MessageToDict(message)
    for span in data.get("resourceSpans", [{}])[0].get("scopeSpans", [{}])[0].get("spans", []):
        span["attributes"] = sorted(span.get("attributes", []), key=lambda kv: kv["key"])
    for rs in data.get("resourceSpans", []):
        rs["resource"]["attributes"] = sorted(rs["resource"].get("attributes", []), key=lambda kv: kv["key"])
    return data


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_matches_the_sdk_encoder(case):
    f = factory()
    resource = Resource.create({"service.name": "decode-worker", "host.name": "h"})
    scope = InstrumentationScope("otel_npu", "0.1.0")
    r = CASES[case]
    encoder = otlp.SpanEncoder(f, resource, "otel_npu", "0.1.0")
    ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.encode(r), encoder.encode(r)]))
    sdk = encode_spans([f.to_readable(r, resource, scope)] * 2)  # twice: the second from the cached template
    ours, sdk = canonical(ours), canonical(sdk)
    # The SDK encoder leaves out a link's trace state; the proto has the field and we fill it.
    for span in ours["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        for link in span.get("links", []):
            if r.links[1].context.trace_state and link["spanId"] == "AAAAAAAADd0=":
                assert link.pop("traceState") == "k=v"
    assert ours == sdk


def test_a_batch_is_one_resource_and_one_scope():
    f = factory()
    encoder = otlp.SpanEncoder(f, Resource.create({"service.name": "x"}), "otel_npu", "0.1.0")
    request = ExportTraceServiceRequest.FromString(encoder.request([encoder.encode(r) for r in CASES.values()]))
    assert len(request.resource_spans) == 1 and len(request.resource_spans[0].scope_spans) == 1
    assert [s.name for s in request.resource_spans[0].scope_spans[0].spans] == [r.name for r in CASES.values()]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, 2**63 - 1, (-1) & (2**64 - 1)])
def test_varint(n):
    from google.protobuf.internal.decoder import _DecodeVarint

    assert _DecodeVarint(otlp.varint(n), 0) == (n, len(otlp.varint(n)))
