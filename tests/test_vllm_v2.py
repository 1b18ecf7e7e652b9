"""The vLLM plugin on the model runner V2 (``vllm/v1/worker/gpu/model_runner.py``), driven through stand-ins.

The stand-ins are built by this test from vLLM 0.34.0's own sources (``tests/vllm_sources.py``): each method's
``def`` line (parameters, their order, which have defaults) is vLLM's, only the body is the test's, doing what
vLLM's does in the same order (the order itself is checked against the sources in ``test_vllm_sources.py``)
with simulated device work. So a parameter the plugin relies on that moves in vLLM's sources fails here: the
hook is refused (named in the warning) and its stages go missing. The real runner: ``test_vllm_serve.py``.
"""

from __future__ import annotations

import ast
import copy
import sys
import threading
import types
from types import SimpleNamespace as NS
from typing import Any

import pytest

import otel_npu
from otel_npu.integrations import vllm as plugin

from .support import TIME_BOUND_NS, enable, new_request, scheduler_output
from .vllm_sources import Release, sources

VERSION = Release("vllm", "0.34.0")
V2 = (0, 34)

# The bodies: what each vLLM method does, in vLLM's order, with the device work of a step (seconds).
BODIES = {
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.execute_model"):
        "return self.worker.execute_model(scheduler_output)",
    ("vllm.v1.worker.gpu_worker", "Worker.execute_model"):
        "return self.model_runner.execute_model(scheduler_output, None)",
    ("vllm.v1.worker.gpu_worker", "Worker.sample_tokens"):
        "return self.model_runner.sample_tokens(grammar_output)",
    ("vllm.v1.worker.gpu.dp_utils", "dispatch_cg_and_sync_dp"):
        "return BatchExecutionDescriptor(cg_mode=MODE, num_tokens=num_tokens, num_reqs=num_reqs), None",
    ("vllm.v1.worker.gpu.async_utils", "StepTimingCollector.forward_start"):
        "calls.append('forward_start')",
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.execute_model"): """
if not dummy_run:
    device(PREPARE)  # update_states, add_requests, ...
batch_desc, dp_sync = dispatch_cg_and_sync_dp(None, 1, 8, None, 1, 0)
if not dummy_run:
    self.prepare_inputs(scheduler_output, None, batch_desc, 0)
self.step_timing.forward_start()
device(FORWARD)  # the model call (or the graph replay)
self.state = 'executed'
return None
""",
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_inputs"):
        "device(PREPARE_INPUTS)",
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.sample"):
        "device(SAMPLE)\nreturn 'sampler_output', 1, 0",
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.postprocess_sampled"):
        "device(POSTPROCESS)",
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.sample_tokens"): """
if self.state is None:
    return None
self.state = None
sampler_output, num_sampled, num_rejected = self.sample('hidden', 'batch', grammar_output)
device(OUTPUT)  # prompt logprobs, the output copy
self.postprocess_sampled('idx', 'tokens', num_sampled, num_rejected)
if self.speculator is not None:
    self.speculator.propose('batch', None, None, 'hidden', None, num_sampled, num_rejected, None, None, None, None)
return 'async_output'
""",
    ("vllm.v1.worker.gpu.spec_decode.speculator", "BaseSpeculator.propose"):
        "device(DRAFT)\nreturn 'draft_tokens'",
}
SECONDS = dict(PREPARE=0.002, PREPARE_INPUTS=0.001, FORWARD=0.005, SAMPLE=0.001, OUTPUT=0.0003,
               POSTPROCESS=0.0004, DRAFT=0.002)


def standin(src: Any, module: str, qualname: str, body: str, namespace: dict, edit: Any = None) -> Any:
    """``qualname``'s def from the sources of ``src`` (decorators, annotations and default values dropped:
    defaults become their literal or None), with ``body``, compiled in ``namespace``."""
    found = src.function(module, qualname)
    assert found is not None, f"{src}: {module}.{qualname} not found"
    fn = copy.deepcopy(found)
    fn.decorator_list, fn.returns, fn.type_comment = [], None, None
    args = fn.args
    for arg in args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]:
        arg.annotation = None
    def literal(default: ast.expr) -> ast.expr:
        return default if isinstance(default, ast.Constant) else ast.Constant(None)

    args.defaults = [literal(d) for d in args.defaults]
    args.kw_defaults = [None if d is None else literal(d) for d in args.kw_defaults]
    if edit is not None:
        edit(fn)
    fn.body = ast.parse(body).body
    tree = ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[]))
    exec(compile(tree, f"<{module}.{qualname} of {src}>", "exec"), namespace)
    return namespace[fn.name]


class FakeVllm:
    """The modules the plugin hooks, as modules in ``sys.modules``, with stand-ins of vLLM 0.34's classes."""

    def __init__(self, src: Any, monkeypatch: pytest.MonkeyPatch, sim: Any, edit: dict | None = None) -> None:
        self.calls: list[str] = []
        self.modules: dict[str, types.ModuleType] = {}
        stream = sim.current_stream()
        common = dict(SECONDS, device=stream.launch, calls=self.calls, MODE=NS(name="FULL"),
                      BatchExecutionDescriptor=lambda **kw: NS(**kw))
        classes: dict[tuple[str, str], dict] = {}
        for (module, qualname), body in BODIES.items():
            namespace = self.module(module, monkeypatch).__dict__
            namespace.update(common)
            fn = standin(src, module, qualname, body, namespace, (edit or {}).get(qualname))
            if "." in qualname:
                owner, name = qualname.split(".")
                classes.setdefault((module, owner), {})[name] = fn
        for (module, owner), methods in classes.items():
            setattr(self.modules[module], owner, type(owner, (), methods))
        # the V2 runner's module reads dispatch_cg_and_sync_dp as its own global, imported from dp_utils
        self.modules["vllm.v1.worker.gpu.model_runner"].dispatch_cg_and_sync_dp = (
            self.modules["vllm.v1.worker.gpu.dp_utils"].dispatch_cg_and_sync_dp)

    def module(self, name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
        if name not in self.modules:
            self.modules[name] = types.ModuleType(name)
            monkeypatch.setitem(sys.modules, name, self.modules[name])
        return self.modules[name]

    def engine(self, speculate: bool = False) -> Any:
        """A worker wrapper -> worker -> V2 runner, as vLLM's worker process holds them."""
        m = self.modules
        runner = m["vllm.v1.worker.gpu.model_runner"].GPUModelRunner()
        runner.state = None
        runner.step_timing = m["vllm.v1.worker.gpu.async_utils"].StepTimingCollector()
        runner.speculator = m["vllm.v1.worker.gpu.spec_decode.speculator"].BaseSpeculator() if speculate else None
        worker = m["vllm.v1.worker.gpu_worker"].Worker()
        worker.model_runner = runner
        wrapper = m["vllm.v1.worker.worker_base"].WorkerWrapperBase()
        wrapper.worker = worker
        return wrapper


@pytest.fixture
def v2_hooks() -> tuple[plugin.Hook, ...]:
    """What ``register()`` installs on vLLM 0.34, less the scheduler side and vLLM's own tracer (not in these
    stand-ins)."""
    yield tuple(h for h in plugin.HOOKS if plugin.admits(h, V2) and h.role not in ("links", "engine step", "ids"))
    plugin.uninstall()


@pytest.fixture
def fake(monkeypatch, sim):
    monkeypatch.setenv("OTEL_NPU_PIPELINE", "app")  # the test's in-memory provider, not the worker's own pipeline
    return FakeVllm(sources(VERSION), monkeypatch, sim)


def step_and_stages(spans: Any) -> list[tuple[Any, list[Any]]]:
    steps = sorted((s for s in spans.all if s.attributes.get("otel_npu.kind") == "step"), key=lambda s: s.start_time)
    return [(step, sorted(spans.children_of(step), key=lambda s: s.start_time)) for step in steps]


def test_each_v2_stage_is_captured_inside_its_step_with_the_device_time_of_its_work(
        provider, spans, sim, fake, v2_hooks, caplog_otel):
    enable(provider, device=sim)
    assert set(plugin.install(v2_hooks, V2)) == {f"{h.module}.{h.attr}" for h in v2_hooks}
    wrapper = fake.engine(speculate=True)
    a = "00-0000000000000000000000000000000a-000000000000000b-01"
    # The two steps' device work queued behind a gate, released once all of it is queued: the simulated device
    # runs it back to back on its own schedule, so each stage's span lasts exactly its work, however late the
    # host was between two launches (on an idle device, a host stall would lengthen the stage).
    gate = threading.Event()
    sim.current_stream().call(gate.wait)
    # async scheduling: execute_model, then sample_tokens, as the EngineCore calls them
    assert wrapper.execute_model(scheduler_output(new=[new_request("r1", 5, a)])) is None
    assert wrapper.worker.sample_tokens(None) == "async_output"
    assert wrapper.execute_model(scheduler_output(cached=[("r1", 5, 1)])) is None
    assert wrapper.worker.sample_tokens(None) == "async_output"
    gate.set()
    assert otel_npu.flush(30.0)

    (prefill, stages), (decode, decode_stages) = step_and_stages(spans)
    assert (prefill.name, decode.name) == ("Prefill", "Decode")
    names = ["prepare input", "forward", "sample", "post process", "draft"]
    assert [s.name for s in stages] == names
    assert [s.name for s in decode_stages] == names
    assert prefill.attributes["vllm.cudagraph_mode"] == "FULL"
    expected = {"prepare input": SECONDS["PREPARE"] + SECONDS["PREPARE_INPUTS"], "forward": SECONDS["FORWARD"],
                "sample": SECONDS["SAMPLE"], "post process": SECONDS["OUTPUT"] + SECONDS["POSTPROCESS"],
                "draft": SECONDS["DRAFT"]}
    for stage in stages + decode_stages:  # the device time of each stage's work, no more, no less
        took = stage.end_time - stage.start_time
        assert abs(took - expected[stage.name] * 1e9) <= TIME_BOUND_NS, (stage.name, took)
    for earlier, later in zip(stages, stages[1:]):  # one after the other, none overlapping
        assert earlier.end_time <= later.start_time + TIME_BOUND_NS
    assert prefill.start_time <= stages[0].start_time and stages[-1].end_time <= prefill.end_time
    assert fake.calls == ["forward_start", "forward_start"]  # vLLM's own forward_start still ran
    assert not [r for r in caplog_otel.records if r.levelname == "WARNING"]


def test_dummy_runs_and_calls_outside_a_step_are_not_stages(provider, spans, sim, fake, v2_hooks):
    enable(provider, device=sim)
    plugin.install(v2_hooks, V2)
    runner = fake.engine().worker.model_runner
    runner.execute_model(scheduler_output(new=[new_request("r1", 5)]), None, True)  # a dummy run (DP padding)
    runner.sample_tokens(None)
    otel_npu.flush()
    assert spans.all == []


def test_a_dummy_run_while_a_step_is_open_adds_no_stage_to_it(provider, spans, sim, fake, v2_hooks):
    # None of the releases read runs a dummy batch from inside execute_model, but a worker may call the runner's
    # _dummy_run (DP padding, a platform's worker) between a step's execute_model and its sample_tokens: that
    # run is not the step's work, and must not become a second "prepare input"/"forward" in it.
    enable(provider, device=sim)
    plugin.install(v2_hooks, V2)
    wrapper = fake.engine()
    runner = wrapper.worker.model_runner
    wrapper.execute_model(scheduler_output(new=[new_request("r1", 5)]))
    assert plugin._worker.in_step()  # async scheduling: the step stays open until sample_tokens
    runner.execute_model(scheduler_output(new=[new_request("dummy", 1)]), None, True)
    wrapper.worker.sample_tokens(None)
    otel_npu.flush()
    [(_, stages)] = step_and_stages(spans)
    assert [s.name for s in stages] == ["prepare input", "forward", "sample", "post process"]


def test_without_a_speculator_there_is_no_draft_and_the_post_process_ends_with_sample_tokens(
        provider, spans, sim, fake, v2_hooks):
    enable(provider, device=sim)
    plugin.install(v2_hooks, V2)
    wrapper = fake.engine(speculate=False)
    wrapper.execute_model(scheduler_output(new=[new_request("r1", 5)]))
    wrapper.worker.sample_tokens(None)
    otel_npu.flush()
    [(step, stages)] = step_and_stages(spans)
    assert [s.name for s in stages] == ["prepare input", "forward", "sample", "post process"]
    assert stages[-1].end_time <= step.end_time


def test_before_the_forward_seam_existed_one_stage_is_named_for_both(provider, spans, sim, fake, v2_hooks):
    # vLLM 0.23 ... 0.27: the V2 runner without StepTimingCollector (its gate leaves that hook out)
    enable(provider, device=sim)
    done = plugin.install(v2_hooks, (0, 27))
    assert f"vllm.v1.worker.gpu.async_utils.{plugin._FORWARD_SEAM}" not in done and len(done) == len(v2_hooks) - 1
    wrapper = fake.engine()
    wrapper.execute_model(scheduler_output(new=[new_request("r1", 5)]))
    wrapper.worker.sample_tokens(None)
    otel_npu.flush()
    [(_, stages)] = step_and_stages(spans)
    assert [s.name for s in stages] == ["prepare input and forward", "sample", "post process"]


def test_an_exception_in_the_model_ends_the_stage_and_the_step_with_it(provider, spans, sim, fake, v2_hooks):
    enable(provider, device=sim)
    plugin.install(v2_hooks, V2)
    wrapper = fake.engine()
    fake.modules["vllm.v1.worker.gpu.model_runner"].FORWARD = "not seconds"  # device() raises in the forward
    with pytest.raises(TypeError):
        wrapper.execute_model(scheduler_output(new=[new_request("r1", 5)]))
    otel_npu.flush()
    [(step, stages)] = step_and_stages(spans)
    assert [s.name for s in stages] == ["prepare input", "forward"]
    assert stages[-1].status.status_code.name == "ERROR" and step.status.status_code.name == "ERROR"
    assert plugin._worker.stage is None and plugin._worker.step is None


def test_a_moved_parameter_in_vllms_sources_refuses_the_hook_and_names_it(monkeypatch, sim, v2_hooks, caplog_otel):
    """If vLLM's execute_model took dummy_run somewhere else, the replacement would read the wrong argument:
    the table's ``params`` refuse it, with the one warning naming the target."""

    def swap(fn: ast.FunctionDef) -> None:  # (self, scheduler_output, dummy_run, intermediate_tensors, ...)
        fn.args.args[2], fn.args.args[3] = fn.args.args[3], fn.args.args[2]

    monkeypatch.setenv("OTEL_NPU_PIPELINE", "app")
    FakeVllm(sources(VERSION), monkeypatch, sim, edit={"GPUModelRunner.execute_model": swap})
    done = plugin.install(v2_hooks, V2)
    assert "vllm.v1.worker.gpu.model_runner.GPUModelRunner.execute_model" not in done
    warnings = [r.getMessage() for r in caplog_otel.records if r.levelname == "WARNING"]
    assert any("GPUModelRunner.execute_model" in w and "dummy_run" in w for w in warnings), warnings
