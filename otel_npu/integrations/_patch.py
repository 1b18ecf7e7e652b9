"""The hook table of an engine integration: which functions of the engine otel-npu wraps, for which of its
versions, checked before anything is patched.

An engine module (``vllm.py``) lists its ``Hook``s; ``Patcher.install(hooks, version)`` applies those whose
version gate admits the running engine, each only after checking that its target exists (and, for a module
global, that the function that must read it does; for a method, that it takes the parameters the
replacement relies on). A target that is missing or changed is named in one warning, saying what is lost
without it, and left out: never an error in the engine. ``uninstall()`` puts every original back (tests; a
serving process keeps its hooks).

Engine-agnostic: nothing here knows an engine. Imports nothing of otel-npu.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import re
import threading
import types
from typing import Any, Callable

#: Stands for "nothing was set on the object itself" in what ``uninstall()`` puts back.
_ABSENT = object()


@dataclasses.dataclass(frozen=True)
class Hook:
    """One place an integration patches in its engine."""

    module: str
    attr: str  # ``Class.method`` or a module global
    gives: str  # what is lost without it
    make: Callable[[Any], Any]  # the original -> its replacement
    role: str = ""  # what it is for ("step", "stages", "links", "graph mode", ...): checked by tests
    since: tuple[int, ...] = ()  # the engine versions it applies to: since <= version < before (() = open)
    before: tuple[int, ...] = ()
    reader: str = ""  # a module global: the function or ``Class.method`` of the module that must read it
    params: tuple[str, ...] = ()  # the leading parameters the replacement relies on, by position
    read: tuple[str, ...] = ()  # engine versions whose sources were read for it
    run: tuple[str, ...] = ()  # engine versions it ran with


def admits(hook: Hook, version: tuple[int, ...]) -> bool:
    """Whether ``hook`` applies to engine ``version`` (``()``: unknown, every hook is tried)."""
    if not version:
        return True
    return (not hook.since or version >= hook.since) and (not hook.before or version < hook.before)


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.32.0+cpu"`` -> ``(0, 32)``; ``()`` when it does not start with major.minor."""
    found = re.match(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else ()


def _lookup(module: Any, module_name: str, attr: str) -> tuple[Any, str, Any]:
    """(owner, attribute name, current value) of ``attr`` (``Class.method`` or a global) in ``module``."""
    owner = module
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            raise LookupError(f"{module_name}.{part} does not exist")
    if not hasattr(owner, name):
        raise LookupError(f"{module_name}.{attr} does not exist")
    return owner, name, vars(owner)[name] if name in vars(owner) else getattr(owner, name)


def target(hook: Hook) -> tuple[Any, str, Any]:
    """(owner, attribute name, current value) of ``hook``'s target, checked; raises LookupError naming what is
    missing or changed. Imports the hook's module."""
    try:
        module: Any = importlib.import_module(hook.module)
    except ImportError as exc:
        raise LookupError(f"module {hook.module} cannot be imported ({exc})") from None
    owner, name, current = _lookup(module, hook.module, hook.attr)
    if hook.reader:  # a global: it must be what the reader reads
        _, _, reader = _lookup(module, hook.module, hook.reader)
        code = getattr(inspect.unwrap(reader), "__code__", None)
        if code is None or name not in code.co_names:
            raise LookupError(f"{hook.module}.{hook.reader} does not read {name}")
    elif not (callable(current) or isinstance(current, classmethod)):
        raise LookupError(f"{hook.module}.{hook.attr} is not callable")
    if hook.params:
        try:
            names = list(inspect.signature(inspect.unwrap(current)).parameters)
        except (TypeError, ValueError):
            names = []
        if names[: len(hook.params)] != list(hook.params):
            raise LookupError(f"{hook.module}.{hook.attr}{tuple(names)} does not start with {hook.params}")
    return owner, name, current


class Patcher:
    """The hooks one integration installed into its engine, and its one-warning-per-problem log.

    ``engine`` names the engine in the warnings ("cannot hook M.A in this vLLM ..."); ``log`` is where they go
    (the engine's own log, with its process prefixes, where it has one)."""

    def __init__(self, engine: str, log: logging.Logger) -> None:
        self.engine = engine
        self.log = log
        self._installed: list[tuple[Any, str, Any]] = []
        #: ``"module.attr"`` of each hook applied.
        self.active: set[str] = set()
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        """Log ``message % args`` as a warning, the first time ``key`` is given only."""
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning(message, *args)

    def install(self, hooks: tuple[Hook, ...], version: tuple[int, ...] = ()) -> list[str]:
        """Apply those of ``hooks`` that ``version`` admits (each target once); returns the targets patched. A
        missing or changed target is warned about once and left out, never raised."""
        done = []
        with self._lock:
            for hook in hooks:
                if not admits(hook, version):
                    continue
                try:
                    owner, name, current = target(hook)
                    if any(o is owner and n == name for o, n, _ in self._installed):
                        continue
                    replacement = hook.make(current)
                    if callable(current) and isinstance(replacement, types.FunctionType):
                        # what a reader check (of another hook's global) looks through
                        replacement.__wrapped__ = current  # type: ignore[attr-defined]
                    setattr(owner, name, replacement)
                except Exception as exc:
                    self.warn_once(f"hook:{hook.module}:{hook.attr}", "otel-npu: cannot hook %s.%s in this %s (%s); "
                                   "left out: %s", hook.module, hook.attr, self.engine, exc, hook.gives)
                    continue
                self._installed.append((owner, name, current))
                self.active.add(f"{hook.module}.{hook.attr}")
                done.append(f"{hook.module}.{hook.attr}")
        return done

    def wrap_object(self, obj: Any, name: str, make: Callable[[Any], Any], gives: str) -> bool:
        """Wrap ``obj.name`` on one live object with ``make(original)``, once per object: for a method whose
        class the engine picks at run time (a worker, a speculator), which no table entry can name. Recorded for
        ``uninstall()`` like a table hook. An object without a callable ``name``, or one that refuses the
        attribute, is warned about once per class and left out: never raised. Returns whether ``obj.name`` is
        wrapped now. Once wrapped, a call costs two attribute reads; the first takes the lock."""
        if hasattr(getattr(obj, name, None), "__otel_npu_wraps__"):
            return True
        with self._lock:
            if any(owner is obj and n == name for owner, n, _ in self._installed):
                return True
            original = getattr(obj, name, None)
            kind = type(obj).__name__
            try:
                if not callable(original):
                    raise LookupError(f"{kind}.{name} does not exist or is not callable")
                replacement = make(original)
                replacement.__otel_npu_wraps__ = original  # the mark the next call's check reads
                # what was set on the object itself, if anything, is put back; else the class's method shows again
                own = vars(obj).get(name, _ABSENT) if hasattr(obj, "__dict__") else _ABSENT
                setattr(obj, name, replacement)
            except Exception as exc:
                self.warn_once(f"object:{kind}:{name}", "otel-npu: cannot hook %s.%s in this %s (%s); left out: %s",
                               kind, name, self.engine, exc, gives)
                return False
            self._installed.append((obj, name, own))
            return True

    def uninstall(self) -> None:
        """Put every original back, last patched first."""
        with self._lock:
            while self._installed:
                owner, name, original = self._installed.pop()
                if original is _ABSENT:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            self.active.clear()
