"""The per-process wiring: settings, device, event pool, clocks, resolver, span pipeline; fork and exit.

A ``Runtime`` is created by the first capture after otel-npu is enabled (not at import: importing must not
touch CUDA or torch_npu, which would break processes that fork workers afterwards). Creating it detects the
device, pre-creates timing events, takes the first clock anchor (a short wait on otel-npu's own idle
stream, once), builds the span pipeline and starts the resolver thread.

Process life:

* **exit**: an ``atexit`` hook flushes and shuts down within ``shutdown_timeout_s`` (default 5 s), so a dead
  collector cannot hang the exit; the background threads are daemons;
* **fork**: in the child the parent's runtime is abandoned without touching its locks or threads (they do
  not exist there), its pending captures are dropped (the parent still resolves them), and the next capture
  in the child starts a fresh runtime.
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from . import capturing, config, devices, durations
from .accounting import process_stats
from .devices.base import EventPool
from .resolve.clock import DeviceClock, HostClock
from .resolve.resolver import POOL_MIN_FREE, Resolver
from .spans.attributes import process_attributes
from .spans.sampling import DetailBudget

_log = logging.getLogger("otel_npu")

_settings = config.from_env()
_runtime: "Runtime | None" = None
_lock = threading.Lock()
_atexit_registered = False


class Runtime:
    """Everything otel-npu runs in one process. Built by ``start()``; see the module docstring."""

    def __init__(self, settings: config.Settings) -> None:
        # Imported here, not by ``import otel_npu``: the export path and the OpenTelemetry SDK are loaded
        # when otel-npu starts (spans/sdk.py: an environment variable the SDK's import rejects cannot fail it).
        from .export import pipeline as telemetry

        self.settings = settings
        self.backend, self.passed_over = devices.select(settings.device)
        self.stats = process_stats()
        #: Which steps may take detail captures (None: all); read by the hot path through ``parts``.
        self.detail_budget = DetailBudget(settings.detail_every) if settings.detail_every > 1 else None
        self.pending: collections.deque = collections.deque()
        self.host_clock = HostClock()
        # Per device (a device event can only be recorded on a stream of its own device): the primary's are
        # made here; another device's by the resolver thread when a capture first asks for it (want_device).
        self.pools: dict[int, EventPool] = {}
        self.clocks: dict[int, DeviceClock] = {}
        self.wanted_devices: set[int] = set()
        self.pool: EventPool | None = None    # the primary device's
        self.clock: DeviceClock | None = None
        if not self.backend.host_timed:
            # Created here, once (≈ µs each): the hot path never allocates one, and a burst of captures at
            # start finds enough (512 captures) before the resolver's first pass tops the pool up.
            self.pool, self.clock = self._device_parts(self.backend.index)
            self.clock.calibrate(read_now=False)  # the read happens on the resolver thread
            self.clocks[self.backend.index] = self.clock
            self.pools[self.backend.index] = self.pool
        otel = config.otel.read()  # the OTEL_* variables, as they are when otel-npu starts
        self.pipeline = telemetry.build(
            settings, otel, process_attrs=process_attributes(self.backend.label(), otel.ranks, settings.attributes),
            stream_label=self.backend.stream_label, to_wall=self.host_clock.to_wall, stats=self.stats)
        if settings.log_durations:
            durations.ensure_visible()
        #: What the hot path is bound to once this runtime runs (``capturing.install``).
        self.parts = capturing.Parts(
            stats=self.stats, pending=self.pending, max_pending=settings.max_pending,
            host_timed=self.backend.host_timed, pools=self.pools, record=self.backend.record,
            current_stream=self.backend.current_stream, want_device=self.want_device, wake=self._wake_resolver,
            detail_budget=self.detail_budget)
        self.resolver = Resolver(
            pending=self.pending, backend=self.backend, pool=self.pool, clock=self.clock,
            pools=self.pools, clocks=self.clocks, wanted_devices=self.wanted_devices,
            make_device=self._device_parts,
            host_clock=self.host_clock, stats=self.stats, emit=self.pipeline.emit,
            on_step=durations.log_step if settings.log_durations else None,
            poll_interval_s=settings.poll_interval_s, event_timeout_s=settings.event_timeout_s,
            max_pending=settings.max_pending, on_room=functools.partial(capturing.set_room, self.parts),
            on_idle=self.pipeline.export_now)
        self.resolver.start()
        self.pid = os.getpid()

    def _device_parts(self, index: int) -> tuple[EventPool, DeviceClock]:
        view = self.backend.for_device(index)
        pool = EventPool(view, initial=POOL_MIN_FREE, limit=2 * self.settings.max_pending + POOL_MIN_FREE)

        def anchor_event() -> Any:
            return pool.take() if len(pool) else view.new_event()

        clock = DeviceClock(view, anchor_event, pool.give, mono=self.host_clock.mono,
                            keep_s=self.settings.event_timeout_s + 10.0)
        return pool, clock

    def want_device(self, index: int) -> None:
        """Hot path, rare: a capture on device ``index``, which has no events yet. The resolver adds it."""
        if index not in self.wanted_devices:
            self.wanted_devices.add(index)
            self.stats.drop("device_starting")
            self.resolver.wake()
        else:
            self.stats.drop("device_starting")


    def _wake_resolver(self) -> None:
        self.resolver.wake()

    def describe(self) -> str:
        return (f"device {self.backend.label()}, spans to {self.pipeline.description}, "
                f"max {self.settings.max_pending} pending, event timeout {self.settings.event_timeout_s:g} s")

    def flush(self, timeout_s: float, report: bool = True) -> bool:
        """Resolve everything captured so far and hand it to the exporters (sent, for otel-npu's own OTLP)."""
        deadline = time.monotonic() + timeout_s
        resolved = self.resolver.wait(timeout_s)
        exported = self.pipeline.flush(max(0.0, deadline - time.monotonic()))
        if report:
            self.stats.report(time.monotonic(), force=True)
        return resolved and exported

    def shutdown(self, timeout_s: float) -> bool:
        """Flush, then stop within ``timeout_s`` in all; every capture not delivered is counted (resolve/resolver.py)."""
        deadline = time.monotonic() + timeout_s
        # One loss report at the end, not two; a tenth of the bound is kept for stopping the resolver, so that
        # what it could not resolve is told apart from what it was held up on.
        ok = self.flush(timeout_s * 0.9, report=False)
        capturing.detach(self.parts)  # from here on, a capture that ends is counted (resolver_stopped), not queued
        self.resolver.stop(max(0.0, deadline - time.monotonic()))
        self.pipeline.shutdown(max(0.0, deadline - time.monotonic()))
        self.stats.report(time.monotonic(), force=True)
        self.backend.close()
        return ok


def settings() -> config.Settings:
    return _settings


def set_settings(new: config.Settings) -> None:
    global _settings
    _settings = new


def current() -> Runtime | None:
    """The running runtime of this process, if any (``None`` before the first capture)."""
    return _runtime


def start() -> Runtime | None:
    """Start the runtime for the current settings (once); ``None`` if it cannot run here (logged)."""
    global _runtime, _atexit_registered
    with _lock:
        if _runtime is not None:
            return _runtime
        try:
            rt = Runtime(_settings)
        except devices.DeviceUnavailable as exc:
            _log.warning("otel-npu is disabled: the %s device is not usable: %s", _settings.device, exc)
            return None
        except Exception:
            _log.exception("otel-npu is disabled: starting it failed")
            return None
        _runtime = rt
        if not _atexit_registered:
            atexit.register(_at_exit)
            _atexit_registered = True
        _arm_exit_paths()
        _log.info("otel-npu started: %s", rt.describe())
        for reason in rt.passed_over:
            _log.info("otel-npu: not using %s", reason)
        return rt


def stop(timeout_s: float) -> bool:
    """Flush and shut down the running runtime (if any) within ``timeout_s``; True if all was delivered."""
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    if rt is None:
        return True
    return rt.shutdown(timeout_s)


_exit_paths_pid = 0  # the process whose exit paths are armed (a forked child arms its own)


def _arm_exit_paths() -> None:
    """The exits that skip ``atexit``, made to flush within the shutdown bound too:

    * a ``multiprocessing`` child started with ``fork``/``forkserver`` ends with ``os._exit`` after running
      its ``multiprocessing.util`` finalizers: one of them shuts otel-npu down (registered only when
      ``multiprocessing`` is already imported; a child started by it always has it);
    * ``SIGTERM`` with the default disposition ends the process at once: when (and only when) the handler
      is still ``SIG_DFL``, and only from the main thread, a handler is installed that shuts otel-npu down
      within the bound, restores ``SIG_DFL`` and sends SIGTERM again, so that the process still ends as it
      would have (same signal, same exit status). An application's own handler is never replaced, and an
      application that installs one later replaces this one.
    """
    global _exit_paths_pid
    pid = os.getpid()
    if _exit_paths_pid == pid:
        return
    _exit_paths_pid = pid
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        try:
            mp_util.Finalize(None, _at_exit, exitpriority=0)
        except Exception:  # pragma: no cover - a multiprocessing without finalizers: atexit only
            _log.debug("otel-npu: no multiprocessing finalizer", exc_info=True)
    try:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, AttributeError):  # not the main interpreter, or no SIGTERM here
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM under the default disposition: deliver what can be delivered within the shutdown bound, then
    end the process by SIGTERM as the default would have."""
    bound = _settings.shutdown_timeout_s
    try:
        # On a thread of its own: this handler runs between two bytecodes of the main thread, which may hold
        # a lock the shutdown needs; then the bound runs out and the process ends anyway.
        worker = threading.Thread(target=_at_exit, name="otel-npu-sigterm", daemon=True)
        worker.start()
        worker.join(bound + 0.5)
        if worker.is_alive():
            _log.warning("otel-npu: SIGTERM: the final flush did not finish within %g s; what it had not "
                         "delivered is lost", bound)
    finally:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)


def _at_exit() -> None:
    try:
        stop(_settings.shutdown_timeout_s)
    except Exception:  # pragma: no cover - never let telemetry fail an exit
        _log.debug("otel-npu: shutdown at exit failed", exc_info=True)


def _after_fork_in_child() -> None:
    global _runtime, _lock
    _lock = threading.Lock()  # replaced, not released: another thread may have held it at fork time
    abandoned, _runtime = _runtime, None
    if abandoned is not None:
        _log.debug("otel-npu: forked child drops %d captures pending in the parent", len(abandoned.pending))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
