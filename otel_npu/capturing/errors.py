"""What is kept of an exception leaving a capture: type name, message, and the innermost frames (error path
only; read later on the resolver thread, where the stack trace is formatted)."""

from __future__ import annotations

import traceback
from typing import Any

#: Frames of a captured exception's traceback kept for ``exception.stacktrace`` (the innermost ones).
STACK_FRAMES = 32


def describe_error(exc_type: type, exc: BaseException | None, tb: Any = None) -> tuple[str, str, Any]:
    """``(type name, message, (frames, frames omitted))`` of an exception leaving a capture (error path only).

    The frames are ``traceback.FrameSummary`` objects without their source lines (read later, on the
    resolver thread, when the stack trace is formatted): no frame, local or the exception is kept alive.
    Never raises: the program's exception is propagating, and whatever its ``__str__`` does must not replace
    it."""
    try:
        qualname = exc_type.__qualname__
        module = exc_type.__module__
        full = qualname if module in ("builtins", None) else f"{module}.{qualname}"
    except Exception:
        full = "?"
    try:
        message = "" if exc is None else str(exc)
        if message.__class__ is not str:
            message = "?"
    except Exception as str_exc:
        message = f"<str() of the exception raised {type(str_exc).__name__}>"
    stack = None
    if tb is not None:
        try:
            frames = list(traceback.walk_tb(tb))
            kept = frames[-STACK_FRAMES:]
            stack = (traceback.StackSummary.extract(iter(kept), lookup_lines=False), len(frames) - len(kept))
        except Exception:  # pragma: no cover - a traceback we cannot walk: no stack trace, nothing else lost
            stack = None
    return full, (message[:500] + "...") if len(message) > 500 else message, stack
