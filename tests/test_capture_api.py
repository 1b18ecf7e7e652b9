"""The public capture API on the CPU backend: parents, links, errors, decorators, threads, asyncio, disabled."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

import otel_npu
from otel_npu.spans.attributes import ATTR_DEVICE, ATTR_ERROR_TYPE, ATTR_PID, ATTR_STEP, ATTR_STREAM

from .support import enable


def test_disabled_by_default_costs_nothing_and_starts_no_thread(spans):
    assert not otel_npu.enabled()
    before = {t.name for t in threading.enumerate()}
    for _ in range(1000):
        with otel_npu.capture("forward"):
            pass
        with otel_npu.step("Decode", links=[]):
            pass
    after = {t.name for t in threading.enumerate()}
    assert not any(name.startswith("otel-npu") for name in after - before)
    assert otel_npu.stats() == {"running": False}
    assert otel_npu.flush() is True
    assert spans.all == []


def test_span_name_must_be_a_non_empty_str():
    with pytest.raises(TypeError, match=r"otel_npu.capture\(name=...\) takes a non-empty str.*got int 3"):
        otel_npu.capture(3)
    with pytest.raises(TypeError, match=r"otel_npu.step\(name=...\)"):
        otel_npu.step("")


def test_outermost_capture_is_parented_to_the_current_request_span(provider, spans):
    enable(provider, device="cpu")
    tracer = provider[0].get_tracer("app")
    with tracer.start_as_current_span("llm_request") as request:
        with otel_npu.capture("forward"):
            with otel_npu.capture("attention"):
                time.sleep(0.001)
    assert otel_npu.flush()
    forward, attention = spans.one("forward"), spans.one("attention")
    assert forward.parent.span_id == request.get_span_context().span_id
    assert forward.context.trace_id == request.get_span_context().trace_id
    assert attention.parent.span_id == forward.context.span_id
    assert attention.end_time - attention.start_time >= 1_000_000
    assert forward.attributes[ATTR_DEVICE] == "cpu"
    assert forward.attributes[ATTR_STREAM] == "thread:MainThread"


def test_remote_request_context_is_honoured(provider, spans):
    enable(provider, device="cpu")
    remote = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    token = trace.context_api.attach(trace.set_span_in_context(NonRecordingSpan(remote)))
    try:
        with otel_npu.capture("forward"):
            pass
    finally:
        trace.context_api.detach(token)
    assert otel_npu.flush()
    span = spans.one("forward")
    assert span.context.trace_id == 0x1234 and span.parent.span_id == 0x5678 and span.parent.is_remote


def test_capture_under_an_unsampled_parent_produces_no_span(provider, spans):
    enable(provider, device="cpu")
    unsampled = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0))
    token = trace.context_api.attach(trace.set_span_in_context(NonRecordingSpan(unsampled)))
    try:
        with otel_npu.step("Decode"):
            with otel_npu.capture("forward"):
                pass
    finally:
        trace.context_api.detach(token)
    with otel_npu.capture("sampled root"):
        pass
    assert otel_npu.flush()
    assert [s.name for s in spans.all] == ["sampled root"]
    stats = otel_npu.stats()
    assert stats["spans_unsampled"] == 2 and stats["resolved"] == 3


def test_without_a_current_span_a_capture_starts_a_new_trace(provider, spans):
    enable(provider, device="cpu")
    with otel_npu.capture("a"):
        pass
    with otel_npu.capture("b"):
        pass
    assert otel_npu.flush()
    a, b = spans.one("a"), spans.one("b")
    assert a.parent is None and b.parent is None
    assert a.context.trace_id != b.context.trace_id


def test_step_links_every_request_of_the_batch(provider, spans):
    enable(provider, device="cpu")
    tracer = provider[0].get_tracer("app")
    requests = [tracer.start_span(f"llm_request {i}") for i in range(3)]
    batch = [requests[0], requests[1].get_span_context(), trace.Link(requests[2].get_span_context())]
    with otel_npu.step("Decode", links=batch, attributes={"batch_size": 3}):
        batch.clear()  # engines reuse their lists: the step must have copied it
        with otel_npu.capture("forward"):
            pass
    for r in requests:
        r.end()
    assert otel_npu.flush()
    step = spans.one("Decode")
    assert [link.context.span_id for link in step.links] == [r.get_span_context().span_id for r in requests]
    assert step.attributes["batch_size"] == 3
    assert step.attributes["otel_npu.kind"] == "step" and step.attributes["otel_npu.batch_size"] == 3
    assert "otel_npu.kind" not in spans.one("forward").attributes
    assert step.parent is None, "an engine step belongs to no single request"
    assert spans.one("forward").attributes[ATTR_STEP] == "Decode"


def test_bad_links_are_dropped_with_one_warning_naming_the_type(provider, spans, caplog_otel):
    enable(provider, device="cpu")
    with otel_npu.step("Decode", links=["not a span", "nor this"]):
        pass
    assert otel_npu.flush()
    assert spans.one("Decode").links == ()
    warnings = [r.getMessage() for r in caplog_otel.records if "link must be" in r.getMessage()]
    assert len(warnings) == 1 and "got str" in warnings[0]
    assert otel_npu.stats()["links_dropped"] == 2


def test_exception_propagates_unchanged_and_marks_the_span(provider, spans):
    enable(provider, device="cpu")
    error = KeyError("missing block")
    with pytest.raises(KeyError) as raised:
        with otel_npu.capture("post process"):
            raise error
    assert raised.value is error
    assert otel_npu.flush()
    span = spans.one("post process")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "KeyError: 'missing block'"
    assert span.attributes[ATTR_ERROR_TYPE] == "KeyError"
    assert [e.name for e in span.events] == ["exception"]


def test_user_attributes_are_kept_and_invalid_ones_dropped_with_a_warning(provider, spans, caplog_otel):
    enable(provider, device="cpu")
    with otel_npu.capture("forward", attributes={"tokens": 128, "ok": True, "dims": [1, 2], "bad": object()}):
        pass
    assert otel_npu.flush()
    attrs = spans.one("forward").attributes
    assert attrs["tokens"] == 128 and attrs["ok"] is True and tuple(attrs["dims"]) == (1, 2)
    assert "bad" not in attrs
    assert any("attribute 'bad'" in r.getMessage() for r in caplog_otel.records)
    assert attrs[ATTR_PID] > 0


def test_decorator_sync_and_async(provider, spans):
    @otel_npu.capture("sample")  # decorated while disabled: must capture once enabled
    def sample(x):
        return x + 1

    @otel_npu.capture("draft")
    async def draft(x):
        await asyncio.sleep(0.001)
        return x * 2

    assert sample(1) == 2
    enable(provider, device="cpu")
    assert sample(2) == 3
    assert asyncio.run(draft(4)) == 8
    assert sample.__name__ == "sample"
    assert otel_npu.flush()
    assert len(spans.named("sample")) == 1
    assert spans.one("draft").end_time - spans.one("draft").start_time >= 1_000_000


def test_the_same_capture_object_can_be_entered_again(provider, spans):
    enable(provider, device="cpu")
    timer = otel_npu.capture("forward")
    for _ in range(3):
        with timer:
            pass
    with timer:
        with timer:  # even nested
            pass
    assert otel_npu.flush()
    spans_ = spans.named("forward")
    assert len(spans_) == 5
    assert len({s.context.span_id for s in spans_}) == 5


def test_many_threads_capture_at_once_and_nest_per_thread(provider, spans):
    enable(provider, device="cpu")
    errors = []

    def worker(n: int) -> None:
        try:
            for _ in range(50):
                with otel_npu.capture(f"outer-{n}"):
                    with otel_npu.capture(f"inner-{n}"):
                        pass
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,), name=f"w{n}") for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert otel_npu.flush(10.0)
    by_id = {s.context.span_id: s for s in spans.all}
    assert len(by_id) == 8 * 50 * 2
    for span in spans.all:
        n = span.name.split("-")[1]
        if span.name.startswith("inner"):
            parent = by_id[span.parent.span_id]
            assert parent.name == f"outer-{n}"
            assert span.attributes[ATTR_STREAM] == parent.attributes[ATTR_STREAM] == f"thread:w{n}"
        else:
            assert span.parent is None


def test_asyncio_tasks_nest_independently(provider, spans):
    enable(provider, device="cpu")

    async def request(n: int) -> None:
        with otel_npu.capture(f"req{n}"):
            for _ in range(3):
                with otel_npu.capture(f"req{n}-part"):
                    await asyncio.sleep(0.001)

    async def main() -> None:
        await asyncio.gather(*(request(n) for n in range(4)))

    asyncio.run(main())
    assert otel_npu.flush()
    for n in range(4):
        root = spans.one(f"req{n}")
        parts = spans.named(f"req{n}-part")
        assert len(parts) == 3
        assert all(p.parent.span_id == root.context.span_id for p in parts)


def test_flush_and_shutdown_are_bounded_and_idempotent(provider, spans):
    enable(provider, device="cpu")
    with otel_npu.capture("x"):
        pass
    assert otel_npu.flush(10.0)
    assert otel_npu.shutdown(10.0)
    assert not otel_npu.enabled()
    assert otel_npu.shutdown(10.0)  # again: nothing to do
    with otel_npu.capture("after shutdown"):
        pass
    assert [s.name for s in spans.all] == ["x"]
    otel_npu.configure(enabled=True)  # starts again on the next capture
    with otel_npu.capture("again"):
        pass
    assert otel_npu.flush()
    assert [s.name for s in spans.all] == ["x", "again"]


def test_stats_report_the_device_and_pipeline(provider):
    enable(provider, device="cpu")
    with otel_npu.capture("x"):
        pass
    otel_npu.flush()
    stats = otel_npu.stats()
    assert stats["running"] and stats["device"] == "cpu" and stats["resolver_alive"]
    assert "application's TracerProvider" in stats["pipeline"]
    assert stats["resolved"] == 1 and stats["spans_emitted"] == 1 and stats["dropped_total"] == 0
