"""Several devices in one process (``device_map="auto"``, a thread per device): events, pools and clock
anchors are per device, on the strict simulated device (records on another device's stream raise there, as
on CUDA and torch_npu; each simulated device's clock has an epoch of its own)."""

from __future__ import annotations

import itertools
import threading
import time

import otel_npu
from otel_npu import runtime
from otel_npu.spans.attributes import ATTR_CLOCK_ERROR, ATTR_STREAM
from otel_npu.testing import SimDevice

from .support import TIME_BOUND_NS, ResolverPasses, enable, truth


def assert_close(span, t) -> None:
    assert abs(span.start_time - t[0]) <= TIME_BOUND_NS and abs(span.end_time - t[1]) <= TIME_BOUND_NS, (
        span.name, span.start_time - t[0], span.end_time - t[1])


def test_a_capture_on_a_stream_of_a_second_device_is_timed_by_that_device(provider, spans):
    """Saw it fail before the fix: every record on device 1 raised 'Event device 0 does not match recording
    stream's device 1' (record_failed), so no span."""
    sim = SimDevice(device_count=2)
    try:
        enable(provider, device=sim, poll_interval_s=0.005)
        s0, s1 = sim.current_stream(), sim.new_stream("on device 1", device=1)
        with otel_npu.capture("device 0") as c0:
            s0.launch(0.002)
        with sim.stream(s1), otel_npu.capture("device 1, first"):  # the resolver prepares device 1 now
            s1.launch(0.001)
        assert otel_npu.flush(5.0)
        truths = {"device 0": truth(c0)}
        for i in range(3):
            with sim.stream(s1):
                with otel_npu.capture(f"device 1 #{i}") as c:
                    s1.launch(0.002)
            truths[f"device 1 #{i}"] = truth(c)
        assert otel_npu.flush(5.0)
        for name, t in truths.items():
            assert_close(spans.one(name), t)
        assert spans.one("device 1 #0").attributes[ATTR_STREAM].startswith("cuda:1/")
        assert not spans.one("device 0").attributes[ATTR_STREAM].startswith("cuda:")
        dropped = otel_npu.stats()["dropped"]
        assert dropped.get("device_starting") == 1 and "record_failed" not in dropped
    finally:
        otel_npu.shutdown(5.0)  # before the device goes: no anchor on a closed stream
        sim.close()


def test_threads_on_two_devices_capture_at_once(provider, spans):
    """Saw it fail before the fix: the thread whose current device is 1 had every capture dropped."""
    sim = SimDevice(device_count=2)
    try:
        enable(provider, device=sim, poll_interval_s=0.005)
        with otel_npu.capture("warm-up"):
            pass
        truths: dict[str, tuple[int, int]] = {}

        def worker(device: int) -> None:
            sim.set_device(device)
            stream = sim.current_stream()
            with otel_npu.capture(f"prepare {device}"):
                stream.launch(0.001)
            otel_npu.flush(5.0)
            for i in range(5):
                with otel_npu.capture(f"d{device} step {i}") as c:
                    stream.launch(0.001 + 0.0005 * device)
                if c.start.__class__ is sim.Event().__class__:  # timed (an untimed capture has no events)
                    truths[f"d{device} step {i}"] = truth(c)

        threads = [threading.Thread(target=worker, args=(d,)) for d in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert otel_npu.flush(5.0)
        assert len(truths) == 10
        for name, t in truths.items():
            assert_close(spans.one(name), t)
    finally:
        otel_npu.shutdown(5.0)  # before the device goes: no anchor on a closed stream
        sim.close()


def test_preparing_a_busy_second_device_does_not_hold_up_the_first(provider, spans, monkeypatch):
    """Saw it fail before the fix: the resolver waited for device 1's first anchor, stuck behind 0.8 s of
    queued work there, and device 0's completed captures waited as long for their spans.

    No duration is measured: device 1 is busy for 30 s and a stuck anchor may be waited for a minute
    (``ANCHOR_WAIT_S``), so a resolver that waited for device 1 could not flush device 0 within 10 s."""
    from otel_npu.resolve import clock

    monkeypatch.setattr(clock, "ANCHOR_WAIT_S", 60.0)
    sim = SimDevice(device_count=2, shared_queue=True)
    try:
        enable(provider, device=sim, poll_interval_s=0.005)
        with otel_npu.capture("warm-up"):
            pass
        assert otel_npu.flush(5.0)
        s1 = sim.new_stream("device 1", device=1)
        s1.launch(30.0)  # device 1 is busy: its first anchor waits behind this
        with sim.stream(s1), otel_npu.capture("device 1, first"):  # asks the resolver to prepare device 1
            s1.launch(0.001)
        ResolverPasses(runtime.current().resolver).wait_for_more(2, timeout_s=10.0)  # preparing device 1 now
        with otel_npu.capture("device 0") as c:
            sim.current_stream().launch(0.001)
        expected = truth(c)
        assert otel_npu.flush(10.0), "device 0's span waited for device 1's preparation"
        assert not s1.query(), "device 1 was still busy"
        assert_close(spans.one("device 0"), expected)
    finally:
        otel_npu.shutdown(5.0)  # before the device goes: no anchor on a closed stream
        sim.close()


def test_a_second_device_busy_at_first_is_placed_from_its_own_anchor_once_idle(provider, spans):
    sim = SimDevice(device_count=2, shared_queue=True)
    try:
        enable(provider, device=sim, poll_interval_s=0.005)
        with otel_npu.capture("warm-up"):
            pass
        assert otel_npu.flush(5.0)
        s1 = sim.new_stream("device 1", device=1)
        s1.launch(0.8)  # device 1 is busy: its first anchor waits behind this
        with sim.stream(s1), otel_npu.capture("device 1, first"):  # asks the resolver to prepare device 1
            s1.launch(0.001)
        s1.synchronize()
        # Device 1's work done: its first anchor completes and the resolver publishes it; until then a capture
        # there is counted as device_starting. Try until one is timed (a deadline, not a measurement).
        deadline = time.monotonic() + 30
        for i in itertools.count():
            with sim.stream(s1), otel_npu.capture(f"device 1, later {i}") as c1:
                s1.launch(0.001)
            later = truth(c1) if hasattr(c1.start, "exec_mono_ns") else None  # None: not timed yet
            assert otel_npu.flush(5.0)
            if spans.named(f"device 1, later {i}") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        span = spans.one(f"device 1, later {i}")  # placed from device 1's own anchor, within its stated bound
        bound = span.attributes[ATTR_CLOCK_ERROR] * 1000 + 2_000
        assert abs(span.start_time - later[0]) <= bound and abs(span.end_time - later[1]) <= bound
    finally:
        otel_npu.shutdown(5.0)  # before the device goes: no anchor on a closed stream
        sim.close()
