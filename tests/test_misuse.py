"""The API misused as people misuse it: shared and re-entered capture objects, exits on the wrong thread or out of
order, exceptions that cannot be printed, generators, bad arguments. The program must never be hurt, and what
becomes of each capture must be said (a span, or a count)."""

from __future__ import annotations

import asyncio
import threading

import pytest

import otel_npu
from otel_npu import capturing

from .support import enable

# A module-level capture object, as people write it, shared by every thread below.
FORWARD = otel_npu.capture("forward")


def test_a_capture_object_entered_inside_itself_times_both_uses(provider, spans):
    enable(provider, device="cpu")
    timer = otel_npu.capture("forward")
    with timer:  # first use: the object itself
        with timer:  # nested re-entry
            with otel_npu.capture("inner"):
                pass
    with otel_npu.capture("after"):
        pass
    assert capturing.current() is None
    assert otel_npu.flush()
    outer, nested = sorted(spans.named("forward"), key=lambda s: s.start_time)
    assert outer.parent is None
    assert nested.parent.span_id == outer.context.span_id
    assert spans.one("inner").parent.span_id == nested.context.span_id
    assert spans.one("after").parent is None, "a later capture must not be parented to an ended use"
    assert otel_npu.stats()["dropped_total"] == 0


def test_a_module_level_capture_shared_by_threads_at_once(provider, spans):
    enable(provider, device="cpu")
    module_level = otel_npu.capture("forward")  # fresh (FORWARD may have been made while disabled: see below)
    n_threads, uses = 6, 200
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    leftovers: list[object] = []

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for _ in range(uses):
                with module_level:
                    with otel_npu.capture(f"inner-{n}"):
                        pass
            leftovers.append(capturing.current())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,), name=f"w{n}") for n in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert leftovers == [None] * n_threads
    assert otel_npu.flush(10.0)
    forwards = {s.context.span_id: s for s in spans.named("forward")}
    assert len(forwards) == n_threads * uses
    for n in range(n_threads):
        inner = spans.named(f"inner-{n}")
        assert len(inner) == uses
        for span in inner:  # each inner capture under a use of the shared object made by the same thread
            parent = forwards[span.parent.span_id]
            assert parent.attributes["otel_npu.stream"] == span.attributes["otel_npu.stream"] == f"thread:w{n}"
    assert len({s.parent.span_id for s in spans.all if s.name.startswith("inner")}) == n_threads * uses
    assert otel_npu.stats()["dropped_total"] == 0


def test_a_capture_object_made_while_disabled_works_once_enabled(provider, spans):
    """The module-level object of the docs, made at import before ``configure(enabled=True)``: once enabled,
    each use is timed (nested, re-entered and from several threads at once), as an object made while enabled."""
    otel_npu.configure(enabled=False)
    forward, decode = otel_npu.capture("forward"), otel_npu.step("Decode")  # made while disabled
    with decode, forward:  # used while still disabled: nothing
        pass
    enable(provider, device="cpu")
    with decode:
        with forward:
            with forward:  # re-entered
                with otel_npu.capture("inner"):
                    pass
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(50):
                with forward:
                    pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and capturing.current() is None
    assert otel_npu.flush()
    step = spans.one("Decode")
    outer, nested = sorted((s for s in spans.named("forward") if s.parent is not None
                            and s.context.trace_id == step.context.trace_id), key=lambda s: s.start_time)
    assert outer.parent.span_id == step.context.span_id and nested.parent.span_id == outer.context.span_id
    assert spans.one("inner").parent.span_id == nested.context.span_id
    assert len(spans.named("forward")) == 2 + 4 * 50
    assert otel_npu.stats()["dropped_total"] == 0 and otel_npu.stats().get("misnested_exits", 0) == 0


def test_the_module_level_object_made_at_import_is_timed_once_enabled(provider, spans):
    # FORWARD was made when this module was imported (otel-npu disabled then, unless the shell enabled it).
    enable(provider, device="cpu")
    with FORWARD:
        pass
    assert otel_npu.flush()
    assert len(spans.named("forward")) == 1


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ fails")


@pytest.mark.parametrize("device", ["cpu", "sim"])
def test_an_exception_whose_str_raises_propagates_unchanged(provider, spans, sim, device):
    enable(provider, device=sim if device == "sim" else "cpu")
    with pytest.raises(Unprintable):
        with otel_npu.capture("forward"):
            raise Unprintable()
    assert otel_npu.flush()
    span = spans.one("forward")
    assert span.attributes["error.type"].endswith("Unprintable")


