"""The compiled data path: Cython twins of the background modules, loaded in their place when they are current.

The modules of ``MODULES`` run on otel-npu's background threads once per capture (taking records in,
resolution, clock placement, ids, span rendering, OTLP encoding, batching, the stage histogram). The package's
build (``setup.py``) compiles each one's **unchanged** ``.py`` source with Cython into a *twin*, an extension
module named ``_<name>_c`` next to it (``resolve/resolver.py`` -> ``resolve/_resolver_c.<abi>.so``), built
under the module's own name, so that its classes, functions and tracebacks read exactly as the pure module's.
Typed declarations, where a profile showed they pay, are in a ``<name>.pxd`` beside the ``.py`` (Cython's
pure-Python mode: the ``.py`` stays the one source, and runs as it is without the build).

``install()`` (called first thing by ``otel_npu/__init__.py``, before any of these modules is imported)
puts a finder at the front of ``sys.meta_path`` that loads each module's twin instead of its ``.py`` when the
build's manifest (``_compiled_manifest.json``, written by ``setup.py``: the sha256 of each module's ``.py``
and ``.pxd`` when its twin was built) matches the sources on disk. Otherwise the pure-Python module loads:

* no manifest (a checkout that was never built, or a build without extensions): quietly, ``stats()["core"]``
  says why;
* a twin that is stale (its ``.py``/``.pxd`` changed since the build) or missing: with one warning naming
  the modules and how to rebuild (``pip install -e .`` or ``python setup.py build_ext --inplace``);
* ``OTEL_NPU_PURE_PYTHON=1``: every module, quietly.

Only the standard library at module level: ``setup.py`` loads this file by its path (without the package,
whose dependencies a build environment lacks) for ``MODULES`` and the manifest's format.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import logging
import os
import sys
from typing import Any

#: The modules compiled into twins: the per-capture work off the hot path. ``capturing/`` (the hot path)
#: stays pure Python.
MODULES: tuple[str, ...] = (
    "otel_npu.accounting",
    "otel_npu.resolve.resolver",
    "otel_npu.resolve.clock",
    "otel_npu.spans.identity",
    "otel_npu.spans.attributes",
    "otel_npu.spans.render",
    "otel_npu.spans.sampling",
    "otel_npu.export.pipeline",
    "otel_npu.export.sinks.otlp",
    "otel_npu.export.encoding.otlp_proto",
    "otel_npu.export.metrics.aggregate",
)

#: The build's record of what it compiled, next to this file.
MANIFEST_NAME = "_compiled_manifest.json"
#: Bumped when the manifest's layout changes (an older one then reads as stale).
MANIFEST_FORMAT = 1

REBUILD = "pip install -e . (or python setup.py build_ext --inplace)"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_log = logging.getLogger("otel_npu")


def twin_name(module: str) -> str:
    """The twin's module name: ``otel_npu.resolve.resolver`` -> ``otel_npu.resolve._resolver_c``."""
    package, _, name = module.rpartition(".")
    return f"{package}._{name}_c"


def source_path(module: str, root: str) -> str:
    """The ``.py`` of ``module`` under ``root`` (the directory holding the ``otel_npu`` package)."""
    return os.path.join(root, *module.split(".")) + ".py"


def source_hashes(module: str, root: str) -> dict[str, str]:
    """sha256 of the files a twin is compiled from: the ``.py`` and, when there is one, the ``.pxd``, by file
    name. What the build records and what loading compares."""
    base = source_path(module, root)[: -len(".py")]
    out = {}
    for suffix in (".py", ".pxd"):
        path = base + suffix
        if os.path.exists(path):
            with open(path, "rb") as f:
                out[os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _twin_path(module: str, filename: str, root: str) -> str | None:
    """The twin file the manifest names, if it is on disk and built for this interpreter."""
    directory = os.path.dirname(source_path(module, root))
    stem = twin_name(module).rpartition(".")[2]
    if not filename.startswith(stem) or filename[len(stem):] not in importlib.machinery.EXTENSION_SUFFIXES:
        return None
    path = os.path.join(directory, filename)
    return path if os.path.isfile(path) else None


class TwinFinder:
    """Finds the twin of a module of ``twins`` (module name -> extension file) and loads it under the module's
    own name (the twin's init function bears that name: see ``setup.py``)."""

    def __init__(self, twins: dict[str, str]) -> None:
        self.twins = twins

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        twin = self.twins.get(fullname)
        if twin is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, TwinLoader(fullname, twin), origin=twin)

    def invalidate_caches(self) -> None:
        pass


