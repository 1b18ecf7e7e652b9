"""Sinks: where identified, sampled spans go.

* ``SdkSink`` hands finished ``ReadableSpan`` objects to an SDK span processor (``on_end``): the
  application's TracerProvider (its processors, exporters and resource), or otel-npu's own console exporter.
* ``OtlpSink`` is otel-npu's own OTLP export: spans encoded by ``otlp.SpanEncoder`` (no SDK objects), held in
  a bounded queue, sent in batches by one exporter thread through the SDK's OTLP exporter classes, which
  bring the standard endpoint/headers/timeout/compression/TLS variables and their retry policy. Only their
  transport is used: ``_client.export(bytes)`` for HTTP, ``export()`` with a pre-encoded batch (via
  ``_translate_data``) for gRPC. ``transport_for()`` checks that those hooks exist and otherwise returns
  ``None``, and the caller falls back to an ``SdkSink`` with a ``BatchSpanProcessor`` (slower, same output).

Batching follows the BatchSpanProcessor: export when ``max_export_batch_size`` spans wait or every
``schedule_delay``; when ``max_queue_size`` spans wait, new ones are dropped and counted (``export_queue_full``)
— never blocking the resolver. Failed exports are counted (``export_failed``) with the first error. Nothing
here runs on the capturing thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from opentelemetry.sdk.trace.export import SpanExporter

from ..config.otel import OtelSettings
from .redact import last_message, redact


_log = logging.getLogger("otel_npu")


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


def wait_until(cond: threading.Condition, done: Callable[[], bool], deadline: float,
               worker: threading.Thread) -> bool:
    """With ``cond`` held: wait until ``done()``, the monotonic ``deadline`` passes, or ``worker`` dies.

    True when ``done()``. Wakes at least every 0.1 s to notice a worker that died without notifying."""
    while not done():
        left = deadline - time.monotonic()
        if left <= 0 or not worker.is_alive():
            return False
        cond.wait(min(left, 0.1))
    return True


class SdkSink:
    """Finished spans to an SDK span processor."""

    def __init__(self, processor: Any, resource: Any, scope: Any, factory: Any, *, owned: bool) -> None:
        self._on_end = processor.on_end
        self._processor = processor
        self._resource = resource
        self._scope = scope
        self._factory = factory
        self._owned = owned  # the application's processors are flushed and shut down by the application

    def emit(self, r: Any) -> None:
        self._on_end(self._factory.to_readable(r, self._resource, self._scope))

    def force_flush(self, timeout_s: float) -> bool:
        if not self._owned:
            return True  # handed over; the app's BatchSpanProcessor.force_flush may ignore timeouts
        return bool(self._processor.force_flush(int(max(timeout_s, 0.001) * 1000)))

    def shutdown(self, timeout_s: float) -> None:
        if self._owned:
            self._processor.shutdown()


class EncodedBatch:
    """A batch of spans already encoded as an ``ExportTraceServiceRequest``."""

    __slots__ = ("data", "count")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count

    def __len__(self) -> int:
        return self.count


def http_session(otel: OtelSettings, signal: str = "TRACES") -> Any:
    """``None``, or (when a certificate variable is set) a ``requests.Session`` for the SDK's OTLP/HTTP
    exporters that keeps ``OTEL_EXPORTER_OTLP_[signal_]CERTIFICATE`` in force.

    Why: the exporters set ``session.verify`` to that file, but ``requests`` lets ``REQUESTS_CA_BUNDLE`` /
    ``CURL_CA_BUNDLE`` from the environment win over a session's ``verify`` — on hosts that set them (common),
    the collector's certificate would be checked against the system bundle instead, and a private CA's
    collector refused. Everything else about the environment (proxies, netrc) is honoured as usual.
    """
    import requests

    class CertificateSession(requests.Session):
        def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None and isinstance(self.verify, str):
                settings["verify"] = self.verify
            return settings

    if not otel.otlp_option(signal, "CERTIFICATE"):
        return None  # nothing to keep in force: the SDK's own session
    return CertificateSession()


def transport_for(protocol: str, otel: OtelSettings) -> Callable[[bytes, int], tuple[bool, str | None]] | None:
    """A ``send(request_bytes, span_count) -> (ok, error)`` over the SDK's OTLP exporter for ``protocol``,
    configured from the standard environment variables; ``None`` if that exporter lacks the hooks we use."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from opentelemetry.sdk.trace.export import SpanExportResult

        if not hasattr(OTLPSpanExporter, "_translate_data") or not hasattr(OTLPSpanExporter, "_export"):
            return None

        class _PreEncodedGrpcExporter(OTLPSpanExporter):
            def _translate_data(self, data: Any) -> Any:  # the one hook: bytes we encoded, parsed in C
                if isinstance(data, EncodedBatch):
                    return ExportTraceServiceRequest.FromString(data.data)
                return super()._translate_data(data)

            def _count_data(self, data: Any) -> int:
                return len(data)

        exporter = _PreEncodedGrpcExporter(**otlp_exporter_kwargs(otel, "TRACES", "grpc"))

        def send_grpc(data: bytes, count: int) -> tuple[bool, str | None]:
            last_message()  # forget an older line: the detail must be this export's
            ok = exporter.export(EncodedBatch(data, count)) == SpanExportResult.SUCCESS
            if ok:
                return True, None
            # The gRPC exporter reports why only in its log; on otel-npu's threads that line is held back
            # (redact.py) and used here, so that the one warning says why.
            return False, last_message() or "the gRPC export failed"

        send_grpc.shutdown = exporter.shutdown  # type: ignore[attr-defined]
        send_grpc.endpoint = getattr(exporter, "_endpoint", "?")  # type: ignore[attr-defined]
        return send_grpc

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    exporter = HttpExporter(session=http_session(otel, "TRACES"),
                            **otlp_exporter_kwargs(otel, "TRACES", "http/protobuf"))
    client = getattr(exporter, "_client", None)
    if client is None or not callable(getattr(client, "export", None)):
        exporter.shutdown()
        return None

    def send_http(data: bytes, count: int) -> tuple[bool, str | None]:
        result = client.export(data)
        if result.success:
            return True, None
        detail = result.reason or (f"{type(result.error).__name__}: {result.error}" if result.error is not None
                                   else "no response")
        return False, redact(f"HTTP {result.status_code}: {detail}" if result.status_code else str(detail))

    send_http.shutdown = exporter.shutdown  # type: ignore[attr-defined]
    send_http.endpoint = getattr(exporter, "_endpoint", "?")  # type: ignore[attr-defined]
    return send_http


