"""Where the stage metrics go (``build``), and the two ways they get there: ``MetricsExport`` (one
``otel-npu-metrics`` thread exporting ready data every interval) and ``SdkInstruments`` (real SDK instruments
on an application MeterProvider that cannot take ready data)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping

from ...accounting import Stats
from ...config import Settings
from ...config.env import keep_known
from ...config.otel import OtelSettings
from ...record import Record
from ...spans.attributes import ATTR_DEVICE, ATTR_RANK, NOT_METRIC_ATTRIBUTES
from ...threads import name_os_thread
from .. import registry
from ..waiting import wait_until
from .aggregate import BOUNDARIES_MS, MAX_SERIES, StageAggregator, stage_key
from .build import COUNTERS, STAGE_DURATION, STAGE_DURATION_DESCRIPTION, MetricsBuilder, _wants_delta, counter_values

_log = logging.getLogger("otel_npu")

class _Destination:
    """One exporter: otel-npu's own (``owned``) or an application reader's (used under its export lock)."""

    def __init__(self, exporter: Any, lock: Any, owned: bool, description: str) -> None:
        self.exporter = exporter
        self.lock = lock
        self.owned = owned
        self.description = description
        self.builder: MetricsBuilder | None = None


class MetricsExport:
    """Exports the stage metrics every ``interval_s`` on one daemon thread (``otel-npu-metrics``)."""

    def __init__(self, aggregator: StageAggregator, stats: Stats, destinations: list[_Destination],
                 resource: Any, scope: Any, interval_s: float, timeout_s: float, description: str,
                 exemplar_filter: str = "trace_based") -> None:
        self.aggregator = aggregator
        self.record = aggregator.record
        #: ``OTEL_METRICS_EXEMPLAR_FILTER``; ``exemplar(r, with_ids)`` is what the pipeline offers spans to.
        self.exemplar_filter = exemplar_filter
        self.exemplar = None if exemplar_filter == "always_off" else aggregator.exemplar
        self._stats = stats
        self._destinations = destinations
        for d in destinations:
            d.builder = MetricsBuilder(aggregator, stats, resource, scope)
        self._interval = interval_s
        self._timeout = timeout_s
        self.description = description
        self._cond = threading.Condition()
        self._requested = 0   # export rounds asked for by flush()
        self._started = 0     # the round exporting now, or the last one (its snapshot taken when it began)
        self._completed = 0   # export rounds finished
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._warned = False
        self._exported_signature: tuple | None = None

    def ensure_started(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="otel-npu-metrics", daemon=True)
                    self._thread.start()

    def _signature(self) -> tuple:
        snap = self._stats.snapshot()
        return snap.get("resolved", 0), snap.get("dropped_total", 0)

    def _run(self) -> None:
        name_os_thread("otel-npu-metrics")
        while True:
            with self._cond:
                if not self._stopping and self._requested <= self._completed:
                    self._cond.wait(self._interval)
                stopping = self._stopping
                target = self._started = max(self._requested, self._completed + 1)
            # The last round at shutdown is skipped when nothing changed since an export went through: at exit
            # with the collector gone, it would only spend the exit bound on a send that cannot succeed.
            if not (stopping and self._exported_signature == self._signature()):
                signature = self._signature()
                if self.export_once():
                    self._exported_signature = signature
            with self._cond:
                self._completed = max(self._completed + 1, target)
                self._cond.notify_all()
            if stopping:
                return

    def export_once(self) -> bool:
        """Build and export one round (export thread). Never raises; failures are counted."""
        from ..redact import last_message, redact

        ok = True
        # One snapshot per round: it starts the next interval of the delta min/max, so every destination of
        # this round must see the same one (else a second exporter saw min=inf, max=-inf).
        snapshot = self.aggregator.snapshot()
        for d in self._destinations:
            try:
                data = d.builder.build(_wants_delta(d.exporter), snapshot)
                last_message()
                if d.lock is not None:
                    with d.lock:
                        result = d.exporter.export(data, timeout_millis=self._timeout * 1000)
                else:
                    result = d.exporter.export(data, timeout_millis=self._timeout * 1000)
                if getattr(result, "name", "SUCCESS") != "SUCCESS":
                    raise MetricsExportError(last_message() or "the export failed")
                self._stats.add("metrics_exported")
            except Exception as exc:
                ok = False
                detail = str(exc) if isinstance(exc, MetricsExportError) else f"{type(exc).__name__}: {exc}"
                error = MetricsExportError(redact(f"{d.description}: {detail}"))
                self._stats.note_error("metrics_export_failed", error)
                if not self._warned:
                    self._warned = True  # once: a later success or failure is in stats()
                    _log.warning("otel-npu: exporting the stage metrics failed (%s); retried every %g s, "
                                 "failures counted in otel_npu.stats()['metrics_export_failed']",
                                 error, self._interval)
        return ok

    def export_now(self) -> None:
        """Ask the export thread for a round now, without waiting for it (the pipeline calls it when the
        process goes idle). A round already asked for and not yet done covers this call too."""
        if not self._destinations or self._thread is None:
            return
        with self._cond:
            if self._requested <= self._completed:
                self._requested = self._completed + 1
                self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Export now. Blocks up to ``timeout_s``; True when a round finished in time."""
        if not self._destinations:
            return True
        self.ensure_started()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            # A round that begins after this call: one exporting now took its snapshot before it.
            target = self._started + 1
            self._requested = max(self._requested, target)
            self._cond.notify_all()
            return wait_until(self._cond, lambda: self._completed >= target, deadline, self._thread)

    def shutdown(self, timeout_s: float) -> None:
        """A last export (bounded by ``timeout_s``), then stop; otel-npu's own exporters are shut down."""
        deadline = time.monotonic() + timeout_s
        if self._destinations:
            self.ensure_started()
            with self._cond:
                self._stopping = True
                self._requested = self._completed + 1
                self._cond.notify_all()
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for d in self._destinations:
            if d.owned:
                try:
                    d.exporter.shutdown(timeout_millis=max(1.0, (deadline - time.monotonic()) * 1000))
                except Exception:  # pragma: no cover - best effort at exit
                    _log.debug("otel-npu: shutting the metrics exporter down failed", exc_info=True)


