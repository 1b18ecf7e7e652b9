"""The hot path (``hot.py``) and what binds it: install, detach, enable/disable, fork.

* ``hot.py``: ``capture()``, ``step()`` and the capture classes' entry/exit, with the state they read as
  module globals; ``off.py``: the disabled objects; ``decorate.py``: the decorator; ``compile_guard.py``:
  torch.compile detection; ``errors.py``: what is kept of an exception leaving a capture.
* here: ``install(parts)`` binds the hot path to a running runtime's ``Parts``; ``set_room``/``detach`` are
  the runtime's word afterwards; ``set_mode`` enables or disables; the first enabled capture calls the
  starter bound by ``set_starter`` (the API binds the runtime's start). A forked child starts afresh.

Imports: ``record``, ``accounting``, ``devices`` (graph-capture watch) and OpenTelemetry's context API. Nothing
above.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from typing import Any, Callable

from ..accounting import Stats, process_stats
from ..devices import registry
from ..record import Record
from . import compile_guard, hot, off
from .hot import Capture, capture, host_step, step

__all__ = ["capture", "step", "host_step", "current", "Capture", "Parts", "NOT_NOW", "set_starter", "install",
           "set_room", "detach", "set_mode", "is_on", "bind_compiler"]


class Parts:
    """What the hot path needs of a running otel-npu, handed to ``install()`` by whoever starts it (the
    runtime builds one; the hot path never imports the runtime). ``pools``/``record``/``current_stream`` are
    used by device backends only (``host_timed`` False)."""

    __slots__ = ("stats", "pending", "max_pending", "host_timed", "pools", "record", "current_stream",
                 "want_device", "wake", "detail_budget")

    def __init__(self, *, stats: Stats, pending: collections.deque, max_pending: int, host_timed: bool, pools: dict | None = None,
                 record: Callable[[Any, Any], None] | None = None, current_stream: Callable[[], Any] | None = None,
                 want_device: Callable[[int], None] | None = None, wake: Callable[[], None] | None = None,
                 detail_budget: Any = None) -> None:
        self.stats = stats                  # accounting.Stats: drops counted on the hot path (rare paths)
        self.pending = pending              # the deque the resolver takes captures from
        self.max_pending = max_pending      # the pending limit until the resolver says otherwise (set_room)
        self.host_timed = host_timed
        self.pools = pools if pools is not None else {}  # device index -> EventPool (devices added later)
        self.record = record                # backend.record(event, stream)
        self.current_stream = current_stream
        self.want_device = want_device      # a capture on a device without events yet (rare)
        self.wake = wake                    # wake the resolver now (rare: the event pool ran empty)
        self.detail_budget = detail_budget  # spans.sampling.DetailBudget, or None (every step takes detail)


#: Not started yet, try again at the next capture (the starter's answer while a graph capture runs).
NOT_NOW: Any = object()
#: Called under ``_state_lock`` by the first capture while enabled: returns ``Parts`` (installed), ``None``
#: (otel-npu cannot run here: captures stay no-ops until ``set_mode`` again) or ``NOT_NOW``. Bound by the API.
_starter: Callable[[], Any] = lambda: None
_state_lock = threading.Lock()


def _set_dispatch(capture_cls: Any, step_cls: Any) -> None:
    """What ``capture()``/``step()`` make from now on (``None``: disabled; ``hot._LAZY``: start on the next
    call; the running backend's classes): the one place that sets the hot path's dispatch, and the mirror
    the disabled objects read (``off._enabled``)."""
    hot._capture_cls, hot._step_cls = capture_cls, step_cls
    off._enabled = capture_cls is not None


def set_starter(starter: Callable[[], Any]) -> None:
    """Bind what the first enabled capture calls to start otel-npu (``api`` binds the runtime's start)."""
    global _starter
    _starter = starter


def _start() -> tuple[Any, Any]:
    """First capture in a process (or after configure()): start otel-npu, then capture normally. Blocks that
    capture for the start-up (see the starter)."""
    with _state_lock:
        if hot._capture_cls is hot._LAZY:
            parts = _starter()
            if parts is NOT_NOW:
                return hot._LAZY, hot._LAZY
            if parts is None:
                _set_dispatch(None, None)
            else:
                install(parts)
    return hot._capture_cls, hot._step_cls


hot._start = _start


def install(parts: Parts) -> None:
    """Bind the hot path to ``parts``: captures from now on are timed and queued there."""
    torch = sys.modules.get("torch")
    if torch is not None:
        bind_compiler(torch)
    hot._parts = parts
    hot._detail_budget = parts.detail_budget
    hot._pending_len = parts.pending.__len__
    hot._pending_append = parts.pending.append
    hot._max_pending = parts.max_pending
    if parts.host_timed:
        _set_dispatch(hot._HostCapture, hot._HostStep)
    else:
        hot._pools = parts.pools
        hot._record = parts.record
        hot._current_stream = parts.current_stream
        _set_dispatch(hot._EventCapture, hot._EventStep)


def set_room(parts: Parts, n: int) -> None:
    """The resolver's word on how many captures may wait in ``pending`` now (the limit less those it holds);
    ignored unless ``parts`` is the installed one."""
    if hot._parts is parts:
        hot._max_pending = n


def detach(parts: Parts) -> None:
    """``parts``' runtime is shutting down: a capture that ends from now on is counted as lost, not queued
    where nothing will take it (a capture open across ``shutdown()``/``configure()``)."""
    if hot._parts is parts:
        hot._pending_append = _late


def _late(item: Record) -> None:
    process_stats().drop("resolver_stopped")


def bind_compiler(torch: Any) -> None:
    """Read torch.compile's flag from ``torch`` from now on (see ``compile_guard.py``)."""
    hot._compiler = compile_guard.flag_of(torch)


def set_mode(enabled: bool) -> None:
    """Enabled: the next capture starts otel-npu. Disabled: captures do nothing (running ones finish)."""
    if enabled:
        registry.watch_graphs()  # as early as possible: a graph capture begun before we watch is not seen
        if "torch" in sys.modules:
            bind_compiler(sys.modules["torch"])
    with _state_lock:
        _set_dispatch(hot._LAZY, hot._LAZY) if enabled else _set_dispatch(None, None)


def is_on() -> bool:
    return hot._capture_cls is not None


def current() -> Capture | None:
    """The innermost open capture or step of this thread/task (``None`` outside any)."""
    return hot._get_current()


def _after_fork_in_child() -> None:
    # The parent's runtime (threads, queue, events) does not exist in the child: start afresh on the next
    # capture. Locks are replaced, not released: a lock held by another thread at fork time stays held.
    global _state_lock
    _state_lock = threading.Lock()
    hot._parts = None
    hot._pending_append = _late  # a capture open across fork ends in the child: counted there, not left in a copy
    set_mode(hot._capture_cls is not None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
