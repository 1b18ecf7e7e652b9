"""otel-npu's own pipeline: OTLP over HTTP and gRPC to real receivers, configured by the OTEL_* variables."""

from __future__ import annotations

import os
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import otel_npu

from .otlp_receiver import GrpcReceiver, HttpReceiver, attributes
from .support import ResolverPasses


@pytest.fixture
def http_receiver():
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def grpc_receiver():
    receiver = GrpcReceiver()
    yield receiver
    receiver.close()


def own_pipeline_env(monkeypatch, endpoint: str, protocol: str, **extra: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "decode-worker")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    monkeypatch.setenv("RANK", "3")
    for key, value in extra.items():
        monkeypatch.setenv(key, value)


def run_steps(tracer_provider: TracerProvider | None = None) -> tuple[int, int]:
    tracer = (tracer_provider or TracerProvider()).get_tracer("app")
    request = tracer.start_span("llm_request")
    for _ in range(3):
        with otel_npu.step("Decode", links=[request]):
            with otel_npu.capture("forward", attributes={"tokens": 7}):
                pass
            with otel_npu.capture("sample"):
                pass
    with trace.use_span(request, end_on_exit=True):
        with otel_npu.capture("prefill forward"):
            pass
    return request.get_span_context().trace_id, request.get_span_context().span_id


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_reach_a_real_otlp_receiver(protocol, monkeypatch, http_receiver, grpc_receiver):
    receiver = http_receiver if protocol == "http/protobuf" else grpc_receiver
    own_pipeline_env(monkeypatch, receiver.endpoint, protocol)
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    request_trace, request_span = run_steps()
    assert otel_npu.flush(10.0)
    received = receiver.wait_for(10)
    assert len(received) == 10
    resource = received[0][0]
    assert resource["service.name"] == "decode-worker"
    assert resource["deployment.environment"] == "test"
    assert resource["otel_npu.rank"] == 3 and resource["process.pid"] > 0
    by_name: dict[str, list] = {}
    for _, span in received:
        by_name.setdefault(span.name, []).append(span)
    assert sorted(by_name) == ["Decode", "forward", "prefill forward", "sample"]
    steps = {s.span_id: s for s in by_name["Decode"]}
    for forward in by_name["forward"]:
        assert forward.parent_span_id in steps
        assert forward.trace_id == steps[forward.parent_span_id].trace_id
        attrs = attributes(forward.attributes)
        assert attrs["tokens"] == 7 and attrs["otel_npu.step"] == "Decode" and attrs["otel_npu.device"] == "cpu"
        assert attrs["otel_npu.rank"] == 3
        assert forward.start_time_unix_nano <= forward.end_time_unix_nano
    for step in by_name["Decode"]:
        assert attributes(step.attributes)["otel_npu.kind"] == "step"
        assert attributes(step.attributes)["otel_npu.batch_size"] == 1
        assert [(int.from_bytes(l.trace_id, "big"), int.from_bytes(l.span_id, "big")) for l in step.links] == \
            [(request_trace, request_span)]
    (prefill,) = by_name["prefill forward"]
    assert int.from_bytes(prefill.trace_id, "big") == request_trace
    assert int.from_bytes(prefill.parent_span_id, "big") == request_span
    stats = otel_npu.stats()
    assert stats["spans_exported"] == 10 and stats["dropped_total"] == 0
    assert "otel-npu's own: otlp " + protocol in stats["pipeline"]


def test_headers_and_traces_endpoint_variables_are_honoured(monkeypatch, http_receiver):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", http_receiver.endpoint + "/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=otel-npu,authorization=Bearer%20s3cret")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(10.0)
    assert len(http_receiver.wait_for(1)) == 1
    headers = {k.lower(): v for k, v in http_receiver.headers[0].items()}
    assert headers["x-tenant"] == "otel-npu" and headers["authorization"] == "Bearer s3cret"


def test_sampler_variables_are_honoured(monkeypatch, http_receiver):
    own_pipeline_env(monkeypatch, http_receiver.endpoint, "http/protobuf", OTEL_TRACES_SAMPLER="always_off")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    for _ in range(5):
        with otel_npu.capture("forward"):
            pass
    assert otel_npu.flush(5.0)
    assert http_receiver.spans() == []
    assert otel_npu.stats()["spans_unsampled"] == 5


def test_sdk_disabled_and_exporter_none_export_nothing_but_still_resolve(monkeypatch, http_receiver):
    own_pipeline_env(monkeypatch, http_receiver.endpoint, "http/protobuf", OTEL_SDK_DISABLED="true")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(5.0)
    assert http_receiver.spans() == [] and otel_npu.stats()["resolved"] == 1
    assert "OTEL_SDK_DISABLED" in otel_npu.stats()["pipeline"]


