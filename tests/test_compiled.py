"""The compiled data path (``otel_npu/_compiled.py``, ``setup.py``): the twins load in place of the background
modules when they are built and current, export exactly what the pure-Python modules export, and give way
to the pure modules (with one warning) when a source changed since the build, or when
``OTEL_NPU_PURE_PYTHON=1`` asks for them.

Each check runs in a fresh process: which module loads is decided once, when ``otel_npu`` is imported.
Without a build (a checkout never built, ``OTEL_NPU_BUILD_PURE_PYTHON=1``) the checks that need twins skip;
``OTEL_NPU_REQUIRE_COMPILED=1`` (CI) makes them fail instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict

from otel_npu import _compiled

from .otlp_receiver import HttpReceiver
from .support import child_env, missing

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "otel_npu"

REPORT = r"""
import importlib, json, sys
import otel_npu
from otel_npu import _compiled
files = {name: importlib.import_module(name).__file__ for name in _compiled.MODULES}
print(json.dumps({"files": files, "core": _compiled.describe()}))
"""


#: The compiled core, whatever the session runs (CI's pure-Python pass sets OTEL_NPU_PURE_PYTHON=1).
COMPILED = {"OTEL_NPU_PURE_PYTHON": "0"}


def report(root: pathlib.Path = ROOT, **env: str) -> tuple[dict, str]:
    """What a fresh process importing otel_npu from ``root`` loads: ``({"files", "core"}, stderr)``."""
    done = subprocess.run([sys.executable, "-c", REPORT], check=False, env=child_env(PYTHONPATH=str(root), **{**COMPILED, **env}),
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def twin_file(module: str, path: str) -> bool:
    """Whether ``path`` is ``module``'s compiled twin (``_<name>_c`` + an extension suffix of this Python)."""
    name = os.path.basename(path)
    stem = _compiled.twin_name(module).rpartition(".")[2]
    import importlib.machinery

    return name.startswith(stem) and name[len(stem):] in importlib.machinery.EXTENSION_SUFFIXES


def built() -> bool:
    manifest = _compiled.read_manifest(str(PACKAGE / _compiled.MANIFEST_NAME))
    return bool(manifest and manifest.get("modules"))


@pytest.fixture
def needs_build() -> None:
    if not built():
        missing("compiled", "the compiled core is not built here (pip install -e . or python setup.py build_ext "
                            "--inplace)")


def test_the_twins_load_in_place_of_the_modules_when_built(needs_build):
    seen, stderr = report()
    for module, path in seen["files"].items():
        assert twin_file(module, path), f"{module} loaded from {path}, not its compiled twin"
    assert seen["core"]["compiled"] == sorted(_compiled.MODULES)
    assert seen["core"]["pure"] == [] and seen["core"]["why_pure"] == ""
    assert "compiled core" not in stderr, stderr


def test_pure_python_is_honoured(needs_build):
    seen, stderr = report(OTEL_NPU_PURE_PYTHON="1")
    for module, path in seen["files"].items():
        assert path.endswith(".py") and not twin_file(module, path), (module, path)
    assert seen["core"] == {"compiled": [], "pure": sorted(_compiled.MODULES), "why_pure": "OTEL_NPU_PURE_PYTHON=1"}
    assert "compiled core" not in stderr, stderr  # asked for: no warning


