"""Transports: how an ``OtlpSink``'s encoded batches leave the process. Each is a small class with the
``registry.Transport`` shape: ``send(batch, count) -> (ok, error)``, ``shutdown()``, ``endpoint``.

* ``GrpcTransport``/``HttpTransport`` go through the SDK's OTLP exporter classes, which bring the standard
  endpoint/headers/timeout/compression/TLS variables and their retry policy. Only their transport is used:
  ``export()`` with a pre-encoded batch for gRPC, ``_client.export(bytes)`` for HTTP. ``build()`` checks that
  those hooks exist and returns ``None`` otherwise (the caller then falls back to the SDK's own encoder:
  slower, same output).

Why each batch goes out in as few Python steps as possible: this runs on a thread of the serving process,
and every time it takes the GIL back from the serving loop (after a system call, say) that loop is made to
stop and wait until this thread has run. So

* over gRPC, the encoded bytes go to the channel as they are (a stub with no serializer): no parse into
  protobuf objects and serialization back, which the SDK's stub would do;
* over plain ``http://`` with no proxy in force, the batch is one ``http.client`` request on a kept-alive
  connection (``PlainHttpTransport``, in the SDK exporter's transport seam, so its retries, headers and
  compression still apply) instead of ``requests``' many Python layers. ``https://``, a proxy or a
  certificate setting keep ``requests``, which knows them.
* ``JsonLinesFileTransport`` appends OTLP/JSON lines (``OTEL_NPU_TRACES_FILE``); ``ProtoFileTransport`` does the
  same from protobuf-encoded batches.

Runs on the exporter thread; nothing here runs on the capturing thread.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from ..config.otel import OtelSettings
from .encoding.otlp_json import request_to_json_line
from .redact import last_message, redact


def otlp_timeout_kwargs(otel: OtelSettings, signal: str) -> dict[str, float]:
    """``{"timeout": seconds}`` for an SDK OTLP exporter when ``OTEL_EXPORTER_OTLP_[signal_]TIMEOUT`` is set:
    validated (``config.otel.otlp_timeout_s``), so that an out-of-range value warns and uses 10 s instead of
    making every export fail (or never end); ``{}`` when unset (the exporter's own default)."""
    timeout = otel.otlp_timeout_s(signal)
    return {} if timeout is None else {"timeout": timeout}


def otlp_exporter_kwargs(otel: OtelSettings, signal: str, protocol: str) -> dict[str, Any]:
    """``otlp_timeout_kwargs``, plus ``{"endpoint": ...}`` when the endpoint variable in force is not a URL
    (``OtelSettings.otlp_endpoint``: warned about, then ``http://`` put in front of it)."""
    kwargs: dict[str, Any] = dict(otlp_timeout_kwargs(otel, signal))
    endpoint = otel.otlp_endpoint(signal, protocol)
    if endpoint is not None:
        kwargs["endpoint"] = endpoint
    return kwargs


def http_session(otel: OtelSettings, signal: str = "TRACES") -> Any:
    """``None``, or (when a certificate variable is set) a ``requests.Session`` for the SDK's OTLP/HTTP
    exporters that keeps ``OTEL_EXPORTER_OTLP_[signal_]CERTIFICATE`` in force.

    Why: the exporters set ``session.verify`` to that file, but ``requests`` lets ``REQUESTS_CA_BUNDLE`` /
    ``CURL_CA_BUNDLE`` from the environment win over a session's ``verify`` — on hosts that set them (common),
    the collector's certificate would be checked against the system bundle instead, and a private CA's
    collector refused. Everything else about the environment (proxies, netrc) is honoured as usual.
    """
    if not otel.otlp_option(signal, "CERTIFICATE"):
        return None  # nothing to keep in force: the SDK's own session
    import requests

    class CertificateSession(requests.Session):
        def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None and isinstance(self.verify, str):
                settings["verify"] = self.verify
            return settings

    return CertificateSession()


class EncodedBatch:
    """A batch of spans already encoded as an ``ExportTraceServiceRequest``."""

    __slots__ = ("data", "count")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count

    def __len__(self) -> int:
        return self.count


#: The OTLP trace service's one method, as gRPC names it.
GRPC_TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _RawTraceStub:
    """The trace service stub with bytes in and out: the request is already encoded, the reply is not read."""

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary(GRPC_TRACE_EXPORT, request_serializer=None, response_deserializer=None)


class GrpcTransport:
    """OTLP/gRPC: pre-encoded batches through the SDK's gRPC span exporter (its channel, credentials, headers,
    time-out and retries), sent as bytes."""

    def __init__(self, exporter: Any) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self._exporter = exporter
        self._success = SpanExportResult.SUCCESS
        self.endpoint = getattr(exporter, "_endpoint", "?")

    @classmethod
    def build(cls, otel: OtelSettings) -> "GrpcTransport | None":
        """Configured from the standard variables; ``None`` if the installed exporter lacks the hooks used."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        if not hasattr(OTLPSpanExporter, "_translate_data") or not hasattr(OTLPSpanExporter, "_export"):
            return None
        # Where the SDK (re)builds its channel and stub (at start and after UNAVAILABLE), the stub is swapped
        # for one that sends bytes; without that seam, batches are parsed into the SDK's request type instead.
        raw = callable(getattr(OTLPSpanExporter, "_initialize_channel_and_stub", None))

        class _PreEncodedGrpcExporter(OTLPSpanExporter):
            def _initialize_channel_and_stub(self) -> None:
                super()._initialize_channel_and_stub()
                self._client = _RawTraceStub(self._channel)

            def _translate_data(self, data: Any) -> Any:  # the one hook: the bytes otel-npu encoded
                if isinstance(data, EncodedBatch):
                    return data.data if raw else ExportTraceServiceRequest.FromString(data.data)
                return super()._translate_data(data)

            def _count_data(self, data: Any) -> int:
                return len(data)

        return cls(_PreEncodedGrpcExporter(**otlp_exporter_kwargs(otel, "TRACES", "grpc")))

    def send(self, data: bytes, count: int) -> tuple[bool, str | None]:
        last_message()  # forget an older line: the detail must be this export's
        if self._exporter.export(EncodedBatch(data, count)) == self._success:
            return True, None
        # The gRPC exporter reports why only in its log; on otel-npu's threads that line is held back
        # (redact.py) and used here, so that the one warning says why.
        return False, last_message() or "the gRPC export failed"

    def shutdown(self) -> None:
        self._exporter.shutdown()


class HttpTransport:
    """OTLP/HTTP (protobuf): pre-encoded batches through the SDK's HTTP span exporter's client (``requests``,
    or ``PlainHttpTransport`` where it applies: see the module docstring)."""

    def __init__(self, exporter: Any, client: Any) -> None:
        self._exporter = exporter
        self._client = client
        self.endpoint = getattr(exporter, "_endpoint", "?")

    @classmethod
    def build(cls, otel: OtelSettings) -> "HttpTransport | None":
        """Configured from the standard variables; ``None`` if the installed exporter lacks the hooks used."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        kwargs = otlp_exporter_kwargs(otel, "TRACES", "http/protobuf")
        exporter = HttpExporter(session=http_session(otel, "TRACES"), **kwargs)
        plain = plain_http_transport(otel, exporter)
        if plain is not None:
            exporter.shutdown()
            exporter = HttpExporter(_transport=plain, **kwargs)
        client = getattr(exporter, "_client", None)
        if client is None or not callable(getattr(client, "export", None)):
            exporter.shutdown()
            return None
        return cls(exporter, client)

    def send(self, data: bytes, count: int) -> tuple[bool, str | None]:
        result = self._client.export(data)
        if result.success:
            return True, None
        detail = result.reason or (f"{type(result.error).__name__}: {result.error}" if result.error is not None
                                   else "no response")
        return False, redact(f"HTTP {result.status_code}: {detail}" if result.status_code else str(detail))

    def shutdown(self) -> None:
        self._exporter.shutdown()


def _http_transport_base() -> Any:
    """The SDK's HTTP transport interface, or ``None`` when the installed exporter has no transport seam."""
    try:
        from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
    except ImportError:
        return None
    return BaseHTTPResult, BaseHTTPTransport


@functools.cache
def _plain_http_classes() -> Any:
    """``PlainHttpTransport``, built on the SDK's transport interface, or ``None`` without it."""
    base = _http_transport_base()
    if base is None:
        return None
    import dataclasses
    import http.client
    import urllib.parse

    BaseHTTPResult, BaseHTTPTransport = base

    @dataclasses.dataclass(frozen=True)
    class PlainHttpResult(BaseHTTPResult):
        body: bytes = b""
        reply_headers: Any = None

        def content(self) -> bytes:
            return self.body

        def headers(self) -> Any:
            return self.reply_headers if self.reply_headers is not None else http.client.HTTPMessage()

    class PlainHttpTransport(BaseHTTPTransport):
        """One kept-alive ``http.client`` connection per host: a batch is one ``request()`` and one read.
        Used by the exporter thread only; the SDK's client retries a stale connection once."""

        def __init__(self) -> None:
            self._connections: dict[tuple[str, int], http.client.HTTPConnection] = {}

        @staticmethod
        def applies(otel: OtelSettings, exporter: Any) -> bool:
            """Plain ``http://`` with no proxy in force, and an exporter with the SDK's transport seam."""
            import inspect

            endpoint = getattr(exporter, "_endpoint", "")
            try:
                seam = "_transport" in inspect.signature(type(exporter).__init__).parameters
            except (TypeError, ValueError):
                seam = False
            return (seam and isinstance(endpoint, str) and endpoint.lower().startswith("http://")
                    and not otel.proxied(endpoint))

        def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                    timeout: float | None = None, data: bytes | None = None) -> Any:
            parts = urllib.parse.urlsplit(url)
            key = (parts.hostname or "localhost", parts.port or 80)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            connection = self._connections.get(key)
            try:
                if connection is None:
                    connection = self._connections[key] = http.client.HTTPConnection(key[0], key[1], timeout=timeout)
                else:
                    connection.timeout = timeout
                    if connection.sock is not None:
                        connection.sock.settimeout(timeout)
                connection.request(method, path, body=data, headers=headers or {})
                reply = connection.getresponse()
                body = reply.read()
            except Exception as exc:  # a connection error or time-out: the SDK's client decides what follows
                self._drop(key)
                return PlainHttpResult(error=exc)
            if reply.will_close:
                self._drop(key)
            return PlainHttpResult(status_code=reply.status, reason=reply.reason, body=body,
                                   reply_headers=reply.headers)

        def _drop(self, key: tuple[str, int]) -> None:
            connection = self._connections.pop(key, None)
            if connection is not None:
                connection.close()

        def is_connection_error(self, exception: Exception | None) -> bool:
            return isinstance(exception, (OSError, http.client.HTTPException))

        def close(self) -> None:
            for key in list(self._connections):
                self._drop(key)

    return PlainHttpTransport


