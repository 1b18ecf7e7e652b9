"""otel-npu: device-measured stage timings (Ascend NPU, CUDA, CPU) as OpenTelemetry spans.

The data path, one module each: ``capturing`` (hot path: two device events) -> ``resolver`` (background
thread: waits for finished events) -> ``clock`` (device time to wall clock) -> ``spans`` (ids, parents,
attributes) -> ``export`` (OTLP or the application's TracerProvider), over ``devices`` (npu, cuda, cpu).
``api`` holds the public functions; this module only re-exports them.

Public API::

    import otel_npu
    with otel_npu.step("Decode", links=[req.span_context for req in batch]):
        with otel_npu.capture("forward"):
            logits = model(...)
    otel_npu.flush()

Off by default; ``OTEL_NPU_ENABLED=1`` (or ``configure(enabled=True)``) turns it on.
"""

# First: the compiled twins of the background modules load in their place when built (``_compiled.py``).
from . import _compiled

_compiled.install()

from typing import TYPE_CHECKING

from ._version import __version__
from .api import (ProfileExecuteDuration, capture, configure, enabled, flush, host_step, instrument_module,
                  shutdown, stats, step)

if TYPE_CHECKING:  # loaded on first use (``__getattr__`` below)
    from .api import IdGenerator

__all__ = ["capture", "step", "host_step", "flush", "shutdown", "configure", "enabled", "stats",
           "ProfileExecuteDuration", "instrument_module", "IdGenerator", "__version__"]


def __getattr__(name: str) -> type:
    if name == "IdGenerator":  # not imported with the package: it imports the OTel SDK (``api.__getattr__``)
        from .api import IdGenerator

        return IdGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
