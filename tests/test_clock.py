"""The device clock over long simulated times: drift is measured and followed, the stated bound holds."""

from __future__ import annotations

import pytest

from otel_npu.resolve.clock import ANCHOR_INTERVAL_S, DeviceClock, HostClock
from otel_npu.testing import SimDevice, VirtualClock


def make(api: str, drift_ppm: float):
    vclock = VirtualClock()
    sim = SimDevice(api=api, drift_ppm=drift_ppm, mono=vclock)
    backend = sim.otel_npu_backend()
    pool = [backend.new_event() for _ in range(8)]
    clock = DeviceClock(backend, lambda: pool.pop() if pool else backend.new_event(), pool.append, mono=vclock)
    return vclock, sim, clock


def run_for(vclock, clock, seconds: float) -> None:
    end = vclock.t + int(seconds * 1e9)
    while vclock.t < end:
        vclock.advance(50_000_000)
        if clock.due(vclock.t):
            clock.calibrate()


def place_busy_capture(vclock, sim, clock):
    stream = sim.default_stream
    stream.launch(0.003)  # the device is behind the host
    begin, end = sim.Event(), sim.Event()
    host_start = vclock()
    begin.record(stream)
    stream.launch(0.002)
    host_end = vclock()
    end.record(stream)
    vclock.advance(10_000_000)
    start_ns, end_ns, bound = clock.place(begin, end, host_start, host_end, vclock())
    return max(abs(start_ns - begin.exec_mono_ns), abs(end_ns - end.exec_mono_ns)), bound


@pytest.mark.parametrize("api", ["cuda", "npu"])
@pytest.mark.parametrize("drift_ppm", [0.0, 50.0, -80.0])
def test_drift_is_measured_and_events_stay_within_the_stated_bound_for_an_hour(api, drift_ppm):
    vclock, sim, clock = make(api, drift_ppm)
    clock.calibrate()
    assert clock.interval_ns() == int(clock.min_interval_s * 1e9), "drift unknown: anchors come often"
    for seconds in (0.5, 5, 60, 3600):
        run_for(vclock, clock, seconds)
        error, bound = place_busy_capture(vclock, sim, clock)
        assert error <= bound, (seconds, error, bound)
        assert error <= 20_000, (seconds, error)
    true_rate = 1 / (1 + drift_ppm * 1e-6)
    assert clock.rate == pytest.approx(true_rate, abs=0.5e-6)
    assert clock.interval_ns() == int(ANCHOR_INTERVAL_S * 1e9), "drift known: anchors every 2 s"
    assert len(clock.anchors) < 100, "old anchors are retired"
    sim.close()


def test_a_stalled_device_makes_calibration_fail_cleanly():
    from otel_npu.resolve.clock import CalibrationError

    vclock, sim, clock = make("cuda", 0.0)
    vclock.tick = 100_000  # let the 1 s wait pass in ~10k reads
    clock._backend._anchor_stream.launch(3600.0)  # the anchor stream is stuck behind an hour of work
    with pytest.raises(CalibrationError, match="did not complete within 1 s"):
        clock.calibrate()
    sim.close()


def test_host_clock_keeps_the_tightest_sample():
    """Scripted clocks with a known offset: one sample of five is quick, the others were preempted (one for
    5 ms); the offset comes from the quick one, and its error bound is half its round trip."""
    offset = 1_700_000_000_123_456_789
    round_trips = [5_000_000, 40_000, 2_000, 900_000, 30_000]
    mono_reads: list[int] = []
    wall_reads: list[int] = []
    t = 10**12
    for rt in round_trips:  # the wall read a quarter of the way through: off the midpoint by rt / 4
        mono_reads += [t, t + rt]
        wall_reads.append(t + rt // 4 + offset)
        t += 10**9
    mono, wall = iter(mono_reads), iter(wall_reads)
    host = HostClock(mono=lambda: next(mono), wall=lambda: next(wall))
    assert host.error_ns == 2_000 // 2 + 1
    assert abs(host.offset_ns - offset) == 2_000 // 4 <= host.error_ns
    assert host.to_wall(5) == 5 + host.offset_ns


def test_host_clock_on_the_real_clocks():
    import time

    host = HostClock()
    # Units and sign only: a loaded machine may preempt any sample (test threads were seen stalled 2-3 s), so no
    # tight bound is taken from real time (the test above checks the arithmetic with scripted clocks). A wrong
    # unit or sign is off by years (the monotonic clock counts from boot, the wall clock from 1970).
    assert abs(host.to_wall(time.perf_counter_ns()) - time.time_ns()) < 60 * 10**9


@pytest.mark.parametrize("api", ["cuda", "npu"])
def test_the_stated_bound_covers_the_timers_resolution(api):
    """NPU timestamps are whole µs: an event placed from them can be up to 1 µs off even from a perfect
    anchor. Saw it fail before the fix (the bound allowed 0.5 µs, CUDA's resolution, for both)."""
    vclock = VirtualClock(tick_ns=37)
    sim = SimDevice(api=api, mono=vclock, launch_latency_us=0.0, device_epoch_s=4242.0004567)
    backend = sim.otel_npu_backend()
    pool = [backend.new_event() for _ in range(8)]
    clock = DeviceClock(backend, lambda: pool.pop() if pool else backend.new_event(), pool.append, mono=vclock)
    clock.calibrate()
    worst_ns = 0
    for i in range(200):
        vclock.advance(1_000 + 97 * i)  # events at every sub-µs phase
        begin, end = sim.Event(), sim.Event()
        host_start = vclock()
        begin.record(sim.default_stream)
        sim.default_stream.launch(1e-6 * (1 + i % 7) + 3.1e-7)
        host_end = vclock()
        end.record(sim.default_stream)
        vclock.advance(20_000)
        start_ns, end_ns, bound = clock.place(begin, end, host_start, host_end, vclock())
        error = max(abs(start_ns - begin.exec_mono_ns), abs(end_ns - end.exec_mono_ns))
        worst_ns = max(worst_ns, error)
        assert error <= bound, (i, error, bound)
    if api == "npu":  # the phases reach what whole-µs timestamps cost: more than CUDA's 0.5 µs resolution
        assert worst_ns > 500, f"the largest error was {worst_ns} ns: the test never reached the case it is about"
    sim.close()