class SdkInstruments:
    """Fallback for an application MeterProvider whose readers cannot take ready data (pull readers): real
    SDK instruments, recorded per capture on the resolver thread (the SDK's cost: 10-22 µs per capture here)."""

    #: Exemplars are the SDK's here: each exported capture is recorded with its span's context.
    exemplar = None
    exemplar_filter = "the application MeterProvider's"

    def __init__(self, provider: Any, aggregator: StageAggregator, stats: Stats, version: str) -> None:
        from opentelemetry.metrics import Observation

        meter = provider.get_meter("otel_npu", version)
        self.aggregator = aggregator
        self.description = f"the application's MeterProvider ({type(provider).__name__}), SDK instruments"
        self._histogram = meter.create_histogram(
            STAGE_DURATION, unit="ms", description=STAGE_DURATION_DESCRIPTION,
            explicit_bucket_boundaries_advisory=list(BOUNDARIES_MS))
        self._attrs: dict[tuple, dict] = {}
        const = {ATTR_DEVICE: aggregator._const.get(ATTR_DEVICE)}
        if ATTR_RANK in aggregator._const:
            const[ATTR_RANK] = aggregator._const[ATTR_RANK]

        def observe(source: str | tuple[str, ...]) -> Callable:
            def callback(options: Any) -> list:
                return [Observation(value, {**const, attr[0]: attr[1]} if attr else const)
                        for attr, value in counter_values(source, stats.snapshot())]
            return callback

        for name, (description, source) in COUNTERS.items():
            meter.create_observable_counter(name, callbacks=[observe(source)], unit="{capture}",
                                            description=description)

    def record(self, r: Record) -> None:
        if r.timed_out:
            return
        key = stage_key(r)
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self.aggregator.attributes(key)
            if len(self._attrs) < MAX_SERIES:
                self._attrs[key] = attrs
        if r.sampled:  # exported: its context, for the SDK's exemplar reservoir (its filter decides)
            self._histogram.record((r.end_ns - r.start_ns) / 1e6, attrs, self._context(r))
        else:
            self._histogram.record((r.end_ns - r.start_ns) / 1e6, attrs)

    @staticmethod
    def _context(r: Record) -> Any:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        span = NonRecordingSpan(SpanContext(r.trace_id, r.span_id, False, TraceFlags(TraceFlags.SAMPLED)))
        return trace.set_span_in_context(span)

    def ensure_started(self) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True  # the application's readers collect on their own schedule

    def shutdown(self, timeout_s: float) -> None:
        pass


