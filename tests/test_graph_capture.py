"""Graph capture (CUDA/ACL graphs in the default "global" mode) on the strict simulated device: otel-npu must
never break the program's capture, nor time what a capturing stream does not execute."""

from __future__ import annotations

import threading
import time

import pytest

import otel_npu
from otel_npu import runtime
from otel_npu.devices import graphs
from otel_npu.spans.attributes import ATTR_TIMED_OUT
from otel_npu.testing import SimDevice

from .support import ResolverPasses, enable, truth, wall_of


def started(provider, sim, **kwargs) -> None:
    """otel-npu running on ``sim``, its first anchors taken and a capture resolved."""
    enable(provider, device=sim, poll_interval_s=0.005, **kwargs)
    with otel_npu.capture("warm-up"):
        sim.current_stream().launch(0.001)
    assert otel_npu.flush(5.0)


# -- the simulated device is as strict as the real API (these pin the rules the tests below rely on) --------
def test_sim_never_recorded_event_queries_true_and_cannot_be_timed(sim):
    a, b = sim.Event(), sim.Event()
    assert a.query() is True  # CUDA and torch_npu: an event never recorded is "complete"
    with pytest.raises(RuntimeError, match="must be recorded"):
        a.elapsed_time(b)


def test_sim_record_on_a_stream_of_another_device_raises():
    sim = SimDevice(device_count=2)
    try:
        event = sim.Event()
        event.record(sim.current_stream(0))
        with pytest.raises(RuntimeError, match="Event device 0 does not match recording stream's device 1"):
            event.record(sim.current_stream(1))
    finally:
        sim.close()


def test_sim_global_capture_is_invalidated_by_another_threads_device_call(sim):
    cuda = sim.torch_cuda
    done = sim.Event()
    done.record(sim.current_stream())
    g = cuda.CUDAGraph()
    errors = []
    with pytest.raises(RuntimeError, match="invalidated"):
        with cuda.graph(g):
            sim.current_stream().launch(0.001)
            t = threading.Thread(target=lambda: errors.append(_raises(done.query)))
            t.start()
            t.join()
    assert errors == [True]
    assert [v.call for v in sim.capture_violations] == ["event query"]


def test_sim_thread_local_capture_ignores_other_threads_and_events_recorded_in_it_are_not_timing_records(sim):
    cuda = sim.torch_cuda
    g = cuda.CUDAGraph()
    inside = sim.Event()
    with cuda.graph(g, capture_error_mode="thread_local"):
        assert cuda.is_current_stream_capturing()
        sim.current_stream().launch(0.01)
        inside.record()
        t = threading.Thread(target=lambda: sim.Event().query())
        t.start()
        t.join()
    assert not cuda.is_current_stream_capturing()
    assert inside.records == 0 and inside.captured_records == 1 and inside.query()  # never a timing record
    start, end = sim.Event(), sim.Event()
    start.record()
    g.replay()  # the captured kernel runs; the captured record does not
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= 9.9
    assert inside.records == 0


def _raises(fn) -> bool:
    try:
        fn()
    except RuntimeError:
        return True
    return False


# -- item 1: no device call from the resolver while a graph capture is in progress ----------------------------
def test_a_graph_capture_with_the_resolver_running_succeeds(provider, spans, sim):
    """Saw it fail before the fix: the resolver's query()/anchor during the capture invalidated it."""
    started(provider, sim)
    stream = sim.current_stream()
    with otel_npu.capture("in flight"):
        stream.launch(0.15)  # completes while the graph is being captured: the resolver would query it
    g = sim.torch_cuda.CUDAGraph()
    passes = ResolverPasses(runtime.current().resolver)
    with sim.torch_cuda.graph(g):  # raises if anything invalidated the capture
        for _ in range(3):
            sim.current_stream().launch(0.001)
            time.sleep(0.1)  # the resolver polls every 5 ms and wants a new anchor every 100 ms ...
            passes.wait_for_more(2)  # ... and it did pass while the graph was being captured
    assert sim.capture_violations == []
    assert otel_npu.flush(5.0)
    assert len(spans.named("in flight")) == 1
    assert graphs.active == 0


def test_time_spent_in_a_graph_capture_does_not_count_toward_the_event_timeout(provider, spans, sim):
    """Saw it fail before the fix (the capture timed out while the resolver was not allowed to look)."""
    # Real time: the resolver times captures out by the host clock, and graph captures are told apart by it.
    # The time-out leaves 3 s for the moments the capture waits outside the graph capture (a loaded machine
    # has stalled a test thread for 2-3 s), and the graph capture lasts longer than the time-out.
    started(provider, sim, event_timeout_s=3.0)
    gate = threading.Event()
    with otel_npu.capture("slow"):
        sim.current_stream().call(lambda: gate.wait(60))  # done when the graph capture is over
    g = sim.torch_cuda.CUDAGraph()
    # capture_begin/capture_end themselves: torch.cuda.graph() would first synchronize the device
    with sim.stream(sim.new_stream("capture")):
        g.capture_begin()
        time.sleep(3.5)  # capturing for longer than the time-out, the capture's work unfinished all along
        g.capture_end()
    gate.set()
    assert otel_npu.flush(10.0)
    span = spans.one("slow")
    assert not span.attributes.get(ATTR_TIMED_OUT), "the time spent capturing counted toward the timeout"
    assert span.end_time - span.start_time >= 3.5e9


