"""What must hold on every device kind, checked on each: the simulated NPU (through otel-npu's NPU backend), the
simulated CUDA device, the CPU, and the real GPU where there is one (the ``device_kind`` fixture, modelled on
PyTorch's ``instantiate_device_type_tests``). Device-specific behaviour is tested in the device's own module."""

from __future__ import annotations

import threading
import time

import pytest
from opentelemetry.trace import StatusCode

import otel_npu
from otel_npu.spans.attributes import ATTR_CLOCK_ERROR, ATTR_DEVICE, ATTR_STREAM

from .support import enable

WORK_S = 0.02


def test_a_step_and_its_stages_become_nested_spans_labelled_with_the_device(device_kind, provider, spans):
    enable(provider, **device_kind.configure)
    with otel_npu.step("Decode"):
        with otel_npu.capture("forward"):
            device_kind.work(WORK_S)
        with otel_npu.capture("sample"):
            device_kind.work(0.001)
    assert otel_npu.flush(10.0)
    step = spans.one("Decode")
    children = spans.children_of(step)
    assert sorted(s.name for s in children) == ["forward", "sample"]
    for span in [step, *children]:
        assert span.attributes[ATTR_DEVICE] == device_kind.label
        assert span.attributes[ATTR_STREAM]
        assert span.attributes[ATTR_CLOCK_ERROR] >= 0
        assert span.status.status_code is StatusCode.UNSET
    for child in children:
        assert step.start_time <= child.start_time <= child.end_time <= step.end_time


def test_a_span_covers_its_work_and_lies_between_entry_and_flush(device_kind, provider, spans):
    """Causality on every device: the work cannot run before the host asked for it nor after the flush saw
    it done, and it takes at least as long as it was made to take."""
    enable(provider, **device_kind.configure)
    with otel_npu.capture("warm-up"):
        pass
    assert otel_npu.flush(10.0)
    before = time.time_ns()
    with otel_npu.capture("forward"):
        device_kind.work(WORK_S)
    assert otel_npu.flush(10.0)
    after = time.time_ns()
    span = spans.one("forward")
    error = int(span.attributes[ATTR_CLOCK_ERROR] * 1000) + 2_000  # + the host clock's own sampling
    assert before - error <= span.start_time <= span.end_time <= after + error
    assert span.end_time - span.start_time >= WORK_S * 1e9 - error


def test_every_capture_from_several_threads_is_exported_or_counted(device_kind, provider, spans):
    enable(provider, **device_kind.configure)
    per_thread, threads = 50, 4
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(per_thread):
                with otel_npu.capture("forward"):
                    device_kind.work(0.0001)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    assert otel_npu.flush(30.0)
    exported = len(spans.named("forward"))
    assert exported + otel_npu.stats()["dropped_total"] == per_thread * threads
    assert exported > 0


def test_an_exception_propagates_unchanged_and_marks_the_span(device_kind, provider, spans):
    enable(provider, **device_kind.configure)

    class Boom(Exception):
        pass

    with pytest.raises(Boom, match="bad shape"):
        with otel_npu.capture("forward"):
            device_kind.work(0.001)
            raise Boom("bad shape")
    assert otel_npu.flush(10.0)
    span = spans.one("forward")
    assert span.status.status_code is StatusCode.ERROR and "bad shape" in span.status.description
    assert span.attributes["error.type"].endswith("Boom")
