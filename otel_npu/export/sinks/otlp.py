"""``OtlpSink``: otel-npu's own OTLP export. Encode on the resolver thread, send on the exporter thread.

Batching follows the BatchSpanProcessor: export when ``max_export_batch_size`` spans wait or every
``schedule_delay``; when ``max_queue_size`` spans wait, new ones are dropped and counted (``export_queue_full``)
— never blocking the resolver. Failed exports are counted (``export_failed``) with the first error.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from ...accounting import Stats
from ...record import Record
from ...threads import name_os_thread
from ..redact import redact
from ..waiting import wait_until


class OtlpSink:
    """otel-npu's own OTLP export: encode on the resolver thread, send on the exporter thread."""

    def __init__(self, transport: Any, encoder: Any, stats: Stats, *,
                 max_queue_size: int = 8192, max_export_batch_size: int = 2048,
                 schedule_delay_s: float = 5.0) -> None:
        self._transport = transport  # registry.Transport
        self._send = transport.send
        self._encoder = encoder
        self._stats = stats
        self._max_queue = max_queue_size
        self._batch = min(max_export_batch_size, max_queue_size)
        self._delay = schedule_delay_s
        self._queue: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._enqueued = 0   # spans accepted so far
        self._settled = 0    # spans exported or failed so far
        self._flush_to = 0   # export at once until _settled reaches this
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.endpoint = transport.endpoint

    # -- resolver thread ----------------------------------------------------------------------------
    def emit(self, r: Record) -> None:
        encoded = self._encoder.encode(r)
        if len(self._queue) >= self._max_queue:
            self._stats.drop("export_queue_full")
            return
        self._queue.append(encoded)
        self._enqueued += 1
        if self._thread is None:
            self._start()
        if len(self._queue) == self._batch:  # exactly at the threshold: one notify per batch
            with self._cond:
                self._cond.notify()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="otel-npu-exporter", daemon=True)
        self._thread.start()

    # -- exporter thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread("otel-npu-exporter")
        while True:
            with self._cond:
                if not self._stopping and len(self._queue) < self._batch and self._settled >= self._flush_to:
                    self._cond.wait(self._delay)
                stopping = self._stopping
            while self._queue:
                self._export_one_batch()
                if len(self._queue) < self._batch and self._settled >= self._flush_to and not stopping:
                    break
            with self._cond:
                self._cond.notify_all()
            if stopping and not self._queue:
                return

    def _export_one_batch(self) -> None:
        queue = self._queue
        batch = []
        popleft = queue.popleft
        waiting = len(queue)
        for _ in range(min(self._batch, waiting)):
            batch.append(popleft())
        if not batch:
            return
        stats = self._stats
        if waiting > stats.export_queue_peak:
            stats.export_queue_peak = waiting
        started = time.monotonic()
        try:
            request = self._encoder.request(batch)
            stats.export_bytes += len(request)
            ok, error = self._send(request, len(batch))
        except Exception as exc:  # the exporter should not raise; if it does, count and carry on
            ok, error = False, redact(f"{type(exc).__name__}: {exc}")
        took = time.monotonic() - started
        stats.export_sends += 1
        stats.export_send_s += took
        if took > stats.export_send_max_s:
            stats.export_send_max_s = took
        with self._cond:
            if self._closed:  # counted as lost by shutdown() already
                return
            self._settled += len(batch)
        if ok:
            self._stats.spans_exported += len(batch)
        else:
            self._stats.drop("export_failed", ExportError(error or "unknown error"), len(batch))

    # -- any thread ---------------------------------------------------------------------------------
    def export_now(self) -> None:
        """Have the exporter thread send everything emitted so far, now, without waiting for it (the resolver
        calls it when the process goes idle). Takes the sink's lock for a moment; never waits for a send."""
        with self._cond:
            if self._enqueued > self._flush_to:
                self._flush_to = self._enqueued
                self._cond.notify_all()

    def force_flush(self, timeout_s: float) -> bool:
        """Export everything emitted so far. Blocks up to ``timeout_s``; True when all were sent or failed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._enqueued
            self._flush_to = max(self._flush_to, target)
            if self._thread is None:
                return self._settled >= target
            self._cond.notify_all()
            return wait_until(self._cond, lambda: self._settled >= target, deadline, self._thread)

    def shutdown(self, timeout_s: float) -> None:
        """Flush within ``timeout_s``, then stop. What is still queued or in flight is counted as lost."""
        self.force_flush(timeout_s)
        with self._cond:
            self._stopping = True
            self._closed = True
            lost = self._enqueued - self._settled
            self._queue.clear()
            self._cond.notify_all()
        if lost:
            self._stats.drop("export_failed", ExportError("not delivered before shutdown"), lost)
        try:
            self._transport.shutdown()
        except Exception:  # pragma: no cover - best effort at exit
            pass


class ExportError(Exception):
    """Spans were not delivered (the name shows in ``stats()`` errors, logs and ``doctor``)."""
