"""Per-module captures through ``torch.nn.Module`` forward hooks: device time per decoder layer, attention, MLP.

``instrument_module(model.model, depth=2)`` puts a capture around every child module down to ``depth``
levels: a forward pre-hook enters ``otel_npu.capture(<dotted name>)``, a forward hook leaves it. The
captures nest like any other (inside the enclosing ``capture("forward")`` and ``step``), cost what a capture
costs, and **never block**.

No cost when disabled: hooks are attached only while otel-npu is enabled. A module without hooks takes
PyTorch's fast call path (``Module._call_impl`` skips all hook handling when a module has none), so an
instrumented model runs exactly as an uninstrumented one. ``otel_npu.configure()`` and
``otel_npu.shutdown()`` attach and detach the hooks of every live handle (``sync()``); ``remove()`` takes
them off for good.

Exceptions: the closing hook is registered with ``always_call=True``, so PyTorch runs it also when the
module's forward (or a hook after it) raises an ``Exception``; the capture is then closed with that error
(status ERROR, ``error.type``) and the exception propagates unchanged. A capture can only be left open by a
``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``), for which PyTorch runs no hook: the
enclosing module's hook closes such leftovers when it runs.

``torch.compile``: while Dynamo traces a module (``torch.compiler.is_compiling()``), its hooks do nothing, so
``fullgraph=True`` compiles and no graph is split; the compiled graph then has no per-layer captures. A
capture around the compiled call still times it; per-layer timings need eager mode.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

from . import capturing as _capture_mod
from .capturing import hot as _hot
from .spans.attributes import ATTR_MODULE

__all__ = ["instrument_module", "ModuleHooks"]


_lock = threading.Lock()
_live: set["ModuleHooks"] = set()


class _HookAttributes(dict):
    """The attributes of one hooked module's captures. Its identity tells the closing hook which open
    capture is its own; its type tells any hook that a capture was opened by a module hook."""

    __slots__ = ()


class ModuleHooks:
    """What ``instrument_module`` returns: the hooks of one call. ``remove()`` takes them off for good."""

    def __init__(self, targets: list[tuple[str, Any]]) -> None:
        self.names = [name for name, _ in targets]
        self._targets = [(weakref.ref(module), name, _HookAttributes({ATTR_MODULE: type(module).__name__}))
                         for name, module in targets]
        self._handles: list[Any] = []
        self._removed = False

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the modules now (they are only while otel-npu is enabled)."""
        return bool(self._handles)

    def remove(self) -> None:
        """Take every hook of this handle off its module, now and for good (idempotent)."""
        with _lock:
            self._removed = True
            _live.discard(self)
            self._detach()

    def _alive(self) -> bool:
        return any(ref() is not None for ref, _, _ in self._targets)

    def _sync(self, on: bool) -> None:
        if on and not self._handles and not self._removed:
            self._attach()
        elif not on and self._handles:
            self._detach()

    def _attach(self) -> None:
        for ref, name, attrs in self._targets:
            module = ref()
            if module is None:
                continue
            pre, post = _hooks(name, attrs)
            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post, always_call=True))

    def _detach(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "attached" if self._handles else "detached (otel-npu disabled)"
        return f"<otel_npu.ModuleHooks {len(self._targets)} modules, {state}>"


def _hooks(name: str, attrs: _HookAttributes) -> tuple[Any, Any]:
    capture = _capture_mod.capture
    current = _capture_mod.current
    mod = _hot

    def pre_hook(module: Any, args: Any) -> None:
        if mod._compiler._is_compiling_flag:  # torch.compile traces this hook: do nothing (see capturing/compile_guard.py)
            return
        capture(name, attributes=attrs, detail=True).__enter__()

    def post_hook(module: Any, args: Any, output: Any) -> None:
        if mod._compiler._is_compiling_flag:
            return
        # output is None when PyTorch calls this from its exception handler (forward raised): close the
        # capture with the exception in flight.
        exc_info = sys.exc_info() if output is None else (None, None, None)
        _close(current(), attrs, exc_info)

    return pre_hook, post_hook


def _close(cur: Any, attrs: _HookAttributes, exc_info: tuple) -> None:
    """Exit this hook's open capture, first exiting hook captures left open inside it."""
    own = cur
    while own is not None and own.attributes is not attrs:
        if own.attributes.__class__ is not _HookAttributes:
            return  # a capture the user opened is innermost: not ours to close (or ours was never opened)
        own = own.parent
    if own is None:
        return  # the pre-hook ran while otel-npu was disabled, or before the hooks were attached
    while cur is not own:
        inner, cur = cur, cur.parent
        inner.__exit__(*exc_info)
    own.__exit__(*exc_info)


def _is_container(module: Any) -> bool:
    import torch

    return type(module).forward is torch.nn.Module.forward  # ModuleList, ModuleDict: never called


def instrument_module(module: Any, *, depth: int = 1, name_prefix: str | None = None) -> ModuleHooks:
    """Capture the forward of each child module of ``module``, down to ``depth`` levels; returns a handle
    whose ``remove()`` takes the hooks off.

    Span names are the children's dotted names below ``module`` (``layers.0``, ``layers.0.self_attn``),
    after ``name_prefix + "."`` when given; each span carries ``otel_npu.module`` (the class name).
    Containers without a forward of their own (``ModuleList``, ``ModuleDict``) are looked through and do not
    count as a level: for a Hugging Face ``LlamaModel``, depth 1 is ``embed_tokens``, ``layers.N``,
    ``norm``, ``rotary_emb``, and depth 2 adds each layer's ``self_attn``, ``mlp`` and norms. A module that
    appears twice is hooked once, under its first name.

    Hooks are attached only while otel-npu is enabled (none otherwise: no cost); they never block. Raises
    ``TypeError`` for something that is not an ``nn.Module`` and ``ValueError`` for ``depth < 1``.
    """
    if not callable(getattr(module, "named_children", None)) or not callable(
            getattr(module, "register_forward_pre_hook", None)):
        raise TypeError(f"instrument_module() needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"instrument_module(depth={depth!r}): depth must be an int >= 1")
    if name_prefix is not None and not isinstance(name_prefix, str):
        raise TypeError(f"instrument_module(name_prefix=...) takes a str or None, got {type(name_prefix).__name__}")

    targets: list[tuple[str, Any]] = []
    seen: set[int] = {id(module)}

    def walk(parent: Any, path: str, level: int) -> None:
        for child_name, child in parent.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            dotted = f"{path}.{child_name}" if path else child_name
            if _is_container(child):
                walk(child, dotted, level)
                continue
            targets.append((f"{name_prefix}.{dotted}" if name_prefix else dotted, child))
            if level < depth:
                walk(child, dotted, level + 1)

    walk(module, "", 1)
    _capture_mod.bind_compiler(sys.modules["torch"])  # the hooks read torch.compiler's flag directly
    handle = ModuleHooks(targets)
    with _lock:
        _live.add(handle)
        handle._sync(_capture_mod.is_on())
    return handle


def sync() -> None:
    """Attach or detach the hooks of every live handle to match whether otel-npu is enabled now.
    Called by ``otel_npu.configure()`` and ``otel_npu.shutdown()``."""
    if not _live:
        return
    on = _capture_mod.is_on()
    with _lock:
        for handle in list(_live):
            if handle._alive():
                handle._sync(on)
            else:  # its modules are gone: forget it
                _live.discard(handle)
