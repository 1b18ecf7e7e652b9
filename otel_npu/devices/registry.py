"""The device kinds otel-npu knows, in one table: where a new device goes.

Each entry of ``KINDS`` (in the order ``auto`` tries them: npu > cuda > cpu) says how to make the kind's
backend (``make()``: raises ``DeviceUnavailable`` saying why when the kind cannot be used here), which of its
classes capture device graphs (``graph_classes(api)``, watched so that no device call is made while a capture
runs: ``graphs.py``), whether the calling thread's current stream is capturing now (``stream_capturing()``),
and under which attribute a simulated device (``otel_npu.testing.SimDevice``) exposes its API (``sim_api``).
``config`` accepts ``OTEL_NPU_DEVICE``/``configure(device=...)`` values from these names (and ``auto``).

Adding a device ``xpu``: ``devices/xpu.py`` with a ``DeviceBackend`` (``base.py`` says who calls each method and
what it may cost) and its two graph hooks, then one entry here. Nothing else names the kinds.

Nothing here imports torch or torch_npu: each backend imports its own, when made.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from . import cpu, cuda, graphs, npu
from .base import DeviceBackend, DeviceUnavailable


class DeviceKind(NamedTuple):
    make: Callable[[], DeviceBackend]
    graph_classes: Callable[[Any], list[tuple[str, Any]]]
    stream_capturing: Callable[[], bool]
    sim_api: str = ""


def _no_graphs(api: Any = None) -> list[tuple[str, Any]]:
    return []


def _never() -> bool:
    return False


#: Device kind -> how to make and watch it, in ``auto``'s order of preference.
KINDS: dict[str, DeviceKind] = {
    "npu": DeviceKind(npu.NpuBackend, npu.graph_classes, npu.stream_capturing, sim_api="torch_npu"),
    "cuda": DeviceKind(cuda.CudaBackend, cuda.graph_classes, cuda.stream_capturing, sim_api="torch_cuda"),
    "cpu": DeviceKind(cpu.CpuBackend, _no_graphs, _never),
}


def make(kind: str) -> DeviceBackend:
    """The backend of ``kind`` (raises ``DeviceUnavailable``, or ``ValueError`` for a kind not in ``KINDS``)."""
    entry = KINDS.get(kind)
    if entry is None:
        raise ValueError(f"unknown device kind {kind!r}; accepted: auto, {', '.join(KINDS)}")
    return entry.make()


def select(device: Any) -> tuple[DeviceBackend, list[str]]:
    """Return ``(backend, reasons)``: the backend to use and why better kinds were passed over.

    ``device`` is ``"auto"``, a kind name, a ``DeviceBackend``, or an object with ``otel_npu_backend()``
    (``otel_npu.testing.SimDevice``). Raises ``DeviceUnavailable`` when an explicitly named kind is unusable.
    """
    if isinstance(device, DeviceBackend):
        return device, []
    factory = getattr(device, "otel_npu_backend", None)
    if callable(factory):
        return factory(), []
    if device != "auto":
        return make(device), []
    reasons = []
    *better, last = KINDS
    for kind in better:
        try:
            return make(kind), reasons
        except DeviceUnavailable as exc:
            reasons.append(f"{kind}: {exc}")
    return make(last), reasons


def watch_graphs(device: Any = None) -> list[str]:
    """Watch the graph-capture classes of every kind whose module is already imported, and those of
    ``device``'s API when it is a simulated device. Returns the names watched. Idempotent and cheap."""
    candidates = []
    for kind in KINDS.values():
        candidates += kind.graph_classes(None)
        api = getattr(device, kind.sim_api, None) if kind.sim_api and device is not None else None
        if api is not None:
            candidates += kind.graph_classes(api)
    return graphs.watch(candidates)


def graph_capture_in_progress(device: Any = None) -> bool:
    """Whether a graph capture runs now: a watched one anywhere, or one on the calling thread's current stream
    of any kind (or of ``device``, a simulated device). Not for the hot path (that reads ``graphs.active``)."""
    if graphs.active:
        return True
    probes = [kind.stream_capturing for kind in KINDS.values()]
    probe = getattr(device, "is_current_stream_capturing", None)
    if callable(probe):
        probes.insert(0, probe)
    for capturing in probes:
        try:
            if capturing():
                return True
        except Exception:
            pass
    return False
