"""The build of otel-npu's compiled core. Everything else about the package is in ``pyproject.toml``.

For each module of ``otel_npu/_compiled.py``'s ``MODULES`` (the per-capture work of the background threads),
Cython compiles the module's own ``.py`` (with its ``.pxd`` beside it, if any) into a *twin*: an extension
named ``_<name>_c`` next to the source (``otel_npu/resolve/_resolver_c.<abi>.so``), whose module name inside
is the real one (``otel_npu.resolve.resolver``), so that nothing imports it by accident and the finder of
``_compiled.py`` loads it under that name. The build writes ``otel_npu/_compiled_manifest.json``: the sha256 of
each module's sources when its twin was built, which is how a twin older than its ``.py`` is recognised.

* ``pip install -e .`` builds the twins in place; ``python setup.py build_ext --inplace`` rebuilds them;
  a wheel carries them (and is then a platform wheel).
* ``OTEL_NPU_BUILD_PURE_PYTHON=1``: no extensions (a pure wheel; every module runs as Python).
* No Cython or no working C compiler: the same, with a message saying so; a module that fails to compile is
  left out (it runs as Python) with a message. The install itself never fails for the compiled core.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
PURE_ENV = "OTEL_NPU_BUILD_PURE_PYTHON"

# _compiled.py by its path: importing the package would need its dependencies, which a build does not have.
_spec = importlib.util.spec_from_file_location("_otel_npu_compiled", ROOT / "otel_npu" / "_compiled.py")
compiled = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compiled)

#: Cython's settings for every twin. ``annotation_typing=False``: the sources' type hints stay hints (Cython
#: would otherwise take ``x: float`` as a C double and reject what the pure module accepts); typing is the
#: ``.pxd`` files' job, declared where a profile showed that it pays.
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True, "embedsignature": False}


def say(message: str) -> None:
    print(f"otel-npu build: {message}", file=sys.stderr, flush=True)


def pure_reason() -> str | None:
    """Why the build makes no extensions (None: it makes them)."""
    if os.environ.get(PURE_ENV, "").strip().lower() in ("1", "true"):
        return f"{PURE_ENV}=1"
    try:
        import Cython  # noqa: F401
    except ImportError:
        return "Cython is not installed (pip's build isolation installs it from pyproject.toml's [build-system])"
    return None


def compiler_missing() -> str | None:
    """Compile and link a trivial extension: None when the C toolchain works, else what went wrong."""
    import sysconfig
    import tempfile

    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    try:
        compiler = new_compiler(force=True)
        customize_compiler(compiler)
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "probe.c")
            with open(source, "w") as f:
                f.write("#include <Python.h>\nint otel_npu_probe(void) { return Py_IsInitialized(); }\n")
            objects = compiler.compile([source], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]])
            compiler.link_shared_object(objects, os.path.join(tmp, "probe.so"))
    except Exception as exc:  # no compiler, no Python headers, a broken toolchain
        return f"no working C compiler or Python headers ({type(exc).__name__}: {exc})"
    return None


#: The commands that build the package (as setuptools' PEP 517 backend and pip call them): only these look
#: for a compiler.
BUILD_COMMANDS = ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist")


TWIN_SHORT_NAMES = {name.rpartition(".")[2] for name in compiled.MODULES}


class BuildTwins(build_ext):
    """Cythonizes each twin (a failure leaves that module pure Python), compiles it under its twin's file name,
    and writes the manifest."""

    def initialize_options(self) -> None:
        super().initialize_options()
        self.failed: dict[str, str] = {}

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:  # the twins compile independently: one per core (-j/--parallel overrides)
            self.parallel = True

    def get_ext_filename(self, fullname: str) -> str:
        """A twin's file: ``_<name>_c<suffix>``. (Asked with the full module name, or, by distutils'
        ``get_ext_fullpath``, with its last part only: the last parts of ``MODULES`` are distinct.)"""
        filename = super().get_ext_filename(fullname)
        name = fullname.rpartition(".")[2]
        if fullname in compiled.MODULES or name in TWIN_SHORT_NAMES:
            directory, base = os.path.split(filename)
            filename = os.path.join(directory, f"_{name}_c" + base[len(name):])
        return filename

    def run(self) -> None:
        if not self.extensions:
            return super().run()
        # What each twin is compiled from, read before compiling (an edit during the build reads as stale).
        sources = {name: compiled.source_hashes(name, str(ROOT)) for name in compiled.MODULES}
        self.extensions = [ext for ext in (self._cythonize(ext) for ext in self.extensions) if ext is not None]
        super().run()
        self._write_manifest(sources)

    def _cythonize(self, ext: Extension) -> Extension | None:
        from Cython.Build import cythonize

        try:
            (out,) = cythonize([ext], compiler_directives=DIRECTIVES, build_dir=os.path.join(self.build_temp, "cython"),
                               quiet=True)
        except BaseException as exc:  # Cython reports a compile error as SystemExit/CompileError
            self.failed[ext.name] = f"Cython failed: {type(exc).__name__}: {exc}"
            say(f"{ext.name} is not compiled (it runs as pure Python): {self.failed[ext.name]}")
            return None
        ext.sources = out.sources  # the generated C; the setuptools Extension itself is kept
        return ext

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # a C compile error leaves this module pure Python instead of failing the install
            self.failed[ext.name] = f"compiling failed: {type(exc).__name__}: {exc}"
            say(f"{ext.name} is not compiled (it runs as pure Python): {self.failed[ext.name]}")

    def copy_extensions_to_source(self) -> None:
        """In place (``--inplace``, editable installs): the twins that were built (a failed one is absent)."""
        built = [ext for ext in self.extensions if ext.name not in self.failed]
        self.extensions, everything = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = everything

    def _write_manifest(self, sources: dict[str, dict[str, str]]) -> None:
        """``otel_npu/_compiled_manifest.json`` in the build (hence the wheel) and, when building in place, in the
        source tree: which twins were built, from which sources (sha256), and why any were not."""
        import Cython

        modules = {}
        for name in compiled.MODULES:
            built = os.path.join(self.build_lib, self.get_ext_filename(name))
            if name not in self.failed and os.path.exists(built):
                modules[name] = {"twin": os.path.basename(built), "sources": sources[name]}
            elif name not in self.failed:
                self.failed[name] = "not built"
        manifest = {"format": compiled.MANIFEST_FORMAT, "cython": Cython.__version__,
                    "python": sys.implementation.cache_tag, "modules": modules, "failed": self.failed}
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        targets = [os.path.join(self.build_lib, "otel_npu")]
        if self.inplace:
            targets.append(self.get_finalized_command("build_py").get_package_dir("otel_npu"))
        for directory in targets:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, compiled.MANIFEST_NAME), "w", encoding="utf-8") as f:
                f.write(text)
        say(f"compiled core: {len(modules)} of {len(compiled.MODULES)} modules compiled"
            + (f"; pure Python: {', '.join(sorted(self.failed))}" if self.failed else ""))


def extensions() -> list[Extension]:
    """One twin per module of ``MODULES``, from the module's own ``.py`` (cythonized when built); none (a pure
    wheel) when the build is asked for none or cannot make them."""
    building = any(arg in BUILD_COMMANDS for arg in sys.argv[1:])
    reason = pure_reason()
    if reason is None and building:
        reason = compiler_missing()
    if reason is not None:
        if building:
            say(f"building without the compiled core ({reason}): otel-npu installs as pure Python, whose "
                "background threads cost more CPU per capture")
        return []
    return [Extension(name, [os.path.relpath(compiled.source_path(name, str(ROOT)), ROOT)])
            for name in compiled.MODULES]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildTwins})
