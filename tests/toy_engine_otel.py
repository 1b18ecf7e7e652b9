"""The toy engine's otel-npu integration (``toy_engine.py``), written on the public seams only: otel-npu's
public API and the integration core (``otel_npu.integrations._patch``: the hook table;
``otel_npu.integrations._engine_step``: the step between engine calls, the requests' trace contexts). The worked example of ``docs/extending.md``: a real engine's module in
``otel_npu/integrations/`` has this shape, with an entry point calling ``install`` when otel-npu is enabled.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import otel_npu
from otel_npu.integrations._engine_step import EngineStep, RequestContexts
from otel_npu.integrations._patch import Hook, Patcher, parse_version

_log = logging.getLogger("toy_engine.otel_npu")  # the engine's log
_patcher = Patcher("toy engine", _log)


class _Engine(EngineStep):
    """What the integration keeps between engine calls: the open step (``EngineStep``) and the requests'
    trace contexts (until the engine says they finished)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = RequestContexts()


_state = _Engine()


def _execute_model(original: Callable) -> Callable:
    """The step opens when the model runs: Prefill when new requests came, else Decode, linked to each
    request's trace."""
    def execute_model(self: Any, batch: Any) -> Any:
        requests = _state.requests
        requests.forget(batch.finished)
        for request in batch.new:
            requests.learn(request.id, request.headers, request.prompt_len)
        ids = [r.id for r in batch.requests]
        _state.open_step("Prefill" if batch.new else "Decode", links=requests.links(ids),
                         attributes={"toy.batch_size": len(ids)})
        try:
            return original(self, batch)
        except BaseException as exc:
            _state.end(exc)  # the step ends with the engine's error, which propagates unchanged
            raise

    return execute_model


def _sample_tokens(original: Callable) -> Callable:
    """The step closes after sampling: a later call than the one that opened it, on the same thread."""
    def sample_tokens(self: Any, batch: Any) -> Any:
        try:
            out = original(self, batch)
        except BaseException as exc:
            _state.end(exc)
            raise
        _state.end()
        return out

    return sample_tokens


def _stage(name: str) -> Callable[[Callable], Callable]:
    """A runner method as a stage: a capture while a step is open on this thread, a plain call otherwise
    (warm-up, graph capture, another thread)."""
    def make(original: Callable) -> Callable:
        def stage(self: Any, *args: Any, **kwargs: Any) -> Any:
            capture = _state.stage_capture(name)
            if capture is None:
                return original(self, *args, **kwargs)
            with capture:
                return original(self, *args, **kwargs)

        return stage

    return make


#: Every place the integration patches, checked before it is applied, and only for the versions it is for.
HOOKS = (
    Hook("tests.toy_engine", "Engine.execute_model", "the step spans", _execute_model, role="step",
         params=("self", "batch")),
    Hook("tests.toy_engine", "Engine.sample_tokens", "the end of each step", _sample_tokens, role="step"),
    Hook("tests.toy_engine", "Runner.prepare", "the prepare input stage", _stage("prepare input"), role="stages"),
    Hook("tests.toy_engine", "Runner.forward", "the forward stage", _stage("forward"), role="stages"),
    Hook("tests.toy_engine", "Runner.sample", "the sample stage", _stage("sample"), role="stages"),
    Hook("tests.toy_engine", "Runner.draft", "the draft stage", _stage("draft"), role="stages", since=(2, 0)),
)


def install(version: str) -> list[str]:
    """What an entry point calls (``register()`` for vLLM): nothing unless otel-npu is enabled."""
    if not otel_npu.enabled():
        return []
    return _patcher.install(HOOKS, parse_version(version))


def uninstall() -> None:
    _patcher.uninstall()
    _state.__init__()
