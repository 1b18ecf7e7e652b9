"""Real OTLP receivers on loopback (HTTP/protobuf and gRPC) that record what arrives, for tests.

Not mocks of otel-npu: they speak the OTLP wire protocol with the official protobuf classes, so whatever
reaches them went through the real exporter, encoder, serialization and transport.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
import zlib
from concurrent import futures
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def attributes(kvs: Any) -> dict[str, Any]:
    """OTLP KeyValue list -> plain dict."""
    out = {}
    for kv in kvs:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            out[kv.key] = getattr(value, kind) if kind else None
    return out


class _Recorder:
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.delay_s = 0.0
        self.status = 200
        self.echo_headers = False
        self._lock = threading.Lock()

    def record(self, request: Any, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append(request)
            self.headers.append(headers)

    def record_metrics(self, request: Any) -> None:
        with self._lock:
            self.metric_requests.append(request)

    def metrics(self) -> list[tuple[dict, Any]]:
        """``[(resource attributes, metric), ...]`` of everything received so far, oldest first."""
        with self._lock:
            requests = list(self.metric_requests)
        return [(attributes(rm.resource.attributes), metric)
                for request in requests for rm in request.resource_metrics
                for sm in rm.scope_metrics for metric in sm.metrics]

    def wait_for_metric(self, name: str, predicate: Any = lambda m: True, timeout_s: float = 10.0) -> Any:
        """The latest received metric ``name`` that satisfies ``predicate``, waiting for it; None if none came."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [m for _, m in self.metrics() if m.name == name and predicate(m)]
            if found or time.monotonic() > deadline:
                return found[-1] if found else None
            time.sleep(0.02)

    def spans(self) -> list[tuple[dict, Any]]:
        """``[(resource attributes, span), ...]`` of everything received so far."""
        with self._lock:
            requests = list(self.requests)
        out = []
        for request in requests:
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append((resource, span))
        return out

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[tuple[dict, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.spans()
            if len(got) >= count:
                return got
            time.sleep(0.02)
        return self.spans()


class HttpReceiver(_Recorder):
    """OTLP/HTTP protobuf receiver: ``POST /v1/traces``."""

    def __init__(self, tls: tuple[str, str] | None = None, keep_alive: bool = False) -> None:
        """``tls``: ``(certificate file, key file)`` to serve HTTPS instead of HTTP; ``keep_alive``: answer in
        HTTP/1.1 and keep connections open (``connections`` counts those made)."""
        super().__init__()
        recorder = self
        self.connections = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                with recorder._lock:
                    recorder.connections += 1

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if recorder.delay_s:
                    time.sleep(recorder.delay_s)
                if recorder.status == 200 and self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    recorder.record(request, dict(self.headers))
                    payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                    self.send_response(200)
                elif recorder.status == 200 and self.path == "/v1/metrics":
                    recorder.record_metrics(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                    payload = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                    self.send_response(200)
                else:
                    # A careless server that echoes the request's headers in its error: what a client logs of
                    # it must still not show the credentials.
                    payload = repr(dict(self.headers)).encode() if recorder.echo_headers else b""
                    self.send_response(recorder.status if recorder.status != 200 else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the slow-collector tests make it): nothing left to answer

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        if tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.endpoint = f"https://localhost:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class GrpcReceiver(_Recorder):
    """OTLP/gRPC receiver (``TraceService/Export``)."""

    def __init__(self, tls: tuple[str, str] | None = None, port: int = 0) -> None:
        """``tls``: ``(certificate file, key file)`` to serve with TLS; ``port``: 0 picks a free one."""
        super().__init__()
        import grpc

        recorder = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC API
                if recorder.delay_s:
                    time.sleep(recorder.delay_s)
                recorder.record(request, dict(context.invocation_metadata()))
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC API
                recorder.record_metrics(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        if tls is None:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
            self.endpoint = f"http://127.0.0.1:{self.port}"
        else:
            with open(tls[0], "rb") as cert, open(tls[1], "rb") as key:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self._server.add_secure_port(f"localhost:{port}", credentials)
            self.endpoint = f"https://localhost:{self.port}"
        self._server.start()

    def close(self) -> None:
        self._server.stop(0)
