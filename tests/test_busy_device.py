"""A busy device whose streams share one hardware queue (CUDA_DEVICE_MAX_CONNECTIONS=1; the NPU task queue):
otel-npu's anchor events wait behind the program's work. The resolver must keep resolving (not wait for
anchors), and every span must stay within its stated error bound."""

from __future__ import annotations

import threading
import time

import pytest

import otel_npu
from otel_npu import runtime
from otel_npu.resolve.clock import DeviceClock
from otel_npu.devices.npu import NpuBackend
from otel_npu.spans.attributes import ATTR_CLOCK_ERROR
from otel_npu.testing import SimDevice, SimEvent

from .support import ResolverPasses, enable, wall_of


@pytest.mark.parametrize("api", ["cuda", "npu"])
def test_the_resolver_does_not_wait_for_an_anchor_stuck_behind_queued_work(provider, spans, api, install_torch_npu,
                                                                         monkeypatch):
    """Saw it fail before the fix: an anchor due while 0.8 s of work was queued ahead of it (one shared
    queue) held the resolver until that work was done (up to ``ANCHOR_WAIT_S`` per try, spinning on query()),
    so a capture that had long completed waited as long for its span.

    No duration is measured: the work queued ahead of the anchor lasts 30 s and a stuck anchor may be waited
    for a minute (``ANCHOR_WAIT_S``), so a resolver that waited for it could not flush within 10 s."""
    from otel_npu.resolve import clock

    monkeypatch.setattr(clock, "ANCHOR_WAIT_S", 60.0)
    sim = SimDevice(api=api, shared_queue=True)
    if api == "npu":
        install_torch_npu(sim)
    try:
        enable(provider, device=sim if api == "cuda" else "npu", poll_interval_s=0.01)
        with otel_npu.capture("warm-up"):
            pass
        assert otel_npu.flush(5.0)
        with otel_npu.capture("done early") as c:
            sim.current_stream().launch(0.0001)
        early = (c.start.exec_mono_ns, c.end.exec_mono_ns)
        sim.new_stream("the program's other stream").launch(30.0)  # queued ahead of any anchor from now on
        time.sleep(0.3)  # an anchor comes due (every 0.1 s while the drift is unknown) ...
        ResolverPasses(runtime.current().resolver).wait_for_more(3)  # ... and the resolver saw it due
        assert otel_npu.flush(10.0), "the span of a completed capture waited for an anchor stuck behind work"
        span = spans.one("done early")
        bound = span.attributes[ATTR_CLOCK_ERROR] * 1000 + 2_000  # + this test's own wall_of sampling
        assert abs(span.start_time - wall_of(early[0])) <= bound and abs(span.end_time - wall_of(early[1])) <= bound
    finally:
        otel_npu.shutdown(5.0)
        sim.close()


@pytest.mark.parametrize("api", ["cuda", "npu"])
def test_on_a_busy_shared_queue_every_span_stays_within_its_stated_bound(provider, spans, api, install_torch_npu):
    """The anchor's window covers the wait behind the queued work, so the stated bound holds there
    (a regression test: it held before these changes too)."""
    sim = SimDevice(api=api, shared_queue=True)
    if api == "npu":
        install_torch_npu(sim)
    stop = threading.Event()
    try:
        enable(provider, device=sim if api == "cuda" else "npu", poll_interval_s=0.01)
        background = sim.new_stream("the program's other stream")

        def keep_busy() -> None:  # ~80 % busy: at times 16 ms of work queued ahead of anything submitted
            while not stop.is_set():
                background.launch(0.016)
                time.sleep(0.02)

        busy = threading.Thread(target=keep_busy)
        busy.start()
        stream, truths = sim.current_stream(), {}
        # Until 600 captures were timed (a deadline against a hang only): a count, so a starved machine that
        # runs fewer iterations per second tests as much, only more slowly.
        deadline = time.monotonic() + 120
        i = 0
        while len(truths) < 600 and time.monotonic() < deadline:
            with otel_npu.capture(f"c{i}") as c:
                stream.launch(0.00001)
            if isinstance(c.start, SimEvent):  # timed
                truths[c.name] = (c.start.exec_mono_ns, c.end.exec_mono_ns)  # known at submit here
            i += 1
            time.sleep(0.0005)
        stop.set()
        busy.join()
        assert otel_npu.flush(10.0)
        for name, (start, end) in truths.items():
            span = spans.one(name)
            bound = span.attributes[ATTR_CLOCK_ERROR] * 1000 + 2_000  # + this test's own wall_of sampling
            assert abs(span.start_time - wall_of(start)) <= bound and abs(span.end_time - wall_of(end)) <= bound
        assert len(truths) >= 600
    finally:
        stop.set()
        otel_npu.shutdown(5.0)
        sim.close()


def test_npu_without_direct_reads_anchors_at_most_twice_a_second():
    """Without aclrtEventGetTimestamp each anchor read (recorded_time) drains the task queue holding the
    GIL: no re-anchoring ten times a second then. Saw it fail before the fix (0.1 s)."""
    sim = SimDevice(api="npu", task_queue_us=20)
    try:
        backend = NpuBackend(sim.torch_npu, acl_timestamp=False)
        pool = [backend.new_event() for _ in range(8)]
        clock = DeviceClock(backend, lambda: pool.pop() if pool else backend.new_event(), pool.append)
        clock.calibrate()
        assert clock.interval_ns() >= 0.5e9
    finally:
        sim.close()
