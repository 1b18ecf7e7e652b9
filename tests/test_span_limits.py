"""Span limits, attribute keys and link attributes, as the OpenTelemetry SDK applies them.

Each scenario runs twice: through otel-npu's own pipeline (its hand-written OTLP encoder, read back by a real
OTLP/HTTP receiver with the official protobuf classes) and through an application's SDK TracerProvider. Both
must carry the same spans: the limits applied, the dropped counts set.
"""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, TraceFlags

import otel_npu

from .otlp_receiver import HttpReceiver, attributes

LIMIT_VARS = ("OTEL_SPAN_LINK_COUNT_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT",
              "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
              "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT")


def ctx(n: int) -> SpanContext:
    return SpanContext(0xABC0000 + n, 0x1000 + n, is_remote=True, trace_flags=TraceFlags(1))


class Run:
    """Turns otel-npu on through one of the two pipelines; ``spans()`` gives a normalized view of each span:
    ``{name: {"attrs", "dropped_attrs", "links": [(trace, span, attrs, dropped)], "dropped_links"}}``."""

    def __init__(self, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind = kind
        if kind == "own":
            self.receiver = HttpReceiver()
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", self.receiver.endpoint)
            monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
            otel_npu.configure(enabled=True, device="cpu", pipeline="own")
        else:
            self.exporter = InMemorySpanExporter()
            provider = TracerProvider()  # reads the OTEL_*_LIMIT variables now, as an application's would
            provider.add_span_processor(SimpleSpanProcessor(self.exporter))
            otel_npu.configure(enabled=True, device="cpu", tracer_provider=provider)

    def spans(self, count: int) -> dict:
        assert otel_npu.flush(10.0)
        out = {}
        if self.kind == "own":
            for _, s in self.receiver.wait_for(count):
                out[s.name] = {
                    "attrs": attributes(s.attributes), "keys": [kv.key for kv in s.attributes],
                    "dropped_attrs": s.dropped_attributes_count, "dropped_links": s.dropped_links_count,
                    "links": [(link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes),
                               link.dropped_attributes_count) for link in s.links],
                    "events": [(e.name, attributes(e.attributes)) for e in s.events]}
        else:
            for s in self.exporter.get_finished_spans():
                out[s.name] = {
                    "attrs": dict(s.attributes), "keys": list(s.attributes),
                    "dropped_attrs": s.dropped_attributes, "dropped_links": s.dropped_links,
                    "links": [(f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}",
                               {k: list(v) if isinstance(v, tuple) else v for k, v in (link.attributes or {}).items()},
                               link.dropped_attributes) for link in s.links],
                    "events": [(e.name, dict(e.attributes)) for e in s.events]}
        assert len(out) == count, sorted(out)
        return out


@pytest.fixture(params=["own", "app"])
def run(request, monkeypatch):
    for var in LIMIT_VARS:
        monkeypatch.delenv(var, raising=False)

    runs = []

    def start(**env: str) -> Run:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        runs.append(Run(request.param, monkeypatch))
        return runs[-1]

    yield start
    otel_npu.shutdown(5.0)
    for r in runs:
        if r.kind == "own":
            r.receiver.close()


def test_a_step_linking_more_requests_than_the_limit_keeps_128_and_counts_the_rest(run):
    r = run()
    with otel_npu.step("Decode", links=[ctx(n) for n in range(200)]):
        pass
    with otel_npu.step("Prefill", links=[ctx(n) for n in range(3)]):
        pass
    spans = r.spans(2)
    span = spans["Decode"]
    assert len(span["links"]) == 128 and span["dropped_links"] == 72
    # Which is which: otel_npu.batch_size counts the links given (the batch), otel_npu.links_over_limit those
    # the link limit left out (as dropped_links_count does), the span's links those exported.
    assert span["attrs"]["otel_npu.batch_size"] == 200
    assert span["attrs"]["otel_npu.links_over_limit"] == 72
    within = spans["Prefill"]
    assert within["attrs"]["otel_npu.batch_size"] == 3 and len(within["links"]) == 3
    assert "otel_npu.links_over_limit" not in within["attrs"]  # only when the limit left links out


def test_link_count_limit_from_the_environment_and_every_request_is_linked_by_some_step(run):
    r = run(OTEL_SPAN_LINK_COUNT_LIMIT="4")
    batch = [ctx(n) for n in range(10)]
    for n in range(3):
        with otel_npu.step(f"Decode {n}", links=batch):
            pass
    spans = r.spans(3)
    linked = set()
    for span in spans.values():
        assert len(span["links"]) == 4 and span["dropped_links"] == 6
        linked |= {s for _, s, _, _ in span["links"]}
    # The kept window moves along the batch from one over-full step to the next: no request is left out of
    # every step (the SDK's "keep the last N" would never link the first six of a stable batch).
    assert linked == {f"{0x1000 + n:016x}" for n in range(10)}