def test_console_exporter(monkeypatch, capfd):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(5.0)
    out = capfd.readouterr().out
    assert '"name": "forward"' in out and '"otel_npu.device": "cpu"' in out


def test_unknown_exporter_and_protocol_warn_and_fall_back(monkeypatch, http_receiver, caplog_otel):
    own_pipeline_env(monkeypatch, http_receiver.endpoint, "http/json", OTEL_TRACES_EXPORTER="zipkin,otlp")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(10.0)
    assert len(http_receiver.wait_for(1)) == 1
    messages = " ".join(r.getMessage() for r in caplog_otel.records)
    assert "OTEL_TRACES_EXPORTER names 'zipkin'" in messages
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not valid" in messages


def test_unreachable_collector_is_counted_not_raised(monkeypatch, caplog_otel):
    own_pipeline_env(monkeypatch, "http://127.0.0.1:9", "http/protobuf", OTEL_EXPORTER_OTLP_TIMEOUT="1")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    for _ in range(3):
        with otel_npu.capture("forward"):
            pass
    assert otel_npu.flush(5.0) is True  # flushed means "sent or failed", and failures are counted
    stats = otel_npu.stats()
    assert stats["dropped"]["export_failed"] == 3
    assert any("3 spans (export_failed)" in r.getMessage() for r in caplog_otel.records)


def test_traces_file_is_otlp_json_lines_with_hex_ids(monkeypatch, tmp_path):
    import json

    path = tmp_path / "out" / "traces.jsonl"
    monkeypatch.setenv("OTEL_NPU_TRACES_FILE", str(path))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.step("Decode"):
        with otel_npu.capture("forward"):
            pass
    assert otel_npu.flush(5.0)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    request = json.loads(lines[0])
    spans_ = request["resourceSpans"][0]["scopeSpans"][0]["spans"]
    by_name = {s["name"]: s for s in spans_}
    assert set(by_name) == {"Decode", "forward"}
    forward, step = by_name["forward"], by_name["Decode"]
    assert len(forward["traceId"]) == 32 and int(forward["traceId"], 16)
    assert len(forward["spanId"]) == 16 and forward["parentSpanId"] == step["spanId"]
    assert forward["kind"] == 1 and int(forward["endTimeUnixNano"]) >= int(forward["startTimeUnixNano"])
    assert "OTEL_NPU_TRACES_FILE" not in otel_npu.stats()["pipeline"] and str(path) in otel_npu.stats()["pipeline"]


