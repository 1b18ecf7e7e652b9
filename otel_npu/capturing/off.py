"""What ``capture()``/``step()`` return while otel-npu is disabled, and the do-nothing object of a detail
capture over its step's budget.

The common call (a name only) returns one shared object per name (``OFF_CACHE``, read inline by the hot
path): no allocation. Each remembers its arguments, so that an object made while disabled (a module-level
``FORWARD = capture("forward")`` made at import) times its uses once otel-npu is enabled, as a decorator too.
``bind`` (called by the hot path at import) says what to make then; ``_enabled`` mirrors the hot path's
dispatch (set with it by ``capturing._set_dispatch``), so that a use reads one global of this module.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .compile_guard import COMPILING
from .decorate import decorate

F = TypeVar("F", bound=Callable[..., Any])

#: The hot path's ``capture``/``step`` and current-capture read (set by ``bind``).
_capture: Callable[..., Any] = lambda *args, **kwargs: None
_step: Callable[..., Any] = lambda *args, **kwargs: None
_get_current: Callable[[], Any] = lambda: None
#: Whether ``capture()``/``step()`` time captures now (enabled, started or about to start): set only with
#: the hot path's dispatch, by ``capturing._set_dispatch``.
_enabled = False
#: Set once an object made while disabled has been entered while enabled: from then on its exits look for
#: their use among the current captures (before, an exit of such an object is one global read).
_live_offs = False


def bind(capture: Callable[..., Any], step: Callable[..., Any], get_current: Callable[[], Any]) -> None:
    global _capture, _step, _get_current
    _capture, _step, _get_current = capture, step, get_current


class Off:
    """What ``capture()``/``step()`` return while otel-npu is disabled. It remembers its arguments, so that
    an object made while disabled (a module-level ``FORWARD = capture("forward")`` made at import) times its
    uses once otel-npu is enabled: each use enters a fresh capture made then (``origin`` is this object),
    found again at exit as a capture of the exiting thread/task, as a re-entered capture's uses are. While
    otel-npu stays disabled each use costs one module-global read at entry and one at exit."""

    __slots__ = ("name", "attributes", "extra")
    is_step = False

    def __init__(self, name: str, attributes: Any, extra: Any) -> None:
        self.name = name
        self.attributes = attributes
        self.extra = extra

    def __enter__(self) -> Any:
        if not _enabled:  # still disabled
            return self
        return _enter_live(self)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if _live_offs:  # some object made while disabled was used while enabled: is this one of its uses?
            return _exit_live(self, exc_type, exc, tb)
        return False

    detail = False

    def __call__(self, fn: F) -> F:
        name, attributes, extra, detail = self.name, self.attributes, self.extra, self.detail
        if self.is_step:
            def make() -> Any:
                return _step(name, links=extra, attributes=attributes)
        else:
            def make() -> Any:
                return _capture(name, attributes=attributes, stream=extra, detail=detail)
        return decorate(fn, make, "step" if self.is_step else "capture", name)


class OffStep(Off):
    __slots__ = ()
    is_step = True


class OffDetail(Off):
    """A disabled ``capture(..., detail=True)``: remembers ``detail`` for a decorator made with it."""

    __slots__ = ()
    detail = True


class Skipped(Off):
    """A detail capture over its step's budget (enabled): does nothing, whatever the state."""

    __slots__ = ()
    detail = True

    def __enter__(self) -> "Skipped":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return False


def _enter_live(off: Off) -> Any:
    """A use, while enabled, of ``off`` (made while disabled): timed by a fresh capture or step made now."""
    global _live_offs
    if off.is_step:
        cm = _step(off.name, links=off.extra or (), attributes=off.attributes)
    else:
        cm = _capture(off.name, attributes=off.attributes, stream=off.extra, detail=off.detail)
    if isinstance(cm, Off) or cm is COMPILING:  # not timed now: over the detail budget, not startable here,
        return off  # or torch.compile tracing
    _live_offs = True
    cm.origin = off
    return cm.__enter__()


def _exit_live(off: Off, exc_type: Any, exc: Any, tb: Any) -> bool:
    """The exit of a use of ``off``: the innermost capture of this thread/task made for ``off``, if any (none:
    the use began while otel-npu was disabled)."""
    node = _get_current()
    while node is not None and getattr(node, "origin", None) is not off:
        node = node.parent
    if node is None:
        return False
    return node.__exit__(exc_type, exc, tb)  # not the current capture: its exit handles the misnesting


OFF_CACHE: dict[str, Off] = {}
OFF_CACHE_LIMIT = 4096  # distinct names remembered; beyond, each call allocates (still correct)
_SKIP_CACHE: dict[str, Skipped] = {}


def off_capture(name: str, attributes: Any, stream: Any) -> Off:
    """Disabled ``capture()``: the common call (a name only) returns a shared object, allocating nothing."""
    if attributes is None and stream is None:
        cm = OFF_CACHE.get(name)
        if cm is None:
            cm = Off(name, None, None)
            if len(OFF_CACHE) < OFF_CACHE_LIMIT:
                OFF_CACHE[name] = cm
        return cm
    return Off(name, attributes, stream)


def skipped(name: str, stream: Any) -> Skipped:
    """A detail capture over budget: a shared object per name (no allocation), a no-op even while enabled."""
    if stream is None:
        cm = _SKIP_CACHE.get(name)
        if cm is None:
            cm = Skipped(name, None, None)
            if len(_SKIP_CACHE) < OFF_CACHE_LIMIT:
                _SKIP_CACHE[name] = cm
        return cm
    return Skipped(name, None, stream)
