"""Stage metrics: a duration histogram per stage and counters of what happened to captures.

Instruments (documented in the README):

* ``otel_npu.stage.duration`` — histogram, unit ``ms``, explicit buckets ``BOUNDARIES_MS`` (0.01 ms to 10 s,
  six per decade: 1, 1.5, 2, 3, 5, 7). Attributes ``otel_npu.stage`` (the capture's name), ``otel_npu.step``
  (the enclosing step's name; a step itself is recorded with ``otel_npu.stage == otel_npu.step``),
  ``otel_npu.device``, and ``otel_npu.rank`` when ``$RANK`` is set. Every resolved capture is recorded, sampled
  or not: traces can be sampled at 1 % while the histogram still sees every step. Captures that timed out are
  not (their times are host times, not device times): they are counted instead.
* ``otel_npu.captures.resolved``, ``otel_npu.captures.timed_out``, ``otel_npu.captures.dropped``
  (attribute ``otel_npu.reason``: ``pending_limit``, ``event_pool_empty``, ``record_failed``,
  ``resolver_stopped``, ``device_unfinished``, ``shutdown_timeout``, ``graph_capture``, ``device_starting``)
  and ``otel_npu.captures.spans_lost`` (spans that did not reach the collector;
  ``otel_npu.reason``: ``export_failed``, ``export_queue_full``, ``emit_failed``) — monotonic sums read from
  the runtime's ``Stats`` at export time.

**Why otel-npu aggregates itself instead of calling the SDK's ``Histogram.record`` per capture.** Measured
on the 2-core machine these numbers are for (SDK 1.45, three attributes): ``Histogram.record`` costs
10-22 µs per call (attribute cleaning, hashing, exemplar filter), more than everything else otel-npu does per
capture (target: ≤ 10 µs across all threads), and all of it under the GIL the serving loop needs.
``StageAggregator.record`` (a dict lookup, a ``bisect`` over 37 boundaries, a few list updates, no lock)
costs ≈ 0.7 µs. The aggregate is handed to the SDK as ready ``MetricsData`` (public SDK
classes) once per export interval, so the SDK's exporters (OTLP gRPC/HTTP, console) do the wire work.

Where the metrics go (``build()``):

* **the application's SDK MeterProvider**, when one is installed (and ``OTEL_NPU_PIPELINE`` is not ``own``):
  through the exporters of its ``PeriodicExportingMetricReader``s, with its resource and export interval, under
  the reader's export lock. A provider with another kind of reader (a pull reader such as Prometheus', an
  in-memory reader) cannot be handed ready data: then otel-npu creates real SDK instruments on it and records
  each capture through them (correct, at the SDK's cost above; logged once at INFO);
* **otel-npu's own**, otherwise: ``OTEL_METRICS_EXPORTER`` (``otlp`` default, ``console``, ``none``),
  ``OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL``, the ``OTEL_EXPORTER_OTLP_[METRICS_]*`` variables (read by the
  SDK's exporter classes), ``OTEL_METRIC_EXPORT_INTERVAL`` (ms, 60000) and ``OTEL_METRIC_EXPORT_TIMEOUT``
  (ms, 30000), and ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` through the exporter.

Threads: ``record`` runs on the resolver thread; exports run on one ``otel-npu-metrics`` thread. A failed export
loses nothing with cumulative temporality (the next one carries the totals); it is counted
(``metrics_export_failed`` in ``otel_npu.stats()``) and its first error kept.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Any, Callable, Mapping

from ..accounting import CAPTURE_DROP_REASONS, SPAN_LOSS_REASONS
from ..record import Record
from ..config.env import keep_known
from ..config.otel import OtelSettings
from .sinks import wait_until

_log = logging.getLogger("otel_npu")

STAGE_DURATION = "otel_npu.stage.duration"
ATTR_STAGE = "otel_npu.stage"
ATTR_STEP = "otel_npu.step"
ATTR_DEVICE = "otel_npu.device"
ATTR_RANK = "otel_npu.rank"
ATTR_REASON = "otel_npu.reason"

#: Bucket boundaries in ms: 10 µs to 10 s, six per decade (each boundary at most 5/3 of the one before), so a
#: p50/p99 read from the histogram is off by at most the width of one such bucket anywhere in the range.
BOUNDARIES_MS: tuple[float, ...] = tuple(
    round(m * 10.0 ** e, 6) for e in range(-2, 4) for m in (1, 1.5, 2, 3, 5, 7)) + (10000.0,)

#: Exemplars per data point per export interval at most (the slowest of the interval).
EXEMPLARS_PER_POINT = 4

#: Distinct (stage, step) series kept; further ones are folded into one ``otel.metric.overflow`` series, as the
#: SDK does at its cardinality limit. Bounds the aggregator's memory (≈ 0.6 KB per series, ≈ 0.6 MB in all).
MAX_SERIES = 1000
_OVERFLOW = ("\0overflow", None)

COUNTERS = {
    # name: (description, how to read it from a Stats snapshot)
    "otel_npu.captures.resolved": "captures whose device times were read (or that timed out)",
    "otel_npu.captures.timed_out": "captures whose device events did not complete within OTEL_NPU_EVENT_TIMEOUT_S",
    "otel_npu.captures.dropped": "captures not timed at all, by otel_npu.reason",
    "otel_npu.captures.spans_lost": "spans of resolved captures that did not reach the exporter's destination, "
                                    "by otel_npu.reason",
}
EXPORTERS = ("otlp", "console", "none")


def stage_key(r: Record) -> tuple[str, str | None]:
    """The histogram series of a resolved capture: (stage, enclosing step); a step is its own stage."""
    if r.is_step:
        return r.name, r.name
    step = r.step
    return r.name, None if step is None else step.name


class StageAggregator:
    """Explicit-bucket histograms per (stage, step), fed on the resolver thread, read by the export thread."""

    def __init__(self, const_attributes: Mapping[str, Any]) -> None:
        self._const = dict(const_attributes)
        self._series: dict[tuple, list] = {}
        self._width = len(BOUNDARIES_MS) + 1
        self.start_ns = time.time_ns()
        #: Exemplars of the current interval per series: [[value ms, time ns, trace id, span id], ...], at most
        #: EXEMPLARS_PER_POINT, the slowest offered (resolver thread writes; ``snapshot`` swaps the dict).
        self._exemplars: dict[tuple, list] = {}
        self.round_exemplars: dict[tuple, list] = {}

    def exemplar(self, r: Record, with_ids: bool = True) -> None:
        """Offer ``r`` (resolver thread) as an exemplar of its series: kept if it is among the slowest
        ``EXEMPLARS_PER_POINT`` of this interval. ``with_ids``: its span was exported (trace and span ids)."""
        if r.timed_out:
            return
        value = (r.end_ns - r.start_ns) / 1e6
        key = stage_key(r)
        held = self._exemplars.get(key)
        if held is None:
            if len(self._exemplars) >= MAX_SERIES:
                return
            held = self._exemplars[key] = []
        entry = [value, r.end_ns, r.trace_id if with_ids else None, r.span_id if with_ids else None]
        if len(held) < EXEMPLARS_PER_POINT:
            held.append(entry)
            return
        low = min(range(len(held)), key=lambda i: held[i][0])
        if value > held[low][0]:
            held[low] = entry

    def record(self, r: Record) -> None:
        """Add ``r``'s device-measured duration (resolver thread only)."""
        if r.timed_out:
            return
        key = stage_key(r)
        value = (r.end_ns - r.start_ns) / 1e6
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key)
        # [sum, min, max, interval min, interval max, bucket counts...]. No lock: this is the only writer, each
        # statement is atomic under the GIL, and readers take the count from the buckets, so a reader that
        # copies the list between two of these lines sees a valid point (the sum or min/max one sample late).
        series[5 + bisect.bisect_left(BOUNDARIES_MS, value)] += 1
        series[0] += value
        if value < series[1]:
            series[1] = value
        if value > series[2]:
            series[2] = value
        if value < series[3]:
            series[3] = value
        if value > series[4]:
            series[4] = value

    def _new_series(self, key: tuple) -> list:
        if len(self._series) >= MAX_SERIES:
            key = _OVERFLOW
            existing = self._series.get(key)
            if existing is not None:
                return existing
        inf = float("inf")
        series = [0.0, inf, -inf, inf, -inf] + [0] * self._width
        self._series[key] = series
        return series

    def attributes(self, key: tuple) -> dict[str, Any]:
        if key is _OVERFLOW or key == _OVERFLOW:
            return {"otel.metric.overflow": True}
        stage, step = key
        attrs = {ATTR_STAGE: stage}
        if step is not None:
            attrs[ATTR_STEP] = step
        attrs.update(self._const)
        return attrs

    def snapshot(self) -> list[tuple[tuple, int, list]]:
        """``[(key, count, [sum, min, max, interval min, interval max, buckets...]), ...]`` (copies; export
        thread). Starts a new interval for the interval min/max (delta temporality)."""
        inf = float("inf")
        out = []
        # The interval's exemplars, for every destination of this round (swapped: an offer racing with this
        # lands in one interval or the other).
        self.round_exemplars, self._exemplars = self._exemplars, {}
        for key, series in list(self._series.items()):  # list(): one C-level copy, safe against an insert
            copy = list(series)
            series[3], series[4] = inf, -inf
            out.append((key, sum(copy[5:]), copy))
        return out


