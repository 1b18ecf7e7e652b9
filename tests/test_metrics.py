"""Stage metrics: every resolved capture in the histogram (sampled or not), the counters, and where they go."""

from __future__ import annotations

import bisect
import threading
import time

import pytest
from opentelemetry import metrics as metrics_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

import otel_npu
from otel_npu import runtime
from otel_npu.export.metrics.aggregate import BOUNDARIES_MS

from .otlp_receiver import attributes
from .support import TIME_BOUND_NS, ListMetricExporter, truth


def own_metrics_env(monkeypatch, receiver, **extra):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    for key, value in extra.items():
        monkeypatch.setenv(key, value)


def points(metric) -> dict:
    return {tuple(sorted(attributes(p.attributes).items())): p for p in metric.histogram.data_points}


def test_buckets_resolve_10_us_to_10_s():
    assert BOUNDARIES_MS[0] == 0.01 and BOUNDARIES_MS[-1] == 10000.0
    ratios = [b / a for a, b in zip(BOUNDARIES_MS, BOUNDARIES_MS[1:])]
    assert max(ratios) <= 5 / 3 + 1e-9 and min(ratios) > 1.0  # 1, 1.5, 2, 3, 5, 7 per decade


def test_every_capture_is_in_the_histogram_even_when_its_span_is_not_sampled(monkeypatch, receiver, sim):
    own_metrics_env(monkeypatch, receiver, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0.01",
                    OTEL_TRACES_EXPORTER="otlp")
    otel_npu.configure(enabled=True, device=sim, pipeline="own")
    stream = sim.current_stream()
    durations = []
    for _ in range(50):
        with otel_npu.step("Decode"):
            with otel_npu.capture("forward") as c:
                stream.launch(0.00025)  # mid-bucket: (0.2, 0.3] ms
        start, end = truth(c)
        durations.append((end - start) / 1e6)
    assert otel_npu.flush(10.0)
    stats = otel_npu.stats()
    assert stats["spans_unsampled"] >= 80, "about 99 % of the step trees are not sampled"
    histogram = receiver.wait_for_metric("otel_npu.stage.duration")
    by = points(histogram)
    forward = by[(("otel_npu.device", "sim:0"), ("otel_npu.stage", "forward"), ("otel_npu.step", "Decode"))]
    step = by[(("otel_npu.device", "sim:0"), ("otel_npu.stage", "Decode"), ("otel_npu.step", "Decode"))]
    assert forward.count == 50 and step.count == 50
    assert sum(forward.bucket_counts) == 50 and len(forward.bucket_counts) == len(BOUNDARIES_MS) + 1
    # Device-measured: what the simulated device really took (a kernel, plus any gap while the host was late).
    bound_ms = TIME_BOUND_NS / 1e6
    assert forward.min == pytest.approx(min(durations), abs=bound_ms)
    assert forward.max == pytest.approx(max(durations), abs=bound_ms)
    assert forward.sum == pytest.approx(sum(durations), abs=50 * bound_ms)
    expected = [0] * (len(BOUNDARIES_MS) + 1)
    for d in durations:
        expected[bisect.bisect_left(BOUNDARIES_MS, d)] += 1
    moved = sum(abs(a - b) for a, b in zip(forward.bucket_counts, expected)) // 2
    assert moved <= 2, "only a duration within the clock bound of a boundary may land one bucket over"


def test_counters_count_resolved_timed_out_and_dropped(monkeypatch, receiver, sim):
    own_metrics_env(monkeypatch, receiver)
    otel_npu.configure(enabled=True, device=sim, pipeline="own", event_timeout_s=0.2)
    stuck = sim.new_stream("stuck")
    gate = threading.Event()
    with sim.stream(stuck), otel_npu.capture("hung"):
        stuck.call(lambda: gate.wait(30))  # until the test is done with it: a stalled machine cannot let it finish
    with otel_npu.capture("forward"):
        sim.current_stream().launch(0.0001)
    try:
        assert otel_npu.flush(10.0)
    finally:
        gate.set()
    resolved = receiver.wait_for_metric("otel_npu.captures.resolved")
    timed_out = receiver.wait_for_metric("otel_npu.captures.timed_out")
    assert resolved.sum.data_points[0].as_int == 2 and timed_out.sum.data_points[0].as_int == 1
    histogram = receiver.wait_for_metric("otel_npu.stage.duration")
    stages = {attributes(p.attributes)["otel_npu.stage"]: p.count for p in histogram.histogram.data_points}
    assert stages == {"forward": 1}, "a timed-out capture has host times only: counted, not in the histogram"