def plain_http_transport(otel: OtelSettings, exporter: Any) -> Any | None:
    """A ``PlainHttpTransport`` for the SDK HTTP exporter ``exporter`` when it applies (plain ``http://``, no
    proxy in force, an SDK with the transport seam), else ``None`` (``requests`` stays)."""
    cls = _plain_http_classes()
    return cls() if cls is not None and cls.applies(otel, exporter) else None


class LineFile:
    """Appends whole lines to a file from several threads."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = os.path.abspath(path)
        self._handle = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, line: str) -> tuple[bool, str | None]:
        try:
            with self._lock:
                self._handle.write(line)
                self._handle.flush()
        except (OSError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return True, None

    def close(self) -> None:
        with self._lock:
            self._handle.close()


class JsonLinesFileTransport:
    """For an ``OtlpSink`` with an ``encoding.otlp_json.JsonSpanEncoder``: appends each batch (one OTLP/JSON
    line, already encoded) to ``path``."""

    def __init__(self, path: str) -> None:
        self._out = LineFile(path)
        self.endpoint = self._out.path

    def send(self, line: str, count: int) -> tuple[bool, str | None]:
        return self._out.write(line)

    def shutdown(self) -> None:
        self._out.close()


class ProtoFileTransport:
    """For an ``OtlpSink`` with the protobuf encoder: appends each batch to ``path`` as one OTLP/JSON line."""

    def __init__(self, path: str) -> None:
        self._out = LineFile(path)
        self.endpoint = self._out.path

    def send(self, data: bytes, count: int) -> tuple[bool, str | None]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        return self._out.write(request_to_json_line(ExportTraceServiceRequest.FromString(data)))

    def shutdown(self) -> None:
        self._out.close()