class TwinLoader:
    """Loads a twin. One that cannot be loaded (a damaged file, a library it needs missing) gives the pure
    module instead, with a warning: a broken build must not keep otel_npu (and the program) from importing."""

    def __init__(self, fullname: str, twin: str) -> None:
        self._twin = importlib.machinery.ExtensionFileLoader(fullname, twin)
        self._pure: Any = None

    def create_module(self, spec: Any) -> Any:
        try:
            return self._twin.create_module(spec)
        except Exception as exc:
            source = source_path(spec.name, os.path.dirname(_PACKAGE_DIR))
            self._pure = importlib.machinery.SourceFileLoader(spec.name, source)
            spec.origin = source
            _state["compiled"] = [m for m in _state["compiled"] if m != spec.name]
            _state["pure"] = sorted({*_state["pure"], spec.name})
            _state["why"] = "; ".join(filter(None, [_state["why"], f"{spec.name}: its twin did not load"]))
            _log.warning("otel-npu: the compiled twin of %s did not load (%s: %s); it runs as pure Python. "
                         "Rebuild it: %s", spec.name, type(exc).__name__, exc, REBUILD)
            return None  # the default module, which exec_module fills from the .py

    def exec_module(self, module: Any) -> None:
        if self._pure is None:
            self._twin.exec_module(module)
        else:
            module.__file__ = self._pure.path
            self._pure.exec_module(module)


#: What ``install()`` decided: ``stats()["core"]``.
_state: dict[str, Any] = {"compiled": [], "pure": list(MODULES), "why": "not decided yet"}


def decide(manifest: dict | None, pure: bool, root: str) -> tuple[dict[str, str], dict[str, str], str]:
    """``(twins to load, {module: why it is stale}, why all are pure)`` for the build's record ``manifest``
    (None: there is none) and the sources under ``root``."""
    if pure:
        return {}, {}, "OTEL_NPU_PURE_PYTHON=1"
    if manifest is None:
        return {}, {}, "not built (no compiled core in this installation)"
    if manifest.get("format") != MANIFEST_FORMAT:
        why = "the build's manifest cannot be read" if "error" in manifest else "built by another version of setup.py"
        return {}, {module: why for module in MODULES}, ""
    built, failed = manifest.get("modules", {}), manifest.get("failed", {})
    twins, stale = {}, {}
    for module in MODULES:
        entry = built.get(module)
        if entry is None:
            stale[module] = f"not compiled by the build: {failed.get(module, 'not in it')}"
            continue
        path = _twin_path(module, entry.get("twin", ""), root)
        if path is None:
            stale[module] = "its compiled twin is missing (or built for another Python)"
        elif entry.get("sources") != source_hashes(module, root):
            stale[module] = "its source changed since the build"
        else:
            twins[module] = path
    return twins, stale, ""


def read_manifest(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"format": None, "error": str(exc)}
    return manifest if isinstance(manifest, dict) else {"format": None}


def install() -> None:
    """Decide, once per process, which modules load compiled, and put the finder in front (idempotent)."""
    if any(isinstance(finder, TwinFinder) for finder in sys.meta_path):
        return
    from .config import pure_python_from_env  # config/ reads the environment (it imports none of MODULES)

    pure = pure_python_from_env()
    manifest = None if pure else read_manifest(os.path.join(_PACKAGE_DIR, MANIFEST_NAME))
    twins, stale, why = decide(manifest, pure, os.path.dirname(_PACKAGE_DIR))
    already = [module for module in twins if module in sys.modules]
    for module in already:  # imported before the finder (cannot happen from the package): stays as it is
        del twins[module]
        stale[module] = "imported before otel_npu (pure Python)"
    _state.update(compiled=sorted(twins), pure=sorted(set(MODULES) - set(twins)),
                  why=why or ("stale: " + "; ".join(f"{m}: {w}" for m, w in sorted(stale.items())) if stale else ""))
    if stale:
        _log.warning("otel-npu: the compiled core is out of date for %s; these run as pure Python (slower on "
                     "the background threads). Rebuild it: %s", ", ".join(
                         f"{module} ({why})" for module, why in sorted(stale.items())), REBUILD)
    sys.meta_path.insert(0, TwinFinder(twins))


def describe() -> dict[str, Any]:
    """``stats()["core"]``: which modules run compiled, which as pure Python, and why."""
    return {"compiled": list(_state["compiled"]), "pure": list(_state["pure"]), "why_pure": _state["why"]}
