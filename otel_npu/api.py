"""The public functions besides ``capture``/``step``: ``configure``, ``enabled``, ``flush``, ``shutdown``,
``stats``; and the binding of the hot path's start hook to the runtime.

The hot path (``capturing``) never imports the runtime: the first capture made while enabled calls the
starter bound here, which starts the runtime and hands the hot path the ``capturing.Parts`` it needs.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from . import _compiled, capturing, config, instrument, runtime
from .accounting import stats_if_started
from .capturing import capture, host_step, step
from .compat import ProfileExecuteDuration
from .devices import registry
from .instrument import instrument_module

if TYPE_CHECKING:  # loaded on first use (``__getattr__`` below)
    from .spans.identity import IdGenerator

__all__ = ["capture", "step", "host_step", "flush", "shutdown", "configure", "enabled", "stats",
           "ProfileExecuteDuration", "instrument_module", "IdGenerator"]

_configure_lock = threading.Lock()


def __getattr__(name: str) -> type:
    # ``IdGenerator`` is one of the OTel SDK's objects: imported on first use, so that ``import otel_npu`` (which
    # vLLM does in each of its processes, with otel-npu off too) does not import the SDK.
    if name == "IdGenerator":
        from .spans.identity import IdGenerator

        return IdGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enabled() -> bool:
    """Whether captures are being timed (False when disabled, or when the device could not be used)."""
    return capturing.is_on()


def configure(*, enabled: bool | None = None, device: Any = None, max_pending: int | None = None,
              event_timeout_s: float | None = None, log_durations: bool | None = None,
              poll_interval_s: float | None = None, shutdown_timeout_s: float | None = None,
              pipeline: str | None = None, tracer_provider: Any = None, keep_slow_steps: str | None = None,
              detail_every: int | None = None, attributes: Any = None) -> None:
    """Override the environment's settings in code (``None`` keeps the current value).

    ``attributes``: a mapping put on every span and stage metric of this process (a worker's ranks, say).
    Raises ``ValueError`` naming the argument for an invalid value. If otel-npu is running, it is flushed
    and shut down first (bounded by ``shutdown_timeout_s``); the new settings take effect at the next capture.
    """
    new = config.override(
        runtime.settings(), enabled=enabled, device=device, max_pending=max_pending,
        event_timeout_s=event_timeout_s, log_durations=log_durations, poll_interval_s=poll_interval_s,
        shutdown_timeout_s=shutdown_timeout_s, pipeline=pipeline, tracer_provider=tracer_provider,
        keep_slow_steps=keep_slow_steps, detail_every=detail_every, attributes=attributes)
    with _configure_lock:
        capturing.set_mode(False)
        runtime.stop(runtime.settings().shutdown_timeout_s)
        runtime.set_settings(new)
        capturing.set_mode(new.enabled)
        instrument.sync()  # module hooks exist only while enabled


def _check_timeout(what: str, timeout_s: Any) -> float:
    """``timeout_s`` as seconds, or a clear error naming the call and what is accepted (before any effect)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"otel_npu.{what}(timeout_s={timeout_s!r}) is not valid: expected a number of seconds "
                        f"(int or float, 0 or more), got {type(timeout_s).__name__}")
    if not 0 <= timeout_s < float("inf"):
        raise ValueError(f"otel_npu.{what}(timeout_s={timeout_s!r}) is not valid: expected a finite number of "
                         f"seconds, 0 or more")
    return float(timeout_s)


def flush(timeout_s: float = 5.0) -> bool:
    """Resolve every capture made so far and hand its span to the exporters (sent, for otel-npu's own OTLP),
    and export the stage metrics.

    **Blocks** the caller up to ``timeout_s`` (never the device). True when everything made it in time.
    Raises ``TypeError``/``ValueError`` for a ``timeout_s`` that is not a finite number ≥ 0.
    """
    timeout_s = _check_timeout("flush", timeout_s)
    rt = runtime.current()
    return True if rt is None else rt.flush(timeout_s)


def shutdown(timeout_s: float = 5.0) -> bool:
    """Flush (bounded by ``timeout_s``), stop the background threads, and disable captures.

    ``configure(enabled=True)`` starts otel-npu again. Returns True when everything was delivered in time.
    Raises ``TypeError``/``ValueError`` for a ``timeout_s`` that is not a finite number ≥ 0, before doing anything.
    """
    timeout_s = _check_timeout("shutdown", timeout_s)
    with _configure_lock:
        capturing.set_mode(False)
        instrument.sync()
        return runtime.stop(timeout_s)


def stats() -> dict[str, Any]:
    """Counters of this process (kept across ``configure()`` and after ``shutdown()``): resolved, timed out,
    spans emitted/unsampled/exported, drops by reason (every capture or span lost is counted here), metrics
    exports; while running, also the device, where spans and metrics go, and which background modules run
    compiled (``core``: ``_compiled.py``)."""
    rt = runtime.current()
    if rt is None:
        counted = stats_if_started()
        if counted is None:
            return {"running": False}
        out = counted.snapshot()  # what this process counted before otel-npu was shut down
        out["running"] = False
        return out
    out = rt.stats.snapshot()
    out.update(running=True, device=rt.backend.label(), pipeline=rt.pipeline.description,
               metrics=rt.pipeline.metrics_description,
               sampling=getattr(rt.pipeline, "sampling_description", ""),
               pending=len(rt.pending), resolver_alive=rt.resolver.alive, core=_compiled.describe())
    reads = getattr(rt.backend, "timing_read_stats", None)
    if reads is not None:
        out["timing_reads"] = reads()
    if rt.clock is not None and rt.clock.anchors:
        out["clock_anchor_bound_ns"] = rt.clock.anchors[-1].bound_ns
        out["clock_rate"] = rt.clock.rate
    return out


def _start_for_hot_path() -> Any:
    """The hot path's starter (see ``capturing.set_starter``): the runtime's ``Parts``, ``None`` when it
    cannot run here, or ``capturing.NOT_NOW`` while a graph capture is in progress.

    Blocks the first capture for the runtime's start-up (device detection, events, the first clock anchor).
    """
    device = runtime.settings().device  # a SimDevice brings its own graph API
    registry.watch_graphs(device)
    if registry.graph_capture_in_progress(device):
        # Starting creates events and streams and waits for an anchor: device calls that would break (or be
        # captured into) the graph. Captures stay no-ops until a later one starts the runtime.
        return capturing.NOT_NOW
    rt = runtime.start()
    return None if rt is None else rt.parts


def _after_fork_in_child() -> None:
    # Replaced, not released: a thread of the parent may have been inside configure()/shutdown() at fork time,
    # and it does not exist in the child to release it.
    global _configure_lock
    _configure_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
capturing.set_starter(_start_for_hot_path)
capturing.set_mode(runtime.settings().enabled)  # OTEL_NPU_ENABLED, read once at import
