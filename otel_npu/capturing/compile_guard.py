"""torch.compile detection: whether Dynamo is tracing the code that calls ``capture()``/``step()`` now.

Under ``fullgraph=True`` a ``ContextVar.set`` makes Dynamo fail, and with graph breaks allowed each capture
would split the graph: so while torch.compile traces, ``capture()``/``step()`` return ``COMPILING`` (a
``contextlib.nullcontext`` made before the trace, which Dynamo handles; an object of otel-npu's own class would
make ``fullgraph=True`` fail) and module hooks do nothing.

The check is one attribute read, ``flag._is_compiling_flag``, on the object ``flag_of(torch)`` returns:
``torch.compiler`` itself where torch holds that flag True for a whole compile session (torch >= 2.10), else a
wrapper calling ``torch.compiler.is_compiling()``. Until torch is imported, ``Pending`` stands in (False).
Never imports torch.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable

#: What capture()/step() return while torch.compile traces.
COMPILING = contextlib.nullcontext()


class _IsCompilingCall:
    """Older torch: ``torch.compiler.is_compiling()`` (Dynamo folds the call to True while tracing)."""

    def __init__(self, is_compiling: Callable[[], bool]) -> None:
        self._call = is_compiling

    @property
    def _is_compiling_flag(self) -> bool:
        return self._call()


class _Never:
    _is_compiling_flag = False


def flag_of(torch: Any) -> Any:
    """The object whose ``_is_compiling_flag`` is True while torch.compile traces (see the module docstring)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "_compile_session_context") and isinstance(
            getattr(compiler, "_is_compiling_flag", None), bool):
        return compiler
    if compiler is not None and callable(getattr(compiler, "is_compiling", None)):
        return _IsCompilingCall(compiler.is_compiling)
    return _Never()


class Pending:
    """Stands in for ``flag_of(torch)`` until torch is imported (False before); once it is, hands the real
    flag to ``bind`` so that the holder reads that from then on."""

    def __init__(self, bind: Callable[[Any], None]) -> None:
        self._bind = bind

    @property
    def _is_compiling_flag(self) -> bool:
        torch = sys.modules.get("torch")
        if torch is None:
            return False
        flag = flag_of(torch)
        self._bind(flag)
        return flag._is_compiling_flag