def test_an_app_provider_from_env_puts_request_and_stage_spans_in_one_file(monkeypatch, tmp_path):
    import json

    from otel_npu.export.pipeline import tracer_provider_from_env

    path = tmp_path / "traces.jsonl"
    monkeypatch.setenv("OTEL_NPU_TRACES_FILE", str(path))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    provider = tracer_provider_from_env()
    otel_npu.configure(enabled=True, device="cpu", tracer_provider=provider)
    with provider.get_tracer("app").start_as_current_span("llm_request"):
        with otel_npu.capture("forward"):
            pass
    assert otel_npu.flush(5.0)
    provider.shutdown()
    spans_ = [s for line in path.read_text().splitlines()
              for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    by_name = {s["name"]: s for s in spans_}
    assert by_name["forward"]["parentSpanId"] == by_name["llm_request"]["spanId"]
    assert by_name["forward"]["traceId"] == by_name["llm_request"]["traceId"]


@pytest.mark.parametrize("traces", [{"OTEL_TRACES_EXPORTER": "console"},
                                    {"OTEL_TRACES_EXPORTER": "none", "OTEL_NPU_TRACES_FILE": "t.jsonl"}])
def test_collector_less_runs_send_no_metrics_to_localhost(traces, monkeypatch, tmp_path, capfd, caplog_otel):
    # With traces to the console or a file only, the stage metrics once went to
    # localhost:4318 (a warning, flush() blocking 5 s and returning False).
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER")
    for key, value in traces.items():
        monkeypatch.setenv(key, value)
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(10.0)
    stats = otel_npu.stats()
    assert "4318" not in stats["metrics"] and stats["metrics"].startswith("none")
    assert "OTEL_METRICS_EXPORTER" in stats["metrics"]  # it says why, and how to have them
    assert not stats.get("metrics_export_failed")
    assert not [r for r in caplog_otel.records if r.levelname == "WARNING"]


def test_metrics_follow_the_traces_to_a_collector_by_default(monkeypatch, http_receiver):
    monkeypatch.delenv("OTEL_METRICS_EXPORTER")
    own_pipeline_env(monkeypatch, http_receiver.endpoint, "http/protobuf")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(10.0)
    assert http_receiver.endpoint in otel_npu.stats()["metrics"]
    assert http_receiver.wait_for_metric("otel_npu.stage.duration") is not None


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_an_idle_process_sends_what_it_holds_without_a_flush(protocol, monkeypatch, http_receiver, grpc_receiver):
    """Engines kill their workers soon after the last request: once nothing is in flight, what the exporters
    hold is sent, though neither their batch size nor their schedule (here ten minutes) has come, and nobody
    called flush()."""
    receiver = http_receiver if protocol == "http/protobuf" else grpc_receiver
    own_pipeline_env(monkeypatch, receiver.endpoint, protocol, OTEL_BSP_SCHEDULE_DELAY="600000",
                     OTEL_METRIC_EXPORT_INTERVAL="600000", OTEL_METRICS_EXPORTER="otlp")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    run_steps()
    received = receiver.wait_for(10, timeout_s=30)
    assert len(received) == 10
    assert receiver.wait_for_metric("otel_npu.stage.duration", timeout_s=30) is not None


def test_idle_is_told_once_per_burst_of_work(monkeypatch, http_receiver):
    """The exporters are told once when a burst of captures is done, not on every resolver pass, and not
    while the process stays idle."""
    import threading

    from otel_npu import runtime
    from otel_npu.export.pipeline import Pipeline
    from otel_npu.resolve import resolver

    told = []
    changed = threading.Condition()
    original = Pipeline.export_now

    def export_now(self):
        with changed:
            told.append(1)
            changed.notify_all()
        original(self)

    monkeypatch.setattr(Pipeline, "export_now", export_now)
    # Idle passes 10 ms apart throughout (not once a second after a second without work).
    monkeypatch.setattr(resolver, "IDLE_POLL_S", 0.01)
    own_pipeline_env(monkeypatch, http_receiver.endpoint, "http/protobuf")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own", poll_interval_s=0.01)
    with otel_npu.capture("start"):
        pass
    rt = runtime.current()
    with changed:
        assert changed.wait_for(lambda: len(told) >= 1, timeout=30), "idle never told"
    # Resolver passes counted, and held back while the test makes a burst: a pass in the middle of a burst
    # (the test thread preempted between two captures on a loaded machine) would rightly find the process
    # idle, and tell the exporters twice for one burst.
    passes = ResolverPasses(rt.resolver)
    for burst in range(2, 5):
        with passes.held():
            for _ in range(5):
                with otel_npu.step("Decode"):
                    with otel_npu.capture("forward"):
                        pass
        with changed:
            assert changed.wait_for(lambda n=burst: len(told) >= n, timeout=30), f"burst {burst}: idle never told"
    passes.wait_for_more(30)  # thirty more idle passes: none of them tells the exporters again
    assert len(told) == 4


def test_the_work_that_starts_otel_npu_is_sent_without_waiting_for_the_idle_poll(monkeypatch, http_receiver):
    """otel-npu starts at a process's first capture, so its resolver starts busy: it takes that work in at its
    poll interval, then tells the exporters once it is done. Were it to start in its idle poll (here ten
    minutes), a process that does one short burst and is killed (vLLM's EngineCore at its default abort
    shutdown) would lose every span."""
    from otel_npu import runtime
    from otel_npu.resolve import resolver

    monkeypatch.setattr(resolver, "IDLE_POLL_S", 600.0)
    own_pipeline_env(monkeypatch, http_receiver.endpoint, "http/protobuf", OTEL_BSP_SCHEDULE_DELAY="600000")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own", poll_interval_s=0.01)
    assert runtime.start() is not None
    time.sleep(0.2)  # the resolver thread is waiting by now: the captures below come while it waits
    run_steps()
    assert len(http_receiver.wait_for(10, timeout_s=30)) == 10


def os_thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux: thread names in /proc")
def test_the_background_threads_carry_their_names_in_the_operating_system(monkeypatch, http_receiver):
    """``top -H``, ``perf`` and ``/proc/<pid>/task/*/comm`` show otel-npu's threads by name (cut to the
    kernel's 15 bytes), so that their CPU can be told from the serving loop's in a real server."""
    from otel_npu import runtime

    own_pipeline_env(monkeypatch, http_receiver.endpoint, "http/protobuf")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own", poll_interval_s=0.01)
    assert runtime.start() is not None
    run_steps()
    assert len(http_receiver.wait_for(10, timeout_s=30)) == 10
    names = os_thread_names()
    assert "otel-npu-resolv" in names, names
    assert "otel-npu-export" in names, names
