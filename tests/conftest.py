"""Shared fixtures: a clean environment, an in-memory TracerProvider, simulated devices, and a clean otel-npu per
test. Helpers that tests import live in ``support.py``."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from . import support

# Before otel-npu is imported (it reads OTEL_NPU_ENABLED and the OTEL_* variables at import): the shell's
# OTEL_*, VLLM_*, RANK, ... never reach the tests or the processes they start (support.KEEP says what does).
for _name in [name for name in os.environ if not support.kept(name)]:
    del os.environ[_name]

import pytest  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import otel_npu  # noqa: E402
from otel_npu import accounting, config, runtime  # noqa: E402
from otel_npu.testing import SimDevice  # noqa: E402


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


@pytest.fixture
def npu_sim(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A simulated Ascend device installed as the ``torch_npu`` module (``device="npu"`` then finds it)."""
    device = SimDevice(api="npu")
    monkeypatch.setitem(sys.modules, "torch_npu", device.torch_npu)
    yield device
    otel_npu.shutdown(5.0)  # before the device goes: no anchor on a closed stream
    device.close()


@pytest.fixture
def install_torch_npu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a given simulated NPU as the ``torch_npu`` module for one test: ``install_torch_npu(sim)``."""

    def install(device: SimDevice) -> SimDevice:
        monkeypatch.setitem(sys.modules, "torch_npu", device.torch_npu)
        return device

    return install


@pytest.fixture(params=[pytest.param(k, marks=pytest.mark.gpu) if k == "cuda" else k for k in support.DEVICE_KINDS])
def device_kind(request: pytest.FixtureRequest, install_torch_npu: Any) -> Any:
    """The test once per device kind (``support.DEVICE_KINDS``): simulated NPU, simulated CUDA, CPU, and the
    real GPU where there is one (marked ``gpu``). otel-npu is shut down before the device goes."""
    kind = support.make_device_kind(request.param, install_torch_npu)
    yield kind
    otel_npu.shutdown(5.0)
    if kind.close is not None:
        kind.close()


@pytest.fixture(autouse=True)
def clean_otel_npu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every test starts in the session's clean environment, disabled, with default settings, and ends with
    otel-npu shut down."""
    for name in [name for name in os.environ if name not in support.SESSION_ENV]:
        monkeypatch.delenv(name)  # set by an earlier test or fixture outside monkeypatch
    for name, value in support.SESSION_ENV.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
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
