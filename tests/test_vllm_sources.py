"""The vLLM plugin's hook table against the sources of the newest releases on the package index.

Every ``HOOKS`` target (module, ``Class.method`` or module global, the function that must read a global, the
parameters the replacement relies on) and every scope name of the stage tables is looked up with ``ast`` in the
downloaded sources (``tests/vllm_sources.py``: sdists from PyPI, cached), for each release its version gate
admits. So a release that renames or drops a target fails here, in CI, and not in a user's engine.

Which releases: ``RELEASES`` (read by hand when the hooks were written) and the newest final release of each
project on the index today (``test_the_newest_releases_on_the_index``). Without network and cache these tests
skip, unless ``OTEL_NPU_REQUIRE_SOURCES=1`` (CI), where they fail.
"""

from __future__ import annotations

import ast

import pytest

from otel_npu.integrations import vllm as plugin

from . import vllm_sources as vs
from .support import missing
from .vllm_sources import RELEASES, Release, sources

#: The model runner modules whose scopes become stages, and the stage table each one's scopes are listed in.
V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
ASCEND_RUNNER = "vllm_ascend.worker.model_runner_v1"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner"


def admits(hook: plugin.Hook, version: str) -> bool:
    return plugin.admits(hook, vs.parse_version(version))


# -- what one release is checked for ------------------------------------------------------------------------------


def hook_problems(src: vs.Sources, hook: plugin.Hook) -> list[str]:
    """Why ``hook``'s target is not what its replacement expects in ``src``; [] when it is."""
    where = f"{hook.module}.{hook.attr}"
    if src.file(hook.module) is None:
        return [f"{where}: module {hook.module} does not exist"]
    *owner, name = hook.attr.split(".")
    if owner:
        function = src.function(hook.module, hook.attr)
        if function is None:
            found = src.binding(hook.module, owner[0])
            missing = owner[0] if found is None or not isinstance(found[1], ast.ClassDef) else hook.attr
            return [f"{where}: {missing} is not defined in {hook.module}"]
        problems = []
        expected = list(getattr(hook, "params", ()))
        actual = vs.parameters(function)
        if expected and actual[: len(expected)] != expected:
            problems.append(f"{where}: parameters {actual} do not start with {expected}")
        return problems
    if src.binding(hook.module, name) is None:
        return [f"{where}: no module-level {name} in {hook.module}"]
    reader = getattr(hook, "reader", "")
    if reader:
        function = src.function(hook.module, reader)
        if function is None:
            return [f"{where}: its reader {hook.module}.{reader} does not exist"]
        if not vs.reads(function, name):
            return [f"{where}: {hook.module}.{reader} does not read {name}"]
    return []


def release_problems(src: vs.Sources) -> list[str]:
    """Everything the hook table gets wrong about one release (sources of that release)."""
    version = src.version
    problems: list[str] = []
    if src.project == "vllm":
        admitted = [hook for hook in plugin.HOOKS if admits(hook, version)]
        resolving = []
        for hook in admitted:
            found = hook_problems(src, hook)
            problems += found
            if not found:
                resolving.append(hook)
        # the step ends in the worker's sample_tokens, wrapped on the worker object at the first step
        if src.function("vllm.v1.worker.gpu_worker", "Worker.sample_tokens") is None:
            problems.append("vllm.v1.worker.gpu_worker.Worker.sample_tokens does not exist: steps would end early")
        # vLLM's provider, built before the plugin loaded, is told by what init_otel_tracer puts in its resource
        if any(hook.role == "ids" for hook in resolving):
            init = src.function("vllm.tracing.otel", "init_otel_tracer")
            if not any(isinstance(n, ast.Constant) and n.value == plugin.VLLM_RESOURCE_KEY for n in ast.walk(init)):
                problems.append(f"init_otel_tracer does not put {plugin.VLLM_RESOURCE_KEY} in its resource")
        roles = {hook.role for hook in resolving}
        if "step" not in roles:
            problems.append("no resolving hook opens the step")
        if "stages" not in roles:
            problems.append("no resolving hook gives stages")
        if any(hook.attr == "_PROFILER_FUNC" for hook in admitted):
            problems += scope_problems(src, V1_RUNNER, plugin.V1_STAGES)
        if any(hook.module == V2_RUNNER for hook in admitted):
            problems += v2_problems(src, forward_seam=any(hook.attr == plugin._FORWARD_SEAM for hook in admitted))
    elif src.project == "vllm-ascend":
        problems += scope_problems(src, ASCEND_RUNNER, plugin.ASCEND_STAGES)
        problems += ascend_runner_problems(src)
        if src.function("vllm_ascend.worker.worker", "NPUWorker.sample_tokens") is None:
            problems.append("vllm_ascend.worker.worker.NPUWorker.sample_tokens does not exist: steps would end early")
    return problems


