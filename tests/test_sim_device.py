"""The core claims, proved on the simulated asynchronous device (work really runs later, on other threads)."""

from __future__ import annotations

import itertools
import threading
import time

from opentelemetry.trace import StatusCode

import otel_npu
from otel_npu import runtime
from otel_npu.spans.attributes import ATTR_CLOCK_ERROR, ATTR_DEVICE, ATTR_HOST_LEAD, ATTR_STREAM, ATTR_TIMED_OUT
from otel_npu.testing import SimDevice

from .support import TIME_BOUND_NS, ResolverPasses, enable, truth, wall_of


def assert_device_times(span, t: tuple[int, int]) -> None:
    """The span's start/end are the device's, within the span's own stated bound and within TIME_BOUND_NS."""
    error = max(abs(span.start_time - t[0]), abs(span.end_time - t[1]))
    assert error <= span.attributes[ATTR_CLOCK_ERROR] * 1000, (span.name, error, span.attributes[ATTR_CLOCK_ERROR])
    assert error <= TIME_BOUND_NS, (span.name, error)


def test_capturing_thread_never_waits_for_the_device(provider, spans, sim):
    enable(provider, device=sim)
    # otel-npu starts at the first capture (its event pool, the first anchor): not what this test times
    # (under CI-like load it took 166 ms, seen; the timed capture itself is microseconds)
    with otel_npu.capture("warm-up"):
        pass
    assert otel_npu.flush(5.0)
    stream = sim.current_stream()
    gate = threading.Event()
    with otel_npu.capture("forward") as c:
        stream.call(lambda: gate.wait(30))  # the device cannot finish before the test lets it
        stream.launch(0.3)  # then 300 ms of device work
    # No clock: a capture that waited for its device work would have come back only after the gate's 30 s.
    assert not stream.query(), "the capture returned only once its device work was done"
    gate.set()
    stream.synchronize()
    expected = truth(c)  # the events' execution times, known once they ran
    assert otel_npu.flush(5.0)
    span = spans.one("forward")
    assert_device_times(span, expected)
    assert span.end_time - span.start_time >= 0.3e9  # device time, not the host's few microseconds
    # The host entered the capture long before the device got to it only if work was queued ahead; here
    # the stream was idle, so the device started within the launch latency of the host's entry.
    assert 0 <= span.attributes[ATTR_HOST_LEAD] * 1000 <= TIME_BOUND_NS
    assert abs(span.start_time - span.attributes[ATTR_HOST_LEAD] * 1000 - wall_of(c.host_start)) <= 2_000
    # No timing read on the capturing thread, none on an unfinished event.
    assert sim.timing_reads(on_thread=threading.get_ident()) == []
    assert sim.timing_reads(incomplete=True) == []


def test_span_times_equal_device_times_and_the_stated_error_bound_holds(provider, spans, sim):
    enable(provider, device=sim)
    stream = sim.current_stream()
    expected = {}
    for i in range(20):
        stream.launch(0.002)  # work queued ahead: the device lags the host
        with otel_npu.capture(f"stage{i}") as c:
            stream.launch(0.001 + 0.0005 * (i % 3))
        expected[f"stage{i}"] = truth(c)
    assert otel_npu.flush(5.0)
    for name, t in expected.items():
        assert_device_times(spans.one(name), t)
    lead = [spans.one(n).attributes[ATTR_HOST_LEAD] for n in expected]
    assert max(lead) > 1_000, "queued work should show as the host running ahead of the device (µs)"


