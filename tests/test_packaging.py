"""The release artefacts, built and checked as a release would: ``python -m build`` makes an sdist and a
wheel, ``twine check`` accepts both, they carry the whole package and its licence, and the wheel installed
into a fresh venv runs ``otel-npu demo``.

The fresh venv sees this test's own environment underneath it (a ``.pth`` line naming its site-packages,
which is what ``--system-site-packages`` does for a system Python), so torch, transformers and OpenTelemetry
are not installed again; the wheel itself is installed with ``--no-index --no-deps`` and shadows any
otel-npu of that environment (an editable install's import hook lives in a ``.pth`` file, and ``.pth`` files
of an added directory are not run). A check that the wheel's dependencies resolve from an index, with
nothing underneath, is the release workflow's (.github/workflows/release.yml), which installs the CPU torch.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

from otel_npu import _compiled

from .support import child_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # builds, installs into a fresh venv

ROOT = pathlib.Path(__file__).resolve().parent.parent


def package_files() -> set[str]:
    """The package's Python files, relative to the repository root (``otel_npu/...``)."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "otel_npu").rglob("*.py")
            if "__pycache__" not in p.parts}


def run(args: list, *, timeout: float, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, timeout=timeout, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, pathlib.Path]:
    pytest.importorskip("build", reason="the test extra is not installed: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("dist")
    # Isolated, as a release builds: the build backend comes from the index, pinned by pyproject's
    # [build-system]; the wheel is built from the unpacked sdist, so a file the sdist lacks fails here.
    run([sys.executable, "-m", "build", "--outdir", out, ROOT], timeout=600)
    (sdist,) = out.glob("otel_npu-*.tar.gz")
    # A platform wheel: it carries the compiled core built for this Python (setup.py).
    python_tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    (wheel,) = out.glob(f"otel_npu-*-{python_tag}-{python_tag}-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_twine_accepts_the_sdist_and_the_wheel(dist):
    pytest.importorskip("twine", reason="the test extra is not installed: pip install -e '.[test]'")
    done = run([sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"]], timeout=120)
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_the_wheel_carries_every_module_the_licence_and_the_entry_points(dist):
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        metadata = whl.read(f"{info}/METADATA").decode()
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert package_files() <= names, sorted(package_files() - names)
    assert f"{info}/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata
    assert "otel-npu = otel_npu.cli:main" in entry_points
    assert "otel_npu = otel_npu.integrations.vllm:register" in entry_points  # the vLLM plugin


def test_the_wheel_carries_the_compiled_core_and_its_manifest(dist):
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        manifest = json.loads(whl.read(f"otel_npu/{_compiled.MANIFEST_NAME}"))
    assert manifest["failed"] == {}, manifest["failed"]
    assert sorted(manifest["modules"]) == sorted(_compiled.MODULES)
    for module, entry in manifest["modules"].items():
        package = module.rpartition(".")[0].replace(".", "/")
        assert f"{package}/{entry['twin']}" in names, entry
        # built from the sources the wheel carries (.pxd included): it loads compiled once installed
        for source in entry["sources"]:
            assert f"{package}/{source}" in names
        assert entry["sources"] == _compiled.source_hashes(module, str(ROOT)), module
    pxd = {p.relative_to(ROOT).as_posix() for p in (ROOT / "otel_npu").rglob("*.pxd")}
    assert pxd <= names, sorted(pxd - names)


def test_the_sdist_carries_the_source_its_tests_and_docs(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "otel_npu", "tests", "examples", "deploy", "benchmarks", "docs"],
                             cwd=ROOT, capture_output=True, text=True, check=False)
    wanted = {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "mkdocs.yml"} | package_files()
    if tracked.returncode == 0:  # a git checkout: every tracked file of those folders
        wanted |= {n for n in tracked.stdout.splitlines() if (ROOT / n).exists()}
    assert wanted <= names, sorted(wanted - names)


def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(dist, tmp_path):
    pytest.importorskip("transformers", reason="the demo extra is not installed: pip install -e '.[demo]'")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=120)
    python = venv / "bin" / "python"
    site = pathlib.Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            timeout=60).stdout.strip())
    underneath = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_underneath.pth").write_text("".join(f"{p}\n" for p in sorted(underneath)))
    run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--ignore-installed",
         dist["wheel"]], timeout=300)

    # the fresh venv, not this checkout: no PYTHONPATH, no VIRTUAL_ENV
    env = {k: v for k, v in child_env().items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    work = tmp_path / "work"
    work.mkdir()
    where = run([python, "-c", "import otel_npu; print(otel_npu.__file__, otel_npu.__version__)"], timeout=120,
                cwd=work, env=env).stdout
    assert where.startswith(str(site / "otel_npu" / "__init__.py")), where
    core = run([python, "-c", "import otel_npu, otel_npu._compiled as c; print(c.describe()['compiled'])"],
               timeout=120, cwd=work, env=env).stdout
    assert core.strip() == str(sorted(_compiled.MODULES)), core  # the installed wheel runs its compiled core

    demo = run([venv / "bin" / "otel-npu", "demo", "--device", "cpu", "--model-size", "tiny", "--steps", "8",
                "--requests", "2", "--no-progress"], timeout=300, cwd=work, env=env)
    (traces,) = work.glob("otel-npu-traces-*.jsonl")
    assert f"Traces written to {traces.name}." in demo.stdout, demo.stdout
    summary = run([venv / "bin" / "otel-npu", "summary", traces.name], timeout=120, cwd=work, env=env)
    assert "forward" in summary.stdout and "Decode" in summary.stdout, summary.stdout