def test_pending_limit_drops_are_counted_by_reason(monkeypatch, receiver, sim):
    own_metrics_env(monkeypatch, receiver)
    otel_npu.configure(enabled=True, device=sim, pipeline="own", max_pending=5, poll_interval_s=30.0)
    for _ in range(12):
        with otel_npu.capture("forward"):
            pass
    assert otel_npu.flush(10.0)
    dropped = receiver.wait_for_metric("otel_npu.captures.dropped")
    by_reason = {attributes(p.attributes)["otel_npu.reason"]: p.as_int for p in dropped.sum.data_points}
    resolved = receiver.wait_for_metric("otel_npu.captures.resolved").sum.data_points[0].as_int
    # The test's own numbers: 12 captures entered while the resolver (polling every 30 s) took in none, so at most
    # 5 waited; each of the others is a pending_limit drop, and every one is either resolved or dropped.
    assert resolved + by_reason["pending_limit"] == 12, (resolved, by_reason)
    assert 12 - 5 <= by_reason["pending_limit"] < 12, by_reason
    lost = receiver.wait_for_metric("otel_npu.captures.spans_lost")
    assert {attributes(p.attributes)["otel_npu.reason"] for p in lost.sum.data_points} == \
        {"export_failed", "export_queue_full", "emit_failed"}


def test_delta_temporality_when_the_exporter_asks_for_it(monkeypatch, receiver, sim):
    own_metrics_env(monkeypatch, receiver, OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta")
    otel_npu.configure(enabled=True, device=sim, pipeline="own")
    for expected in (3, 2):
        for _ in range(expected):
            with otel_npu.capture("forward"):
                sim.current_stream().launch(0.0001)
        assert otel_npu.flush(10.0)
        histogram = receiver.wait_for_metric("otel_npu.stage.duration",
                                             lambda m, n=expected: m.histogram.data_points[0].count == n)
        assert histogram is not None, f"a delta point of {expected}"
        assert histogram.histogram.aggregation_temporality == 1  # AGGREGATION_TEMPORALITY_DELTA


@pytest.fixture
def app_meter_provider(monkeypatch):
    """Install an SDK MeterProvider as the global one for one test (the API allows setting it only once)."""
    installed = {}

    def install(reader):
        provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "app"}))
        monkeypatch.setattr(metrics_api._internal, "_METER_PROVIDER", provider)
        installed["provider"] = provider
        return provider

    yield install
    otel_npu.shutdown(5.0)
    if "provider" in installed:
        installed["provider"].shutdown()


def test_the_applications_meter_provider_exports_through_its_own_exporter(app_meter_provider, provider, sim):
    exporter = ListMetricExporter()
    app_meter_provider(PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000))
    otel_npu.configure(enabled=True, device=sim, tracer_provider=provider[0])
    with otel_npu.capture("forward"):
        sim.current_stream().launch(0.0005)
    assert otel_npu.flush(10.0)
    assert "the application's MeterProvider" in otel_npu.stats()["metrics"]
    ours = [(rm.resource, m) for batch in exporter.batches for rm in batch.resource_metrics
            for sm in rm.scope_metrics if sm.scope.name == "otel_npu" for m in sm.metrics]
    # A round may also go out when the process goes idle (the resolver says so), before flush()'s own: the
    # histogram is cumulative, so the last round holds the capture once whichever ran.
    rounds = [(r, m) for r, m in ours if m.name == "otel_npu.stage.duration"]
    assert 1 <= len(rounds) <= 2, rounds
    resource, histogram = rounds[-1]
    assert resource.attributes["service.name"] == "app", "the application's resource"
    (point,) = histogram.data.data_points
    assert point.count == 1 and dict(point.attributes)["otel_npu.stage"] == "forward"


