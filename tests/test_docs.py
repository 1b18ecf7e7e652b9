"""The README and the documentation site: the README stays short and its links and commands hold; the site
builds strictly (a broken link, anchor, nav entry or API reference fails); CI runs the README's test command."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from .collector import require_agent
from .otlp_receiver import GrpcReceiver
from .support import child_env, free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_blocks(text: str, lang: str = "bash") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_the_readme_is_a_few_screens():
    lines = README.splitlines()
    assert len(lines) <= 200, len(lines)
    assert len(README.encode()) <= 14_000, len(README.encode())
    # the picture comes before the first section
    assert README.index("docs/phoenix-trace.png") < README.index("\n## ")


def test_every_relative_link_of_the_readme_exists():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    missing = [t for t in targets if not re.match(r"[a-z]+://", t) and not (ROOT / t).exists()]
    assert not missing, missing


def anchors(markdown: str) -> set[str]:
    """The fragments a link into ``markdown`` can name: its headings' slugs (as GitHub and mkdocs' toc make
    them: lower case, punctuation dropped, spaces to hyphens) and explicit ids."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.DOTALL | re.MULTILINE)  # a "# comment" is no heading
    headings = re.findall(r"^#+ (.+?)\s*$", markdown, flags=re.MULTILINE)
    slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).strip().replace(" ", "-") for heading in headings}
    ids = {html or attr for html, attr in re.findall(r"""id=["']([^"']+)["']|\{#([\w-]+)\}""", markdown)}
    return slugs | ids


def test_every_anchor_the_readme_links_to_exists():
    """A link's ``#fragment`` (into the README itself or a page of docs/) names a heading or an id there."""
    broken = []
    for target, fragment in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", README):
        if re.match(r"[a-z]+://", target):
            continue
        text = README if not target else (ROOT / target).read_text()
        if fragment not in anchors(text):
            broken.append(f"{target}#{fragment}")
    assert not broken, broken


def test_the_readme_installs_from_a_clone_and_says_the_package_is_not_on_pypi():
    install = section(README, "Install (from a clone)")
    assert "git clone" in install and "&& cd otel-npu" in install
    assert "not published on PyPI" in install
    assert "pip install otel-npu\n" not in README  # the command that fails
    # The repository's address: a real one, or a placeholder that reads as one and is said to be one (a
    # made-up word in capitals read as a URL to type in).
    for text in (install, (ROOT / "docs" / "index.md").read_text()):
        url = re.search(r"git clone (\S+)", text).group(1)
        assert url.startswith("https://") or (re.fullmatch(r"<[a-z-]+>", url) and "placeholder" in text), url


def test_ci_runs_the_readme_test_command():
    (block,) = fenced_blocks(section(README, "Run the tests"))
    setup, command = block.strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines(), command
    for extra in re.search(r'-e "\.\[([a-z,]+)\]"', setup).group(1).split(","):
        assert re.search(rf'-e "\.\[[a-z,]*\b{extra}\b', ci), extra


def test_the_one_demo_command_sets_up_a_venv_and_runs_the_demo():
    line = fenced_blocks(section(README, "See it work: one command"))[0].strip()
    assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert line.endswith("&& otel-npu demo")


def test_the_release_workflow_builds_and_checks():
    """The sdist, then from it the platform wheels (the compiled core) with cibuildwheel, each checked,
    installed and run; publishing takes them all."""
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    jobs = workflow["jobs"]
    sdist = "\n".join(step.get("run", "") for step in jobs["sdist"]["steps"])
    assert "python -m build --sdist" in sdist and "twine check --strict" in sdist
    wheels = jobs["wheels"]
    assert wheels["needs"] == "sdist"
    (cibw,) = [step for step in wheels["steps"] if step.get("uses", "").startswith("pypa/cibuildwheel@")]
    assert cibw["with"]["package-dir"] == "${{ env.SDIST }}"  # the wheels are built from the sdist
    env = cibw["env"]
    assert "download.pytorch.org/whl/cpu" in env["CIBW_BEFORE_TEST"]  # never PyPI's CUDA torch by accident
    assert "otel-npu demo" in env["CIBW_TEST_COMMAND"] and "not core['pure']" in env["CIBW_TEST_COMMAND"]
    assert "twine check --strict" in "\n".join(step.get("run", "") for step in wheels["steps"])
    assert set(jobs["publish"]["needs"]) == {"sdist", "wheels"}
    (download,) = [step for step in jobs["publish"]["steps"] if "download-artifact" in step.get("uses", "")]
    uploaded = [step["with"]["name"] for job in ("sdist", "wheels") for step in jobs[job]["steps"]
                if "upload-artifact" in step.get("uses", "")]
    assert all(name.startswith(download["with"]["pattern"].rstrip("*")) for name in uploaded), uploaded


