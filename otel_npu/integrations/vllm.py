"""vLLM plugin: every engine step becomes an ``otel_npu.step`` with device-timed stages, linked to its requests.

Registered in otel-npu's package metadata under the entry-point group ``vllm.general_plugins``, which vLLM
loads in each of its processes (API server, EngineCore, workers). ``register()`` does nothing at all unless
otel-npu is enabled (``OTEL_NPU_ENABLED=1``): no import of vLLM modules, no patch, no thread. Enabled, it
installs the hooks of ``HOOKS`` that the running vLLM's version admits, each checked to exist first; a missing
one is named in one warning and skipped (fewer stages, no links...), never an error in the engine.

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
import dataclasses
import importlib
import inspect
import logging
import os
import re
import threading
import types
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import extract

import otel_npu

_log = logging.getLogger("vllm.otel_npu")  # in vLLM's log, with its process prefixes

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


@dataclasses.dataclass(frozen=True)
class Hook:
    """One place otel-npu patches in vLLM."""

    module: str
    attr: str  # ``Class.method`` or a module global
    gives: str  # what is lost without it
    make: Callable[[Any], Any]  # the original -> its replacement
    role: str = ""  # "step", "stages", "links" or "graph mode"
    since: tuple[int, ...] = ()  # the vLLM versions it applies to: since <= version < before (() = open)
    before: tuple[int, ...] = ()
    reader: str = ""  # a module global: the function or ``Class.method`` of the module that must read it
    params: tuple[str, ...] = ()  # the leading parameters the replacement relies on, by position
    read: tuple[str, ...] = ()  # vLLM versions whose sources were read for it (tests/test_vllm_sources.py)
    run: tuple[str, ...] = ()  # vLLM versions it ran with


def admits(hook: Hook, version: tuple[int, ...]) -> bool:
    """Whether ``hook`` applies to vLLM ``version`` (``()``: unknown, every hook is tried)."""
    if not version:
        return True
    return (not hook.since or version >= hook.since) and (not hook.before or version < hook.before)


def _parse_version(text: str) -> tuple[int, ...]:
    """``"0.32.0+cpu"`` -> ``(0, 32)``; ``()`` when it does not start with major.minor."""
    found = re.match(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else ()


# -- the worker's state ----------------------------------------------------------------------------------------


class _Worker:
    """What a worker process remembers between steps, and the step in flight."""

    def __init__(self) -> None:
        self.requests: dict[str, tuple[Any, int]] = {}  # req_id -> (client SpanContext or None, prompt length)
        self.step: Any = None  # the open step's context manager (between execute_model and sample_tokens)
        self.attributes: dict[str, Any] | None = None
        self.thread: int | None = None
        self.prepared = False  # the first step's set-up is done
        self.sample_hooked = False  # the worker's sample_tokens ends the step
        self.flusher: _Flusher | None = None
        self.stage: Any = None  # the V2 runner's open stage capture, entered by one hook, left by the next
        self.stage_name: str | None = None

    def forget(self, finished: Any) -> None:
        requests = self.requests
        for req_id in finished or ():
            requests.pop(req_id, None)

    def learn(self, new_reqs: Any) -> None:
        requests = self.requests
        for new in new_reqs:
            headers = getattr(new, "trace_headers", None)
            requests[new.req_id] = (_client_context(headers) if headers else None, _prompt_len(new))
        while len(requests) > MAX_REQUESTS:
            requests.pop(next(iter(requests)))

    def begin(self, so: Any) -> Any:
        """The step for scheduler output ``so``, entered; None when this step runs no model."""
        self.forget(getattr(so, "finished_req_ids", ()))
        new_reqs = so.scheduled_new_reqs
        self.learn(new_reqs)
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
        links = []
        for req_id in scheduled:
            known = requests.get(req_id)
            if known is not None and known[0] is not None:
                links.append(known[0])
        ids = list(scheduled)
        attributes = {ATTR_BATCH: len(ids), ATTR_TOKENS: so.total_num_scheduled_tokens,
                      ATTR_REQUEST_IDS: ids[:MAX_REQUEST_IDS]}
        step = otel_npu.step("Prefill" if prefill else "Decode", links=links, attributes=attributes)
        step.__enter__()
        self.step, self.attributes, self.thread = step, attributes, threading.get_ident()
        return step

    def open_stage(self, name: str) -> None:
        """Leave the open stage (if any) and enter ``name``: the V2 runner's stages follow one another."""
        self.close_stage()
        stage = otel_npu.capture(name)
        stage.__enter__()
        self.stage, self.stage_name = stage, name

    def close_stage(self, exc: BaseException | None = None) -> None:
        stage, self.stage, self.stage_name = self.stage, None, None
        if stage is not None:
            stage.__exit__(None if exc is None else type(exc), exc, None if exc is None else exc.__traceback__)

    def in_step(self) -> bool:
        """A step is open, on this thread (the engine's)."""
        return self.step is not None and self.thread == threading.get_ident()

    def end(self, exc: BaseException | None = None) -> None:
        self.close_stage(exc)
        step, self.step, self.attributes, self.thread = self.step, None, None, None
        if step is not None:
            step.__exit__(None if exc is None else type(exc), exc, None if exc is None else exc.__traceback__)
            if self.flusher is not None:
                self.flusher.wake.set()


