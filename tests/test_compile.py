"""torch.compile(fullgraph=True) over instrumented code: captures and module hooks do nothing while Dynamo
traces (a ContextVar.set there fails fullgraph, and would split the graph otherwise); a capture around the
compiled call still times it. Real torch.compile on CPU (the "eager" backend: Dynamo's tracing is what is
under test, and it is the same for every backend)."""

from __future__ import annotations

import pytest

import otel_npu

from .support import enable

torch = pytest.importorskip("torch")


def model() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fullgraph_compile_of_an_instrumented_module_and_a_capture_around_the_call(provider, spans):
    """Saw it fail before the fix: torch._dynamo.exc.Unsupported (ContextVar.get/set in the module hooks)."""
    enable(provider, device="cpu")
    m = model()
    handle = otel_npu.instrument_module(m)
    x = torch.randn(3, 8)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with otel_npu.capture("compiled forward"):
        y = compiled(x)
    torch.testing.assert_close(y, m(x))  # the eager call: the hooks are live there
    assert otel_npu.flush(5.0)
    assert len(spans.named("compiled forward")) == 1
    # one span per layer: from the eager call only; the compiled graph has no per-layer captures
    assert sorted(s.name for s in spans.all if s.name != "compiled forward") == ["0", "1", "2"]
    assert handle.attached


@pytest.mark.parametrize("enabled", [True, False])
def test_capture_and_step_inside_a_fullgraph_compiled_function(provider, spans, enabled):
    """Saw it fail before the fix: Unsupported (ContextVar mutation; a context manager Dynamo cannot trace)."""
    if enabled:
        enable(provider, device="cpu")
    with otel_npu.capture("a name seen before the trace"):
        pass

    def f(x):
        with otel_npu.step("step"):
            with otel_npu.capture("a name seen before the trace"):
                y = x * 2
            with otel_npu.capture("stage", attributes={"k": 1}):
                return y + 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.ones(4)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), x * 2 + 1)
    assert otel_npu.flush(5.0)
    assert [s.name for s in spans.all] == (["a name seen before the trace"] if enabled else [])