class MetricsExportError(Exception):
    """An export of the stage metrics failed (the name shows in ``stats()`` errors, logs and ``doctor``)."""


def exporter_names(otel: OtelSettings) -> list[str]:
    """The ``OTEL_METRICS_EXPORTER`` names otel-npu builds (none when ``otel.metrics_off_reason``)."""
    return keep_known("OTEL_METRICS_EXPORTER", otel.metrics_exporters, registry.names(registry.METRIC_EXPORTERS),
                      who="otel-npu's own metrics do not support",
                      hint=" (for a pull exporter such as prometheus, install an SDK MeterProvider with that "
                           "reader: otel-npu then records into it)")


def app_meter_provider(settings: Settings) -> Any | None:
    """The application's SDK MeterProvider, if one is installed and otel-npu may use it."""
    if settings.pipeline == "own":
        return None
    from opentelemetry import metrics as metrics_api
    from opentelemetry.sdk.metrics import MeterProvider

    provider = metrics_api.get_meter_provider()
    return provider if isinstance(provider, MeterProvider) else None


def _app_destinations(provider: Any) -> tuple[list[_Destination], Any, float] | None:
    """The exporters of ``provider``'s periodic readers, its resource and interval; ``None`` when any reader is
    of another kind (or the SDK's layout is not the one known here)."""
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    config = getattr(provider, "_sdk_config", None)
    # The SDK keeps the readers on the provider (1.45) or, in older releases, in its configuration.
    readers = getattr(provider, "_metric_readers", None) or getattr(config, "metric_readers", None)
    resource = getattr(config, "resource", None)
    if not readers or resource is None:
        return None
    out, interval = [], None
    for reader in readers:
        exporter = getattr(reader, "_exporter", None)
        if not isinstance(reader, PeriodicExportingMetricReader) or exporter is None:
            return None
        out.append(_Destination(exporter, getattr(reader, "_export_lock", None), False,
                                type(exporter).__name__))
        millis = getattr(reader, "_export_interval_millis", 60000)
        interval = millis if interval is None else min(interval, millis)
    return out, resource, (interval or 60000) / 1000.0


def build(settings: Settings, otel: OtelSettings, *, const_attributes: Mapping[str, Any], resource: Any,
          scope: Any, stats: Stats) -> Any | None:
    """The metrics part of a pipeline (``MetricsExport`` or ``SdkInstruments``), or ``None`` (no metrics)."""
    attrs = {ATTR_DEVICE: const_attributes.get(ATTR_DEVICE, "?")}
    if ATTR_RANK in const_attributes:
        attrs[ATTR_RANK] = const_attributes[ATTR_RANK]
    # and those an integration gave (``configure(attributes=)``: a worker's ranks), never the pid
    attrs.update((k, v) for k, v in const_attributes.items() if k not in NOT_METRIC_ATTRIBUTES and k not in attrs)
    aggregator = StageAggregator(attrs)
    timeout_s = otel.metric_ms("OTEL_METRIC_EXPORT_TIMEOUT")
    provider = app_meter_provider(settings)
    if provider is not None:
        found = _app_destinations(provider)
        if found is not None:
            destinations, app_resource, interval_s = found
            return MetricsExport(aggregator, stats, destinations, app_resource, scope, interval_s, timeout_s,
                                 f"the application's MeterProvider ({', '.join(d.description for d in destinations)})",
                                 otel.exemplar_filter)
        _log.info("otel-npu: the application's MeterProvider has a reader that cannot take ready data; "
                  "recording through SDK instruments (slower per capture)")
        return SdkInstruments(provider, aggregator, stats, scope.version or "")
    destinations = []
    protocol = otel.protocol("METRICS")
    for name in exporter_names(otel):
        try:
            exporter, text = registry.METRIC_EXPORTERS[name](otel, protocol)
        except Exception as exc:
            _log.warning("otel-npu: cannot set up the %s metrics exporter (%s: %s); stage metrics are not "
                         "exported there", name, type(exc).__name__, exc)
            continue
        destinations.append(_Destination(exporter, None, True, text))
    if not destinations:
        return None
    interval_s = otel.metric_ms("OTEL_METRIC_EXPORT_INTERVAL")
    return MetricsExport(aggregator, stats, destinations, resource, scope, interval_s, timeout_s,
                         "otel-npu's own: " + ", ".join(d.description for d in destinations),
                         otel.exemplar_filter)