class _Flusher(threading.Thread):
    """Sends the worker's spans as soon as the engine goes idle, off the engine's thread.

    vLLM's default shutdown (``--shutdown-timeout 0``) SIGKILLs the EngineCore and its workers as soon as the
    API server gets SIGTERM, so what a worker still holds then is lost; exporters batch for seconds. This
    thread flushes otel-npu (its resolver and its exporters) once the engine has been idle for ``IDLE_S``.
    Not while it is busy: a flush makes the resolver poll every millisecond until it is done, which on a
    starved machine took the engine's GIL time (and the exporters' batches of ≤ 5 s do that job then).
    """

    IDLE_S = 0.05

    def __init__(self) -> None:
        super().__init__(name="otel-npu-vllm-flush", daemon=True)
        self.wake = threading.Event()

    def run(self) -> None:
        wake = self.wake
        while True:
            wake.wait()
            wake.clear()
            while wake.wait(self.IDLE_S):
                wake.clear()
            try:
                otel_npu.flush(2.0)
            except Exception:  # pragma: no cover - the exporters count and report their own failures
                _log.debug("otel-npu: flush after steps failed", exc_info=True)


_worker = _Worker()


def _client_context(headers: Any) -> Any:
    """The SpanContext of the client's span in ``headers`` (``traceparent``), or None."""
    ctx = trace.get_current_span(extract(dict(headers))).get_span_context()
    return ctx if ctx.is_valid else None


