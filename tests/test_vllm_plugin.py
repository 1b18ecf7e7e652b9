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


# -- one trace per engine step, every rank ------------------------------------------------------------------
def engine_and_ranks(sos, ranks=2, env=None, keep="p99"):
    """The EngineCore opens an engine step per scheduler output, each of ``ranks`` workers receives it pickled
    (as vLLM's executor sends it) and runs its step, then the EngineCore processes the outputs."""
    import pickle
    import time

    engine = plugin._EngineCore()
    engine.setup(env or {"OTEL_NPU_KEEP_SLOW_STEPS": keep})
    engine.active = True
    workers = [plugin._Worker() for _ in range(ranks)]
    requests = {}
    for so in sos:
        requests.update({new.req_id: NS(trace_headers=new.trace_headers) for new in so.scheduled_new_reqs})
        scheduler = NS(requests=requests, waiting=[1, 2], running=[3], kv_cache_manager=NS(usage=0.25))
        engine.schedule(scheduler, so, time.perf_counter_ns())
        received = [pickle.loads(pickle.dumps(so)) for _ in workers]
        for worker, copy in zip(workers, received):
            if worker.begin(copy) is not None:
                with otel_npu.capture("forward"):
                    pass
                worker.end()
        assert engine.close(so)
    otel_npu.flush()
    return engine


def test_each_engine_step_is_one_trace_with_one_step_per_rank_under_it_and_the_links_once(provider, spans):
    enable(provider, device="cpu")
    a = "00-0000000000000000000000000000000a-000000000000000b-01"
    engine_and_ranks([
        scheduler_output(new=[new_request("r1", 5, a)]),
        scheduler_output(cached=[("r1", 5, 1)]),
    ])
    everything = spans.all
    engine_steps = spans.named("engine step")
    assert len(engine_steps) == 2
    assert len({s.context.trace_id for s in engine_steps}) == 2  # no two steps share a trace
    assert len({s.context.span_id for s in everything}) == len(everything)  # no span id repeats
    for engine_step, kind in zip(sorted(engine_steps, key=lambda s: s.start_time), ["Prefill", "Decode"]):
        assert engine_step.parent is None
        assert engine_step.attributes["vllm.num_waiting_requests"] == 2
        assert engine_step.attributes["vllm.kv_cache_usage"] == 0.25
        assert [(l.context.trace_id, l.context.span_id) for l in engine_step.links] == [(0xA, 0xB)]
        children = spans.children_of(engine_step)
        assert [c.name for c in children] == [kind, kind]  # one per rank
        for child in children:
            assert child.context.trace_id == engine_step.context.trace_id and child.parent.is_remote
            assert not child.links  # linked once, on the engine step
            assert [g.name for g in spans.children_of(child)] == ["forward"]
    assert {s.context.trace_id for s in everything} == {s.context.trace_id for s in engine_steps}


def test_the_engine_step_decides_sampling_and_every_rank_follows(provider, spans):
    enable(provider, device="cpu")
    engine_and_ranks([scheduler_output(cached=[("r1", 5, 1)]) for _ in range(4)], keep="off",
                     env={"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0",
                          "OTEL_NPU_KEEP_SLOW_STEPS": "off"})
    assert spans.all == []  # dropped where it was opened: no rank exports a part of it
    engine = engine_and_ranks([scheduler_output(cached=[("r1", 5, 1)]) for _ in range(4)],
                              env={"OTEL_TRACES_SAMPLER": "always_on"})
    assert engine.promise
    assert len(spans.named("engine step")) == 4 and len(spans.named("Decode")) == 8


