"""What otel-npu counts: every capture or span lost, by reason, and the per-capture counters.

``DROP_REASONS`` is the one list of loss reasons: ``Stats.report`` explains them in its warning, the stage
metrics export them as ``otel_npu.captures.dropped`` / ``otel_npu.captures.spans_lost`` (``CAPTURE_DROP_REASONS``,
``SPAN_LOSS_REASONS``), and ``otel_npu.stats()`` shows their counts.

The process's counters (``process_stats()``) outlive a runtime: ``configure()`` restarts otel-npu with the
same counters, and ``stats()`` still reports them after ``shutdown()``. A forked child starts its own.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any

_log = logging.getLogger("otel_npu")

#: Seconds between two drop/failure warnings (each says how many and why since the last one).
REPORT_EVERY_S = 60.0

#: Why data was lost, and what was lost: every drop is counted under one of these (or an error's name).
DROP_REASONS = {
    "pending_limit": ("captures", "entered while OTEL_NPU_MAX_PENDING captures were waiting for their device "
                                  "events"),
    "event_pool_empty": ("captures", "no pre-created timing event was free (the resolver is behind the device)"),
    "record_failed": ("captures", "recording a device event raised"),
    "resolver_stopped": ("captures", "captured while otel-npu was shutting down, or ended after it shut down"),
    "device_unfinished": ("captures", "their device work had not finished when otel-npu shut down"),
    "shutdown_timeout": ("captures", "still waiting to be turned into spans when the shutdown bound ran out (the "
                                     "resolver was held up, e.g. by an exporter that does not answer)"),
    "export_failed": ("spans", "the collector did not accept them"),
    "export_queue_full": ("spans", "the export queue (OTEL_BSP_MAX_QUEUE_SIZE) was full: the collector is slow "
                                   "or unreachable"),
    "emit_failed": ("spans", "turning a resolved capture into a span raised"),
    "calibration_failed": ("clock anchors", "a clock reference event did not complete; older anchors are used"),
    "graph_capture": ("captures", "entered while a CUDA/ACL graph capture was in progress (time the graph's "
                                  "replay instead)"),
    "query_failed": ("device timings", "query() on a capture's event raised; its span carries host times"),
    "device_starting": ("captures", "made on a device otel-npu had not seen before, while its events and clock "
                                    "were being prepared"),
}

#: The reasons of ``otel_npu.captures.dropped`` (captures not timed) and ``otel_npu.captures.spans_lost``
#: (spans of resolved captures that did not reach their destination), in ``DROP_REASONS`` order.
CAPTURE_DROP_REASONS = tuple(reason for reason, (what, _) in DROP_REASONS.items() if what == "captures")
SPAN_LOSS_REASONS = tuple(reason for reason, (what, _) in DROP_REASONS.items() if what == "spans")


class Stats:
    """Counters shared by the hot path (drops only, under a lock: a rare path), the resolver and the sinks.

    The per-capture counters are plain attributes, each written by one thread only (``resolved``,
    ``timed_out``, ``spans_emitted``, ``spans_unsampled``: the resolver; ``spans_exported`` and the
    ``export_*`` figures: the exporter thread), so counting costs no lock; readers may see a value a moment old.
    """

    SINGLE_WRITER = ("resolved", "timed_out", "spans_emitted", "spans_unsampled", "spans_exported",
                     "export_sends", "export_bytes", "export_send_s", "export_send_max_s", "export_queue_peak")

    def __init__(self) -> None:
        self.resolved = self.timed_out = self.spans_emitted = self.spans_unsampled = self.spans_exported = 0
        # otel-npu's own span exporter (its exporter thread): requests sent (delivered or failed), their bytes
        # (encoded, before any compression), the seconds they took in all and the slowest, and the most spans
        # seen waiting when a batch was taken: whether a full export queue came from a slow collector or from
        # an exporter thread that did not get to run
        self.export_sends = self.export_bytes = 0
        self.export_send_s = 0.0
        self.export_send_max_s = 0.0
        self.export_queue_peak = 0
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.drops: collections.Counter[str] = collections.Counter()
        self.first_error: dict[str, str] = {}
        self._reported: collections.Counter[str] = collections.Counter()
        self._last_report = float("-inf")

    def drop(self, reason: str, exc: BaseException | None = None, n: int = 1) -> None:
        with self._lock:
            self.drops[reason] += n
            if exc is not None and reason not in self.first_error:
                self.first_error[reason] = f"{type(exc).__name__}: {exc}"

    def note_error(self, name: str, exc: BaseException) -> None:
        """Count a failure that lost nothing (the capture still became a span), keeping the first error."""
        with self._lock:
            self.counts[name] += 1
            self.first_error.setdefault(name, f"{type(exc).__name__}: {exc}")

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {name: getattr(self, name) for name in self.SINGLE_WRITER}
            out.update(self.counts)
            out["dropped"] = dict(self.drops)
            out["dropped_total"] = sum(self.drops.values())
            return out

    def report(self, now: float, force: bool = False) -> None:
        """Warn about drops since the last warning: at most once every REPORT_EVERY_S unless forced."""
        with self._lock:
            new = self.drops - self._reported
            if not new or (not force and now - self._last_report < REPORT_EVERY_S):
                return
            self._reported = collections.Counter(self.drops)
            self._last_report = now
            errors = dict(self.first_error)
        parts = []
        for reason, n in sorted(new.items()):
            what, why = DROP_REASONS.get(reason, ("items", reason))
            detail = f" (first error: {errors[reason]})" if reason in errors else ""
            if reason == "export_queue_full" and self.export_sends:
                detail += (f" (the exporter so far: {self.export_sends} requests of "
                           f"{self.export_bytes / self.export_sends / 1e3:.0f} kB, "
                           f"{self.export_send_s / self.export_sends * 1e3:.0f} ms each on average, the slowest "
                           f"{self.export_send_max_s * 1e3:.0f} ms, up to {self.export_queue_peak} spans waiting)")
            parts.append(f"{n} {what} ({reason}): {why}{detail}")
        _log.warning("otel-npu lost data since its last report: %s", "; ".join(parts))


#: The process's counters: shared by every runtime it starts, kept after shutdown (``None`` until first used).
_stats: Stats | None = None


def process_stats() -> Stats:
    """The counters of this process (since it started, or was forked): every loss is counted here."""
    global _stats
    stats = _stats
    if stats is None:
        stats = _stats = Stats()
    return stats


def stats_if_started() -> Stats | None:
    """The process's counters, or ``None`` when nothing has counted anything in this process yet."""
    return _stats


def reset_stats() -> None:
    """Forget the counters (for tests: each starts from zero)."""
    global _stats
    _stats = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reset_stats)  # a forked child counts its own