def test_link_attributes_are_kept_and_limited(run):
    r = run(OTEL_LINK_ATTRIBUTE_COUNT_LIMIT="2", OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="4")
    links = [Link(ctx(1), {"request.id": "r1"}), Link(ctx(2), {"a": 1, "b": 2, "c": 3}),
             Link(ctx(3), {"long": "abcdefgh"})]
    with otel_npu.step("Decode", links=links):
        pass
    got = {s: (attrs, dropped) for _, s, attrs, dropped in r.spans(1)["Decode"]["links"]}
    assert got[f"{0x1001:016x}"] == ({"request.id": "r1"}, 0)
    attrs, dropped = got[f"{0x1002:016x}"]
    assert len(attrs) == 2 and dropped == 1
    assert got[f"{0x1003:016x}"] == ({"long": "abcd"}, 0)


def test_span_attribute_count_and_value_length_limits(run):
    r = run(OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT="16", OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="5")
    user = {f"user.{n:02d}": n for n in range(20)}
    user["user.text"] = "abcdefgh"
    user["user.list"] = ["abcdefgh", "xy"]
    with otel_npu.capture("forward", attributes=user):
        pass
    span = r.spans(1)["forward"]
    assert len(span["attrs"]) == 16
    own = [k for k in span["attrs"] if k not in user]
    assert "otel_npu.device" in own and "otel_npu.stream" in own  # otel-npu's own are never the ones cut
    kept = [k for k in span["attrs"] if k in user]
    assert span["dropped_attrs"] == len(user) - len(kept) > 0
    assert kept == sorted(kept) and kept[0] == "user.00"  # the user's first ones, in their order
    with otel_npu.capture("short", attributes={"user.text": "abcdefgh", "user.list": ["abcdefgh", "xy"]}):
        pass
    short = r.spans(2)["short"]
    assert short["attrs"]["user.text"] == "abcde" and list(short["attrs"]["user.list"]) == ["abcde", "xy"]
    assert short["dropped_attrs"] == 0


def test_attribute_keys_are_unique_empty_keys_and_out_of_range_ints_dropped(run, caplog):
    r = run()
    caplog.set_level(logging.WARNING, logger="otel_npu")
    with otel_npu.capture("forward", attributes={"otel_npu.device": "mine", "error.type": "mine", "": 1,
                                                 "big": 2 ** 64, "small": -(2 ** 63) - 1, "ok": 2 ** 63 - 1}):
        pass
    with pytest.raises(KeyError):
        with otel_npu.capture("failing", attributes={"error.type": "mine"}):
            raise KeyError("k")
    spans = r.spans(2)
    span = spans["forward"]
    assert len(span["keys"]) == len(set(span["keys"])), span["keys"]  # keys MUST be unique
    assert span["attrs"]["otel_npu.device"] == "cpu"  # otel-npu's own attribute wins
    assert span["attrs"]["error.type"] == "mine"  # not set by otel-npu on this span: the user's
    assert "" not in span["attrs"] and "big" not in span["attrs"] and "small" not in span["attrs"]
    assert span["attrs"]["ok"] == 2 ** 63 - 1
    assert span["dropped_attrs"] == 4  # the shadowed otel_npu.device, the empty key, two ints
    failing = spans["failing"]
    assert failing["keys"].count("error.type") == 1 and failing["attrs"]["error.type"] == "KeyError"
    warned = caplog.text
    assert "big" in warned and "int64" in warned and "otel_npu.device" in warned


def _fails_deep(depth: int) -> None:
    if depth:
        _fails_deep(depth - 1)
    raise ValueError("bad shape (3, 4)")


def test_exception_events_carry_a_bounded_stacktrace(run):
    # The semantic conventions recommend exception.stacktrace on the exception event.
    r = run()
    with pytest.raises(ValueError):
        with otel_npu.capture("shallow"):
            _fails_deep(2)
    with pytest.raises(ValueError):
        with otel_npu.capture("deep"):
            _fails_deep(900)
    spans = r.spans(2)
    (name, event), = spans["shallow"]["events"]
    assert name == "exception" and event["exception.type"] == "ValueError"
    trace_text = event["exception.stacktrace"]
    assert trace_text.startswith("Traceback (most recent call last):\n")
    assert trace_text.count("in _fails_deep") == 3 and 'raise ValueError("bad shape (3, 4)")' in trace_text
    assert trace_text.endswith("ValueError: bad shape (3, 4)\n")
    deep = spans["deep"]["events"][0][1]["exception.stacktrace"]
    assert len(deep) <= 8192 and deep.endswith("ValueError: bad shape (3, 4)\n")  # bounded, the raise kept
    assert "frames omitted" in deep
