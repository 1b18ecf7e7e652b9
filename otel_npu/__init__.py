"""otel-npu: device-measured stage timings (Ascend NPU, CUDA, CPU) as OpenTelemetry spans.

The data path, one module each: ``capturing`` (hot path: two device events) -> ``resolver`` (background thread:
waits for finished events) -> ``clock`` (device time to wall clock) -> ``spans`` (ids, parents, attributes)
-> ``export`` / ``otlp`` (OTLP or the application's TracerProvider), over ``devices`` (npu, cuda, cpu).

Public API::

    import otel_npu
    with otel_npu.step("Decode", links=[req.span_context for req in batch]):
        with otel_npu.capture("forward"):
            logits = model(...)
    otel_npu.flush()

Off by default; ``OTEL_NPU_ENABLED=1`` (or ``configure(enabled=True)``) turns it on.
"""

from __future__ import annotations

import threading
from typing import Any

__version__ = "0.1.0"

from . import capturing as _capture_mod  # noqa: E402  (after __version__: export.pipeline reads it)
from . import config as _config  # noqa: E402
from . import runtime as _runtime  # noqa: E402
from .capturing import capture, step  # noqa: E402
from .compat import ProfileExecuteDuration  # noqa: E402
from . import instrument as _instrument  # noqa: E402
from .instrument import instrument_module  # noqa: E402

__all__ = ["capture", "step", "flush", "shutdown", "configure", "enabled", "stats", "ProfileExecuteDuration",
           "instrument_module", "__version__"]

_configure_lock = threading.Lock()


def enabled() -> bool:
    """Whether captures are being timed (False when disabled, or when the device could not be used)."""
    return _capture_mod.is_on()


def configure(*, enabled: bool | None = None, device: Any = None, max_pending: int | None = None,
              event_timeout_s: float | None = None, log_durations: bool | None = None,
              poll_interval_s: float | None = None, shutdown_timeout_s: float | None = None,
              pipeline: str | None = None, tracer_provider: Any = None, keep_slow_steps: str | None = None,
              detail_every: int | None = None) -> None:
    """Override the environment's settings in code (``None`` keeps the current value).

    Raises ``ValueError`` naming the argument for an invalid value. If otel-npu is running, it is flushed
    and shut down first (bounded by ``shutdown_timeout_s``); the new settings take effect at the next capture.
    """
    new = _config.override(
        _runtime.settings(), enabled=enabled, device=device, max_pending=max_pending,
        event_timeout_s=event_timeout_s, log_durations=log_durations, poll_interval_s=poll_interval_s,
        shutdown_timeout_s=shutdown_timeout_s, pipeline=pipeline, tracer_provider=tracer_provider,
        keep_slow_steps=keep_slow_steps, detail_every=detail_every)
    with _configure_lock:
        _capture_mod.set_mode(False)
        _runtime.stop(_runtime.settings().shutdown_timeout_s)
        _runtime.set_settings(new)
        _capture_mod.set_mode(new.enabled)
        _instrument.sync()  # module hooks exist only while enabled


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
    rt = _runtime.current()
    return True if rt is None else rt.flush(timeout_s)


def shutdown(timeout_s: float = 5.0) -> bool:
    """Flush (bounded by ``timeout_s``), stop the background threads, and disable captures.

    ``configure(enabled=True)`` starts otel-npu again. Returns True when everything was delivered in time.
    Raises ``TypeError``/``ValueError`` for a ``timeout_s`` that is not a finite number ≥ 0, before doing anything.
    """
    timeout_s = _check_timeout("shutdown", timeout_s)
    with _configure_lock:
        _capture_mod.set_mode(False)
        _instrument.sync()
        return _runtime.stop(timeout_s)


def stats() -> dict[str, Any]:
    """Counters of this process (kept across ``configure()`` and after ``shutdown()``): resolved, timed out,
    spans emitted/unsampled/exported, drops by reason (every capture or span lost is counted here), metrics
    exports; while running, also the device and where spans and metrics go."""
    rt = _runtime.current()
    if rt is None:
        counted = _runtime.stats_if_started()
        if counted is None:
            return {"running": False}
        out = counted.snapshot()  # what this process counted before otel-npu was shut down
        out["running"] = False
        return out
    out = rt.stats.snapshot()
    out.update(running=True, device=rt.backend.label(), pipeline=rt.pipeline.description,
               metrics=rt.pipeline.metrics_description,
               sampling=getattr(rt.pipeline, "sampling_description", ""),
               pending=len(rt.pending), resolver_alive=rt.resolver.alive)
    reads = getattr(rt.backend, "timing_read_stats", None)
    if reads is not None:
        out["timing_reads"] = reads()
    if rt.clock is not None and rt.clock.anchors:
        out["clock_anchor_bound_ns"] = rt.clock.anchors[-1].bound_ns
        out["clock_rate"] = rt.clock.rate
    return out


def _after_fork_in_child() -> None:
    # Replaced, not released: a thread of the parent may have been inside configure()/shutdown() at fork time,
    # and it does not exist in the child to release it.
    global _configure_lock
    _configure_lock = threading.Lock()


_runtime.on_fork_child(_after_fork_in_child)
_capture_mod.set_mode(_runtime.settings().enabled)