def test_the_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
    env = child_env(NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in ("capture", "step", "flush", "shutdown", "configure", "enabled", "stats", "instrument_module",
                 "ProfileExecuteDuration", "IdGenerator", "testing.SimDevice"):
        assert f'id="otel_npu.{name}"' in reference, name


def test_every_test_named_in_the_promises_table_exists():
    """docs/promises.md maps each promise to the test that proves it: each name there is a test function of
    that module (``Class::test`` for a method), and every test of tests/test_promises.py is named there."""
    import ast

    table = (ROOT / "docs" / "promises.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::([\w:]+)`", table)
    assert len(named) >= 30, len(named)
    missing = []
    for path, name in named:
        module = ROOT / path
        if not module.exists():
            missing.append(f"{path} (no such file)")
            continue
        tree = ast.parse(module.read_text())
        scope: list = tree.body
        *classes, function = name.split("::")
        for cls in classes:
            scope = next((n.body for n in scope if isinstance(n, ast.ClassDef) and n.name == cls), [])
        if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function for n in scope):
            missing.append(f"{path}::{name}")
    assert not missing, missing
    own = re.findall(r"^def (test_\w+)", (ROOT / "tests" / "test_promises.py").read_text(), flags=re.MULTILINE)
    assert set(own) <= {name for path, name in named if path == "tests/test_promises.py"}


def test_the_vllm_hook_table_says_each_hooks_versions_as_the_code_does():
    """docs/vllm.md's hook table has one row per ``HOOKS`` entry, giving the versions its gate admits and the
    releases the entry says it was read in and run with (the code is what tests/test_vllm_sources.py checks
    against the sources; the page must not drift from it)."""
    from otel_npu.integrations import vllm as plugin

    rows = {}
    for line in (ROOT / "docs" / "vllm.md").read_text().splitlines():
        if line.startswith("| `vllm."):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[re.match(r"`([\w.]+)`", cells[0]).group(1)] = cells
    assert sorted(rows) == sorted(f"{hook.module}.{hook.attr}" for hook in plugin.HOOKS)

    def version(parts: tuple[int, ...]) -> str:
        return ".".join(map(str, parts))

    for hook in plugin.HOOKS:
        target, _, gate, read, run = rows[f"{hook.module}.{hook.attr}"]
        admitted = f"≥ {version(hook.since)}"
        if hook.before:  # the last minor release before the gate closes
            admitted = f"{version(hook.since)} … {version(hook.before[:-1] + (hook.before[-1] - 1,))}"
        assert gate == admitted, target
        assert read == ", ".join(hook.read), target
        assert run.split(" (")[0] == ", ".join(hook.run), target


def continued_command(block: str, pattern: str) -> str:
    """The shell command of ``block`` whose first line matches ``pattern``, with its ``\\``-continued lines."""
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(pattern, line))
    end = start
    while lines[end].rstrip().endswith("\\"):
        end += 1
    return "\n".join(lines[start:end + 1])


def test_the_rotel_collector_line_runs_as_written(tmp_path):
    """docs/export.md's rotel line, run by bash in an environment where ``pip install rotel`` was done (only its
    ports and forwarding address changed to free loopback ones): the agent starts, and forwards a span sent to
    it. A plain ``rotel-agent start ...`` finds no command: the binary sits inside the wheel, not on PATH."""
    require_agent()
    block = fenced_blocks((ROOT / "docs" / "export.md").read_text())[0]
    command = continued_command(block, r'^[^#]*rotel-agent"? start\b')
    receiver = GrpcReceiver()
    grpc, http = free_port(), free_port()
    for written, here in (("0.0.0.0:4317", f"127.0.0.1:{grpc}"), ("0.0.0.0:4318", f"127.0.0.1:{http}"),
                          ("http://tempo:4317", receiver.endpoint)):
        assert command.count(written) == 1, (written, command)
        command = command.replace(written, here)
    # ``python`` is the one that has rotel installed, as after ``pip install rotel`` in an activated venv
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(["bash", "-c", "exec " + command], cwd=tmp_path, env=child_env(PATH=path),
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30  # generous: a loaded machine starts the agent in well under a second
        while True:
            try:
                socket.create_connection(("127.0.0.1", http), 0.2).close()
                break
            except OSError:
                assert agent.poll() is None, f"the line did not start rotel-agent: {log.read_text(errors='replace')}"
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.05)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http}/v1/traces")))
        provider.get_tracer("docs").start_span("through rotel").end()
        provider.shutdown()
        assert [span.name for _, span in receiver.wait_for(1, timeout_s=30)] == ["through rotel"]
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        receiver.close()


def test_what_the_readmes_commands_write_in_the_clone_is_ignored_by_git():
    """The demo's traces file, the Chrome trace, the vLLM example's traces and the docs site (``mkdocs build
    --strict`` writes site/): none of them shows up as an untracked file of the clone."""
    written = {"otel-npu-traces-20261203-091428.jsonl": "otel-npu-traces-", "trace.json": "-o trace.json",
               "vllm-traces.jsonl": "vllm-traces.jsonl", "site/index.html": "mkdocs build --strict` writes site/"}
    for path, said in written.items():
        assert said in README, f"the README no longer says it writes {path}: update this test"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert set(done.stdout.split()) == set(written), sorted(set(written) - set(done.stdout.split()))