def test_nesting_and_step_cover_their_captures(provider, spans, sim):
    enable(provider, device=sim)
    stream = sim.current_stream()
    with otel_npu.step("Decode") as s:
        with otel_npu.capture("prepare input and forward"):
            stream.launch(0.002)
            with otel_npu.capture("forward"):
                stream.launch(0.004)
        with otel_npu.capture("post process"):
            stream.launch(0.001)
    step_truth = truth(s)
    assert otel_npu.flush(5.0)
    step = spans.one("Decode")
    outer = spans.one("prepare input and forward")
    inner = spans.one("forward")
    post = spans.one("post process")
    assert step.parent is None
    assert outer.parent.span_id == step.context.span_id and post.parent.span_id == step.context.span_id
    assert inner.parent.span_id == outer.context.span_id
    assert {s.context.trace_id for s in spans.all} == {step.context.trace_id}
    slack = 1000  # events recorded back to back run at the same device time; rounding may differ by ns
    assert outer.start_time - slack <= inner.start_time <= inner.end_time <= outer.end_time + slack
    assert step.start_time - slack <= outer.start_time and post.end_time <= step.end_time + slack
    assert_device_times(step, step_truth)
    assert inner.attributes["otel_npu.step"] == "Decode"
    assert inner.attributes[ATTR_DEVICE] == "sim:0"


def test_two_streams_completing_out_of_order(provider, spans, sim):
    enable(provider, device=sim)
    slow, fast = sim.new_stream("slow"), sim.new_stream("fast")
    with sim.stream(slow), otel_npu.capture("slow") as a:
        slow.launch(0.3)
    with sim.stream(fast), otel_npu.capture("fast") as b:
        fast.launch(0.01)
    ta, tb = truth(a), truth(b)
    assert otel_npu.flush(5.0)
    order = [s.name for s in spans.all]
    assert order == ["fast", "slow"], "the fast stream's capture must not wait behind the slow one"
    assert_device_times(spans.one("slow"), ta)
    assert_device_times(spans.one("fast"), tb)
    assert spans.one("slow").attributes[ATTR_STREAM] != spans.one("fast").attributes[ATTR_STREAM]


def test_explicit_stream_argument(provider, spans, sim):
    enable(provider, device=sim)
    side = sim.new_stream("side")
    with otel_npu.capture("copy", stream=side) as c:
        side.launch(0.02)
    assert c.stream is side
    assert otel_npu.flush(5.0)
    assert spans.one("copy").end_time - spans.one("copy").start_time >= 0.02e9 - TIME_BOUND_NS


def test_event_timeout_gives_an_error_span_and_does_not_hold_the_rest(provider, spans, sim):
    enable(provider, device=sim, event_timeout_s=0.2)
    stuck = sim.new_stream("stuck")
    with sim.stream(stuck), otel_npu.capture("hung kernel"):
        stuck.launch(30.0)  # never finishes within the test
    with otel_npu.capture("fine"):
        sim.current_stream().launch(0.001)
    assert otel_npu.flush(5.0)
    hung = spans.one("hung kernel")
    assert hung.status.status_code is StatusCode.ERROR
    assert "did not complete within 0.2 s" in hung.status.description
    assert hung.attributes[ATTR_TIMED_OUT] is True
    assert spans.one("fine").status.status_code is StatusCode.UNSET
    assert otel_npu.stats()["timed_out"] == 1


def test_drops_at_the_pending_limit_are_counted_and_reported(provider, spans, sim, caplog_otel):
    enable(provider, device=sim, max_pending=10, poll_interval_s=30.0)
    t0 = time.perf_counter()
    for _ in range(50):
        with otel_npu.capture("c"):
            pass
    # A drop that waited for the resolver (polling every 30 s here) would take that long: a bound of a few
    # seconds catches it and leaves a loaded machine room.
    assert time.perf_counter() - t0 < 5.0, "dropping must never block the capturing thread"
    assert otel_npu.flush(5.0)
    assert len(spans.named("c")) == 10
    assert otel_npu.stats()["dropped"] == {"pending_limit": 40}
    warnings = [r.getMessage() for r in caplog_otel.records if "lost" in r.getMessage()]
    assert len(warnings) == 1
    assert "40 captures (pending_limit)" in warnings[0] and "OTEL_NPU_MAX_PENDING" in warnings[0]


