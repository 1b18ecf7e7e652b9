"""``SdkSink``: finished spans to an SDK span processor (the application's TracerProvider's, or otel-npu's
own console exporter's)."""

from __future__ import annotations

from typing import Any

from ...config.otel import OtelSettings
from ...record import Record


class SdkSink:
    """Finished spans to an SDK span processor."""

    def __init__(self, processor: Any, resource: Any, scope: Any, factory: Any, *, owned: bool) -> None:
        self._on_end = processor.on_end
        self._processor = processor
        self._resource = resource
        self._scope = scope
        self._factory = factory
        self._owned = owned  # the application's processors are flushed and shut down by the application

    def emit(self, r: Record) -> None:
        self._on_end(self._factory.to_readable(r, self._resource, self._scope))

    def force_flush(self, timeout_s: float) -> bool:
        if not self._owned:
            return True  # handed over; the app's BatchSpanProcessor.force_flush may ignore timeouts
        return bool(self._processor.force_flush(int(max(timeout_s, 0.001) * 1000)))

    def shutdown(self, timeout_s: float) -> None:
        if self._owned:
            self._processor.shutdown()


def sdk_batch_processor(exporter: Any, otel: OtelSettings, *, schedule_delay_ms: int | None = None) -> Any:
    """The SDK's BatchSpanProcessor with otel-npu's validated batching (``OtelSettings.batching``) passed in:
    left to read ``OTEL_BSP_*`` itself, it raises ``ValueError`` for a queue or batch size of 0 or less, or a
    batch above the queue (the demo crashed so, leaving an empty traces file), and logs a traceback for an
    export timeout that is not a number."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    queue, batch, delay_s = otel.batching
    return BatchSpanProcessor(exporter, max_queue_size=queue, max_export_batch_size=batch,
                              schedule_delay_millis=round(delay_s * 1000) if schedule_delay_ms is None
                              else schedule_delay_ms, export_timeout_millis=otel.bsp_export_timeout_ms)
