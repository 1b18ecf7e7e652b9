"""Shared fixtures: an in-memory TracerProvider, a simulated device, and a clean otel-npu per test."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_npu
from otel_npu import accounting, config, runtime
from otel_npu.testing import SimDevice

#: Stated bound on |span time - simulated device time| in these tests, when the device clock does not drift:
#: anchor placement (launch latency 5 µs + the record call) + float32 ms rounding + host clock sampling.
TIME_BOUND_NS = 50_000


class Spans:
    """The spans an in-memory exporter received, with helpers to look them up."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter

    @property
    def all(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[Any]:
        return [s for s in self.all if s.name == name]

    def one(self, name: str) -> Any:
        found = self.named(name)
        assert len(found) == 1, f"expected one span named {name!r}, got {[s.name for s in self.all]}"
        return found[0]

    def children_of(self, parent: Any) -> list[Any]:
        return [s for s in self.all if s.parent is not None and s.parent.span_id == parent.context.span_id]


@pytest.fixture
def provider() -> tuple[TracerProvider, Spans]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp, Spans(exporter)


@pytest.fixture
def spans(provider: tuple[TracerProvider, Spans]) -> Spans:
    return provider[1]


@pytest.fixture
def sim() -> Any:
    device = SimDevice()
    yield device
    device.close()


@pytest.fixture(autouse=True)
def clean_otel_npu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every test starts disabled, with default settings, and ends with otel-npu shut down."""
    for var in ("OTEL_NPU_ENABLED", "VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE", "OTEL_NPU_DEVICE",
                "OTEL_NPU_LOG_DURATIONS", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_HEADERS"):
        monkeypatch.delenv(var, raising=False)
    # Stage metrics default to OTLP at localhost:4318 (the spec's default), where no collector runs in tests:
    # the tests about metrics turn them on with their own endpoint.
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    otel_npu.shutdown(5.0)
    runtime.set_settings(config.Settings())
    accounting.reset_stats()  # the process's counters outlive shutdown(): each test counts from zero
    yield
    otel_npu.shutdown(5.0)
    runtime.set_settings(config.Settings())
    otel_npu.configure(enabled=False)


def enable(provider: tuple[TracerProvider, Spans], **kwargs: Any) -> None:
    """Turn otel-npu on with spans going to the in-memory provider."""
    otel_npu.configure(enabled=True, tracer_provider=provider[0], **kwargs)


def wall_of(mono_ns: int) -> int:
    """Host monotonic ns -> Unix epoch ns, as a test's own reference."""
    best = None
    for _ in range(5):
        a = time.perf_counter_ns()
        w = time.time_ns()
        b = time.perf_counter_ns()
        if best is None or b - a < best[0]:
            best = (b - a, w - (a + b) // 2)
    return mono_ns + best[1]


@pytest.fixture
def receiver() -> Any:
    """An OTLP/HTTP test receiver; otel-npu is shut down (flushing to it) before it closes."""
    from .otlp_receiver import HttpReceiver

    r = HttpReceiver()
    yield r
    otel_npu.shutdown(5.0)
    r.close()


@pytest.fixture
def caplog_otel(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="otel_npu")
    return caplog
