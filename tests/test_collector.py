"""Spans and stage metrics through a real collector (rotel-agent) to a recording OTLP receiver, both protocols.

otel-npu's own pipeline sends to the collector over gRPC or HTTP/protobuf (chosen by the OTEL_* variables);
the collector forwards over the other protocol to the receiver; the test asserts on what arrived there.
"""

from __future__ import annotations

import socket

import pytest
from opentelemetry.sdk.trace import TracerProvider

import otel_npu

from .collector import Collector
from .otlp_receiver import GrpcReceiver, HttpReceiver, attributes
from .support import TIME_BOUND_NS, truth

# (what otel-npu sends to the collector, what the collector forwards to the receiver)
ROUTES = [("grpc", "http"), ("http/protobuf", "grpc")]


@pytest.fixture(params=ROUTES, ids=["grpc-in", "http-in"])
def route(request, tmp_path):
    ingress, egress = request.param
    receiver = HttpReceiver() if egress == "http" else GrpcReceiver()
    collector = Collector(receiver.endpoint, egress, tmp_path).start()
    yield ingress, collector, receiver
    otel_npu.shutdown(5.0)  # while the collector still runs: the last metrics export goes through
    collector.stop()
    receiver.close()


def test_spans_and_metrics_arrive_through_a_real_collector(route, monkeypatch, sim):
    ingress, collector, receiver = route
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint(ingress))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", ingress)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", ingress)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "decode-worker")
    monkeypatch.setenv("RANK", "5")
    otel_npu.configure(enabled=True, device=sim, pipeline="own")
    stream = sim.current_stream()
    request = TracerProvider().get_tracer("app").start_span("llm_request")
    truths = {}
    for i in range(3):
        with otel_npu.step("Decode", links=[request]) as step:
            with otel_npu.capture("forward", attributes={"batch": 4}) as fwd:
                stream.launch(0.004)
                with otel_npu.capture("attention") as attn:
                    stream.launch(0.001)
            with otel_npu.capture("sample") as smp:
                stream.launch(0.0005)
        truths[i] = {"Decode": truth(step), "forward": truth(fwd), "attention": truth(attn), "sample": truth(smp)}
    assert otel_npu.flush(15.0)

    received = receiver.wait_for(12, timeout_s=15.0)
    assert len(received) == 12, collector.output()
    resource = received[0][0]
    assert resource["service.name"] == "decode-worker"
    assert resource["host.name"] == socket.gethostname()
    assert resource["process.pid"] > 0 and resource["otel_npu.rank"] == 5

    spans_ = [span for _, span in received]
    steps = sorted((s for s in spans_ if s.name == "Decode"), key=lambda s: s.start_time_unix_nano)
    assert len(steps) == 3
    for i, step in enumerate(steps):
        assert step.parent_span_id == b"" and len(step.links) == 1
        link = step.links[0]
        assert int.from_bytes(link.trace_id, "big") == request.get_span_context().trace_id
        assert int.from_bytes(link.span_id, "big") == request.get_span_context().span_id
        children = {s.name: s for s in spans_ if s.parent_span_id == step.span_id}
        assert set(children) == {"forward", "sample"}
        (attention,) = [s for s in spans_ if s.parent_span_id == children["forward"].span_id]
        family = {"Decode": step, **children, "attention": attention}
        assert {s.trace_id for s in family.values()} == {step.trace_id}
        for name, span in family.items():
            start, end = truths[i][name]
            # The device-measured window, as the simulated device really ran it.
            assert abs(span.start_time_unix_nano - start) <= TIME_BOUND_NS, name
            assert abs(span.end_time_unix_nano - end) <= TIME_BOUND_NS, name
            attrs = attributes(span.attributes)
            assert attrs["otel_npu.device"] == "sim:0" and attrs["otel_npu.rank"] == 5
            if name != "Decode":
                assert attrs["otel_npu.step"] == "Decode"
        assert attributes(children["forward"].attributes)["batch"] == 4
        assert attention.start_time_unix_nano >= children["forward"].start_time_unix_nano

    # The stage metrics went through the same collector.
    histogram = receiver.wait_for_metric(
        "otel_npu.stage.duration", lambda m: sum(p.count for p in m.histogram.data_points) == 12)
    assert histogram is not None, [m.name for _, m in receiver.metrics()]
    assert histogram.unit == "ms"
    by_stage = {attributes(p.attributes)["otel_npu.stage"]: p for p in histogram.histogram.data_points}
    assert set(by_stage) == {"Decode", "forward", "attention", "sample"}
    forward = by_stage["forward"]
    assert attributes(forward.attributes) == {"otel_npu.stage": "forward", "otel_npu.step": "Decode",
                                              "otel_npu.device": "sim:0", "otel_npu.rank": 5}
    # What the simulated device really ran (≈ 5 ms each; longer when its thread was kept from running on a
    # loaded machine, which the spans above and these truths both show).
    ran_ms = sum(truths[i]["forward"][1] - truths[i]["forward"][0] for i in range(3)) / 1e6
    assert forward.count == 3 and ran_ms - 0.2 <= forward.sum <= ran_ms + 0.2 and ran_ms >= 3 * 5.0 - 0.2
    assert list(forward.explicit_bounds)[0] == 0.01 and list(forward.explicit_bounds)[-1] == 10000.0
    resolved = receiver.wait_for_metric("otel_npu.captures.resolved",
                                        lambda m: m.sum.data_points[0].as_int == 12)
    assert resolved is not None and resolved.sum.is_monotonic


def test_the_collector_sees_the_trace_file_and_the_network_alike(route, monkeypatch, tmp_path, sim):
    """OTEL_NPU_TRACES_FILE next to OTLP: the same spans in the file (hex ids) and at the collector."""
    import json

    ingress, collector, receiver = route
    path = tmp_path / "traces.jsonl"
    monkeypatch.setenv("OTEL_NPU_TRACES_FILE", str(path))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint(ingress))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", ingress)
    otel_npu.configure(enabled=True, device=sim, pipeline="own")
    with otel_npu.step("Prefill"):
        with otel_npu.capture("forward"):
            sim.current_stream().launch(0.001)
    assert otel_npu.flush(15.0)
    received = receiver.wait_for(2, timeout_s=15.0)
    in_file = [s for line in path.read_text().splitlines() for rs in json.loads(line)["resourceSpans"]
               for ss in rs["scopeSpans"] for s in ss["spans"]]
    assert sorted((s.span_id.hex(), s.name) for _, s in received) == \
        sorted((s["spanId"], s["name"]) for s in in_file)
