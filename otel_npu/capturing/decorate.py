"""``capture``/``step`` objects used as decorators: each call of the function runs inside a fresh capture."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def decorate(fn: F, make: Callable[[], Any], what: str, name: str) -> F:
    """Wrap ``fn`` so that each call runs inside ``make()`` (a fresh capture or step made with the settings
    current at the call). ``what``/``name``: how the decorator was made (``"capture"``, ``"forward"``), for
    the error raised for a generator function."""
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        kind = "an async generator" if inspect.isasyncgenfunction(fn) else "a generator"
        raise TypeError(
            f"otel_npu.{what}({name!r}) cannot decorate {getattr(fn, '__qualname__', fn)!r}: it is {kind} "
            f"function, and a decorator would time only the creation of the generator, not its consumption. "
            f"Put `with otel_npu.{what}({name!r}):` around the loop that consumes it, or around the work "
            f"between two yields")
    if inspect.iscoroutinefunction(fn):
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            with make():
                return await fn(*args, **kwargs)

        return functools.wraps(fn)(async_wrapper)  # type: ignore[return-value]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with make():
            return fn(*args, **kwargs)

    return functools.wraps(fn)(wrapper)  # type: ignore[return-value]