def test_the_running_stats_say_which_modules_are_compiled(needs_build):
    script = ("import json, otel_npu; otel_npu.configure(enabled=True, device='cpu', pipeline='own');"
              "\nwith otel_npu.capture('x'): pass\nprint(json.dumps(otel_npu.stats()['core']))")
    for env, compiled in ((COMPILED, sorted(_compiled.MODULES)), ({"OTEL_NPU_PURE_PYTHON": "1"}, [])):
        done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                              env=child_env(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", **env))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["compiled"] == compiled


def copy_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the built package (twins and manifest included) that a test may change."""
    root = tmp_path / "tree"
    shutil.copytree(PACKAGE, root / "otel_npu", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_changed_source_loads_as_pure_python_with_one_warning(needs_build, tmp_path):
    root = copy_tree(tmp_path)
    changed = root / "otel_npu" / "resolve" / "resolver.py"
    changed.write_text(changed.read_text() + "\n# changed after the build\n")
    seen, stderr = report(root)
    assert seen["files"]["otel_npu.resolve.resolver"] == str(changed)
    assert seen["core"]["pure"] == ["otel_npu.resolve.resolver"]
    assert sorted(seen["core"]["compiled"]) == sorted(set(_compiled.MODULES) - {"otel_npu.resolve.resolver"})
    for module in seen["core"]["compiled"]:  # the others still load compiled
        assert twin_file(module, seen["files"][module])
    warnings = [line for line in stderr.splitlines() if "compiled core is out of date" in line]
    assert len(warnings) == 1, stderr
    assert "otel_npu.resolve.resolver (its source changed since the build)" in warnings[0]
    assert "pip install -e ." in warnings[0] and "build_ext --inplace" in warnings[0]


def test_a_missing_twin_or_an_added_pxd_loads_as_pure_python_with_one_warning(needs_build, tmp_path):
    root = copy_tree(tmp_path)
    for twin in (root / "otel_npu" / "export" / "encoding").glob("_otlp_proto_c.*"):
        twin.unlink()
    (root / "otel_npu" / "spans" / "identity.pxd").write_text("# declarations added after the build\n")
    seen, stderr = report(root)
    assert seen["core"]["pure"] == ["otel_npu.export.encoding.otlp_proto", "otel_npu.spans.identity"]
    warnings = [line for line in stderr.splitlines() if "compiled core is out of date" in line]
    assert len(warnings) == 1, stderr
    assert "otel_npu.export.encoding.otlp_proto (its compiled twin is missing" in warnings[0]
    assert "otel_npu.spans.identity (its source changed since the build)" in warnings[0]


def test_a_twin_that_does_not_load_gives_the_pure_module_and_a_warning(needs_build, tmp_path):
    root = copy_tree(tmp_path)
    (twin,) = (root / "otel_npu" / "resolve").glob("_resolver_c.*")
    twin.write_bytes(b"not a shared library")  # the manifest still matches the sources: only loading tells
    seen, stderr = report(root)
    assert seen["files"]["otel_npu.resolve.resolver"] == str(root / "otel_npu" / "resolve" / "resolver.py")
    assert "otel_npu.resolve.resolver" in seen["core"]["pure"]
    assert "otel_npu.resolve.resolver" not in seen["core"]["compiled"]
    assert len(seen["core"]["compiled"]) == len(_compiled.MODULES) - 1
    warnings = [line for line in stderr.splitlines() if "did not load" in line]
    assert len(warnings) == 1 and "otel_npu.resolve.resolver" in warnings[0], stderr
    # and it works: a capture resolved by the pure resolver among compiled modules
    script = ("import otel_npu; otel_npu.configure(enabled=True, device='cpu', pipeline='own')\n"
              "with otel_npu.capture('x'): pass\nassert otel_npu.flush(30.0)\nprint(otel_npu.stats()['resolved'])")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                          cwd=root, env=child_env(PYTHONPATH=str(root), OTEL_TRACES_EXPORTER="none",
                                                  OTEL_METRICS_EXPORTER="none", **COMPILED))
    assert done.returncode == 0 and done.stdout.split()[-1] == "1", done.stderr


def test_a_tree_never_built_runs_pure_python_quietly(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(PACKAGE, root / "otel_npu", ignore=shutil.ignore_patterns(
        "__pycache__", "_*_c.*", _compiled.MANIFEST_NAME))
    seen, stderr = report(root)
    assert seen["core"]["compiled"] == [] and seen["core"]["why_pure"].startswith("not built")
    assert all(path.endswith(".py") for path in seen["files"].values())
    assert "compiled core" not in stderr, stderr


# -- the same spans either way ------------------------------------------------------------------------------
WORKLOAD = r"""
import sys
import otel_npu
from opentelemetry.trace import SpanContext, TraceFlags
from otel_npu.testing import SimDevice

sim = SimDevice()
otel_npu.configure(enabled=True, device=sim, pipeline="own")
stream = sim.current_stream()
requests = [SpanContext(0x1234 + i, 0x5678 + i, is_remote=True, trace_flags=TraceFlags(1)) for i in range(3)]
for i in range(60):
    links = requests[: 1 + i % 3]
    with otel_npu.step("Decode" if i % 5 else "Prefill", links=links, attributes={"batch": len(links)}):
        with otel_npu.capture("prepare input"):
            stream.launch(0.0001)
        with otel_npu.capture("forward", attributes={"tokens": i} if i % 4 == 0 else None):
            stream.launch(0.0005)
            with otel_npu.capture("attention", detail=True):
                stream.launch(0.0001)
        if i % 7 == 0:
            try:
                with otel_npu.capture("sample"):
                    stream.launch(0.0001)
                    raise ValueError(f"bad token {i}")
            except ValueError:
                pass
        else:
            with otel_npu.capture("sample"):
                stream.launch(0.0001)
with otel_npu.capture("outside any step", attributes={"what": "a root"}):
    stream.launch(0.0001)
assert otel_npu.flush(30.0)
print(otel_npu.stats()["core"]["compiled"] != [], otel_npu.stats()["spans_exported"])
otel_npu.shutdown(30.0)
"""

#: Span fields that differ from run to run whatever the modules (ids, times, the measured clock figures).
VARYING = {"traceId", "spanId", "parentSpanId", "startTimeUnixNano", "endTimeUnixNano"}
VARYING_ATTRIBUTES = {"otel_npu.host_lead_us", "otel_npu.clock_error_us", "process.pid"}


def canonical(spans: list[Any]) -> list[dict]:
    """The spans in device-time order, as dicts without what varies between runs; parents and traces named
    by their position in that order."""
    spans = sorted(spans, key=lambda s: (s.start_time_unix_nano, -s.end_time_unix_nano, s.name))
    position = {s.span_id: n for n, s in enumerate(spans)}
    traces: dict[bytes, int] = {}
    out = []
    for s in spans:
        d = {k: v for k, v in MessageToDict(s).items() if k not in VARYING}
        d["attributes"] = [a for a in d.get("attributes", []) if a["key"] not in VARYING_ATTRIBUTES]
        for event in d.get("events", []):
            event.pop("timeUnixNano", None)
        d["parent"] = position.get(s.parent_span_id, "remote" if s.parent_span_id else None)
        d["trace"] = traces.setdefault(s.trace_id, len(traces))
        d["duration_positive"] = s.end_time_unix_nano >= s.start_time_unix_nano
        out.append(d)
    return out


def export_once(receiver: HttpReceiver, tmp_path: pathlib.Path, **env: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", WORKLOAD], check=False, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=child_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                                                      OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                                                      OTEL_METRICS_EXPORTER="none", **{**COMPILED, **env}))
    assert done.returncode == 0, done.stderr
    compiled, exported = done.stdout.split()
    assert compiled == str(env.get("OTEL_NPU_PURE_PYTHON") != "1"), done.stdout
    spans = [span for _, span in receiver.wait_for(int(exported), timeout_s=30)]
    assert len(spans) == int(exported) > 300
    return canonical(spans)


@pytest.mark.timeout(600)
def test_compiled_and_pure_python_export_the_same_spans(needs_build, tmp_path):
    receivers = HttpReceiver(), HttpReceiver()
    try:
        compiled = export_once(receivers[0], tmp_path)
        pure = export_once(receivers[1], tmp_path, OTEL_NPU_PURE_PYTHON="1")
    finally:
        for receiver in receivers:
            receiver.close()
    assert len(compiled) == len(pure)
    for n, (a, b) in enumerate(zip(compiled, pure)):
        assert a == b, f"span {n} differs:\ncompiled: {a}\npure:     {b}"
    # what the comparison covered: steps with links, user attributes, errors, detail captures, a lone root
    names = {s["name"] for s in compiled}
    assert names == {"Decode", "Prefill", "prepare input", "forward", "attention", "sample", "outside any step"}
    assert any(s.get("links") for s in compiled) and any(s.get("events") for s in compiled)
    assert any(s["parent"] is None and s["name"] == "outside any step" for s in compiled)