def _prompt_len(new: Any) -> int:
    if getattr(new, "prompt_token_ids", None) is not None:
        return len(new.prompt_token_ids)
    embeds = getattr(new, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(message, *args)


def _export_like_vllm(wrapper: Any, env: Any = os.environ) -> None:
    """Before otel-npu starts in the worker: its own pipeline (≈ 90 µs of CPU per step of 8 requests and five
    stages, against ≈ 430 µs through vLLM's TracerProvider, whose SDK processor and encoder cost ≈ 60 µs a
    span), sending where vLLM sends, as vLLM would: ``--otlp-traces-endpoint`` is in
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` of every vLLM process (vLLM puts it there), over gRPC unless
    ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` says otherwise. ``OTEL_NPU_PIPELINE`` set: as it says."""
    config = getattr(getattr(wrapper, "vllm_config", None), "observability_config", None)
    if getattr(config, "otlp_traces_endpoint", None):
        env.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")  # vLLM's default, made explicit
    _metrics_to_vllm_collector(env)
    if not env.get("OTEL_NPU_PIPELINE", "").strip():
        otel_npu.configure(pipeline="own")


def _metrics_to_vllm_collector(env: Any = os.environ) -> None:
    """Stage metrics go where vLLM sends its traces when no metrics endpoint is configured.

    vLLM puts ``--otlp-traces-endpoint`` into ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` of its processes, with
    gRPC unless ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` says otherwise. Without this, otel-npu's metrics would go
    to the OTLP default (``localhost:4318``). Called before otel-npu starts in this process.
    """
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not traces or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip() or "grpc"
    if protocol != "grpc" and traces.rstrip("/").endswith("/v1/traces"):
        traces = traces.rstrip("/")[: -len("traces")] + "metrics"
    env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = traces
    env.setdefault("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", protocol)


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
                _hook_sample_tokens(self)
                w.flusher = _Flusher()
                w.flusher.start()
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


def _hook_sample_tokens(wrapper: Any) -> None:
    """The worker's ``sample_tokens`` closes the step (the async-scheduling split of ``execute_model``).

    Wrapped on the worker object that ``WorkerWrapperBase`` forwards to (any worker class: GPU, CPU, NPU)."""
    worker = getattr(wrapper, "worker", None)
    original = getattr(worker, "sample_tokens", None)
    if not callable(original):
        _warn_once("sample_tokens", "otel-npu: this vLLM worker (%s) has no sample_tokens(); each step ends "
                   "when execute_model returns, without the sampling stage", type(worker).__name__)
        return

    def sample_tokens(*args: Any, **kwargs: Any) -> Any:
        w = _worker
        try:
            out = original(*args, **kwargs)
        except BaseException as exc:
            w.end(exc)
            raise
        w.end()
        return out

    worker.sample_tokens = sample_tokens
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
        return cm if plain else _Both(inner(name), cm)

    return scope


class _Both:
    """vLLM's own scope (a profiler range, when profiling is on) around otel-npu's capture."""

    __slots__ = ("outer", "inner")

    def __init__(self, outer: Any, inner: Any) -> None:
        self.outer = outer
        self.inner = inner

    def __enter__(self) -> Any:
        self.outer.__enter__()
        try:
            return self.inner.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            self.inner.__exit__(exc_type, exc, tb)
        finally:
            return bool(self.outer.__exit__(exc_type, exc, tb))


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
        w.open_stage("prepare input" if _FORWARD_HOOK in _active else "prepare input and forward")
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
    class has its own ``propose``)."""
    speculator = getattr(runner, "speculator", None)
    original = getattr(speculator, "propose", None)
    if speculator is None or original is None or getattr(original, "_otel_npu", False):
        return

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

    propose._otel_npu = True  # type: ignore[attr-defined]
    try:
        speculator.propose = propose
    except Exception as exc:  # pragma: no cover - a speculator that refuses attributes: no draft stage
        _warn_once("propose", "otel-npu: cannot hook %s.propose (%s); left out: the draft stage",
                   type(speculator).__name__, exc)


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
    Hook("vllm.v1.core.sched.output", "NewRequestData.from_request", "span links to the requests' traces",
         _from_request, role="links", since=MIN_VLLM, read=_READ, run=("0.32.0",)),
    # the V1 runner (vllm/v1/worker/gpu_model_runner.py; removed in 0.34), and vllm-ascend's, built on it
    Hook("vllm.v1.utils", "_PROFILER_FUNC", "stage captures (the runner's record_function_or_nullcontext scopes)",
         _scopes, role="stages", since=MIN_VLLM, before=(0, 34), reader="record_function_or_nullcontext",
         read=_READ[:-1], run=("0.32.0",)),
    Hook("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher.dispatch", "the vllm.cudagraph_mode attribute",
         _dispatch, role="graph mode", since=MIN_VLLM, before=(0, 34), read=_READ[:-1], run=("0.32.0",)),
    # the V2 runner (vllm/v1/worker/gpu/model_runner.py): vLLM's default where Triton works, for some models
    # from 0.23 and for most from 0.30; the only runner from 0.34
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

_installed: list[tuple[Any, str, Any]] = []
_active: set[str] = set()  # "module.attr" of each hook applied
_install_lock = threading.Lock()


def _target(hook: Hook) -> tuple[Any, str, Any]:
    """(owner, attribute name, current value) of ``hook``'s target; raises LookupError naming what is missing."""
    try:
        module: Any = importlib.import_module(hook.module)
    except ImportError as exc:
        raise LookupError(f"module {hook.module} cannot be imported ({exc})") from None
    owner, name, current = _lookup(module, hook.module, hook.attr)
    if hook.reader:  # a global: it must be what the reader reads
        _, _, reader = _lookup(module, hook.module, hook.reader)
        code = getattr(inspect.unwrap(reader), "__code__", None)
        if code is None or name not in code.co_names:
            raise LookupError(f"{hook.module}.{hook.reader} does not read {name}")
    elif not (callable(current) or isinstance(current, classmethod)):
        raise LookupError(f"{hook.module}.{hook.attr} is not callable")
    if hook.params:
        try:
            names = list(inspect.signature(inspect.unwrap(current)).parameters)
        except (TypeError, ValueError):
            names = []
        if names[: len(hook.params)] != list(hook.params):
            raise LookupError(f"{hook.module}.{hook.attr}{tuple(names)} does not start with {hook.params}")
    return owner, name, current


