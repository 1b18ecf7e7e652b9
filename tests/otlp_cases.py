"""The encoders' test cases: records as the resolver hands them over, and the same spans built by the
OpenTelemetry SDK's own tracer (the expected side of the encoder tests, with no otel-npu code in it). Shared by
``test_otlp_encoding`` and ``test_otlp_json``."""

from __future__ import annotations

import types

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.trace import Link, SpanContext, TraceFlags, TraceState

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


# -- the truth from outside otel-npu: spans the SDK itself built, encoded by the SDK's encoder ------------------
class FixedIds(IdGenerator):
    """The SDK's id generator hook, giving the ids the record has."""

    def __init__(self, trace_id: int, span_id: int) -> None:
        self.trace_id, self.span_id = trace_id, span_id

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id


RESOURCE = {"service.name": "decode-worker", "host.name": "h"}
#: What every otel-npu span of ``factory()`` carries, written out from the factory's settings and the record's
#: numbers (docs/how-it-works.md, "Span attributes"): the constant attributes, the stream's label, the host's
#: lead (device start 1_700_000_000_500_000_000 - host entry 499_000_000 + 1.7e18 = 1 ms) and the clock error
#: (1234 ns).
COMMON = {"otel_npu.device": "npu:0", "process.pid": 4242, "otel_npu.rank": 0, "otel_npu.stream": "stream-7",
          "otel_npu.host_lead_us": 1000.0, "otel_npu.clock_error_us": 1.234}
START, END = 1_700_000_000_500_000_000, 1_700_000_000_504_000_000
TRACE, SPAN = 0x0123456789ABCDEF0123456789ABCDEF, 0x1122334455667788


def sdk_span(name: str, attributes: dict, *, parent: int = 0, remote: bool = False, trace_state=None,
             links=(), status=None, events=()):
    """The span, as the OpenTelemetry SDK's own tracer builds it."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import NonRecordingSpan, Status

    exporter = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create(RESOURCE), id_generator=FixedIds(TRACE, SPAN))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    context = None
    if parent:
        context = trace.set_span_in_context(NonRecordingSpan(SpanContext(
            TRACE, parent, is_remote=remote, trace_flags=TraceFlags(1), trace_state=trace_state or TraceState())))
    span = tp.get_tracer("otel_npu", "0.1.0").start_span(name, context=context, attributes=attributes,
                                                          links=[Link(c) for c in links], start_time=START)
    for event_name, event_attributes in events:
        span.add_event(event_name, event_attributes, timestamp=END)
    if status is not None:
        span.set_status(Status(*status))
    span.end(end_time=END)
    (finished,) = exporter.get_finished_spans()
    return finished


def sdk_cases() -> dict:
    from opentelemetry.trace import StatusCode

    links = [SpanContext(0xAAA, 0xBBB, is_remote=True, trace_flags=TraceFlags(1)),
             SpanContext(0xCCC, 0xDDD, is_remote=False, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v")]))]
    return {
        "plain root": sdk_span("forward", COMMON),
        "child in a step (the template path)": sdk_span("forward", {**COMMON, "otel_npu.step": "Decode"},
                                                        parent=0x77),
        "child in a step with attributes": sdk_span("forward", {
            **COMMON, "otel_npu.step": "Decode", "s": "é✓", "b": False, "i": -42, "big": 2**62, "f": 0.25,
            "ls": ["a", "b"], "li": [1, 2, 3], "lf": [1.5], "lb": [True, False]}, parent=0x99),
        "remote parent and trace state": sdk_span("forward", COMMON, parent=0x77, remote=True,
                                                  trace_state=TraceState([("vendor", "v1")])),
        "error": sdk_span("forward", {**COMMON, "error.type": "ValueError"},
                          status=(StatusCode.ERROR, "ValueError: bad shape (3, 4)"),
                          events=[("exception", {"exception.type": "ValueError",
                                                 "exception.message": "bad shape (3, 4)"})]),
        "timed out": sdk_span("forward", {**COMMON, "otel_npu.timed_out": True},
                              status=(StatusCode.ERROR, "device events did not complete within 60 s")),
        "step with links": sdk_span("Decode", {**COMMON, "otel_npu.kind": "step", "otel_npu.batch_size": 2},
                                    links=links),
    }