def test_a_capture_exited_on_another_thread_does_not_stay_the_parent_here(provider, spans):
    enable(provider, device="cpu")
    cm = otel_npu.capture("handed over")
    cm.__enter__()
    worker = threading.Thread(target=cm.__exit__, args=(None, None, None))
    worker.start()
    worker.join()
    with otel_npu.capture("later"):
        pass
    assert capturing.current() is None
    assert otel_npu.flush()
    assert spans.one("handed over").parent is None
    assert spans.one("later").parent is None, "the capture exited elsewhere captured this thread's future"
    assert otel_npu.stats()["misnested_exits"] == 1


def test_captures_exited_out_of_order_are_timed_and_do_not_capture_the_future(provider, spans):
    enable(provider, device="cpu")
    a = otel_npu.capture("a")
    b = otel_npu.capture("b")
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # out of order: b is still open inside it
    b.__exit__(None, None, None)
    with otel_npu.capture("later"):
        pass
    assert capturing.current() is None
    assert otel_npu.flush()
    assert spans.one("b").parent.span_id == spans.one("a").context.span_id
    assert spans.one("later").parent is None
    assert otel_npu.stats()["misnested_exits"] == 1


def test_decorating_a_generator_is_refused_clearly():
    def tokens():
        yield 1

    async def stream():
        yield 1

    for fn in (tokens, stream):
        with pytest.raises(TypeError, match="generator.*consum"):
            otel_npu.capture("decode")(fn)
        with pytest.raises(TypeError, match="generator"):
            otel_npu.step("Decode")(fn)


def test_decorating_a_generator_is_refused_when_enabled_too(provider):
    enable(provider, device="cpu")

    def tokens():
        yield 1

    with pytest.raises(TypeError, match="generator"):
        otel_npu.capture("decode")(tokens)


@pytest.mark.parametrize("on", [False, True])
def test_step_links_that_are_not_iterable_are_refused_by_name(provider, on):
    if on:
        enable(provider, device="cpu")
    with pytest.raises(TypeError, match=r"step\(links=\.\.\.\) takes an iterable.*got int 5"):
        otel_npu.step("Decode", links=5)


def test_exit_without_enter_and_double_exit_say_so(provider, spans):
    enable(provider, device="cpu")
    with pytest.raises(RuntimeError, match="exited without being entered"):
        otel_npu.capture("never entered").__exit__(None, None, None)
    cm = otel_npu.capture("twice")
    with cm:
        pass
    with pytest.raises(RuntimeError, match="exited twice"):
        cm.__exit__(None, None, None)
    # with the program's own exception in flight, that exception is never replaced
    assert otel_npu.capture("x").__exit__(KeyError, KeyError("k"), None) is False
    assert otel_npu.flush()
    assert [s.name for s in spans.all] == ["twice"]


def test_an_asyncio_task_may_exit_the_capture_it_inherited(provider, spans):
    enable(provider, device="cpu")

    async def main() -> None:
        cm = otel_npu.capture("opened in main")
        cm.__enter__()

        async def closer() -> None:
            cm.__exit__(None, None, None)

        await asyncio.create_task(closer())
        with otel_npu.capture("later"):
            pass

    asyncio.run(main())
    assert otel_npu.flush()
    assert spans.one("later").parent is None
    assert otel_npu.stats()["misnested_exits"] == 1


@pytest.mark.parametrize("bad", [None, "x", -1, float("nan"), float("inf"), True])
def test_flush_and_shutdown_name_a_bad_timeout_and_change_nothing(provider, spans, bad):
    enable(provider, device="cpu")
    with otel_npu.capture("before"):
        pass
    with pytest.raises((TypeError, ValueError), match=r"otel_npu\.flush\(timeout_s=.*\) is not valid: expected"):
        otel_npu.flush(bad)
    with pytest.raises((TypeError, ValueError), match=r"otel_npu\.shutdown\(timeout_s=.*\) is not valid: expected"):
        otel_npu.shutdown(bad)
    assert otel_npu.enabled(), "a refused shutdown() must not have detached anything"
    with otel_npu.capture("after"):
        pass
    assert otel_npu.flush()
    assert [s.name for s in spans.all] == ["before", "after"]


def test_a_link_whose_get_span_context_raises_costs_that_link_only(provider, spans, caplog_otel):
    enable(provider, device="cpu")
    tracer = provider[0].get_tracer("test")
    with tracer.start_as_current_span("request") as good:
        pass

    class Broken:
        def get_span_context(self):
            raise RuntimeError("gone")

    with otel_npu.step("Decode", links=[good, Broken()]):
        with otel_npu.capture("forward"):
            pass
    assert otel_npu.flush()
    step = spans.one("Decode")
    assert [link.context.span_id for link in step.links] == [good.get_span_context().span_id]
    assert spans.one("forward").parent.span_id == step.context.span_id
    assert otel_npu.stats()["links_dropped"] == 1
    assert "get_span_context() raised RuntimeError" in caplog_otel.text
