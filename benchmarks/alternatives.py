"""The ways of timing a stage that otel-npu is compared with, each as ``timer(name)`` -> context manager.

* ``otel_npu``: ``otel_npu.capture(name)`` (enabled or disabled);
* ``otel_span``: an OpenTelemetry SDK span per stage (``start_as_current_span``), BatchSpanProcessor + OTLP;
* ``record_function``: ``torch.profiler.record_function`` inside an active ``torch.profiler.profile``;
* ``seed``: vllm-ascend's ``ProfileExecuteDuration`` pattern, written fresh: two new timing events per
  capture, appended under a lock, its enable variable read per call, a synchronizing pop once per step;
* ``sync``: ``synchronize()`` + host timestamps around the stage (what the seed was written to avoid).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Iterator

import torch


class Device:
    """The device the benchmark runs on: ``cpu`` or ``cuda``."""

    def __init__(self, kind: str) -> None:
        if kind == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
        self.kind = kind
        self.torch_device = torch.device(kind)

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize()
        else:
            torch.cpu.synchronize()  # a no-op: on the CPU the work is already done

    def timing_event(self) -> Any:
        """A new timing event (the seed's pattern allocates two per capture)."""
        if self.kind == "cuda":
            return torch.cuda.Event(enable_timing=True)
        return _HostEvent()


class _HostEvent:
    """The CPU's stand-in for a device timing event (there are none): a host timestamp."""

    __slots__ = ("t",)

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter_ns()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end.t - self.t) / 1e6


class SeedProfiler:
    """vllm-ascend's ProfileExecuteDuration, re-created for comparison (not its code)."""

    ENV = "VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE"

    def __init__(self, device: Device) -> None:
        self._device = device
        self._lock = threading.Lock()
        self._observations: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def capture_async(self, tag: str) -> Iterator[None]:
        if os.environ.get(self.ENV, "0") in ("0", ""):  # the seed read its switch on every call
            yield
            return
        start = self._device.timing_event()
        end = self._device.timing_event()
        start.record()
        try:
            yield
        finally:
            end.record()
            with self._lock:
                self._observations.append((tag, start, end))

    def pop_captured_sync(self) -> dict[str, float]:
        durations = {}
        while self._observations:
            with self._lock:
                tag, start, end = self._observations.pop()
            end.synchronize()
            durations[tag] = start.elapsed_time(end)
        return durations


class SyncTimer:
    """``synchronize()`` before and after the stage, host timestamps in between."""

    def __init__(self, device: Device) -> None:
        self._device = device
        self.durations: list[float] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._device.synchronize()
        t0 = time.perf_counter_ns()
        try:
            yield
        finally:
            self._device.synchronize()
            self.durations.append((time.perf_counter_ns() - t0) / 1e6)


def otel_tracer(endpoint: str | None) -> tuple[Any, Any]:
    """An SDK TracerProvider with a BatchSpanProcessor: OTLP/HTTP to ``endpoint``, or an in-memory sink."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint + "/v1/traces")
    else:
        exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536))
    return provider, provider.get_tracer("benchmark")


def timers(device: Device, endpoint: str | None) -> dict[str, Callable[[str], Any]]:
    """name -> timer factory, for the variants that time each stage with a context manager."""
    import otel_npu

    provider, tracer = otel_tracer(endpoint)
    seed = SeedProfiler(device)
    return {
        "otel_npu": otel_npu.capture,
        "otel_span": tracer.start_as_current_span,
        "record_function": torch.profiler.record_function,
        "seed": seed.capture_async,
        "sync": SyncTimer(device),
        "_provider": provider,  # type: ignore[dict-item]
        "_seed": seed,  # type: ignore[dict-item]
    }
