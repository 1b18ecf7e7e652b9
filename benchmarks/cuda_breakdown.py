"""Where an enabled capture's host time goes on a real GPU: the CUDA calls on the hot path, one by one.

    python -m benchmarks.cuda_breakdown        # needs torch with CUDA; run by benchmarks/gpu_check.sh

Each figure is the median over rounds of the mean per-call host time of 2000 calls (µs). Nothing here is
asserted: it says which part of ``benchmarks.run``'s "enabled capture" figure is the driver's.
"""

from __future__ import annotations

import statistics
import time


def per_call_us(fn, calls: int = 2000, rounds: int = 15) -> float:
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter_ns() - t0) / calls / 1000)
    return statistics.median(means)


def _backend_current_stream():
    from otel_npu.devices.cuda import CudaBackend

    return CudaBackend().current_stream


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("cuda_breakdown: torch.cuda.is_available() is False; nothing to measure")
        return
    import otel_npu

    stream = torch.cuda.current_stream()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for e in events:
        e.record(stream)
    plain = torch.cuda.Event(enable_timing=False)
    plain.record(stream)
    torch.cuda.synchronize()
    rows = [
        ("python call of a no-op lambda", per_call_us(lambda: None)),
        ("torch.cuda.current_stream()", per_call_us(torch.cuda.current_stream)),
        ("otel-npu's cached current stream", per_call_us(_backend_current_stream())),
        ("Event(enable_timing=True).record(stream)", per_call_us(lambda: events[0].record(stream))),
        ("Event(enable_timing=False).record(stream)", per_call_us(lambda: plain.record(stream))),
        ("Event.query() (completed)", per_call_us(events[1].query)),
    ]
    torch.cuda.synchronize()
    otel_npu.configure(enabled=True, device="cuda")
    with otel_npu.capture("warm-up"):
        pass
    otel_npu.flush(10.0)

    def one_capture() -> None:
        with otel_npu.capture("c"):
            pass

    means = []
    for _ in range(9):  # 200 captures a round, then a flush: the 1024 pooled events never run out
        means.append(per_call_us(one_capture, calls=200, rounds=1))
        otel_npu.flush(30.0)
    rows.append(("otel_npu.capture() enter+exit (2 records)", statistics.median(means)))
    dropped = otel_npu.stats().get("dropped", {})
    otel_npu.shutdown(10.0)
    print(f"\nHost cost of the CUDA calls on the hot path, {torch.cuda.get_device_name()}, torch {torch.__version__} "
          f"(median of per-round means, µs per call):")
    for name, us in rows:
        print(f"  {name:<45} {us:8.2f}")
    if dropped:
        print(f"  (captures dropped while measuring: {dropped})")


if __name__ == "__main__":
    main()
