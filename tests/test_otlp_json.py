"""The traces-file encoder writes OTLP/JSON: the document the SDK's encoder gives for spans the SDK built
(turned into OTLP/JSON by the test itself), and, over more cases, what otel-npu's protobuf encoder +
MessageToDict write for the same records."""

from __future__ import annotations

import copy
import json
import math

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from otel_npu.export.encoding import otlp_json
from otel_npu.export.encoding import otlp_proto as otlp
from otel_npu.export.encoding.otlp_json import request_to_json_line

from .otlp_cases import CASES, RESOURCE, factory, record, sdk_cases


def both(records):
    resource = Resource.create({"service.name": "decode-worker", "host.name": "h", "n": 3, "ok": True})
    # A factory each: which links an over-full step keeps moves on from one step to the next.
    reference = otlp.SpanEncoder(factory(), resource, "otel_npu", "0.1.0")
    fast = otlp_json.JsonSpanEncoder(factory(), resource, "otel_npu", "0.1.0")
    # Each encoder converts a record's links/attributes once and caches the result on it: give each its copy.
    ref_line = request_to_json_line(ExportTraceServiceRequest.FromString(
        reference.request([reference.encode(copy.copy(r)) for r in records])))
    fast_line = fast.request([fast.encode(copy.copy(r)) for r in records])
    return json.loads(ref_line), fast_line


@pytest.mark.parametrize("case", list(CASES))
def test_same_document_as_protobuf_and_message_to_dict(case):
    expected, line = both([CASES[case]])
    assert line.endswith("\n") and "\n" not in line[:-1], "one line per batch"
    assert json.loads(line) == expected


def test_a_batch_of_several_kinds_and_kept_steps():
    records = [record(parent_span_id=0x77, step=CASES["child in a step (the template path)"].step),
               record(name="Decode", is_step=True, kept=("slow", 12.5)),
               record(name="Decode", is_step=True, kept=("detail", None)), record(), record(name='quo"te\\ ✓')]
    expected, line = both(records)
    document = json.loads(line)
    assert document == expected
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    kept = {kv["key"]: kv["value"] for kv in spans[1]["attributes"]}
    assert kept["otel_npu.kept"] == {"stringValue": "slow"} and kept["otel_npu.slow_threshold_ms"] == {"doubleValue": 12.5}


def test_values_json_cannot_carry_as_numbers_are_strings():
    expected, line = both([record(attributes={"nan": math.nan, "inf": math.inf, "big": 2**63 - 1})])
    assert json.loads(line) == expected
    assert "NaN" in line and "Infinity" in line and '"9223372036854775807"' in line


def otlp_json_of(message) -> dict:
    """OTLP/JSON as the OTLP specification defines it, made here from a protobuf message: the protobuf JSON
    mapping with enums as integers, and trace and span ids as hex strings instead of base64."""
    import base64

    from google.protobuf import json_format

    data = json_format.MessageToDict(message, use_integers_for_enums=True)
    for rs in data.get("resourceSpans", ()):
        rs["resource"]["attributes"] = sorted(rs["resource"].get("attributes", []), key=lambda kv: kv["key"])
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                span["attributes"] = sorted(span.get("attributes", []), key=lambda kv: kv["key"])
                for obj in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in obj:
                            obj[key] = base64.b64decode(obj[key]).hex()
    return data


def test_same_document_as_the_sdk_encodes_for_spans_the_sdk_built():
    """The expected side has no otel-npu code in it: spans built by the SDK's tracer (``test_otlp_encoding``'s
    cases), encoded by the SDK's encoder, turned into OTLP/JSON here."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    for case, sdk in sdk_cases().items():
        fast = otlp_json.JsonSpanEncoder(factory(), Resource.create(RESOURCE), "otel_npu", "0.1.0")
        line = fast.request([fast.encode(copy.copy(CASES[case]))])
        document = json.loads(line)
        for rs in document["resourceSpans"]:
            rs["resource"]["attributes"] = sorted(rs["resource"]["attributes"], key=lambda kv: kv["key"])
            for span in rs["scopeSpans"][0]["spans"]:
                span["attributes"] = sorted(span.get("attributes", []), key=lambda kv: kv["key"])
                for link in span.get("links", []):  # the SDK's encoder leaves a link's trace state out
                    if link.get("traceState") == "k=v":
                        del link["traceState"]
        assert document == otlp_json_of(encode_spans([sdk])), case