def test_a_step_a_rank_keeps_as_slow_has_its_engine_step_exported(provider, spans):
    # the sampler drops every step; the ranks keep every one as slow (threshold 1 ns): each has its parent
    enable(provider, device="cpu", keep_slow_steps="0.000001ms")
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    engine_and_ranks([scheduler_output(cached=[("r1", 5, 1)]) for _ in range(3)], env=env)
    engine_steps = {s.context.span_id: s for s in spans.named("engine step")}
    decodes = spans.named("Decode")
    assert len(engine_steps) == 3 and len(decodes) == 6
    for step in decodes:
        assert step.attributes["otel_npu.kept"] == "slow"
        parent = engine_steps[step.parent.span_id]
        assert parent.context.trace_id == step.context.trace_id
        assert parent.attributes["otel_npu.kept"] == "ranks"
    # an EngineCore that keeps no steps the sampler dropped promises no parent: no rank keeps a child then
    # (here the engine step itself is kept as slow, by the rule of this one process)
    spans.exporter.clear()
    engine_and_ranks([scheduler_output(cached=[("r1", 5, 1)])], env={**env, "OTEL_NPU_KEEP_SLOW_STEPS": "off"})
    assert [(s.name, s.attributes["otel_npu.kept"]) for s in spans.all] == [("engine step", "slow")]


def test_async_scheduling_overlapping_steps_each_end_their_own_engine_step(provider, spans):
    import time

    enable(provider, device="cpu")
    engine = plugin._EngineCore()
    engine.setup({})
    first, second = scheduler_output(cached=[("r1", 5, 1)]), scheduler_output(cached=[("r1", 6, 1)])
    engine.open(first, time.perf_counter_ns(), ["r1"], {"vllm.num_scheduled_tokens": 1})
    engine.open(second, time.perf_counter_ns(), ["r1"], {"vllm.num_scheduled_tokens": 2})  # before first's outputs
    assert first.otel_npu_step[:2] != second.otel_npu_step[:2]
    assert engine.close(first) and engine.close(second) and not engine.close(second)  # each once
    otel_npu.flush()
    got = sorted((s.attributes["vllm.num_scheduled_tokens"], s.context.trace_id) for s in spans.named("engine step"))
    assert [(n, t) for n, t in got] == [(1, first.otel_npu_step[0]), (2, second.otel_npu_step[0])]


def test_ranks_are_on_every_span_and_stage_metric_of_the_worker(provider, spans):
    from otel_npu import runtime

    enable(provider, device="cpu", attributes={"vllm.tp_rank": 1, "vllm.pp_rank": 0, "vllm.dp_rank": 0,
                                               "otel_npu.rank": 1})
    run_steps([scheduler_output(new=[new_request("r1", 5)])])
    assert spans.all
    for span in spans.all:
        assert {k: span.attributes[k] for k in ("vllm.tp_rank", "vllm.pp_rank", "vllm.dp_rank", "otel_npu.rank")} == \
            {"vllm.tp_rank": 1, "vllm.pp_rank": 0, "vllm.dp_rank": 0, "otel_npu.rank": 1}
    metrics = runtime.current().pipeline.metrics
    if metrics is not None:
        attrs = metrics.aggregator.attributes(("forward", "Prefill"))
        assert attrs["vllm.tp_rank"] == 1 and "process.pid" not in attrs


def test_configure_refuses_attributes_that_are_not_a_mapping_of_scalars():
    with pytest.raises(ValueError, match="attributes"):
        otel_npu.configure(attributes={"vllm.tp_rank": [1]})
    with pytest.raises(ValueError, match="attributes"):
        otel_npu.configure(attributes=[("a", 1)])


def test_a_workers_ranks_are_read_from_vllms_parallel_groups(monkeypatch):
    # vllm.distributed.parallel_state's group coordinators, as a worker has them once its device is set up
    state = types.ModuleType("vllm.distributed.parallel_state")
    state._TP, state._PP, state._DP = NS(rank_in_group=1), NS(rank_in_group=2), NS(rank_in_group=3)
    state._WORLD = NS(rank=5, rank_in_group=5)
    distributed = types.ModuleType("vllm.distributed")
    distributed.parallel_state = state
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", distributed)
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", state)
    wrapper = NS(vllm_config=NS(parallel_config=NS(data_parallel_rank=3)), global_rank=9)
    assert plugin._ranks(wrapper) == {"vllm.tp_rank": 1, "vllm.pp_rank": 2, "vllm.dp_rank": 3, "otel_npu.rank": 5}
    # groups not set up (a vLLM whose state moved): what can be read, never an error
    state._TP = state._PP = state._DP = state._WORLD = None
    assert plugin._ranks(wrapper) == {"vllm.dp_rank": 3, "otel_npu.rank": 9}
