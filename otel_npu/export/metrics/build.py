"""``MetricsBuilder``: the aggregate and the drop counters as SDK ``MetricsData`` (public SDK classes),
cumulative or delta, for the SDK's metric exporters to put on the wire."""

from __future__ import annotations

import time
from typing import Any

from ...accounting import CAPTURE_DROP_REASONS, SPAN_LOSS_REASONS, Stats
from ...spans.attributes import ATTR_DEVICE, ATTR_RANK, ATTR_REASON
from .aggregate import BOUNDARIES_MS, StageAggregator

STAGE_DURATION = "otel_npu.stage.duration"
STAGE_DURATION_DESCRIPTION = "device-measured duration of each stage (capture) and step"
#: The counters beside the histogram, for both ways of exporting them (ready data here, SDK instruments in
#: ``exporter.py``): name -> (description, what it reads from a ``Stats.snapshot()``: a counter's name, or
#: the drop reasons it is split into, one data point per ``otel_npu.reason``).
COUNTERS: dict[str, tuple[str, str | tuple[str, ...]]] = {
    "otel_npu.captures.resolved": ("captures whose device times were read (or that timed out)", "resolved"),
    "otel_npu.captures.timed_out": (("captures whose device events did not complete within "
                                     "OTEL_NPU_EVENT_TIMEOUT_S"), "timed_out"),
    "otel_npu.captures.dropped": ("captures not timed at all, by otel_npu.reason", CAPTURE_DROP_REASONS),
    "otel_npu.captures.spans_lost": (("spans of resolved captures that did not reach the exporter's "
                                      "destination, by otel_npu.reason"), SPAN_LOSS_REASONS),
}


def counter_values(source: str | tuple[str, ...], snapshot: dict[str, Any]) -> list[tuple[tuple, int]]:
    """One counter's data points in ``snapshot`` (``Stats.snapshot()``): ``(attribute, value)`` pairs, the
    attribute ``()`` or ``(ATTR_REASON, reason)`` (``source``: see ``COUNTERS``)."""
    if isinstance(source, str):
        return [((), snapshot.get(source, 0))]
    drops = snapshot.get("dropped", {})
    return [((ATTR_REASON, reason), drops.get(reason, 0)) for reason in source]
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

    def __init__(self, aggregator: StageAggregator, stats: Stats, resource: Any, scope: Any) -> None:
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
                                  description=STAGE_DURATION_DESCRIPTION))
        const = {ATTR_DEVICE: self.aggregator._const.get(ATTR_DEVICE)}
        if ATTR_RANK in self.aggregator._const:
            const[ATTR_RANK] = self.aggregator._const[ATTR_RANK]
        snap = self._stats.snapshot()
        for name, (description, source) in COUNTERS.items():
            data_points = []
            for attr, value in counter_values(source, snap):
                if delta:
                    last = self._last_counts.get((name, attr), 0)
                    self._last_counts[(name, attr)] = value
                    value -= last
                attrs = dict(const)
                if attr:
                    attrs[attr[0]] = attr[1]
                data_points.append(NumberDataPoint(attributes=attrs, start_time_unix_nano=start,
                                                   time_unix_nano=now, value=value))
            metrics.append(Metric(name=name, description=description, unit="{capture}",
                                  data=Sum(data_points, temporality, is_monotonic=True)))
        self._last_time = now
        return MetricsData([ResourceMetrics(self._resource, [ScopeMetrics(self._scope, metrics, "")], "")])
