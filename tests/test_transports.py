"""How encoded batches leave the process: the gRPC channel gets the bytes as they are, plain HTTP goes through
one kept-alive ``http.client`` connection, and a proxy or ``https://`` keeps ``requests``."""

from __future__ import annotations

import pytest

import otel_npu
from otel_npu.config import otel as otel_config

from .otlp_receiver import GrpcReceiver, HttpReceiver


def captures(n: int = 3) -> None:
    for _ in range(n):
        with otel_npu.step("Decode"):
            with otel_npu.capture("forward"):
                pass


def own_pipeline(monkeypatch, endpoint: str, protocol: str, **extra: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")


def test_grpc_sends_the_encoded_bytes_without_parsing_them(monkeypatch):
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    import threading

    original = trace_service_pb2.ExportTraceServiceRequest.FromString
    parsed_by = []

    def parse(data):
        parsed_by.append(threading.current_thread().name)
        return original(data)

    monkeypatch.setattr(trace_service_pb2.ExportTraceServiceRequest, "FromString", staticmethod(parse))
    receiver = GrpcReceiver()
    try:
        own_pipeline(monkeypatch, receiver.endpoint, "grpc")
        captures()
        assert otel_npu.flush(10.0)
        spans = receiver.wait_for(6)
        assert "otel-npu-exporter" not in parsed_by  # only the receiver parsed the batch
        assert sorted(span.name for _, span in spans) == ["Decode"] * 3 + ["forward"] * 3
        assert otel_npu.stats()["dropped"].get("export_failed", 0) == 0
    finally:
        receiver.close()


def test_plain_http_goes_through_one_kept_alive_connection_not_requests(monkeypatch):
    import requests

    def send(*args, **kwargs):
        raise AssertionError("requests was used for a plain http:// endpoint with no proxy")

    monkeypatch.setattr(requests.Session, "send", send)
    receiver = HttpReceiver(keep_alive=True)
    try:
        own_pipeline(monkeypatch, receiver.endpoint, "http/protobuf")
        for _ in range(3):
            captures(2)
            assert otel_npu.flush(10.0)
        spans = receiver.wait_for(12)
        assert len(spans) == 12
        assert len(receiver.requests) >= 3  # three flushes, three batches at least
        assert receiver.connections == 1
        assert otel_npu.stats()["dropped"].get("export_failed", 0) == 0
    finally:
        receiver.close()


def test_plain_http_reconnects_when_the_collector_closes_connections(monkeypatch):
    receiver = HttpReceiver(keep_alive=False)  # HTTP/1.0: the server closes after each answer
    try:
        own_pipeline(monkeypatch, receiver.endpoint, "http/protobuf")
        for _ in range(3):
            captures(1)
            assert otel_npu.flush(10.0)
        assert len(receiver.wait_for(6)) == 6
        assert receiver.connections >= 3
        assert otel_npu.stats()["dropped"].get("export_failed", 0) == 0
    finally:
        receiver.close()


def test_plain_http_counts_a_collector_that_is_not_there(monkeypatch, caplog_otel):
    receiver = HttpReceiver()
    endpoint = receiver.endpoint
    receiver.close()  # nothing listens there now
    own_pipeline(monkeypatch, endpoint, "http/protobuf", OTEL_EXPORTER_OTLP_TIMEOUT="2")
    captures(2)
    assert otel_npu.flush(10.0) is True  # "sent or failed"; the failures are counted and said
    assert otel_npu.stats()["dropped"]["export_failed"] == 4
    assert any("ConnectionRefusedError" in r.getMessage() for r in caplog_otel.records)


def test_a_proxy_keeps_requests(monkeypatch):
    from otel_npu.export.transports import HttpTransport

    seen = []
    import requests

    def send(self, request, **kwargs):
        seen.append(request.url)
        raise requests.exceptions.ConnectionError("no proxy here")

    monkeypatch.setattr(requests.Session, "send", send)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4318", "HTTP_PROXY": "http://proxy:3128",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    transport = HttpTransport.build(otel_config.read(env))
    try:
        ok, error = transport.send(b"", 0)
    finally:
        transport.shutdown()
    assert not ok and seen and seen[0] == "http://collector.example:4318/v1/traces"


@pytest.mark.parametrize("env, url, expected", [
    ({}, "http://collector:4318/v1/traces", False),
    ({"HTTP_PROXY": "http://proxy:3128"}, "http://collector:4318/v1/traces", True),
    ({"http_proxy": "http://proxy:3128"}, "http://collector:4318/v1/traces", True),
    ({"ALL_PROXY": "http://proxy:3128"}, "http://collector:4318/v1/traces", True),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "http://collector:4318/v1/traces", False),
    ({"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "collector"}, "http://collector:4318/v1/traces", False),
    ({"HTTP_PROXY": "http://proxy:3128", "no_proxy": "*"}, "http://collector:4318/v1/traces", False),
    ({"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "other"}, "http://collector:4318/v1/traces", True),
    ({"HTTP_PROXY": "http://proxy:3128", "http_proxy": ""}, "http://collector:4318/v1/traces", True),
])
def test_which_endpoints_a_proxy_applies_to(env, url, expected):
    assert otel_config.read(env).proxied(url) is expected