def _lookup(module: Any, module_name: str, attr: str) -> tuple[Any, str, Any]:
    owner = module
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            raise LookupError(f"{module_name}.{part} does not exist")
    if not hasattr(owner, name):
        raise LookupError(f"{module_name}.{attr} does not exist")
    return owner, name, vars(owner)[name] if name in vars(owner) else getattr(owner, name)


def install(hooks: tuple[Hook, ...] = HOOKS, version: tuple[int, ...] = ()) -> list[str]:
    """Apply those of ``hooks`` that ``version`` admits (each once); returns the targets patched. A missing
    target is warned about, not raised."""
    done = []
    with _install_lock:
        for hook in hooks:
            if not admits(hook, version):
                continue
            try:
                owner, name, current = _target(hook)
                if any(o is owner and n == name for o, n, _ in _installed):
                    continue
                replacement = hook.make(current)
                if callable(current) and isinstance(replacement, types.FunctionType):
                    replacement.__wrapped__ = current  # type: ignore[attr-defined] # what a reader check looks through
                setattr(owner, name, replacement)
            except Exception as exc:
                _warn_once(f"hook:{hook.module}:{hook.attr}", "otel-npu: cannot hook %s.%s in this vLLM (%s); "
                           "left out: %s", hook.module, hook.attr, exc, hook.gives)
                continue
            _installed.append((owner, name, current))
            _active.add(f"{hook.module}.{hook.attr}")
            done.append(f"{hook.module}.{hook.attr}")
    return done


def uninstall() -> None:
    """Undo ``install()`` (for tests; a serving process keeps its hooks)."""
    with _install_lock:
        while _installed:
            owner, name, original = _installed.pop()
            setattr(owner, name, original)
        _active.clear()
        _worker.__init__()


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Does nothing unless otel-npu is enabled."""
    if not otel_npu.enabled():
        return
    try:
        import vllm

        version = str(getattr(vllm, "__version__", "0"))
    except Exception:  # pragma: no cover - vLLM calls us, so it imports
        return
    parsed = _parse_version(version)
    if parsed and parsed < MIN_VLLM:  # unparsable (a source build's): the targets are checked one by one anyway
        _warn_once("version", "otel-npu: vLLM %s is older than the versions its plugin was written for (%s+); "
                   "not hooking it", version, ".".join(map(str, MIN_VLLM)))
        return
    done = install(HOOKS, parsed)
    _log.info("otel-npu: vLLM %s hooked (pid %d): %s", version, os.getpid(), ", ".join(done) or "nothing")
