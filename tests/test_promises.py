"""Promises of the docs that no other test proved: the loss warning's rate, the event pool's cap, the stage
histogram's series cap, the application's resource on otel-npu's spans, and the events of a timed-out capture
never reused. docs/promises.md maps each promise to the test that proves it."""

from __future__ import annotations

import threading
import time
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_npu
from otel_npu import runtime

from .otlp_receiver import attributes
from .support import ResolverPasses, enable


def wait_until(condition: Any, what: str, timeout_s: float = 20.0) -> None:
    """Poll ``condition`` until true; a deadline for a background thread's work, not a measurement."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.005)


def losses(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "otel-npu lost data" in r.getMessage()]


def test_the_loss_warning_comes_at_most_every_60_s(sim, provider, caplog_otel, monkeypatch):
    """docs/failure-behaviour.md: "reported by one warning at most every 60 s". The resolver's report clock is
    the test's: the warning at t, none for new losses at t + 59.9 s however many passes run, one at t + 60 s."""
    from otel_npu.resolve import resolver

    now, reads = [1000.0], [0]

    def clock() -> float:
        reads[0] += 1
        return now[0]

    monkeypatch.setattr(resolver, "_monotonic", clock)
    stream = sim.current_stream()
    gate = threading.Event()
    stream.call(lambda: gate.wait(60))  # the captures below wait behind this: the pending limit stays full
    enable(provider, device=sim, max_pending=2, poll_interval_s=0.002)

    def lose(n: int) -> None:
        for _ in range(n):
            with otel_npu.capture("lost"):
                pass

    try:
        lose(2 + 3)  # 2 wait for their events, 3 are dropped (pending_limit)
        wait_until(lambda: len(losses(caplog_otel)) == 1, "the first warning")
        assert "3 captures (pending_limit)" in losses(caplog_otel)[0]
        lose(4)
        now[0] = 1059.9
        seen = reads[0]
        wait_until(lambda: reads[0] >= seen + 20, "20 resolver passes")
        assert len(losses(caplog_otel)) == 1, "a second warning within 60 s"
        now[0] = 1060.0
        wait_until(lambda: len(losses(caplog_otel)) == 2, "the warning 60 s after the first")
        assert "4 captures (pending_limit)" in losses(caplog_otel)[1], "says how many since the last one"
    finally:
        gate.set()


def test_the_event_pool_grows_to_the_burst_and_stops_at_twice_the_pending_limit_plus_1024(sim, provider):
    """docs/failure-behaviour.md: the pool "grows to the largest burst seen, at most 2 × OTEL_NPU_MAX_PENDING
    + 1024 events, and does not shrink". A burst of 3000 captures held on the device, with a limit of 600."""
    limit = 600
    stream = sim.current_stream()
    enable(provider, device=sim, max_pending=limit, poll_interval_s=0.002)
    with otel_npu.capture("start"):
        pass
    assert otel_npu.flush(10.0)
    rt = runtime.current()
    gate = threading.Event()
    stream.call(lambda: gate.wait(60))
    try:
        for _ in range(3000):
            with otel_npu.capture("burst"):
                pass
        # The resolver tops the pool up while the burst waits: until it stopped growing at the cap.
        wait_until(lambda: rt.pool.created >= 2 * limit, "the pool to grow to the burst")
        ResolverPasses(rt.resolver).wait_for_more(20)  # passes keep running: growth past the cap would show
    finally:
        gate.set()
    assert otel_npu.flush(30.0)
    created = sum(sim.events_created.values())
    assert 2 * limit <= rt.pool.created == created <= 2 * limit + 1024, created
    # Every event back in the pool once read, none freed: it does not shrink (but for the clock's anchor events).
    assert created - len(rt.pool) <= 8, (created, len(rt.pool))
    stats = otel_npu.stats()
    assert stats["dropped"].get("pending_limit", 0) > 0, "the burst went past the limit"
    assert stats["resolved"] + stats["dropped_total"] == 1 + 3000, stats


def test_the_stage_histogram_keeps_at_most_1000_series(monkeypatch, receiver):
    """docs/failure-behaviour.md: "the stage histogram ≤ 1000 series"; further stages are folded into the
    overflow series (as the SDK does at its cardinality limit), and every capture is still counted."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    for i in range(1100):
        with otel_npu.capture(f"stage{i}"):
            pass
    assert otel_npu.flush(30.0)
    assert otel_npu.stats()["dropped_total"] == 0
    histogram = receiver.wait_for_metric("otel_npu.stage.duration",
                                         lambda m: sum(p.count for p in m.histogram.data_points) == 1100)
    assert histogram is not None, "every one of the 1100 captures is counted"
    points = [attributes(p.attributes) for p in histogram.histogram.data_points]
    overflow = [p for p in points if p.get("otel.metric.overflow") is True]
    assert len(points) == 1000 + 1 and len(overflow) == 1, len(points)
    assert len({p["otel_npu.stage"] for p in points if "otel_npu.stage" in p}) == 1000


def test_spans_carry_the_applications_resource(provider):
    """docs/how-it-works.md: with the application's TracerProvider, spans go through it — "its sampler, id
    generator, resource and processors"."""
    exporter = InMemorySpanExporter()
    app = TracerProvider(resource=Resource.create({"service.name": "the-app", "deployment.environment": "test"}))
    app.add_span_processor(SimpleSpanProcessor(exporter))
    enable((app, None), device="cpu")
    with otel_npu.step("Decode"), otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(5.0)
    got = exporter.get_finished_spans()
    assert sorted(s.name for s in got) == ["Decode", "forward"]
    for span in got:
        assert span.resource.attributes["service.name"] == "the-app"
        assert span.resource.attributes["deployment.environment"] == "test"


def test_the_events_of_a_timed_out_capture_are_abandoned_not_reused(sim, provider, spans):
    """docs/failure-behaviour.md: a capture whose device events never complete becomes an ERROR span after
    OTEL_NPU_EVENT_TIMEOUT_S; "its events are abandoned, not reused" (they may still complete later)."""
    enable(provider, device=sim, event_timeout_s=0.2, poll_interval_s=0.002)
    stuck = sim.new_stream("stuck")
    gate = threading.Event()
    stuck.call(lambda: gate.wait(60))
    try:
        with sim.stream(stuck), otel_npu.capture("hung") as hung:
            pass
        abandoned = (hung.start, hung.end)
        assert otel_npu.flush(10.0)
        assert spans.one("hung").attributes["otel_npu.timed_out"] is True
        pool = runtime.current().pool
        used = []
        for _ in range(3 * (len(pool) + 16)):  # enough to go through every free event several times
            with otel_npu.capture("later") as c:
                pass
            used += [c.start, c.end]
            if len(used) % 256 == 0:
                assert otel_npu.flush(10.0)
        assert otel_npu.flush(10.0)
        assert not any(e is a for e in used for a in abandoned), "an abandoned event was used again"
        assert not any(e is a for e in list(pool._free) for a in abandoned), "an abandoned event is in the pool"
    finally:
        gate.set()