def otlp_json_line(request: Any) -> str:
    """An ``ExportTraceServiceRequest`` as one line of OTLP/JSON: trace and span ids in hex (as the OTLP/JSON
    encoding requires, not protobuf-JSON's base64), enums as integers, int64 as strings."""
    import base64
    import json

    from google.protobuf import json_format

    message = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rs in message.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                for obj in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in obj:
                            obj[key] = base64.b64decode(obj[key]).hex()
    return json.dumps(message, separators=(",", ":")) + "\n"


class _LineFile:
    """Appends whole lines to a file from several threads."""

    def __init__(self, path: str) -> None:
        import os

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


def json_file_transport(path: str) -> Callable[[str, int], tuple[bool, str | None]]:
    """A ``send`` for ``OtlpSink`` with an ``otlp_json.JsonSpanEncoder``: appends each batch (one OTLP/JSON
    line, already encoded) to ``path``."""
    out = _LineFile(path)

    def send_json(line: str, count: int) -> tuple[bool, str | None]:
        return out.write(line)

    send_json.shutdown = out.close  # type: ignore[attr-defined]
    send_json.endpoint = out.path  # type: ignore[attr-defined]
    return send_json


def file_transport(path: str) -> Callable[[bytes, int], tuple[bool, str | None]]:
    """A ``send`` for ``OtlpSink`` that appends each batch to ``path`` as one OTLP/JSON line."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    out = _LineFile(path)

    def send_file(data: bytes, count: int) -> tuple[bool, str | None]:
        return out.write(otlp_json_line(ExportTraceServiceRequest.FromString(data)))

    send_file.shutdown = out.close  # type: ignore[attr-defined]
    send_file.endpoint = out.path  # type: ignore[attr-defined]
    return send_file


class JsonLinesSpanExporter(SpanExporter):
    """An SDK ``SpanExporter`` writing the same OTLP/JSON lines file, for applications' own TracerProviders
    (so that their request spans and otel-npu's spans land in one file)."""

    def __init__(self, path: str) -> None:
        self._out = _LineFile(path)
        self.path = self._out.path

    def export(self, spans: Any) -> Any:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        ok, _ = self._out.write(otlp_json_line(encode_spans(spans)))
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._out.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class OtlpSink:
    """otel-npu's own OTLP export: encode on the resolver thread, send on the exporter thread."""

    def __init__(self, send: Callable[[bytes, int], tuple[bool, str | None]], encoder: Any, stats: Any, *,
                 max_queue_size: int = 8192, max_export_batch_size: int = 2048,
                 schedule_delay_s: float = 5.0) -> None:
        self._send = send
        self._encoder = encoder
        self._stats = stats
        self._max_queue = max_queue_size
        self._batch = min(max_export_batch_size, max_queue_size)
        self._delay = schedule_delay_s
        self._queue: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._enqueued = 0   # spans accepted so far
        self._settled = 0    # spans exported or failed so far
        self._flush_to = 0   # export at once until _settled reaches this
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.endpoint = getattr(send, "endpoint", "?")

    # -- resolver thread ----------------------------------------------------------------------------
    def emit(self, r: Any) -> None:
        encoded = self._encoder.encode(r)
        if len(self._queue) >= self._max_queue:
            self._stats.drop("export_queue_full")
            return
        self._queue.append(encoded)
        self._enqueued += 1
        if self._thread is None:
            self._start()
        if len(self._queue) == self._batch:  # exactly at the threshold: one notify per batch
            with self._cond:
                self._cond.notify()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="otel-npu-exporter", daemon=True)
        self._thread.start()

    # -- exporter thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stopping and len(self._queue) < self._batch and self._settled >= self._flush_to:
                    self._cond.wait(self._delay)
                stopping = self._stopping
            while self._queue:
                self._export_one_batch()
                if len(self._queue) < self._batch and self._settled >= self._flush_to and not stopping:
                    break
            with self._cond:
                self._cond.notify_all()
            if stopping and not self._queue:
                return

    def _export_one_batch(self) -> None:
        queue = self._queue
        batch = []
        popleft = queue.popleft
        for _ in range(min(self._batch, len(queue))):
            batch.append(popleft())
        if not batch:
            return
        try:
            ok, error = self._send(self._encoder.request(batch), len(batch))
        except Exception as exc:  # the exporter should not raise; if it does, count and carry on
            ok, error = False, redact(f"{type(exc).__name__}: {exc}")
        with self._cond:
            if self._closed:  # counted as lost by shutdown() already
                return
            self._settled += len(batch)
        if ok:
            self._stats.spans_exported += len(batch)
        else:
            self._stats.drop("export_failed", ExportError(error or "unknown error"), len(batch))

    # -- any thread ---------------------------------------------------------------------------------
    def force_flush(self, timeout_s: float) -> bool:
        """Export everything emitted so far. Blocks up to ``timeout_s``; True when all were sent or failed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._enqueued
            self._flush_to = max(self._flush_to, target)
            if self._thread is None:
                return self._settled >= target
            self._cond.notify_all()
            return wait_until(self._cond, lambda: self._settled >= target, deadline, self._thread)

    def shutdown(self, timeout_s: float) -> None:
        """Flush within ``timeout_s``, then stop. What is still queued or in flight is counted as lost."""
        self.force_flush(timeout_s)
        with self._cond:
            self._stopping = True
            self._closed = True
            lost = self._enqueued - self._settled
            self._queue.clear()
            self._cond.notify_all()
        if lost:
            self._stats.drop("export_failed", ExportError("not delivered before shutdown"), lost)
        shutdown = getattr(self._send, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # pragma: no cover - best effort at exit
                pass


class ExportError(Exception):
    """Spans were not delivered (the name shows in ``stats()`` errors, logs and ``doctor``)."""
