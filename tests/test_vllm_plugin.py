"""The vLLM plugin's parts that need no vLLM: the hook table (checked targets, degrade with one warning), the
step a scheduler output becomes, and where stage metrics go. The real engine: tests/test_vllm_serve.py."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace as NS

import pytest

import otel_npu
from otel_npu.integrations import vllm as plugin

from .support import enable, new_request, scheduler_output


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("fake_vllm_runner")

    class Runner:
        def execute_model(self, so):
            return "ran"

    module.Runner = Runner
    monkeypatch.setitem(sys.modules, "fake_vllm_runner", module)
    yield module
    plugin.uninstall()


def test_a_missing_hook_target_is_named_in_one_warning_and_the_others_still_apply(fake_vllm, caplog_otel):
    wrapped = []

    def make(original):
        def replacement(self, so):
            wrapped.append(so)
            return original(self, so)
        return replacement

    hooks = (plugin.Hook("fake_vllm_runner", "Runner.execute_model", "steps", make),
             plugin.Hook("fake_vllm_runner", "Runner.sample_tokens", "the sampling stage", make),
             plugin.Hook("no_such_vllm_module", "X.y", "links", make))
    assert plugin.install(hooks) == ["fake_vllm_runner.Runner.execute_model"]
    assert plugin.install(hooks) == []  # each target once, and no second warning
    assert fake_vllm.Runner().execute_model(1) == "ran" and wrapped == [1]
    warnings = [r.getMessage() for r in caplog_otel.records if r.levelname == "WARNING" and r.name == "vllm.otel_npu"]
    assert len(warnings) == 2
    assert "fake_vllm_runner.Runner.sample_tokens" in warnings[0] and "the sampling stage" in warnings[0]
    assert "no_such_vllm_module" in warnings[1] and "cannot be imported" in warnings[1]
    plugin.uninstall()
    assert fake_vllm.Runner().execute_model(2) == "ran" and wrapped == [1]


def test_the_table_rejects_a_global_that_record_function_or_nullcontext_does_not_read(fake_vllm, caplog_otel):
    fake_vllm._PROFILER_FUNC = None
    fake_vllm.record_function_or_nullcontext = lambda name: None
    hook = plugin.Hook("fake_vllm_runner", "_PROFILER_FUNC", "stages", lambda original: "patched",
                       reader="record_function_or_nullcontext")
    assert plugin.install((hook,)) == []
    assert fake_vllm._PROFILER_FUNC is None
    assert "does not read _PROFILER_FUNC" in caplog_otel.text


def test_a_hook_outside_its_version_gate_is_neither_applied_nor_warned_about(fake_vllm, caplog_otel):
    def make(original):
        return lambda self, so: "patched"

    hooks = (plugin.Hook("fake_vllm_runner", "Runner.execute_model", "steps", make, since=(0, 34)),
             plugin.Hook("no_such_vllm_module", "X.y", "the old runner", make, before=(0, 34)))
    assert plugin.install(hooks, (0, 33)) == []
    assert fake_vllm.Runner().execute_model(1) == "ran"
    assert plugin.install(hooks, (0, 34)) == ["fake_vllm_runner.Runner.execute_model"]
    assert fake_vllm.Runner().execute_model(1) == "patched"
    assert not [r for r in caplog_otel.records if r.levelname == "WARNING"]
    assert [plugin.admits(hooks[0], v) for v in [(0, 33), (0, 34), (0, 34, 1), (1, 0), ()]] == [
        False, True, True, True, True]  # () : a version nobody could read: every target is tried, and checked


def test_a_global_is_checked_against_its_reader_even_when_another_hook_wrapped_the_reader(fake_vllm):
    def reader(self, so):
        return dispatch(so)  # noqa: F821 - a global of the fake module, for the check to find; never called

    fake_vllm.Runner.execute_model = reader
    fake_vllm.dispatch = lambda so: "dispatched"  # the global ``dispatch`` that reader reads
    def wrap(original):
        return lambda self, so: original(self, so)

    hooks = (plugin.Hook("fake_vllm_runner", "Runner.execute_model", "stages", wrap),
             plugin.Hook("fake_vllm_runner", "dispatch", "graph mode", lambda original: original,
                         reader="Runner.execute_model"))
    assert plugin.install(hooks) == ["fake_vllm_runner.Runner.execute_model", "fake_vllm_runner.dispatch"]


def test_a_target_whose_parameters_moved_is_refused(fake_vllm, caplog_otel):
    hook = plugin.Hook("fake_vllm_runner", "Runner.execute_model", "steps", lambda original: original,
                       params=("self", "scheduler_output"))
    assert plugin.install((hook,)) == []
    assert "does not start with ('self', 'scheduler_output')" in caplog_otel.text


def run_steps(outputs):
    worker = plugin._Worker()
    for so in outputs:
        if worker.begin(so) is not None:
            with otel_npu.capture("forward"):
                pass
            worker.end()
    otel_npu.flush()
    return worker


def test_scheduler_outputs_become_prefill_and_decode_steps_linked_to_their_clients(provider, spans):
    enable(provider)
    a = "00-0000000000000000000000000000000a-000000000000000b-01"
    run_steps([
        scheduler_output(new=[new_request("r1", 5, a), new_request("r2", 300)]),
        scheduler_output(cached=[("r1", 5, 1), ("r2", 256, 44)]),  # r2's prompt is still being prefilled
        scheduler_output(cached=[("r1", 6, 1), ("r2", 300, 1)]),
        scheduler_output(finished=["r1", "r2"]),  # nothing scheduled: no step
    ])
    steps = sorted((s for s in spans.all if s.attributes.get("otel_npu.kind") == "step"),
                   key=lambda s: s.start_time)
    assert [s.name for s in steps] == ["Prefill", "Prefill", "Decode"]
    assert [s.attributes["vllm.batch_size"] for s in steps] == [2, 2, 2]
    assert [s.attributes["otel_npu.batch_size"] for s in steps] == [1, 1, 1]  # linked: r1 only
    assert [s.attributes["vllm.num_scheduled_tokens"] for s in steps] == [305, 45, 2]
    assert list(steps[0].attributes["vllm.request_ids"]) == ["r1", "r2"]
    for step in steps:  # r1 came with a traceparent, r2 without: one link, to the client's span
        assert [(link.context.trace_id, link.context.span_id) for link in step.links] == [(0xA, 0xB)]
        assert [c.name for c in spans.children_of(step)] == ["forward"]


def test_finished_requests_are_forgotten():
    worker = plugin._Worker()
    worker.learn([new_request("r1", 3), new_request("r2", 3)])
    worker.forget({"r1"})
    assert list(worker.requests) == ["r2"]


@pytest.mark.parametrize("env, expected", [
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"},
     {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"}),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
     {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics",
      "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"}),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://m:4318"}, {}),
    ({}, {}),
])
def test_stage_metrics_follow_vllms_traces_endpoint_unless_one_is_set(env, expected):
    given = dict(env)
    plugin._metrics_to_vllm_collector(given)
    assert {k: v for k, v in given.items() if k not in env} == expected


def test_runner_scopes_become_stages_inside_a_step_and_vllms_own_scopes_still_run(provider, spans):
    enable(provider)
    entered = []

    class Range:  # what torch's record_function is to vLLM (VLLM_CUSTOM_SCOPES_FOR_PROFILING=1)
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            entered.append(self.name)

        def __exit__(self, *exc):
            entered.append("/" + self.name)

    scope = plugin._scopes(Range)
    names = ["gpu_model_runner: preprocess", "schedule: allocate_slots", "gpu_model_runner: ModelRunnerOutput",
             "EPLB update", "sample_token"]
    with scope(names[0]):  # no step open: vLLM's range only
        pass
    worker = plugin._worker
    try:
        worker.begin(scheduler_output(new=[new_request("r1", 3)]))
        for name in names:
            with scope(name):
                pass
        worker.end()
    finally:
        worker.__init__()
    otel_npu.flush()
    step = spans.one("Prefill")
    # the scheduler's scopes and the output packing are not stages; unknown scopes keep their name
    assert [c.name for c in spans.children_of(step)] == ["prepare input", "EPLB update", "sample"]
    assert len(spans.all) == 4
    assert entered == [x for name in [names[0]] + names for x in (name, "/" + name)]


def test_the_worker_exports_with_its_own_pipeline_where_vllm_sends_over_vllms_protocol():
    from otel_npu import runtime

    wrapper = NS(vllm_config=NS(observability_config=NS(otlp_traces_endpoint="http://c:4317")))
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}  # vLLM puts its endpoint there
    plugin._export_like_vllm(wrapper, env)
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"  # vLLM's convention, not OTLP's http default
    assert env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] == "http://c:4317"
    assert runtime.settings().pipeline == "own"
    # a protocol the operator chose stays; so does a pipeline the operator chose
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_NPU_PIPELINE": "app"}
    otel_npu.configure(pipeline="auto")
    plugin._export_like_vllm(wrapper, env)
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf" and runtime.settings().pipeline == "auto"


def test_the_docs_hook_table_says_for_each_hook_the_versions_it_applies_to_was_read_in_and_run_with():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "vllm.md").read_text()
    rows = {row.split("`")[1]: [cell.strip() for cell in row.strip().strip("|").split("|")]
            for row in doc.splitlines() if row.startswith("| `vllm.")}
    assert len(rows) == len(plugin.HOOKS)
    for hook in plugin.HOOKS:
        _, _, gate, read, run = rows[f"{hook.module}.{hook.attr}"]
        since = ".".join(map(str, hook.since))
        assert gate == (f"{since} … {hook.before[0]}.{hook.before[1] - 1}" if hook.before else f"≥ {since}")
        assert read == ", ".join(hook.read)
        assert run.split(" (")[0] == ", ".join(hook.run)
