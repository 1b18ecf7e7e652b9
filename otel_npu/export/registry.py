"""What an exporter is, and the tables that name them: where a new exporter, transport or sampler goes.

The shapes (typed ``Protocol``s, as the OpenTelemetry SDK's ``SpanExporter``/``Exporter``):

* ``Sink``: where a pipeline hands each exported record. ``emit(record)`` runs on the resolver thread and must
  not block (queue, then send on a thread of your own); ``force_flush(timeout_s) -> bool`` and
  ``shutdown(timeout_s)`` are called from any thread and bounded by their timeout.
* ``Transport``: how ``sinks.otlp.OtlpSink`` sends an encoded batch, on its exporter thread:
  ``send(batch, count) -> (ok, error text or None)``, ``shutdown()``, and ``endpoint`` (for descriptions).

The tables (name -> builder; a name not in a table is warned about once and ignored, never an error):

* ``SPAN_EXPORTERS``: ``OTEL_TRACES_EXPORTER`` names for otel-npu's own pipeline -> ``build(ctx) -> (Sink,
  description)``;
* ``TRANSPORTS``: ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` -> ``build(otel) -> Transport | None`` (``None``:
  this installation lacks what it needs; the OTLP exporter then falls back to the SDK's own encoder);
* ``SDK_SPAN_EXPORTERS``: the same names for an SDK ``TracerProvider`` otel-npu configures for an application
  (``pipeline.tracer_provider_from_env``) -> ``build(otel) -> (SpanExporter, batched)`` (batched: behind a
  BatchSpanProcessor, else a SimpleSpanProcessor);
* ``METRIC_EXPORTERS``: ``OTEL_METRICS_EXPORTER`` names -> ``build(otel, protocol) -> (MetricExporter,
  description)``;
* ``SAMPLERS``: ``OTEL_TRACES_SAMPLER`` names (``config.otel.SAMPLERS``) -> ``build(ratio) -> Sampler``.

Adding an exporter ``foo``: a ``Sink`` class (see ``sinks/``), a builder here, and ``"foo": builder`` in
``SPAN_EXPORTERS``; ``OTEL_TRACES_EXPORTER=foo`` then selects it and ``otel-npu doctor`` lists it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Protocol, runtime_checkable

from opentelemetry.sdk.trace import sampling

from ..accounting import Stats
from ..config.otel import OtelSettings
from ..record import Record


@runtime_checkable
class Sink(Protocol):
    """Where a pipeline hands each exported record (see the module docstring)."""

    def emit(self, r: Record) -> None: ...

    def force_flush(self, timeout_s: float) -> bool: ...

    def shutdown(self, timeout_s: float) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """How an ``OtlpSink`` sends an encoded batch (see the module docstring)."""

    endpoint: str

    def send(self, batch: Any, count: int) -> tuple[bool, str | None]: ...

    def shutdown(self) -> None: ...


class SinkContext:
    """What a ``SPAN_EXPORTERS`` builder is given: the settings, the pipeline's span factory, its resource and
    instrumentation scope, and the counters a sink reports its losses to."""

    __slots__ = ("otel", "factory", "resource", "scope", "stats")

    def __init__(self, *, otel: OtelSettings, factory: Any, resource: Any, scope: Any, stats: Stats) -> None:
        self.otel = otel
        self.factory = factory
        self.resource = resource
        self.scope = scope
        self.stats = stats


# -- span exporters ----------------------------------------------------------------------------------------

def _console_sink(ctx: SinkContext) -> tuple[Sink, str]:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from .sinks.sdk import SdkSink

    exporter, _ = _sdk_console(ctx.otel)
    return SdkSink(SimpleSpanProcessor(exporter), ctx.resource, ctx.scope, ctx.factory, owned=True), "console"


def _otlp_sink(ctx: SinkContext) -> tuple[Sink, str]:
    """otel-npu's own OTLP export: hand-made encoding and a transport; the SDK's exporter where the installed
    one lacks what the transport needs."""
    from . import redact
    from .encoding.otlp_proto import SpanEncoder
    from .sinks.otlp import OtlpSink
    from .sinks.sdk import SdkSink, sdk_batch_processor

    protocol = ctx.otel.protocol("TRACES")
    transport = TRANSPORTS[protocol](ctx.otel)
    if transport is None:  # the SDK path works, more slowly
        logging.getLogger("otel_npu").info(
            "otel-npu: this opentelemetry-exporter-otlp has no pre-encoded export path; using the SDK's")
        exporter, _ = _sdk_otlp(ctx.otel)
        return (SdkSink(sdk_batch_processor(exporter, ctx.otel), ctx.resource, ctx.scope, ctx.factory, owned=True),
                f"otlp {protocol} (SDK encoder)")
    redact.install_exporter_log_filter()
    encoder = SpanEncoder(ctx.factory, ctx.resource, ctx.scope.name, ctx.scope.version or "")
    # Batching per OTEL_BSP_*, with larger defaults than the BatchSpanProcessor's (config.otel.BSP_DEFAULTS).
    max_queue_size, max_export_batch_size, schedule_delay_s = ctx.otel.batching
    sink = OtlpSink(transport, encoder, ctx.stats, max_queue_size=max_queue_size,
                    max_export_batch_size=max_export_batch_size, schedule_delay_s=schedule_delay_s)
    return sink, f"otlp {protocol} -> {sink.endpoint}"


#: ``OTEL_TRACES_EXPORTER`` name -> builder of otel-npu's own sink (``"none"`` is accepted besides these).
SPAN_EXPORTERS: dict[str, Callable[[SinkContext], tuple[Sink, str]]] = {
    "otlp": _otlp_sink,
    "console": _console_sink,
}


def _grpc(otel: OtelSettings) -> Transport | None:
    from .transports import GrpcTransport

    return GrpcTransport.build(otel)


def _http(otel: OtelSettings) -> Transport | None:
    from .transports import HttpTransport

    return HttpTransport.build(otel)


#: OTLP protocol (``config.otel.PROTOCOLS``) -> transport builder.
TRANSPORTS: dict[str, Callable[[OtelSettings], Transport | None]] = {
    "grpc": _grpc,
    "http/protobuf": _http,
}


# -- SDK span exporters, for a TracerProvider otel-npu configures for an application ----------------------

def _sdk_console(otel: OtelSettings) -> tuple[Any, bool]:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    # stdout as it is now: ConsoleSpanExporter's default is the one at its import
    return ConsoleSpanExporter(out=sys.stdout), False


def _sdk_otlp(otel: OtelSettings) -> tuple[Any, bool]:
    from .transports import http_session, otlp_exporter_kwargs

    protocol = otel.protocol("TRACES")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(**otlp_exporter_kwargs(otel, "TRACES", protocol)), True
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(session=http_session(otel, "TRACES"), **otlp_exporter_kwargs(otel, "TRACES", protocol)), True


#: ``OTEL_TRACES_EXPORTER`` name -> (an SDK span exporter, whether it goes behind a BatchSpanProcessor).
SDK_SPAN_EXPORTERS: dict[str, Callable[[OtelSettings], tuple[Any, bool]]] = {
    "otlp": _sdk_otlp,
    "console": _sdk_console,
}


# -- metric exporters ----------------------------------------------------------------------------------------

def _console_metrics(otel: OtelSettings, protocol: str) -> tuple[Any, str]:
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

    return ConsoleMetricExporter(out=sys.stdout), "console"


def _otlp_metrics(otel: OtelSettings, protocol: str) -> tuple[Any, str]:
    from .transports import http_session, otlp_exporter_kwargs

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(**otlp_exporter_kwargs(otel, "METRICS", protocol))
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        exporter = HttpExporter(session=http_session(otel, "METRICS"),
                                **otlp_exporter_kwargs(otel, "METRICS", protocol))
    return exporter, f"otlp {protocol} -> {getattr(exporter, '_endpoint', '?')}"


#: ``OTEL_METRICS_EXPORTER`` name -> builder of an SDK metric exporter (``"none"`` is accepted besides these).
METRIC_EXPORTERS: dict[str, Callable[[OtelSettings, str], tuple[Any, str]]] = {
    "otlp": _otlp_metrics,
    "console": _console_metrics,
}


# -- samplers --------------------------------------------------------------------------------------------

#: ``OTEL_TRACES_SAMPLER`` name -> the SDK sampler, given ``OTEL_TRACES_SAMPLER_ARG``'s ratio.
SAMPLERS: dict[str, Callable[[float], Any]] = {
    "always_on": lambda ratio: sampling.ALWAYS_ON,
    "always_off": lambda ratio: sampling.ALWAYS_OFF,
    "traceidratio": lambda ratio: sampling.TraceIdRatioBased(ratio),
    "parentbased_always_on": lambda ratio: sampling.DEFAULT_ON,
    "parentbased_always_off": lambda ratio: sampling.DEFAULT_OFF,
    "parentbased_traceidratio": lambda ratio: sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
}


def names(table: dict[str, Any]) -> tuple[str, ...]:
    """The names a variable may list for ``table``: its keys and ``none``."""
    return (*table, "none")
