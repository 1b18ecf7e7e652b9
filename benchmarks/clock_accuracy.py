"""Clock accuracy on the simulated device: how far a span's start is from the device's true time, after
1 s, 10 s, 100 s and 1 h of simulated time, with the production policy (anchors every 0.1 s while the drift
is unknown, every 2 s once it is measured) and, for contrast, a single anchor taken at start. Captures are
made while the device is busy, so each event runs milliseconds after the host enqueued it.

Time is virtual (``otel_npu.testing.VirtualClock``: every read advances it by 200 ns, ``advance`` jumps),
so an hour takes a second. The simulated device runs a clock of its own that drifts by ``drift_ppm`` against the host, and
is read through otel-npu's real CUDA backend (float32-millisecond ``elapsed_time``) or NPU backend (µs
``recorded_time``); errors come from the same ``clock.DeviceClock`` the resolver uses.
"""

from __future__ import annotations

from typing import Any

from otel_npu.resolve.clock import MIN_ANCHOR_INTERVAL_S, DeviceClock
from otel_npu.testing import SimDevice, VirtualClock

HORIZONS_S = (1, 10, 100, 3600)


def _errors_at(horizon_s: float, drift_ppm: float, api: str, refresh: bool, samples: int = 5) -> float:
    vclock = VirtualClock()
    sim = SimDevice(api=api, drift_ppm=drift_ppm, mono=vclock)
    backend = sim.otel_npu_backend()
    pool = [backend.new_event() for _ in range(16)]
    clock = DeviceClock(backend, lambda: pool.pop() if pool else backend.new_event(), pool.append, mono=vclock,
                        keep_s=1e9)
    clock.calibrate()
    start = vclock.t
    step = int(MIN_ANCHOR_INTERVAL_S * 1e9)
    while vclock.t - start < horizon_s * 1e9:
        vclock.advance(min(step, int(horizon_s * 1e9) - (vclock.t - start)) or 1)
        if refresh and clock.due(vclock.t):
            clock.calibrate()
    worst = 0.0
    stream = sim.default_stream
    for _ in range(samples):
        # As in serving: the host enqueues while the device is still busy with earlier work, so the
        # event runs milliseconds after the host entered the capture (causality cannot hide errors).
        vclock.advance(37_000_000)
        stream.launch(0.003)
        begin, end = sim.Event(), sim.Event()
        host_start = vclock()
        begin.record(stream)
        stream.launch(0.004)
        host_end = vclock()
        end.record(stream)
        vclock.advance(20_000_000)
        seen = vclock()
        placed_start, placed_end, _ = clock.place(begin, end, host_start, host_end, seen)
        worst = max(worst, abs(placed_start - begin.exec_mono_ns), abs(placed_end - end.exec_mono_ns))
        if refresh and clock.due(vclock.t):
            clock.calibrate()
    sim.close()
    return worst / 1000.0  # µs


def run(report: Any, quick: bool = False) -> None:
    horizons = HORIZONS_S[:3] if quick else HORIZONS_S
    cases = {
        "CUDA-style timer, 50 ppm drift, otel-npu's anchors": ("cuda", 50.0, True),
        "NPU-style timer, 50 ppm drift, otel-npu's anchors": ("npu", 50.0, True),
        "CUDA-style timer, no drift, one anchor at start": ("cuda", 0.0, False),
        "CUDA-style timer, 50 ppm drift, one anchor at start": ("cuda", 50.0, False),
    }
    table = {name: [_errors_at(h, drift, api, refresh) for h in horizons]
             for name, (api, drift, refresh) in cases.items()}
    report.add("clock", {"horizons_s": list(horizons), "max_error_us": table})
    print("\nClock accuracy on the simulated device (max |span time - device truth|, µs):")
    print("  " + f"{'':52s}" + "".join(f"{h:>10g}s" for h in horizons))
    for name, errors in table.items():
        print(f"  {name:52s}" + "".join(f"{e:11.2f}" for e in errors))
    for name in list(cases)[:2]:
        worst = max(table[name])
        report.check(f"clock error, {name.split(',')[0]}, all horizons", worst, "µs", "≤ 20 µs", worst <= 20.0,
                     f"worst of {', '.join(f'{h:g}s' for h in horizons)}")
