"""vLLM plugin: every engine step becomes an ``otel_npu.step`` with device-timed stages, linked to its requests.

Registered in otel-npu's package metadata under the entry-point group ``vllm.general_plugins``, which vLLM
loads in each of its processes (API server, EngineCore, workers). ``register()`` does nothing at all unless
otel-npu is enabled (``OTEL_NPU_ENABLED=1``): no import of vLLM modules, no patch, no thread. Enabled, it
installs the hooks of ``HOOKS`` that the running vLLM's version admits, each checked to exist first; a missing
one is named in one warning and skipped (fewer stages, no links...), never an error in the engine.

Built on the engine-agnostic integration core: ``_patch.py`` (the hook table: version gates, checks,
install/uninstall) and ``_engine_step.py`` (the step open between engine calls, the requests' trace contexts,
where spans go). What is here is vLLM's: its hooks, its stage names, and how a scheduler
output becomes a step.

What the hooks do, per process:

* **worker** (the process that runs the model): ``WorkerWrapperBase.execute_model`` opens a step named
  ``Prefill`` (some scheduled request has not finished its prompt) or ``Decode``, with ``vllm.batch_size``,
  ``vllm.num_scheduled_tokens``, ``vllm.request_ids`` and a span link to the trace context each request came
  with (``otel_npu.batch_size``: how many were linked); the worker's ``sample_tokens`` closes it (or
  ``execute_model`` itself, when it returned the output).
  Inside, the stages. vLLM's V1 model runner (and vllm-ascend's, built on it): every
  ``record_function_or_nullcontext`` scope it opens (``vllm.v1.utils``'s ``_PROFILER_FUNC``) is a capture,
  named by ``STAGES``. The V2 runner opens none: its stages are cut at its own methods (``_v2_*`` below). The
  batch's CUDA-graph mode (``vllm.cudagraph_mode``: ``NONE`` = eager, ``PIECEWISE``, ``FULL``) comes from
  ``CudagraphDispatcher.dispatch`` (V1) or ``dispatch_cg_and_sync_dp`` (V2).
* **EngineCore** (the scheduler): ``NewRequestData.from_request`` copies ``Request.trace_headers`` (the
  client's ``traceparent``, which vLLM keeps when ``--otlp-traces-endpoint`` is set) onto the data sent to
  the worker, as ``trace_headers``.

Where spans go: otel-npu's own pipeline, per the ``OTEL_*`` variables, where vLLM's ``--otlp-traces-endpoint``
is ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (vLLM puts it there) over gRPC unless
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` says otherwise (see ``_export_like_vllm``). Stage metrics go to
``OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT``, or where none is set, to the same collector.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable

import otel_npu

from ._engine_step import (ATTR_RANK, Both, EngineStep, RequestContexts, SchedulerStep, export_like_engine,
                           metrics_follow_traces, parent_context, process_attributes)
from ._patch import Hook, Patcher, admits, parse_version

__all__ = ["register", "HOOKS", "Hook", "admits", "install", "uninstall", "STAGES", "V1_STAGES", "ASCEND_STAGES",
           "MIN_VLLM"]

_log = logging.getLogger("vllm.otel_npu")  # in vLLM's log, with its process prefixes
#: The hooks installed in this process, and the one warning per missing target.
_patcher = Patcher("vLLM", _log)
_warn_once = _patcher.warn_once

#: vLLM's V1 model runner (``vllm/v1/worker/gpu_model_runner.py``, vLLM < 0.34; the CPU runner inherits it):
#: its ``record_function_or_nullcontext`` scope names -> otel-npu's stage names. ``None``: not captured.
V1_STAGES = {
    "gpu_model_runner: preprocess": "prepare input",
    "gpu_model_runner: forward": "forward",
    "gpu_model_runner: postprocess": "post process",
    "gpu_model_runner: sample": "sample",
    "gpu_model_runner: draft": "draft",
    "gpu_model_runner: bookkeep": "bookkeep",
    "gpu_model_runner: eplb": None,  # empty unless expert load balancing is on
    # packing the output: microseconds of host work, not worth a capture each
    "gpu_model_runner: ModelRunnerOutput": None,
    "gpu_model_runner: AsyncGPUModelRunnerOutput": None,
    "gpu_model_runner: set_async_sampled_token_ids": None,
}
#: vllm-ascend's NPUModelRunner (``vllm_ascend/worker/model_runner_v1.py``, built on the V1 runner).
ASCEND_STAGES = {
    "prepare input": "prepare input",
    "forward": "forward",
    "post process": "post process",
    "sample_token": "sample",
    "draft_token": "draft",
    "async_state_update": "async state update",
}
#: Every scope name -> stage. Scopes not listed become captures under their own name, unless they belong to
#: the scheduler or the engine loop (``_NOT_STAGES``). The V2 runner opens no scopes: its stages come from
#: hooks on its methods (``_v2_*``).
STAGES = {**V1_STAGES, **ASCEND_STAGES}
_NOT_STAGES = ("schedule", "llm_engine")
#: At most this many request ids in a step's ``vllm.request_ids`` (``vllm.batch_size`` has the count).
MAX_REQUEST_IDS = 32
#: Requests remembered by a worker (trace context, prompt length) until vLLM says they finished; past it,
#: the oldest are forgotten (their steps lose the link), so a lost "finished" cannot grow memory.
MAX_REQUESTS = 65536

ATTR_BATCH = "vllm.batch_size"  # every scheduled request (otel_npu.batch_size: those linked)
ATTR_TOKENS = "vllm.num_scheduled_tokens"
ATTR_REQUEST_IDS = "vllm.request_ids"
ATTR_GRAPH = "vllm.cudagraph_mode"
#: On the engine step (the EngineCore's): the scheduler's state once this step was scheduled.
ATTR_NEW = "vllm.num_new_requests"          # scheduled for the first time in this step
ATTR_WAITING = "vllm.num_waiting_requests"
ATTR_RUNNING = "vllm.num_running_requests"
ATTR_PREEMPTED = "vllm.num_preempted_requests"  # preempted since the previous step
ATTR_KV_USAGE = "vllm.kv_cache_usage"      # fraction of the KV cache's blocks in use, 0..1
#: On every span and stage metric of a worker: its ranks (read once, from vLLM's parallel state).
ATTR_TP_RANK = "vllm.tp_rank"
ATTR_PP_RANK = "vllm.pp_rank"
ATTR_DP_RANK = "vllm.dp_rank"
#: The global rank (vLLM's world group: every TP x PP rank of every DP engine) goes in ``ATTR_RANK``, otel-npu's
#: own rank attribute, which the stage metrics carry and the dashboard's per-rank panel reads ($RANK, where a
#: launcher set it, wins).


# -- the worker's state ----------------------------------------------------------------------------------------


class _Worker(EngineStep):
    """What a vLLM worker remembers between steps (the requests it serves), and the step in flight
    (``EngineStep``: opened by ``execute_model``, closed by ``sample_tokens``)."""

    def __init__(self) -> None:
        super().__init__()
        #: req_id -> (client SpanContext or None, prompt length)
        self.requests = RequestContexts(MAX_REQUESTS)
        self.prepared = False  # the first step's set-up is done
        self.sample_hooked = False  # the worker's sample_tokens ends the step

    def forget(self, finished: Any) -> None:
        self.requests.forget(finished)

    def learn(self, new_reqs: Any, contexts: bool = True) -> None:
        """Remember ``new_reqs`` (prompt length; with ``contexts``, the trace context each came with)."""
        requests = self.requests
        for new in new_reqs:
            requests.learn(new.req_id, getattr(new, "trace_headers", None) if contexts else None, _prompt_len(new))

    def begin(self, so: Any) -> Any:
        """The step for scheduler output ``so``, entered; None when this step runs no model. Its parent: the
        EngineCore's engine step that came with ``so`` (which links the requests, once for every rank), else
        none (this step links them)."""
        self.forget(getattr(so, "finished_req_ids", ()))
        new_reqs = so.scheduled_new_reqs
        parent = parent_context(so)
        self.learn(new_reqs, parent is None)
        scheduled = so.num_scheduled_tokens
        if not scheduled:
            return None
        requests = self.requests
        prefill = bool(new_reqs)
        if not prefill:
            cached = so.scheduled_cached_reqs
            for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
                known = requests.get(req_id)
                if known is not None and computed < known[1]:
                    prefill = True
                    break
        ids = list(scheduled)
        attributes = {ATTR_BATCH: len(ids), ATTR_TOKENS: so.total_num_scheduled_tokens,
                      ATTR_REQUEST_IDS: ids[:MAX_REQUEST_IDS]}
        return self.open_step("Prefill" if prefill else "Decode", links=requests.links(ids) if parent is None else (),
                              attributes=attributes, parent=parent)


_worker = _Worker()


# -- the EngineCore's state --------------------------------------------------------------------------------------


class _EngineCore(SchedulerStep):
    """The EngineCore's side of a step trace: the engine step (``SchedulerStep``: opened by ``schedule()``,
    closed once ``update_from_output()`` processed its outputs), when the workers run in processes of their own.
    ``active``: None until the first step decides it."""

    def __init__(self) -> None:
        super().__init__()
        self.active: bool | None = None

    def start(self, scheduler: Any) -> bool:
        """Whether this EngineCore makes engine steps: only when its workers are other processes (vLLM's
        ``mp`` and ``ray`` executors: any TP/PP > 1, and the CPU platform). With the in-process executor the
        worker's own step begins the step's trace, as before; a second, host-timed step in the process that
        times the device would be placed on the device's clock. Then otel-npu here times on the host (this
        process runs no device work), exporting where vLLM sends."""
        parallel = getattr(getattr(scheduler, "vllm_config", None), "parallel_config", None)
        backend = getattr(parallel, "distributed_executor_backend", None)
        if backend not in ("mp", "ray"):
            return False
        otel_npu.configure(device="cpu")
        _export_like_vllm(scheduler)
        self.setup()
        return True

    def schedule(self, scheduler: Any, so: Any, start: int) -> None:
        """``scheduler`` scheduled ``so`` (``schedule()`` began at host monotonic ``start``): the engine step."""
        if self.active is None:
            self.active = self.start(scheduler)
            if not self.active:
                return
        known = self.requests
        known.forget(getattr(so, "finished_req_ids", ()))
        requests = scheduler.requests
        for new in so.scheduled_new_reqs:
            known.learn(new.req_id, getattr(requests.get(new.req_id), "trace_headers", None))
        scheduled = so.num_scheduled_tokens
        if not scheduled:
            return
        ids = list(scheduled)
        attributes = {ATTR_BATCH: len(ids), ATTR_TOKENS: so.total_num_scheduled_tokens,
                      ATTR_NEW: len(so.scheduled_new_reqs), ATTR_REQUEST_IDS: ids[:MAX_REQUEST_IDS]}
        try:
            attributes[ATTR_WAITING] = len(scheduler.waiting)
            attributes[ATTR_RUNNING] = len(scheduler.running)
            attributes[ATTR_PREEMPTED] = len(getattr(so, "preempted_req_ids", None) or ())
            attributes[ATTR_KV_USAGE] = round(float(scheduler.kv_cache_manager.usage), 4)
        except Exception:  # pragma: no cover - a scheduler without them: fewer attributes
            pass
        self.open(so, start, ids, attributes)


_engine = _EngineCore()


def _prompt_len(new: Any) -> int:
    if getattr(new, "prompt_token_ids", None) is not None:
        return len(new.prompt_token_ids)
    embeds = getattr(new, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


def _export_like_vllm(wrapper: Any, env: Any = None) -> None:
    """Before otel-npu starts in the worker: its own pipeline (≈ 90 µs of CPU per step of 8 requests and five
    stages, against ≈ 430 µs through vLLM's TracerProvider, whose SDK processor and encoder cost ≈ 60 µs a
    span), sending where vLLM sends, as vLLM would: ``--otlp-traces-endpoint`` is in
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` of every vLLM process (vLLM puts it there), over gRPC unless
    ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` says otherwise. ``OTEL_NPU_PIPELINE`` set: as it says. ``env``: the
    process environment unless given."""
    config = getattr(getattr(wrapper, "vllm_config", None), "observability_config", None)
    export_like_engine(traces_endpoint_set=bool(getattr(config, "otlp_traces_endpoint", None)),
                       default_protocol="grpc", env=env)


def _ranks(wrapper: Any) -> dict[str, int]:
    """This worker's ranks: tensor-, pipeline-, data-parallel and global, read once from vLLM's parallel state
    (its groups exist once the worker's device is initialized, before the first step); each one that cannot
    be read is left out (a vLLM whose state moved: fewer attributes, never an error)."""
    ranks: dict[str, int] = {}
    try:
        from vllm.distributed import parallel_state as ps
    except Exception:  # pragma: no cover - vLLM calls us, so it imports
        ps = None
    for key, group in ((ATTR_TP_RANK, "_TP"), (ATTR_PP_RANK, "_PP"), (ATTR_DP_RANK, "_DP"), (ATTR_RANK, "_WORLD")):
        coordinator = getattr(ps, group, None)
        value = getattr(coordinator, "rank_in_group" if key != ATTR_RANK else "rank", None)
        if isinstance(value, int):
            ranks[key] = value
    parallel = getattr(getattr(wrapper, "vllm_config", None), "parallel_config", None)
    dp_rank = getattr(parallel, "data_parallel_rank", None)
    if isinstance(dp_rank, int):  # the engine's place among DP engines (the DP group's rank, where it differs)
        ranks[ATTR_DP_RANK] = dp_rank
    if ATTR_RANK not in ranks:
        rank = getattr(wrapper, "global_rank", None)
        if isinstance(rank, int):
            ranks[ATTR_RANK] = rank
    return ranks


def _metrics_to_vllm_collector(env: Any = None) -> None:
    """Stage metrics go where vLLM sends its traces when no metrics endpoint is configured (vLLM's default
    protocol is gRPC). Called before otel-npu starts in this process."""
    metrics_follow_traces(env, "grpc")


# -- the replacements ------------------------------------------------------------------------------------------


def _execute_model(original: Callable) -> Callable:
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        w = _worker
        if w.step is not None:  # the previous step's sample_tokens never came
            w.end()
        step = None
        try:
            if not w.prepared:
                w.prepared = True
                _export_like_vllm(self)
                process_attributes(_ranks(self))
                _hook_sample_tokens(self)
            step = w.begin(scheduler_output)
        except Exception as exc:
            _warn_once("begin", "otel-npu: could not open a step (%s: %s); the engine goes on, this batch "
                       "untraced (warned once)", type(exc).__name__, exc)
        if step is None:
            return original(self, scheduler_output, *args, **kwargs)
        try:
            out = original(self, scheduler_output, *args, **kwargs)
        except BaseException as exc:
            w.end(exc)
            raise
        if out is not None or not w.sample_hooked:
            w.end()
        return out

    return execute_model


def _schedule(original: Callable) -> Callable:
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        so = original(self, *args, **kwargs)
        if _engine.active is not False:
            try:
                _engine.schedule(self, so, start)
            except Exception as exc:
                _warn_once("engine step", "otel-npu: could not open an engine step (%s: %s); the engine goes on, "
                           "this step without one (warned once)", type(exc).__name__, exc)
        return so

    return schedule


def _update_from_output(original: Callable) -> Callable:
    def update_from_output(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, scheduler_output, *args, **kwargs)
        e = _engine
        if e.active:
            try:
                e.close(scheduler_output)
            except Exception as exc:
                _warn_once("engine step end", "otel-npu: could not end an engine step (%s: %s); the engine goes "
                           "on (warned once)", type(exc).__name__, exc)
        return out

    return update_from_output


def _hook_sample_tokens(wrapper: Any) -> None:
    """The worker's ``sample_tokens`` closes the step (the async-scheduling split of ``execute_model``).

    Wrapped on the worker object that ``WorkerWrapperBase`` forwards to (any worker class: GPU, CPU, NPU)."""

    def make(original: Callable) -> Callable:
        def sample_tokens(*args: Any, **kwargs: Any) -> Any:
            w = _worker
            try:
                out = original(*args, **kwargs)
            except BaseException as exc:
                w.end(exc)
                raise
            w.end()
            return out

        return sample_tokens

    if _patcher.wrap_object(getattr(wrapper, "worker", None), "sample_tokens", make,
                            "the step's end at sample_tokens (each step ends when execute_model returns, without "
                            "the sampling stage)"):
        _worker.sample_hooked = True


def _scopes(original: Any) -> Callable[[str], Any]:
    """vLLM's ``_PROFILER_FUNC``: each scope of the runner, while a step is open, is also a capture."""
    inner = original
    if inner is None:  # resolve vLLM's own choice (nullcontext, torch record_function or nvtx) now, once
        from vllm.v1 import utils

        utils.record_function_or_nullcontext("otel-npu")
        inner = utils._PROFILER_FUNC
    plain = inner is contextlib.nullcontext
    capture = otel_npu.capture
    w = _worker
    stages = STAGES

    def scope(name: str) -> Any:
        if w.step is None or w.thread != threading.get_ident() or name.startswith(_NOT_STAGES):
            return inner(name)
        stage = stages.get(name, name)
        if stage is None:
            return inner(name)
        cm = capture(stage)
        return cm if plain else Both(inner(name), cm)

    return scope


def _dispatch(original: Callable) -> Callable:
    def dispatch(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        attributes = _worker.attributes
        if attributes is not None:
            try:
                mode = result[0]
                attributes[ATTR_GRAPH] = getattr(mode, "name", str(mode))
            except Exception:  # pragma: no cover - another return shape: no attribute, no harm
                pass
        return result

    return dispatch


def _from_request(original: Any) -> Any:
    function = original.__func__  # a classmethod, read from the class: bound; rebind to subclasses

    def from_request(cls: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        data = function(cls, request, *args, **kwargs)
        headers = getattr(request, "trace_headers", None)
        if headers:
            try:
                data.trace_headers = dict(headers)
            except Exception:  # pragma: no cover - a slotted NewRequestData: no links
                pass
        return data

    return classmethod(from_request)


# -- vLLM's own tracer (vllm/tracing/otel.py) --------------------------------------------------------------------


#: What ``init_otel_tracer`` puts in the resource of each provider it builds: how vLLM's provider is told from
#: one of the application's.
VLLM_RESOURCE_KEY = "vllm.instrumenting_module_name"


def _tracer_provider(original: Any) -> Callable:
    """vLLM's ``TracerProvider``, as ``init_otel_tracer`` builds it in each of vLLM's processes (API server,
    EngineCore, every worker: ``init_tracer``/``maybe_init_worker_tracer``): the same provider, whose span and
    trace ids come from ``otel_npu.IdGenerator``; nothing else of vLLM's tracing changes.

    Why: the SDK's default ``RandomIdGenerator`` draws from Python's global ``random``, which vLLM seeds alike in
    every worker (``seed=0`` by default). Every rank's start-up spans ("Load model", "Allocate KV cache", ...)
    would then repeat the other ranks' span ids, and every server (and every restart) vLLM's ids of the one
    before. otel-npu's generator draws from an RNG that ``random.seed()`` does not touch (seeded from the OS,
    re-seeded in a forked child). A tracer copies its provider's generator when it is made (``get_tracer``: the
    tracer ``init_otel_tracer`` returns, and the one each of vLLM's ``@instrument`` spans gets through the global
    provider), so the generator is set on the provider. A generator other than the SDK's default is kept.

    Hooked at the name ``init_otel_tracer`` calls, not at ``init_otel_tracer``: ``vllm.tracing``'s table of
    backends holds that function itself since its import, and calls it. And a process that built its provider
    before it loaded the plugin (a spawned worker or EngineCore calls ``maybe_init_worker_tracer`` first) has
    it as the global provider, told by ``VLLM_RESOURCE_KEY`` in its resource: it gets the generator here, at
    install, for the spans it starts from now on."""
    own = otel_npu.IdGenerator  # first: it imports the SDK as otel-npu does (no OTEL_* value can fail that)
    from opentelemetry import trace
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    def give(provider: Any) -> None:
        if type(getattr(provider, "id_generator", None)) is RandomIdGenerator:
            provider.id_generator = own()

    current = trace.get_tracer_provider()
    if VLLM_RESOURCE_KEY in getattr(getattr(current, "resource", None), "attributes", {}):
        give(current)

    def TracerProvider(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - the name vLLM calls
        provider = original(*args, **kwargs)
        give(provider)
        return provider

    return TracerProvider


# -- the V2 model runner (vllm/v1/worker/gpu/model_runner.py) ----------------------------------------------------
#
# It opens no profiler scopes; its stages are cut at its own seams, one capture after the other:
#   "prepare input"  execute_model's start (state update, inputs, attention metadata) .. forward_start()
#   "forward"        StepTimingCollector.forward_start(), called right before the model runs in every mode
#                    (FULL graph replay, micro-batches, piecewise graph, eager) .. execute_model's return
#   "sample"         sample(): logits, grammar bitmask, sampler or rejection sampler
#   "post process"   sample()'s return .. sample_tokens' return (prompt logprobs, output copy, state update)
#   "draft"          the speculator's propose(), when the runner speculates (the post process ends there)
# Each only while the step is open on the engine thread: dummy runs, warm-up and graph capture pass through.

_FORWARD_SEAM = "StepTimingCollector.forward_start"
_FORWARD_HOOK = f"vllm.v1.worker.gpu.async_utils.{_FORWARD_SEAM}"


def _v2_execute_model(original: Callable) -> Callable:
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        w = _worker
        dummy = args[1] if len(args) > 1 else kwargs.get("dummy_run", False)  # (intermediate_tensors, dummy_run)
        if not w.in_step() or dummy:
            return original(self, scheduler_output, *args, **kwargs)
        # without the forward seam the two cannot be told apart: one stage, named for what it holds
        w.open_stage("prepare input" if _FORWARD_HOOK in _patcher.active else "prepare input and forward")
        try:
            out = original(self, scheduler_output, *args, **kwargs)
        except BaseException as exc:
            w.close_stage(exc)
            raise
        w.close_stage()
        return out

    return execute_model


def _v2_forward_start(original: Callable) -> Callable:
    def forward_start(self: Any, *args: Any, **kwargs: Any) -> Any:
        w = _worker
        if w.stage_name == "prepare input" and w.in_step():
            w.open_stage("forward")
        return original(self, *args, **kwargs)

    return forward_start


def _v2_sample(original: Callable) -> Callable:
    def sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        w = _worker
        if not w.in_step():
            return original(self, *args, **kwargs)
        w.open_stage("sample")
        try:
            out = original(self, *args, **kwargs)
        except BaseException as exc:
            w.close_stage(exc)
            raise
        w.open_stage("post process")
        return out

    return sample


def _v2_sample_tokens(original: Callable) -> Callable:
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        w = _worker
        if not w.in_step():
            return original(self, *args, **kwargs)
        _hook_propose(self)
        try:
            out = original(self, *args, **kwargs)
        except BaseException as exc:
            w.close_stage(exc)
            raise
        w.close_stage()
        return out

    return sample_tokens


def _hook_propose(runner: Any) -> None:
    """The runner's speculator's ``propose`` is the "draft" stage (wrapped on the instance: every speculator
    class has its own ``propose``). A runner without a speculator does not speculate: nothing to hook."""
    speculator = getattr(runner, "speculator", None)
    if speculator is None:
        return

    def make(original: Callable) -> Callable:
        def propose(*args: Any, **kwargs: Any) -> Any:
            w = _worker
            if not w.in_step():
                return original(*args, **kwargs)
            w.open_stage("draft")
            try:
                out = original(*args, **kwargs)
            except BaseException as exc:
                w.close_stage(exc)
                raise
            w.close_stage()
            return out

        return propose

    _patcher.wrap_object(speculator, "propose", make, "the draft stage")


def _v2_dispatch(original: Callable) -> Callable:
    """``dispatch_cg_and_sync_dp`` as the V2 runner's module sees it: the batch's CUDA-graph mode, agreed
    across data-parallel ranks, is ``result[0].cg_mode``."""

    def dispatch_cg_and_sync_dp(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        w = _worker
        if w.attributes is not None and w.in_step():
            try:
                mode = result[0].cg_mode
                w.attributes[ATTR_GRAPH] = getattr(mode, "name", str(mode))
            except Exception:  # pragma: no cover - another return shape: no attribute, no harm
                pass
        return result

    return dispatch_cg_and_sync_dp


#: The oldest vLLM these hooks were written for; older ones are left alone.
MIN_VLLM = (0, 15)
#: The vLLM releases whose sources the hooks were read in (vllm-ascend 0.23.0.post1 runs on 0.23.0)
_READ = ("0.23.0", "0.28.0", "0.32.0", "0.33.0", "0.34.0")

#: Every patch, checked to exist (and, for a global, to be read where it matters) before it is applied, and only
#: where its version gate admits the running vLLM. ``read``: the releases whose sources were read for it
#: (tests/test_vllm_sources.py checks each again); ``run``: the ones it ran with.
HOOKS = (
    Hook("vllm.v1.worker.worker_base", "WorkerWrapperBase.execute_model", "the step spans", _execute_model,
         role="step", since=MIN_VLLM, params=("self", "scheduler_output"), read=_READ, run=("0.32.0",)),
    # the EngineCore: one engine step per scheduler output, the parent of every rank's step
    Hook("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "the engine step (one trace per step, every rank)",
         _schedule, role="engine step", since=MIN_VLLM, params=("self",), read=_READ, run=("0.32.0",)),
    Hook("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", "the end of the engine step",
         _update_from_output, role="engine step", since=MIN_VLLM, params=("self", "scheduler_output"),
         read=_READ, run=("0.32.0",)),
    Hook("vllm.v1.core.sched.output", "NewRequestData.from_request", "span links to the requests' traces",
         _from_request, role="links", since=MIN_VLLM, read=_READ, run=("0.32.0",)),
    # every process: vLLM's own spans (start-up, llm_request) draw their ids where random.seed() cannot repeat them
    Hook("vllm.tracing.otel", "TracerProvider", "ids of vLLM's own spans that no rank or server repeats",
         _tracer_provider, role="ids", since=(0, 23), reader="init_otel_tracer", read=_READ, run=("0.32.0",)),
    # the V1 runner (vllm/v1/worker/gpu_model_runner.py; removed in 0.34), and vllm-ascend's, built on it
    Hook("vllm.v1.utils", "_PROFILER_FUNC", "stage captures (the runner's record_function_or_nullcontext scopes)",
         _scopes, role="stages", since=MIN_VLLM, before=(0, 34), reader="record_function_or_nullcontext",
         read=_READ[:-1], run=("0.32.0",)),
    Hook("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher.dispatch", "the vllm.cudagraph_mode attribute",
         _dispatch, role="graph mode", since=MIN_VLLM, before=(0, 34), read=_READ[:-1], run=("0.32.0",)),
    # the V2 runner (vllm/v1/worker/gpu/model_runner.py): vLLM's default where Triton works, for some models
    # from 0.23 and for most from 0.28; the only runner from 0.34
    Hook("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.execute_model", "the prepare input and forward stages",
         _v2_execute_model, role="stages", since=(0, 23),
         params=("self", "scheduler_output", "intermediate_tensors", "dummy_run"), read=_READ, run=("0.32.0",)),
    Hook("vllm.v1.worker.gpu.async_utils", _FORWARD_SEAM, "the split of prepare input from forward",
         _v2_forward_start, role="stages", since=(0, 28), params=("self",), read=_READ[1:], run=("0.32.0",)),
    Hook("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.sample", "the sample and post process stages",
         _v2_sample, role="stages", since=(0, 23), read=_READ, run=("0.32.0",)),
    Hook("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.sample_tokens",
         "the end of the post process stage, and the draft stage", _v2_sample_tokens, role="stages",
         since=(0, 23), read=_READ, run=("0.32.0",)),
    Hook("vllm.v1.worker.gpu.model_runner", "dispatch_cg_and_sync_dp", "the vllm.cudagraph_mode attribute",
         _v2_dispatch, role="graph mode", since=(0, 23), reader="GPUModelRunner.execute_model", read=_READ,
         run=("0.32.0",)),
)

def install(hooks: tuple[Hook, ...] = HOOKS, version: tuple[int, ...] = ()) -> list[str]:
    """Apply those of ``hooks`` that ``version`` admits (each once); returns the targets patched. A missing
    target is warned about, not raised (``_patch.Patcher``)."""
    return _patcher.install(hooks, version)


def uninstall() -> None:
    """Undo ``install()`` (for tests; a serving process keeps its hooks)."""
    _patcher.uninstall()
    _worker.__init__()
    _engine.__init__()


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Does nothing unless otel-npu is enabled."""
    if not otel_npu.enabled():
        return
    try:
        import vllm

        version = str(getattr(vllm, "__version__", "0"))
    except Exception:  # pragma: no cover - vLLM calls us, so it imports
        return
    parsed = parse_version(version)
    if parsed and parsed < MIN_VLLM:  # unparsable (a source build's): the targets are checked one by one anyway
        _warn_once("version", "otel-npu: vLLM %s is older than the versions its plugin was written for (%s+); "
                   "not hooking it", version, ".".join(map(str, MIN_VLLM)))
        return
    done = install(HOOKS, parsed)
    _log.info("otel-npu: vLLM %s hooked (pid %d): %s", version, os.getpid(), ", ".join(done) or "nothing")
