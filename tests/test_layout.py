"""The package's layout holds: imports flow down the layers of docs/architecture.md, no cycle, devices know
nothing of OpenTelemetry, spans nothing of devices, integrations only the public face and the integration
core, and only ``config/`` reads the environment.

Read from the sources with ``ast`` (every import, at module level or inside a function: a lazy import is still
an arrow), never by importing them.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Iterator

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "otel_npu"

#: The layers, lowest first: a module may import its own layer (no cycle) and the layers below, never above.
LAYERS: list[tuple[str, ...]] = [
    ("record", "accounting", "_version", "_compiled", "config", "devices", "durations", "threads", "testing"),
    ("capturing", "resolve", "spans"),
    ("export",),
    ("runtime",),
    ("api", "compat", "instrument", "__init__"),
]
#: At the side: the command line (``cli``, and ``python -m otel_npu``) may import anything; ``integrations``
#: are checked on their own (below). Nothing in the layers imports them.
SIDE = ("cli", "__main__", "integrations")
#: Imports forbidden within or below the layer order (what the order alone would allow).
FORBIDDEN = {
    "capturing": ("resolve", "spans", "export", "runtime"),
    "resolve": ("spans", "export", "capturing"),
    "spans": ("devices", "capturing", "resolve"),
    "export": ("capturing", "resolve", "devices"),
    "devices": ("opentelemetry",),
    "record": ("opentelemetry",),
    "accounting": ("opentelemetry",),
    "config": ("opentelemetry",),
    "_compiled": ("opentelemetry",),
}
#: What integrations may import of otel-npu: the public face (the package itself), and for engine modules the
#: integration core; the core may also read ``config`` and the modules that define names it writes.
INTEGRATION_CORE = ("otel_npu.integrations._patch", "otel_npu.integrations._engine_step")
INTEGRATION_CORE_READS = ("otel_npu.spans.attributes", "otel_npu.spans.sampling")
#: Modules outside ``config/`` that name the process environment, and why. Reading a variable is
#: ``config``'s job; these only pass the mapping on.
ENVIRONMENT_EXCEPTIONS: dict[str, str] = {}
#: What names the process environment: these attributes of any object (``os.environ``, ``_os.getenv``), and
#: these names imported from the modules that hold them (``from os import getenv``).
ENVIRONMENT_NAMES = frozenset({"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"})
ENVIRONMENT_MODULES = frozenset({"os", "posix", "nt"})


def modules() -> Iterator[tuple[str, pathlib.Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


ALL = dict(modules())


def resolve(module: str, path: pathlib.Path, level: int, name: str | None) -> str:
    """The absolute name of a relative import's target."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(module: str, path: pathlib.Path) -> Iterator[str]:
    """Every module ``module`` imports (an imported name that is a submodule counts as that submodule)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, path, node.level, node.module) if node.level else node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in ALL else target


GRAPH = {module: sorted({t for t in imports(module, path) if t != module}) for module, path in ALL.items()}


def top(module: str) -> str:
    """The part of the package a module belongs to (``otel_npu.export.sinks.otlp`` -> ``export``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int | None:
    part = top(module)
    for n, names in enumerate(LAYERS):
        if part in names:
            return n
    return None


def internal(target: str) -> bool:
    return target == "otel_npu" or target.startswith("otel_npu.")


def test_every_module_is_in_a_layer():
    loose = [m for m in ALL if layer(m) is None and top(m) not in SIDE]
    assert not loose, f"modules in no layer of LAYERS (add them where they belong): {loose}"


def test_imports_flow_down_only():
    up = []
    for module, targets in GRAPH.items():
        here = layer(module)
        if here is None:
            continue
        for target in filter(internal, targets):
            there = layer(target)
            if top(target) in SIDE or (there is not None and there > here):
                up.append(f"{module} -> {target}")
    assert not up, "imports that run back up the layers:\n" + "\n".join(up)


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_forbidden_imports(part):
    found = []
    for module, targets in GRAPH.items():
        if top(module) != part:
            continue
        for target in targets:
            name = target.split(".")[0] if not internal(target) else top(target)
            if name in FORBIDDEN[part] and (internal(target) or not name.startswith("otel_npu")):
                found.append(f"{module} -> {target}")
    assert not found, f"{part} must not import {FORBIDDEN[part]}:\n" + "\n".join(found)


def test_the_package_root_only_reexports_and_nothing_imports_it_back():
    root = [t for t in GRAPH["otel_npu"] if internal(t)]
    assert sorted(root) == ["otel_npu._compiled", "otel_npu._version", "otel_npu.api"]
    inside = [m for m, targets in GRAPH.items() if "otel_npu" in targets and top(m) not in SIDE]
    assert not inside, f"modules importing the package root (import what you need from its module): {inside}"


def test_the_hot_path_and_the_runtime_are_imported_from_above_only():
    runtime_importers = sorted(m for m, targets in GRAPH.items() if "otel_npu.runtime" in targets)
    assert set(runtime_importers) <= {"otel_npu.api", "otel_npu.compat", "otel_npu.cli.doctor"}, \
        runtime_importers


def test_integrations_use_the_public_face_and_the_integration_core_only():
    wrong = []
    for module, targets in GRAPH.items():
        if top(module) != "integrations" or module == "otel_npu.integrations":
            continue
        allowed = {"otel_npu", *INTEGRATION_CORE}
        if module in INTEGRATION_CORE:
            allowed |= {m for m in ALL if top(m) == "config"} | set(INTEGRATION_CORE_READS)
        wrong += [f"{module} -> {t}" for t in targets if internal(t) and t not in allowed]
    assert not wrong, "\n".join(wrong)


def test_no_cycles():
    internal_graph = {m: [t for t in targets if t in ALL] for m, targets in GRAPH.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in internal_graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in internal_graph:
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def environment_uses(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line, code) of each place ``path`` names the process environment, read with ``ast`` (a use inside a
    literal, a call's arguments or under another name is still one; a docstring that mentions it is not)."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT_NAMES:
            yield node.lineno, ast.get_source_segment(source, node) or node.attr
        elif isinstance(node, ast.ImportFrom) and node.module in ENVIRONMENT_MODULES and not node.level:
            for alias in node.names:
                if alias.name in ENVIRONMENT_NAMES:
                    yield node.lineno, f"from {node.module} import {alias.name}"


def test_only_config_reads_the_environment():
    readers = []
    for module, path in ALL.items():
        if top(module) == "config" or module in ENVIRONMENT_EXCEPTIONS:
            continue
        readers += [f"{path.relative_to(PACKAGE.parent)}:{line}: {code}" for line, code in environment_uses(path)]
    assert not readers, "the environment read outside config/ (read it through config):\n" + "\n".join(readers)


def test_the_environment_check_sees_every_way_of_naming_it(tmp_path):
    """The check above finds the environment named in a dict literal, under another name of ``os`` and
    imported by name, and not in a docstring or a comment."""
    sample = tmp_path / "sample.py"
    sample.write_text('''"""Reads os.environ? Only in this docstring."""
import os as _os
from os import getenv as _get

SETTINGS = {
    "level": _os.environ.get("LEVEL"),  # os.getenv in a comment is not a use
}
VALUE = _get("VALUE")
''')
    assert sorted(environment_uses(sample)) == [(3, "from os import getenv"), (6, "_os.environ")]


#: Where each name otel-npu puts on the wire is defined (module, and the assignments there that hold names):
#: the span attributes, the metric names, the trace-state entry of a parent exported whatever was sampled,
#: the vLLM plugin's attributes.
NAME_HOMES = {
    "spans/attributes.py": lambda target: target.startswith("ATTR_"),
    "export/metrics/build.py": lambda target: target in ("STAGE_DURATION", "COUNTERS"),
    "spans/sampling.py": lambda target: target == "PARENT_EXPORTED",
    "integrations/vllm.py": lambda target: target.startswith("ATTR_"),
}


def string_constants(node: ast.AST) -> Iterator[str]:
    """The strings in an assigned value: a constant, the items of a tuple, the keys of a dict."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, (ast.Tuple, ast.List)):
        for item in node.elts:
            yield from string_constants(item)
    elif isinstance(node, ast.Dict):
        for key in node.keys:
            if key is not None:
                yield from string_constants(key)


def code_strings(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line, value) of every string constant in ``path``'s code, docstrings left out."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_each_name_otel_npu_writes_is_spelled_out_once():
    """A span attribute, metric or trace-state name is written in its home module and imported from there
    everywhere else: a second copy can drift from the first, and the spans then disagree with the metrics,
    the dashboards or ``otel-npu summary``."""
    names: dict[str, str] = {}
    for home, holds_names in NAME_HOMES.items():
        for node in ast.parse((PACKAGE / home).read_text()).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and holds_names(target.id) and node.value is not None:
                for value in string_constants(node.value):
                    names.setdefault(value, home)
    assert {"otel_npu.rank", "otel_npu.captures.dropped", "otelnpu"} <= set(names)  # the homes were read
    copies = []
    for path in ALL.values():
        here = str(path.relative_to(PACKAGE))
        uses = sorted((value, line) for line, value in code_strings(path) if value in names)
        for n, (value, line) in enumerate(uses):
            at_home_once = here == names[value] and (n == 0 or uses[n - 1][0] != value)
            if not at_home_once:
                copies.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r} (defined in {names[value]})")
    assert not copies, "names spelled out again (import them from their home):\n" + "\n".join(copies)


def test_every_field_of_the_record_is_typed_and_documented():
    """The record is the contract between the threads of the data path: each of its slots has a type on
    ``Record`` and a row in ``record.py``'s table of who writes it and when."""
    from otel_npu import record

    fields = [*record.Record.__slots__, *record.STEP_SLOTS]
    untyped = [f for f in fields if f not in record.Record.__annotations__]
    undocumented = [f for f in fields if f"``{f}``" not in (record.__doc__ or "")]
    assert not untyped and not undocumented, f"untyped: {untyped}; not in the table: {undocumented}"


def test_the_import_reader_resolves_what_it_reads():
    """The graph the checks above read is the real one: relative imports resolved, submodules told apart."""
    assert layer("otel_npu.capturing.hot") < layer("otel_npu.runtime")
    assert "otel_npu.record" in GRAPH["otel_npu.capturing.hot"]
    assert "otel_npu.export.registry" in GRAPH["otel_npu.export.pipeline"]
    assert resolve("otel_npu.export.sinks.otlp", ALL["otel_npu.export.sinks.otlp"], 2, "redact") == \
        "otel_npu.export.redact"
