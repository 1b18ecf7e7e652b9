"""instrument_module: captures around child modules through forward hooks, on the CPU backend."""

from __future__ import annotations

import pytest
import torch
from opentelemetry.trace import StatusCode

import otel_npu
from otel_npu import capturing
from otel_npu.spans.attributes import ATTR_ERROR_TYPE, ATTR_MODULE, ATTR_STEP

from .support import enable


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(8, 8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())

    def forward(self, x):
        return self.mlp(self.attn(x))


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Boom(torch.nn.Module):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    def forward(self, x):
        raise self.exc


class Catching(torch.nn.Module):
    """Calls a child that raises, and carries on (as a fallback path in a model might)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.boom = Boom(exc)
        self.after = torch.nn.Linear(4, 4)

    def forward(self, x):
        try:
            self.boom(x)
        except BaseException:
            pass
        return self.after(x)


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_names_follow_depth_and_look_through_module_lists():
    model = Model()
    assert otel_npu.instrument_module(model).names == ["embed", "layers.0", "layers.1", "head"]
    deeper = otel_npu.instrument_module(model, depth=2, name_prefix="model")
    assert deeper.names == ["model.embed", "model.layers.0", "model.layers.0.attn", "model.layers.0.mlp",
                            "model.layers.1", "model.layers.1.attn", "model.layers.1.mlp", "model.head"]
    assert len(otel_npu.instrument_module(model, depth=3).names) == len(deeper.names) + 4  # mlp.0, mlp.1 x2


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="needs a torch.nn.Module, got list"):
        otel_npu.instrument_module([])
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        otel_npu.instrument_module(Model(), depth=0)


def test_no_hooks_while_disabled_so_the_model_takes_torch_fast_path(provider, spans):
    model = Model()
    handle = otel_npu.instrument_module(model, depth=2)
    assert not otel_npu.enabled()
    assert hook_count(model) == 0 and not handle.attached  # Module._call_impl's no-hook fast path
    model(torch.ones(1, 4))

    enable(provider, device="cpu")
    assert handle.attached and hook_count(model) == 2 * len(handle.names)
    with otel_npu.step("Decode"):
        model(torch.ones(1, 4))
    assert otel_npu.flush()
    assert {s.name for s in spans.all} == {"Decode", *handle.names}

    otel_npu.shutdown()
    assert hook_count(model) == 0
    enable(provider, device="cpu")
    assert hook_count(model) == 2 * len(handle.names)
    handle.remove()
    assert hook_count(model) == 0
    otel_npu.configure(enabled=True)
    assert hook_count(model) == 0  # removed for good
    handle.remove()  # idempotent


def test_module_captures_nest_inside_the_stage_and_step(provider, spans):
    model = Model()
    enable(provider, device="cpu")
    handle = otel_npu.instrument_module(model, depth=2)
    with otel_npu.step("Prefill"):
        with otel_npu.capture("forward"):
            model(torch.ones(3, 4))
    assert otel_npu.flush()
    forward = spans.one("forward")
    assert [s.name for s in sorted(spans.children_of(forward), key=lambda s: s.start_time)] == [
        "embed", "layers.0", "layers.1", "head"]
    layer = spans.one("layers.1")
    assert [s.name for s in sorted(spans.children_of(layer), key=lambda s: s.start_time)] == [
        "layers.1.attn", "layers.1.mlp"]
    for span in spans.all:
        if span.name in handle.names:
            parent = next(p for p in spans.all if p.context.span_id == span.parent.span_id)
            assert parent.start_time <= span.start_time <= span.end_time <= parent.end_time
            assert span.attributes[ATTR_STEP] == "Prefill"
    assert spans.one("layers.0.mlp").attributes[ATTR_MODULE] == "Sequential"
    assert capturing.current() is None


def test_a_module_that_raises_closes_its_captures_with_the_error(provider, spans):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Boom(ValueError("bad shape")))
    enable(provider, device="cpu")
    otel_npu.instrument_module(model)
    with otel_npu.capture("forward"):
        with pytest.raises(ValueError, match="bad shape"):
            model(torch.ones(1, 4))
        assert capturing.current().name == "forward"  # nothing of the module left open
    with otel_npu.capture("sample"):
        pass
    assert otel_npu.flush()
    boom = spans.one("1")
    assert boom.status.status_code is StatusCode.ERROR
    assert boom.attributes[ATTR_ERROR_TYPE] == "ValueError"
    assert spans.one("0").status.status_code is StatusCode.UNSET
    assert spans.one("sample").parent is None  # not parented to a leftover capture
    assert {s.name for s in spans.children_of(spans.one("forward"))} == {"0", "1"}


def test_a_capture_left_open_by_a_base_exception_is_closed_by_the_enclosing_module(provider, spans):
    # PyTorch runs no hook for a BaseException that is not an Exception: the child's capture stays open
    # until the hook of the module around it closes it.
    model = torch.nn.Sequential(Catching(KeyboardInterrupt()))
    enable(provider, device="cpu")
    otel_npu.instrument_module(model, depth=2)
    model(torch.ones(1, 4))
    assert capturing.current() is None
    assert otel_npu.flush()
    outer, boom, after = spans.one("0"), spans.one("0.boom"), spans.one("0.after")
    assert boom.parent.span_id == outer.context.span_id
    assert after.parent.span_id == boom.context.span_id  # opened while the leftover was innermost
    assert outer.start_time <= boom.start_time <= boom.end_time <= outer.end_time