def _exemplars(held: list | None) -> list:
    """SDK ``Exemplar`` objects of one data point, slowest first."""
    if not held:
        return []
    from opentelemetry.sdk.metrics import Exemplar

    return [Exemplar({}, value, time_ns, span_id, trace_id)
            for value, time_ns, trace_id, span_id in sorted(held, key=lambda e: -e[0])]


def _sdk_classes() -> Any:
    from opentelemetry.sdk.metrics.export import (AggregationTemporality, Histogram, HistogramDataPoint,
                                                  Metric, MetricsData, NumberDataPoint, ResourceMetrics,
                                                  ScopeMetrics, Sum)

    return AggregationTemporality, Histogram, HistogramDataPoint, Metric, MetricsData, NumberDataPoint, \
        ResourceMetrics, ScopeMetrics, Sum


def _wants_delta(exporter: Any) -> bool:
    """Whether ``exporter`` asked for delta temporality for histograms (``OTEL_EXPORTER_OTLP_METRICS_
    TEMPORALITY_PREFERENCE=delta``/``lowmemory``), read from the attribute every SDK MetricExporter sets."""
    from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    preferred = getattr(exporter, "_preferred_temporality", None) or {}
    return preferred.get(HistogramInstrument) is AggregationTemporality.DELTA


class MetricsBuilder:
    """Turns the aggregator and the ``Stats`` counters into SDK ``MetricsData`` (cumulative or delta)."""

    def __init__(self, aggregator: StageAggregator, stats: Any, resource: Any, scope: Any) -> None:
        self.aggregator = aggregator
        self._stats = stats
        self._resource = resource
        self._scope = scope
        self._last_hist: dict[tuple, list] = {}
        self._last_counts: dict[tuple, int] = {}
        self._last_time = aggregator.start_ns

    def build(self, delta: bool, snapshot: list | None = None) -> Any:
        """``snapshot``: the aggregator's ``snapshot()`` for this export round, shared by every destination of
        the round (taking one per destination would start a new min/max interval between them)."""
        (Temporality, Histogram, HistogramDataPoint, Metric, MetricsData, NumberDataPoint, ResourceMetrics,
         ScopeMetrics, Sum) = _sdk_classes()
        now = time.time_ns()
        start = self._last_time if delta else self.aggregator.start_ns
        temporality = Temporality.DELTA if delta else Temporality.CUMULATIVE
        points = []
        for key, count, series in self.aggregator.snapshot() if snapshot is None else snapshot:
            total = series[0]
            buckets = series[5:]
            low, high = (series[3], series[4]) if delta else (series[1], series[2])
            if delta:
                last = self._last_hist.get(key)
                self._last_hist[key] = (count, series)
                if last is not None:
                    count, total = count - last[0], total - last[1][0]
                    buckets = [a - b for a, b in zip(buckets, last[1][5:])]
                if not count:
                    continue
            elif not count:
                continue
            points.append(HistogramDataPoint(
                attributes=self.aggregator.attributes(key), start_time_unix_nano=start, time_unix_nano=now,
                count=count, sum=total, bucket_counts=tuple(buckets), explicit_bounds=BOUNDARIES_MS,
                min=low, max=high, exemplars=_exemplars(self.aggregator.round_exemplars.get(key))))
        metrics = []
        if points:
            metrics.append(Metric(name=STAGE_DURATION, unit="ms", data=Histogram(points, temporality),
                                  description="device-measured duration of each stage (capture) and step"))
        const = {ATTR_DEVICE: self.aggregator._const.get(ATTR_DEVICE)}
        if ATTR_RANK in self.aggregator._const:
            const[ATTR_RANK] = self.aggregator._const[ATTR_RANK]
        snap = self._stats.snapshot()
        drops = snap.get("dropped", {})
        values = {
            "otel_npu.captures.resolved": [((), snap.get("resolved", 0))],
            "otel_npu.captures.timed_out": [((), snap.get("timed_out", 0))],
            "otel_npu.captures.dropped": [((ATTR_REASON, r), drops.get(r, 0)) for r in CAPTURE_DROP_REASONS],
            "otel_npu.captures.spans_lost": [((ATTR_REASON, r), drops.get(r, 0)) for r in SPAN_LOSS_REASONS],
        }
        for name, entries in values.items():
            data_points = []
            for attr, value in entries:
                if delta:
                    last = self._last_counts.get((name, attr), 0)
                    self._last_counts[(name, attr)] = value
                    value -= last
                attrs = dict(const)
                if attr:
                    attrs[attr[0]] = attr[1]
                data_points.append(NumberDataPoint(attributes=attrs, start_time_unix_nano=start,
                                                   time_unix_nano=now, value=value))
            metrics.append(Metric(name=name, description=COUNTERS[name], unit="{capture}",
                                  data=Sum(data_points, temporality, is_monotonic=True)))
        self._last_time = now
        return MetricsData([ResourceMetrics(self._resource, [ScopeMetrics(self._scope, metrics, "")], "")])


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

    def __init__(self, aggregator: StageAggregator, stats: Any, destinations: list[_Destination],
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
        while True:
            with self._cond:
                if not self._stopping and self._requested <= self._completed:
                    self._cond.wait(self._interval)
                stopping = self._stopping
                target = self._requested
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
        from .redact import last_message, redact

        ok = True
        # One snapshot per round: it starts the next interval of the delta min/max, so every destination of
        # this round must see the same one (issue 11 item 17: a second exporter saw min=inf, max=-inf).
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

    def flush(self, timeout_s: float) -> bool:
        """Export now. Blocks up to ``timeout_s``; True when a round finished in time."""
        if not self._destinations:
            return True
        self.ensure_started()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._requested = self._completed + 1
            target = self._requested
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

    def __init__(self, provider: Any, aggregator: StageAggregator, stats: Any, version: str) -> None:
        from opentelemetry.metrics import Observation

        meter = provider.get_meter("otel_npu", version)
        self.aggregator = aggregator
        self.description = f"the application's MeterProvider ({type(provider).__name__}), SDK instruments"
        self._histogram = meter.create_histogram(
            STAGE_DURATION, unit="ms", description="device-measured duration of each stage (capture) and step",
            explicit_bucket_boundaries_advisory=list(BOUNDARIES_MS))
        self._attrs: dict[tuple, dict] = {}
        const = {ATTR_DEVICE: aggregator._const.get(ATTR_DEVICE)}
        if ATTR_RANK in aggregator._const:
            const[ATTR_RANK] = aggregator._const[ATTR_RANK]

        def observe(name: str, reasons: tuple[str, ...] | None) -> Callable:
            def callback(options: Any) -> list:
                snap = stats.snapshot()
                if reasons is None:
                    key = name.rsplit(".", 1)[1]
                    return [Observation(snap.get(key, 0), const)]
                drops = snap.get("dropped", {})
                return [Observation(drops.get(r, 0), {**const, ATTR_REASON: r}) for r in reasons]
            return callback

        for name, reasons in (("otel_npu.captures.resolved", None), ("otel_npu.captures.timed_out", None),
                              ("otel_npu.captures.dropped", CAPTURE_DROP_REASONS),
                              ("otel_npu.captures.spans_lost", SPAN_LOSS_REASONS)):
            meter.create_observable_counter(name, callbacks=[observe(name, reasons)], unit="{capture}",
                                            description=COUNTERS[name])

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
    return keep_known("OTEL_METRICS_EXPORTER", otel.metrics_exporters, EXPORTERS,
                      who="otel-npu's own metrics do not support",
                      hint=" (for a pull exporter such as prometheus, install an SDK MeterProvider with that "
                           "reader: otel-npu then records into it)")


def own_exporter(name: str, protocol: str, otel: OtelSettings) -> tuple[Any, str]:
    """An SDK metric exporter for ``name`` (``otlp``/``console``) configured from the environment."""
    import sys

    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter(out=sys.stdout), "console"
    from .sinks import http_session, otlp_exporter_kwargs

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    if protocol == "grpc":
        exporter = OTLPMetricExporter(**otlp_exporter_kwargs(otel, "METRICS", protocol))
    else:
        exporter = OTLPMetricExporter(session=http_session(otel, "METRICS"),
                                      **otlp_exporter_kwargs(otel, "METRICS", protocol))
    return exporter, f"otlp {protocol} -> {getattr(exporter, '_endpoint', '?')}"


def app_meter_provider(settings: Any) -> Any | None:
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


def build(settings: Any, otel: OtelSettings, *, const_attributes: Mapping[str, Any], resource: Any,
          scope: Any, stats: Any) -> Any | None:
    """The metrics part of a pipeline (``MetricsExport`` or ``SdkInstruments``), or ``None`` (no metrics)."""
    attrs = {ATTR_DEVICE: const_attributes.get(ATTR_DEVICE, "?")}
    if ATTR_RANK in const_attributes:
        attrs[ATTR_RANK] = const_attributes[ATTR_RANK]
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
            exporter, text = own_exporter(name, protocol, otel)
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