def scope_problems(src: vs.Sources, module: str, table: dict[str, str | None]) -> list[str]:
    """The stage table lists exactly the scopes ``module`` opens: none gone, none new and unnamed."""
    if src.file(module) is None:
        return [f"{module} does not exist: its scopes ({', '.join(table)}) are not opened"]
    opened = {name for _, name in src.scopes(module)}
    problems = [f"{module} opens no scope {name!r} (listed in the stage table)" for name in table
                if name not in opened]
    problems += [f"{module} opens scope {name!r}, which the stage table does not list" for name in sorted(opened)
                 if name not in table]
    return problems


def v2_problems(src: vs.Sources, forward_seam: bool) -> list[str]:
    """What the V2 replacements rely on inside the runner's methods, besides the targets themselves."""
    problems = []
    execute = src.function(V2_RUNNER, "GPUModelRunner.execute_model")
    sample_tokens = src.function(V2_RUNNER, "GPUModelRunner.sample_tokens")
    if execute is None or sample_tokens is None:
        return ["GPUModelRunner.execute_model or sample_tokens is missing"]
    # "prepare input" ends and "forward" begins at forward_start(): it must come after the inputs are prepared
    # and before every way the model is run (FULL graph replay, DBO micro-batches, piecewise graph, eager).
    starts = vs.calls(execute, "self.step_timing.forward_start")
    model_calls = (vs.calls(execute, "self.model") + vs.calls(execute, "self.cudagraph_manager.run_fullgraph")
                   + vs.calls(execute, "self.cudagraph_manager.run_pw_graph")
                   + vs.calls(execute, "self.ubatch_runner.run"))
    prepared = vs.calls(execute, "self.prepare_inputs")
    if not forward_seam:
        pass  # "prepare input and forward" is one stage there
    elif len(starts) != 1:
        problems.append(f"execute_model calls self.step_timing.forward_start() {len(starts)} times, not once")
    elif not model_calls or not prepared:
        problems.append("execute_model has no model call or no self.prepare_inputs() call")
    elif not max(prepared) < starts[0] < min(model_calls):
        problems.append(f"forward_start() (line {starts[0]}) is not between prepare_inputs (lines {prepared}) "
                        f"and the model calls (lines {model_calls})")
    if not vs.calls(execute, "dispatch_cg_and_sync_dp"):
        problems.append("execute_model does not call dispatch_cg_and_sync_dp()")
    dispatch = src.function("vllm.v1.worker.gpu.dp_utils", "dispatch_cg_and_sync_dp")
    returns = ast.unparse(dispatch.returns) if dispatch is not None and dispatch.returns else ""
    if not returns.startswith("tuple[BatchExecutionDescriptor"):
        problems.append(f"dispatch_cg_and_sync_dp() returns {returns or '?'}, not (BatchExecutionDescriptor, ...)")
    descriptor = src.binding("vllm.v1.worker.gpu.cudagraph_utils", "BatchExecutionDescriptor")
    fields = {node.target.id for node in (descriptor[1].body if descriptor else ())
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    if "cg_mode" not in fields:
        problems.append("BatchExecutionDescriptor has no cg_mode field")
    # "sample" is self.sample(); "post process" runs from its return to the end; "draft" is the speculator's
    # propose(), reached through the runner's speculator attribute.
    for callee in ("self.sample", "self.postprocess_sampled", "self.speculator.propose"):
        if not vs.calls(sample_tokens, callee):
            problems.append(f"sample_tokens does not call {callee}()")
    if src.function("vllm.v1.worker.gpu.spec_decode.speculator", "BaseSpeculator.propose") is None:
        problems.append("BaseSpeculator.propose is not defined")
    return problems


def ascend_runner_problems(src: vs.Sources) -> list[str]:
    """vllm-ascend's default NPUModelRunner builds on vLLM's V1 runner (so the V1 hooks are the ones it meets)."""
    found = src.binding(ASCEND_RUNNER, "NPUModelRunner")
    if found is None or not isinstance(found[1], ast.ClassDef):
        return [f"{ASCEND_RUNNER}.NPUModelRunner does not exist"]
    bases = [ast.unparse(base) for base in found[1].bases]
    base = src.binding(ASCEND_RUNNER, bases[0]) if bases else None
    origin = base[1] if base else None
    if not (isinstance(origin, ast.ImportFrom) and origin.module == V1_RUNNER):
        return [f"NPUModelRunner builds on {bases}, not on {V1_RUNNER}.GPUModelRunner"]
    if not vs.calls(found[1], "self.cudagraph_dispatcher.dispatch"):
        return ["NPUModelRunner does not call self.cudagraph_dispatcher.dispatch()"]
    return []


# -- the tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_the_hook_table_matches_the_release(release: Release) -> None:
    problems = release_problems(sources(release))
    assert not problems, f"{release}:\n  " + "\n  ".join(problems)


def test_the_newest_releases_on_the_index() -> None:
    """A release newer than ``RELEASES`` is checked as soon as it is on the index."""
    checked = {(r.project, r.version) for r in RELEASES}
    failures = []
    for project in vs.PACKAGES:
        try:
            version = vs.newest(project)
        except vs.Unavailable as exc:
            missing("sources", f"cannot ask the index for {project}'s newest release ({exc})")
        if (project, version) in checked:
            continue
        problems = release_problems(sources(Release(project, version)))
        if problems:
            failures.append(f"{project} {version} (newest on the index, not in RELEASES):\n  " + "\n  ".join(problems))
    assert not failures, "\n".join(failures)


def test_every_hook_was_read_in_releases_this_test_checks() -> None:
    """A hook's "read in" names releases that its gate admits and that are checked here."""
    versions = {r.version for r in RELEASES if r.project == "vllm"}
    for hook in plugin.HOOKS:
        assert hook.read, f"{hook.module}.{hook.attr} says no version it was read in"
        for version in hook.read:
            assert version in versions, f"{hook.module}.{hook.attr}: read in {version}, which RELEASES lacks"
            assert admits(hook, version), f"{hook.module}.{hook.attr}: read in {version}, outside its gate"
        for version in hook.run:
            assert admits(hook, version), f"{hook.module}.{hook.attr}: run in {version}, outside its gate"


def test_a_renamed_target_fails_the_check(tmp_path) -> None:
    """The check itself can fail: a release (here a small made-up one) where the step hook's method was renamed
    and a V1 scope dropped."""
    root = tmp_path / "vllm"
    (root / "v1" / "worker").mkdir(parents=True)
    (root / "v1" / "worker" / "worker_base.py").write_text(
        "class WorkerWrapperBase:\n    def execute_model_v2(self, scheduler_output):\n        pass\n")
    (root / "v1" / "utils.py").write_text(
        "_PROFILER_FUNC = None\n\ndef record_function_or_nullcontext(name):\n    return _PROFILER_FUNC(name)\n")
    (root / "v1" / "worker" / "gpu_model_runner.py").write_text(
        "from vllm.v1.utils import record_function_or_nullcontext\n\n"
        "def run():\n    with record_function_or_nullcontext('gpu_model_runner: forward'):\n        pass\n")
    problems = "\n".join(release_problems(vs.Sources("vllm", "0.33.0", tmp_path)))
    assert "WorkerWrapperBase.execute_model is not defined" in problems
    assert "no resolving hook opens the step" in problems
    assert "opens no scope 'gpu_model_runner: preprocess'" in problems
    assert "gpu_model_runner: forward" not in problems


#: The files of vLLM 0.34.0 that ``v2_problems`` reads, and edits of them that each break one V2 seam the
#: replacements rely on: (file under vllm/v1/worker/gpu, [(text, its replacement)], what the check must say).
V2_FILES = ("model_runner.py", "dp_utils.py", "cudagraph_utils.py", "async_utils.py", "spec_decode/speculator.py")
V2_EDITS = {
    "forward_start moved after the eager model call": (
        "model_runner.py",
        [
            ("        self.step_timing.forward_start()\n", ""),
            (
                "            model_output = self.model(**model_inputs)\n",
                "            model_output = self.model(**model_inputs)\n            self.step_timing.forward_start()\n",
            ),
        ],
        "is not between prepare_inputs",
    ),
    "the graph mode renamed": (
        "cudagraph_utils.py",
        [("    cg_mode: CUDAGraphMode\n", "    mode: CUDAGraphMode\n")],
        "BatchExecutionDescriptor has no cg_mode field",
    ),
    "the speculator called otherwise": (
        "model_runner.py",
        [("draft_tokens = self.speculator.propose(", "draft_tokens = self.speculator.draft(")],
        "sample_tokens does not call self.speculator.propose()",
    ),
    "the graph mode decided elsewhere": (
        "model_runner.py",
        [("= dispatch_cg_and_sync_dp(", "= dispatch_and_sync(")],
        "execute_model does not call dispatch_cg_and_sync_dp()",
    ),
}


@pytest.mark.parametrize("edit", V2_EDITS, ids=str)
def test_a_v2_runner_whose_seams_moved_fails_the_check(tmp_path, edit: str) -> None:
    """The V2 checks themselves can fail: vLLM 0.34.0's own files, with one seam moved, are reported."""
    original = sources(Release("vllm", "0.34.0")).root / "vllm" / "v1" / "worker" / "gpu"
    copy = tmp_path / "vllm" / "v1" / "worker" / "gpu"
    for name in V2_FILES:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text((original / name).read_text(encoding="utf-8"), encoding="utf-8")
    assert v2_problems(vs.Sources("vllm", "0.34.0", tmp_path), forward_seam=True) == []  # the copy is complete
    name, replacements, expected = V2_EDITS[edit]
    text = (copy / name).read_text(encoding="utf-8")
    for old, new in replacements:
        assert text.count(old) == 1, f"{name}: {old!r} is not there once (the test's edit needs updating)"
        text = text.replace(old, new)
    (copy / name).write_text(text, encoding="utf-8")
    problems = v2_problems(vs.Sources("vllm", "0.34.0", tmp_path), forward_seam=True)
    assert any(expected in problem for problem in problems), problems


def test_sources_come_from_the_index_checked_against_its_sha256_and_are_cached(tmp_path, monkeypatch):
    """The download path itself, on a made-up index (a file: URL): the sdist is picked over a wheel, its
    relative URL resolved, its digest checked, the package's .py files kept, the cache used next time."""
    import hashlib
    import io
    import json
    import tarfile

    index, cache = tmp_path / "index", tmp_path / "cache"
    sdist = io.BytesIO()
    with tarfile.open(fileobj=sdist, mode="w:gz") as tar:
        for name, text in [("vllm-9.9.0/vllm/__init__.py", ""), ("vllm-9.9.0/vllm/v1/utils.py", "X = 1\n"),
                           ("vllm-9.9.0/setup.py", "raise SystemExit\n"), ("vllm-9.9.0/vllm/README.md", "")]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    (index / "files").mkdir(parents=True)
    (index / "files" / "vllm-9.9.0.tar.gz").write_bytes(sdist.getvalue())
    digest = hashlib.sha256(sdist.getvalue()).hexdigest()

    def publish(sha256: str) -> None:
        files = [{"packagetype": "bdist_wheel", "filename": "vllm-9.9.0-py3-none-any.whl", "size": 1,
                  "url": "../files/missing.whl", "digests": {"sha256": "0"}},
                 {"packagetype": "sdist", "filename": "vllm-9.9.0.tar.gz", "size": 1,
                  "url": "../files/vllm-9.9.0.tar.gz", "digests": {"sha256": sha256}}]
        (index / "vllm").mkdir(exist_ok=True)
        (index / "vllm" / "json").write_text(json.dumps(
            {"info": {"version": "10.0.0rc1"}, "releases": {"9.9.0": files, "10.0.0rc1": files, "9.10.0": []}}))

    monkeypatch.setenv("OTEL_NPU_PYPI_JSON", index.as_uri())
    publish("f" * 64)
    with pytest.raises(vs.Unavailable, match="sha256"):
        vs.fetch("vllm", "9.9.0", cache)
    assert not list(cache.iterdir())  # nothing half-written is left
    publish(digest)
    assert vs.newest("vllm") == "9.9.0"  # not the pre-release, not the release without files
    folder = vs.fetch("vllm", "9.9.0", cache)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py")) == [
        "vllm/__init__.py", "vllm/v1/utils.py"]
    assert json.loads((folder / "SOURCE.json").read_text())["sha256"] == digest
    assert vs.Sources("vllm", "9.9.0", folder).binding("vllm.v1.utils", "X") is not None
    (index / "vllm" / "json").unlink()  # the index gone: the cache still answers
    assert vs.fetch("vllm", "9.9.0", cache) == folder
    with pytest.raises(vs.Unavailable):
        vs.fetch("vllm", "9.8.0", cache)