def test_an_empty_event_pool_drops_and_counts_never_allocates_and_is_refilled(provider, spans, sim):
    enable(provider, device=sim, poll_interval_s=30.0)
    with otel_npu.capture("first"):
        pass
    from otel_npu import runtime

    rt = runtime.current()
    me = threading.get_ident()
    at_start = sim.events_created[me]  # the first capture started otel-npu here: it made the initial pool
    taken = [rt.pool.take() for _ in range(len(rt.pool))]  # as if a burst had used every free event
    for _ in range(5):
        with otel_npu.capture("starved"):
            pass
    assert sim.events_created[me] == at_start, "the hot path must never create device events"
    assert otel_npu.stats()["dropped"]["event_pool_empty"] == 5
    # The first drop woke the resolver (it polls every 30 s here): the pool is refilled on its thread.
    deadline = time.monotonic() + 5.0
    while len(rt.pool) < 64 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(rt.pool) >= 64
    with otel_npu.capture("after refill"):
        pass
    assert otel_npu.flush(5.0)
    assert spans.named("starved") == [] and len(spans.named("after refill")) == 1
    assert sim.events_created[me] == at_start
    del taken


def test_bursty_steps_with_short_idle_gaps_do_not_run_the_event_pool_dry(provider, spans, sim):
    """A serving loop with short pauses between bursts (requests arriving, a scheduler's gap): a resolver pass
    that finds nothing in flight must not switch to the 1 s idle poll while captures keep coming, or the
    1024 pooled events run out within the second (seen: ≈ 90 event_pool_empty drops at each such pass, with a
    2 ms decode-like loop and poll_interval_s=0.02)."""
    enable(provider, device=sim, poll_interval_s=0.02)
    with otel_npu.capture("warm-up"):
        pass
    assert otel_npu.flush(5.0)
    stream = sim.current_stream()
    passes = ResolverPasses(runtime.current().resolver)
    steps = 0
    t_end = time.monotonic() + 1.6
    while time.monotonic() < t_end:
        for _ in range(20):  # a burst: 20 steps of a step + 4 stages (200 events)
            with otel_npu.step("Decode"):
                for stage in ("prepare input", "forward", "post process", "sample"):
                    with otel_npu.capture(stage):
                        stream.launch(0.0001)
            steps += 1
        time.sleep(0.06)  # idle long enough for a pass to find nothing in flight ...
        passes.wait_for_more(2)  # ... and the resolver did pass meanwhile
    assert otel_npu.flush(10.0)
    assert otel_npu.stats()["dropped"].get("event_pool_empty", 0) == 0, otel_npu.stats()["dropped"]
    assert len(spans.named("Decode")) == steps


def test_children_of_a_dropped_capture_attach_to_its_parent(provider, spans, sim):
    enable(provider, device=sim, poll_interval_s=30.0)
    from otel_npu import runtime

    with otel_npu.capture("warm-up"):
        pass
    rt = runtime.current()
    with otel_npu.step("Decode"):
        taken = [rt.pool.take() for _ in range(len(rt.pool))]  # starve the pool for the next capture
        with otel_npu.capture("untimed"):
            for event in taken[:4]:
                rt.pool.give(event)
            with otel_npu.capture("timed child"):
                pass
    assert otel_npu.flush(5.0)
    assert spans.named("untimed") == []
    assert spans.one("timed child").parent.span_id == spans.one("Decode").context.span_id
    assert otel_npu.stats()["dropped"]["event_pool_empty"] == 1


def test_the_pending_limit_is_decided_at_entry_so_no_span_points_at_a_missing_parent(provider, spans, sim):
    enable(provider, device=sim, max_pending=3, poll_interval_s=30.0)
    from otel_npu import runtime

    tracer = provider[0].get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        with otel_npu.step("Decode"):  # entered below the limit: timed
            with otel_npu.capture("forward"):
                pass
            assert otel_npu.flush(5.0)  # "forward" is resolved and emitted while its step is still open
            for _ in range(3):
                with otel_npu.capture("filler"):
                    pass  # the intake is full now ...
        # ... and the step, open when it filled, still goes in: dropped now, "forward" would be an orphan.
        with otel_npu.step("Prefill"):  # entered at the limit: not timed, nor what it holds until the intake drains
            with otel_npu.capture("sample"):
                pass
            assert otel_npu.flush(5.0)
            with otel_npu.capture("post process"):  # timed again: its parent is the nearest timed ancestor
                pass
    assert otel_npu.flush(5.0)

    emitted = {s.context.span_id for s in spans.all}
    orphans = [s.name for s in spans.all if s.parent is not None and s.parent.span_id not in emitted]
    assert orphans == [], "spans pointing at a parent that was never emitted"
    assert spans.one("forward").parent.span_id == spans.one("Decode").context.span_id
    assert len(spans.named("filler")) == 3
    assert spans.named("Prefill") == [] and spans.named("sample") == []
    post = spans.one("post process")
    assert post.parent.span_id == request.get_span_context().span_id
    assert "otel_npu.step" not in post.attributes
    assert otel_npu.stats()["dropped"] == {"pending_limit": 2}
    assert runtime.current().resolver._steps == {}, "step state left waiting for a step that never comes"


