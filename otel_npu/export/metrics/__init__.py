"""Stage metrics: a duration histogram per stage and counters of what happened to captures.

* ``aggregate.py``: ``StageAggregator``, the per-(stage, step) histograms fed on the resolver thread;
* ``build.py``: ``MetricsBuilder``, the aggregate and the drop counters as SDK ``MetricsData``;
* ``exporter.py``: where they go (``build``), the export thread (``MetricsExport``) and the fallback for a
  MeterProvider that cannot take ready data (``SdkInstruments``).

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
on 2 CPU cores (SDK 1.45, three attributes; ``benchmarks/``): ``Histogram.record`` costs
10-22 µs per call (attribute cleaning, hashing, exemplar filter), more than everything else otel-npu does per
capture (target: ≤ 10 µs across all threads), and all of it under the GIL the serving loop needs.
``StageAggregator.record`` (a dict lookup, a ``bisect`` over 37 boundaries, a few list updates, no lock)
costs ≈ 0.7 µs. The aggregate is handed to the SDK as ready ``MetricsData`` (public SDK
classes) once per export interval, so the SDK's exporters (OTLP gRPC/HTTP, console) do the wire work.

Where the metrics go (``exporter.build()``):

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