# -- item 2: captures inside a graph capture are counted no-ops; a replay is timed as one unit -------------
def test_a_capture_inside_a_graph_capture_is_a_counted_no_op_and_the_replay_is_timed(provider, spans, sim):
    """Saw it fail before the fix: the capture inside recorded pooled events on the capturing stream, which
    kept their old records, and became a span with times from the past."""
    started(provider, sim)
    g = sim.torch_cuda.CUDAGraph()
    with sim.torch_cuda.graph(g):
        with otel_npu.step("captured step"):
            with otel_npu.capture("inside"):
                sim.current_stream().launch(0.02)
    assert sim.capture_violations == []
    with otel_npu.capture("replay") as c:
        g.replay()
    replay_truth = truth(c)
    assert otel_npu.flush(5.0)
    assert spans.named("inside") == [] and spans.named("captured step") == []
    assert otel_npu.stats()["dropped"].get("graph_capture") == 2
    replay = spans.one("replay")
    assert abs(replay.start_time - replay_truth[0]) <= 50_000 and abs(replay.end_time - replay_truth[1]) <= 50_000
    assert replay.end_time - replay.start_time >= 0.02e9


def test_the_runtime_does_not_start_inside_a_graph_capture(provider, spans, sim):
    """Saw it fail before the fix: starting (events, an anchor stream, an anchor wait) broke the capture."""
    enable(provider, device=sim)
    g = sim.torch_cuda.CUDAGraph()
    with sim.torch_cuda.graph(g):
        with otel_npu.capture("first, inside the capture"):
            sim.current_stream().launch(0.001)
    assert sim.capture_violations == []
    with otel_npu.capture("after"):
        sim.current_stream().launch(0.001)
    assert otel_npu.flush(5.0)
    assert [s.name for s in spans.all] == ["after"]


def test_a_query_that_raises_costs_one_capture_not_the_resolver(provider, spans, sim, caplog_otel):
    """Saw it fail before the fix: the exception ended the resolver thread; nothing resolved after it."""
    backend = sim.otel_npu_backend()
    real_query = backend.query
    bad = set()

    def query(event):
        if id(event) in bad:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return real_query(event)

    backend.query = query
    enable(provider, device=backend, poll_interval_s=0.005)
    with otel_npu.capture("broken") as c:
        sim.current_stream().launch(0.001)
    bad.add(id(c.end))
    for i in range(3):
        with otel_npu.capture(f"fine{i}"):
            sim.current_stream().launch(0.001)
    assert otel_npu.flush(5.0)
    for i in range(3):
        assert len(spans.named(f"fine{i}")) == 1
    broken = spans.one("broken")  # kept, with host times
    assert broken.start_time == wall_of(c.host_start) or abs(broken.start_time - wall_of(c.host_start)) < 5_000
    stats = otel_npu.stats()
    assert stats["dropped"]["query_failed"] == 1
    assert "query_failed" in caplog_otel.text and "operation not permitted" in caplog_otel.text


def test_a_graph_capture_beginning_during_a_resolver_pass_waits_for_its_device_calls(provider, spans, sim):
    """Saw it fail before the fix: the pass went on querying after capture_begin, invalidating the capture."""
    backend = sim.otel_npu_backend()
    real_query = backend.query
    in_query = threading.Event()

    def slow_query(event):
        done = real_query(event)
        if threading.current_thread().name == "otel-npu-resolver" and done:
            in_query.set()
            time.sleep(0.05)  # a capture begins now, between two queries of one pass
        return done

    backend.query = slow_query
    enable(provider, device=backend, poll_interval_s=0.005)
    with otel_npu.capture("warm-up"):
        pass
    assert otel_npu.flush(5.0)
    in_query.clear()
    for i in range(5):
        with otel_npu.capture(f"c{i}"):
            sim.current_stream().launch(0.0001)
    assert in_query.wait(5.0)
    g = sim.torch_cuda.CUDAGraph()
    with sim.stream(sim.new_stream("capture")):
        g.capture_begin()
        time.sleep(0.05)
        g.capture_end()
    assert sim.capture_violations == []
    assert otel_npu.flush(5.0)
    assert all(len(spans.named(f"c{i}")) == 1 for i in range(5))
