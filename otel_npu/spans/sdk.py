"""The OpenTelemetry SDK's trace package (``opentelemetry.sdk.trace``), imported so that no environment
variable can make the import fail. Every module of otel-npu that imports that package at module level
imports this module first (``export/__init__.py`` does it for all of ``export/``); ``import otel_npu`` imports
neither (the runtime imports ``export`` when it starts).

Why: ``import opentelemetry.sdk.trace`` parses ``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT`` (a module-level constant,
``SPAN_ATTRIBUTE_COUNT_LIMIT``, that the SDK keeps for backward compatibility and no longer reads) and raises
``ValueError`` for a value that is not a whole number from 0 (``-5``, ``abc``, ``1.5``; and ``unset``, which
otel-npu reads as no limit while the SDK 1.45 reads no limit from an empty value): before this module,
``import otel_npu`` itself raised so. The other limit variables
(``config.otel.SDK_LIMIT_VARS``) are parsed only when a ``SpanLimits`` is made, and otel-npu always passes its
own, validated ones (``export.pipeline.sdk_span_limits``).

When the import raises for one of these variables, the package is imported again with its module-level
constant reading the variable under a name no environment can hold (``=NAME``: a name cannot contain ``=``),
so that the constant takes the SDK's default; the SDK's name for the variable is then put back on both
modules, so that a ``SpanLimits`` the application makes reads the variable as the SDK always does. Nothing in
the process environment is changed. otel-npu's own limits fall back to the default as ``otel-npu doctor``
says (``config.otel.span_limits``), which also says the invalid value once (``rescued`` names the variable,
for a pipeline that would not read the limits otherwise). Any other failure of the import is raised.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from ..config.otel import SDK_LIMIT_VARS

PACKAGE = "opentelemetry.sdk.trace"
NAMES = "opentelemetry.sdk.environment_variables"

#: The limit variables whose value the SDK's import rejected, and that it was imported without (empty when
#: the import went through as it is).
rescued: list[str] = []


def _rejected(exc: ValueError) -> str | None:
    """The limit variable the SDK's ``ValueError`` names (``NAME must be a non-negative integer but got ...``)."""
    first = str(exc).split(" ", 1)[0]
    return first if first in SDK_LIMIT_VARS else None


def _import() -> ModuleType:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    names: ModuleType | None = None
    hidden: dict[str, str] = {}  # variable -> the SDK's name for it
    try:
        while True:
            try:
                module = importlib.import_module(PACKAGE)
                break
            except ValueError as exc:
                var = _rejected(exc)
                if var is None or var in hidden:
                    raise
                names = names or importlib.import_module(NAMES)
                hidden[var] = getattr(names, var, var)
                setattr(names, var, "=" + var)
    finally:
        for var, name in hidden.items():
            setattr(names, var, name)
    for var, name in hidden.items():
        if getattr(module, var, None) == "=" + var:
            setattr(module, var, name)
    if hidden:
        # The failed attempts left the package's submodules in sys.modules, but not as attributes of the
        # package imported again: put them back, so that ``opentelemetry.sdk.trace.sampling`` reads as always.
        for full, sub in list(sys.modules.items()):
            head, _, child = full.rpartition(".")
            if head == PACKAGE and sub is not None and not hasattr(module, child):
                setattr(module, child, sub)
    rescued.extend(hidden)
    return module


#: ``opentelemetry.sdk.trace``, and its ``export`` module (span processors and exporters).
trace = _import()
export = importlib.import_module(PACKAGE + ".export")
