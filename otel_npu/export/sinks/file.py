"""``JsonLinesSpanExporter``: the ``OTEL_NPU_TRACES_FILE`` format (OTLP/JSON lines) as an SDK ``SpanExporter``,
for applications' own TracerProviders, so that their request spans and otel-npu's spans land in one file."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter

from ..encoding.otlp_json import request_to_json_line
from ..transports import LineFile


class JsonLinesSpanExporter(SpanExporter):
    """An SDK ``SpanExporter`` writing the same OTLP/JSON lines file, for applications' own TracerProviders
    (so that their request spans and otel-npu's spans land in one file)."""

    def __init__(self, path: str) -> None:
        self._out = LineFile(path)
        self.path = self._out.path

    def export(self, spans: Any) -> Any:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        ok, _ = self._out.write(request_to_json_line(encode_spans(spans)))
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._out.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
