"""Transports: how an ``OtlpSink``'s encoded batches leave the process. Each is a small class with the
``registry.Transport`` shape: ``send(batch, count) -> (ok, error)``, ``shutdown()``, ``endpoint``.

* ``GrpcTransport``/``HttpTransport`` go through the SDK's OTLP exporter classes, which bring the standard
  endpoint/headers/timeout/compression/TLS variables and their retry policy. Only their transport is used:
  ``export()`` with a pre-encoded batch (via ``_translate_data``) for gRPC, ``_client.export(bytes)`` for
  HTTP. ``build()`` checks that those hooks exist and returns ``None`` otherwise (the caller then falls back
  to the SDK's own encoder: slower, same output).
* ``JsonLinesFileTransport`` appends OTLP/JSON lines (``OTEL_NPU_TRACES_FILE``); ``ProtoFileTransport`` does the
  same from protobuf-encoded batches.

Runs on the exporter thread; nothing here runs on the capturing thread.
"""

from __future__ import annotations

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


class GrpcTransport:
    """OTLP/gRPC: pre-encoded batches through the SDK's gRPC span exporter."""

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

        class _PreEncodedGrpcExporter(OTLPSpanExporter):
            def _translate_data(self, data: Any) -> Any:  # the one hook: bytes we encoded, parsed in C
                if isinstance(data, EncodedBatch):
                    return ExportTraceServiceRequest.FromString(data.data)
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
    """OTLP/HTTP (protobuf): pre-encoded batches through the SDK's HTTP span exporter's client."""

    def __init__(self, exporter: Any, client: Any) -> None:
        self._exporter = exporter
        self._client = client
        self.endpoint = getattr(exporter, "_endpoint", "?")

    @classmethod
    def build(cls, otel: OtelSettings) -> "HttpTransport | None":
        """Configured from the standard variables; ``None`` if the installed exporter lacks the hooks used."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter(session=http_session(otel, "TRACES"),
                                **otlp_exporter_kwargs(otel, "TRACES", "http/protobuf"))
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