def test_device_clock_drift_stays_within_the_stated_bound(provider, spans):
    device = SimDevice(drift_ppm=80.0)
    try:
        enable(provider, device=device)
        expected = {}
        for i in range(10):
            with otel_npu.capture(f"k{i}") as c:
                device.current_stream().launch(0.01)
            expected[f"k{i}"] = truth(c)
            time.sleep(0.02)
        assert otel_npu.flush(5.0)
        for name, (start, end) in expected.items():
            span = spans.one(name)
            error = max(abs(span.start_time - start), abs(span.end_time - end))
            assert error <= span.attributes[ATTR_CLOCK_ERROR] * 1000, (name, error, span.attributes[ATTR_CLOCK_ERROR])
    finally:
        device.close()


def test_timing_reads_happen_only_on_the_resolver_thread_for_finished_events(provider, spans, sim):
    enable(provider, device=sim)
    stream = sim.current_stream()
    for _ in range(30):
        with otel_npu.capture("x"):
            stream.launch(0.001)
    assert otel_npu.flush(5.0)
    reads = sim.timing_reads()
    assert reads, "expected the resolver to read event times"
    threads = {r.thread for r in reads}
    assert threading.get_ident() not in threads
    assert {t.name for t in threading.enumerate() if t.ident in threads} <= {"otel-npu-resolver"}
    assert sim.timing_reads(incomplete=True) == []


def test_work_queued_behind_a_call_runs_on_the_devices_own_schedule(sim):
    """Records behind a ``call()`` land where the device's schedule puts them (right after the kernel before
    them), not whenever the stream's thread got to them: a busy host cannot stretch device time."""
    stream = sim.current_stream()
    gate = threading.Event()
    stream.call(gate.wait)
    events = [sim.Event() for _ in range(4)]
    for event in events:
        event.record(stream)
        stream.launch(0.001)
    gate.set()
    stream.synchronize()
    gaps = [b.exec_mono_ns - a.exec_mono_ns for a, b in itertools.pairwise(events)]
    assert gaps == [1_000_000] * 3


def test_a_captures_truth_is_its_own_records_after_otel_npu_records_its_events_again(provider, spans, sim):
    """Once a capture is resolved its events go back to the pool, and the next capture (or a clock anchor on
    the resolver thread, at any moment) records them again. The truth a test reads afterwards must still be
    this capture's records, not the events' latest: read from the latest, a test that ran late on a loaded
    machine compared a span with another record's time (seen: 1.5 ms off against a 36 µs stated bound)."""
    enable(provider, device=sim)
    stream = sim.current_stream()
    with otel_npu.capture("first") as first:
        stream.launch(0.002)
    stream.synchronize()
    assert otel_npu.flush(5.0)  # resolved: its events are back in the pool
    ran = (first.start.exec_mono_ns, first.end.exec_mono_ns)
    time.sleep(0.01)  # the device is idle; a record now lands measurably later
    first.start.record(stream)  # what the next capture or an anchor does with events from the pool
    first.end.record(stream)
    stream.synchronize()
    assert first.start.exec_mono_ns > ran[1] and first.end.exec_mono_ns > ran[1]
    assert_device_times(spans.one("first"), truth(first))
