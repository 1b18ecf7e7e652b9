"""Which steps become spans besides the sampler's: slow steps, and steps that carry per-layer detail.

Runs on the resolver thread (``export/pipeline.py`` asks it once per step the sampler dropped). Nothing here
is on the hot path except ``DetailBudget.take`` (once per ``step()`` call, only when a budget is set).

**Slow steps** (``OTEL_NPU_KEEP_SLOW_STEPS``, ``SlowSteps``): a step that the sampler dropped is still
exported, with all its captures, when it is slow:

* ``off``: never;
* ``25ms`` (or ``25``, ``2.5ms``, ``1s``...): its device-measured duration exceeds that threshold;
* ``p99`` / ``p999`` (default ``p99``): its duration exceeds that percentile of the recent durations of steps
  *of the same name* (Decode and Prefill are judged apart). **Estimator**: the exact percentile of a ring
  buffer of the last ``window`` durations (1,000 for p99, 10,000 for p999: ten steps above the cut), sorted
  again every ``window / 10`` steps (amortized ≈ 1 µs per step) — so the threshold follows a load change
  within a tenth of a window. No step is kept as slow before ``window / 10`` steps of that name were seen
  (the percentile of fewer is not meaningful).

**Bounding a burst**: when many steps are slow at once (a stall, a load change the window has not caught up
with yet), at most ``BURST`` slow steps per step name are kept at once, refilled at ``RATE_PER_S`` per
second of step time (a token bucket); slow steps beyond are not kept and are counted
(``stats()["slow_steps_not_kept"]``). With ``p99`` and steady load, ≈ 1 % of the dropped steps are kept.

Only steps that begin a trace are kept this way: a step under a request span (or a remote parent) follows
that parent's sampling decision, since keeping it would export a span whose parent is not exported. One
exception: a parent that says in its trace state (``PARENT_EXPORTED``: ``otelnpu=pe``) that it is exported
whatever its sampled flag says — an engine's scheduler step, parent of its workers' steps
(``integrations/_engine_step.py``) — lets its child be kept like a step that begins a trace.

**Detail budget** (``OTEL_NPU_DETAIL_EVERY=N``, ``DetailBudget``): detail captures (``instrument_module``'s
hooks, ``capture(..., detail=True)``) are taken only inside one step in ``N`` of each step name (the 1st,
the N+1th, ...); in the other steps ``capture(..., detail=True)`` returns a do-nothing object (no device
events, no resolver work). With ``N > 1``, a step in which detail captures were taken is always exported
(attribute ``otel_npu.kept = "detail"`` when the sampler had dropped it), so its per-layer spans are never
thrown away; with the default ``N = 1`` detail captures are ordinary captures and follow the sampler. So a
process exports about ``ratio + 1/N`` of its steps (plus the slow ones): with ``traceidratio`` 1 % and
``N = 100``, 2 % of steps, half of them with per-layer detail.
"""

from __future__ import annotations

import array

from ..accounting import Stats

#: The trace-state entry of a parent exported whatever its sampled flag says (see the module docstring).
PARENT_EXPORTED = ("otelnpu", "pe")

#: Slow steps kept at once per step name at most, and how fast that allowance comes back (per second).
BURST = 20
RATE_PER_S = 2.0

#: The recent durations kept per step name for each percentile rule (``config.parse_keep_slow``): ten steps
#: above the cut.
_WINDOWS = {"p99": 1000, "p999": 10000}


class _StepWindow:
    """Recent durations of one step name and the percentile over them (see the module docstring)."""

    __slots__ = ("ring", "next", "seen", "threshold", "tokens", "last_ns")

    def __init__(self) -> None:
        self.ring = array.array("q")  # 8 bytes a duration: a p999 window of one name is 80 KB
        self.next = 0
        self.seen = 0
        self.threshold: int | None = None
        self.tokens = float(BURST)
        self.last_ns = 0


class SlowSteps:
    """Decides, per finished step, whether it is slow by the configured rule (resolver thread only)."""

    _MAX_NAMES = 64  # step names followed (engines have a handful); beyond, only a threshold rule applies

    def __init__(self, rule: tuple[str, float], stats: Stats) -> None:
        self.kind, self.value = rule
        self._stats = stats
        self._window = _WINDOWS.get(self.kind, 0)
        self._names: dict[str, _StepWindow] = {}

    def describe(self) -> str:
        if self.kind == "threshold":
            return f"slow steps (> {self.value / 1e6:g} ms) kept"
        return f"slow steps (> {self.kind} of the last {self._window} of their name) kept"

    def observe(self, name: str, duration_ns: int, end_ns: int, dropped: bool) -> float | None:
        """Note a finished step; when ``dropped`` (by the sampler), return the threshold (ns) it exceeded if
        it is to be kept as slow, else None. Every step is observed, exported or not."""
        w = self._names.get(name)
        if w is None:
            if len(self._names) >= self._MAX_NAMES:
                return self._decide(duration_ns, end_ns, dropped, None,
                                    self.value if self.kind == "threshold" else None)
            w = self._names[name] = _StepWindow()
        if self.kind == "threshold":
            threshold = self.value
        else:
            threshold = w.threshold
            size = self._window
            if len(w.ring) < size:
                w.ring.append(duration_ns)
            else:
                w.ring[w.next] = duration_ns
                w.next = (w.next + 1) % size
            w.seen += 1
            if w.seen % (size // 10) == 0:  # re-estimate every tenth of a window (first: at a tenth full)
                ordered = sorted(w.ring)
                w.threshold = ordered[min(len(ordered) - 1, int(self.value * len(ordered)))]
        return self._decide(duration_ns, end_ns, dropped, w, threshold)

    def _decide(self, duration_ns: int, end_ns: int, dropped: bool, w: _StepWindow | None,
                threshold: float | None) -> float | None:
        if not dropped or threshold is None or duration_ns <= threshold:
            return None
        if w is not None:
            # Token bucket in step time: BURST at once, RATE_PER_S after that.
            if w.last_ns:
                w.tokens = min(float(BURST), w.tokens + (end_ns - w.last_ns) * 1e-9 * RATE_PER_S)
            w.last_ns = end_ns
            if w.tokens < 1.0:
                self._stats.add("slow_steps_not_kept")
                return None
            w.tokens -= 1.0
        return threshold


class DetailBudget:
    """``OTEL_NPU_DETAIL_EVERY``: which steps may take detail captures (read on the capturing thread)."""

    __slots__ = ("every", "_counts")

    def __init__(self, every: int) -> None:
        self.every = every
        self._counts: dict[str, int] = {}

    def take(self, name: str) -> int:
        """For a new step named ``name``: 1 if detail captures may be taken inside it, else 0.

        Racing threads may both read the same count (a step more or less with detail): harmless."""
        counts = self._counts
        n = counts.get(name, 0)
        if n == 0 and len(counts) >= 4096:
            return 0  # too many step names to count: no detail for new ones
        counts[name] = n + 1 if n + 1 < self.every else 0
        return 1 if n == 0 else 0


__all__ = ["SlowSteps", "DetailBudget", "PARENT_EXPORTED"]