def test_a_pull_reader_gets_real_sdk_instruments(app_meter_provider, provider, sim):
    reader = InMemoryMetricReader()
    app_meter_provider(reader)
    otel_npu.configure(enabled=True, device=sim, tracer_provider=provider[0])
    for _ in range(4):
        with otel_npu.capture("forward"):
            sim.current_stream().launch(0.0005)
    assert otel_npu.flush(10.0)
    data = reader.get_metrics_data()
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    (point,) = metrics["otel_npu.stage.duration"].data.data_points
    assert point.count == 4 and tuple(point.explicit_bounds) == BOUNDARIES_MS
    assert metrics["otel_npu.captures.resolved"].data.data_points[0].value == 4
    # the drop counters: one point per reason, none dropped here
    dropped = {dict(p.attributes)["otel_npu.reason"]: p.value
               for p in metrics["otel_npu.captures.dropped"].data.data_points}
    assert dropped["pending_limit"] == 0 and dropped["event_pool_empty"] == 0 and set(dropped.values()) == {0}
    assert "export_failed" in {dict(p.attributes)["otel_npu.reason"]
                               for p in metrics["otel_npu.captures.spans_lost"].data.data_points}
    assert "SDK instruments" in otel_npu.stats()["metrics"]


def test_min_and_max_are_right_for_every_exporter_of_a_round(monkeypatch, receiver, sim, capfd):
    # With two exporters (console first, then OTLP asking for delta), building the console's
    # data started a new interval, and OTLP saw min=inf, max=-inf.
    own_metrics_env(monkeypatch, receiver, OTEL_METRICS_EXPORTER="console,otlp",
                    OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta")
    otel_npu.configure(enabled=True, device=sim, pipeline="own")
    durations = []
    for seconds in (0.0001, 0.0003, 0.0002):
        with otel_npu.capture("forward") as c:
            sim.current_stream().launch(seconds)
        start, end = truth(c)
        durations.append((end - start) / 1e6)
    assert otel_npu.flush(10.0)
    histogram = receiver.wait_for_metric("otel_npu.stage.duration",
                                         lambda m: m.histogram.data_points[0].count == 3)
    assert histogram is not None
    otel_npu.shutdown(5.0)  # while the console exporter's stdout is still captured
    point = histogram.histogram.data_points[0]
    # device-read durations: within 1 µs of the simulator's truth
    assert point.min == pytest.approx(min(durations), abs=1e-3) and point.max == pytest.approx(max(durations), abs=1e-3)
    printed = capfd.readouterr().out
    assert '"min": 0.' in printed and "inf" not in printed, printed[-2000:]


class GatedMetricExporter(ListMetricExporter):
    """Its first export waits until the test opens the gate (``entered`` says it began)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
        self.entered.set()
        self.gate.wait(30)
        return super().export(metrics_data, timeout_millis, **kwargs)


def forward_count(batch) -> int:
    return sum(p.count for rm in batch.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
               if m.name == "otel_npu.stage.duration" for p in m.data.data_points
               if p.attributes.get("otel_npu.stage") == "forward")


def test_flush_exports_what_was_recorded_before_it_even_with_a_round_in_flight(monkeypatch):
    """A metrics round already exporting when flush() is called took its snapshot before: flush must wait for
    a round that starts after it (seen: it returned with the older round, and the last capture's metrics
    were not exported until the next interval)."""
    from otel_npu.export import registry

    exporter = GatedMetricExporter()
    monkeypatch.setitem(registry.METRIC_EXPORTERS, "gated", lambda otel, protocol: (exporter, "gated"))
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "gated")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    first = threading.Thread(target=otel_npu.flush, args=(30.0,))
    first.start()
    try:
        assert exporter.entered.wait(30), "the first round began"  # its snapshot holds one capture
        with otel_npu.capture("forward"):
            pass
        done: list[bool] = []
        second = threading.Thread(target=lambda: done.append(otel_npu.flush(30.0)))
        second.start()
        # Open the gate only once both flushes wait for a round (the condition's waiters: CPython's), so
        # that the second one was asked for while the first round was still exporting.
        cond = runtime.current().pipeline.metrics._cond
        deadline = time.monotonic() + 30
        while len(cond._waiters) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(cond._waiters) >= 2, "both flushes wait for the metrics export"
    finally:
        exporter.gate.set()
    first.join(30)
    second.join(30)
    assert done == [True]
    assert [forward_count(b) for b in exporter.batches][-1] == 2, [forward_count(b) for b in exporter.batches]
