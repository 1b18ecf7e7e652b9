"""The integration core seen from a new engine: the toy engine's integration (``toy_engine_otel.py``), built
on ``otel_npu.integrations._patch`` and ``_engine_step`` and the public API only, gives steps spanning two
engine calls, stages from the runner's methods, links to the requests' traces, version gates, one warning
per missing target, and undoes itself."""

from __future__ import annotations

import threading

import pytest

import otel_npu

from . import toy_engine, toy_engine_otel
from .support import enable

CLIENT = "00-0000000000000000000000000000000a-000000000000000b-01"


@pytest.fixture
def integration():
    originals = (toy_engine.Engine.execute_model, toy_engine.Runner.forward)
    yield toy_engine_otel
    toy_engine_otel.uninstall()
    assert (toy_engine.Engine.execute_model, toy_engine.Runner.forward) == originals  # every original back


def run(engine: toy_engine.Engine, steps: int) -> None:
    for _ in range(steps):
        engine.step()


def steps_of(spans):
    return sorted((s for s in spans.all if s.attributes.get("otel_npu.kind") == "step"), key=lambda s: s.start_time)


def test_steps_span_two_engine_calls_with_stages_and_links(provider, spans, integration, caplog):
    enable(provider, device="cpu")
    assert integration.install(toy_engine.__version__) == [
        "tests.toy_engine.Engine.execute_model", "tests.toy_engine.Engine.sample_tokens",
        "tests.toy_engine.Runner.prepare", "tests.toy_engine.Runner.forward", "tests.toy_engine.Runner.sample"]
    engine = toy_engine.Engine()
    engine.add(toy_engine.Request("r1", 5, {"traceparent": CLIENT}))
    engine.add(toy_engine.Request("r2", 7))
    run(engine, 3)
    engine.runner.forward([1])  # outside a step: no capture
    assert otel_npu.flush(5.0)
    steps = steps_of(spans)
    assert [s.name for s in steps] == ["Prefill", "Decode", "Decode"]
    for step in steps:
        assert step.attributes["toy.batch_size"] == 2
        assert [(link.context.trace_id, link.context.span_id) for link in step.links] == [(0xA, 0xB)]
        stages = sorted(spans.children_of(step), key=lambda s: s.start_time)
        assert [s.name for s in stages] == ["prepare input", "forward", "sample"]
        assert step.start_time <= stages[0].start_time and stages[-1].end_time <= step.end_time
    assert len(spans.all) == 3 * 4
    # the draft stage is for version 2 of the engine: not tried, not warned about
    assert "Runner.draft" not in caplog.text


def test_a_missing_target_is_one_warning_and_the_rest_still_works(provider, spans, integration, caplog):
    enable(provider, device="cpu")
    done = integration.install("2.0")  # version 2 should have Runner.draft; this build does not
    assert "tests.toy_engine.Runner.draft" not in done and len(done) == 5
    assert integration.install("2.0") == []  # each target once, and no second warning
    warnings = [r.getMessage() for r in caplog.records if r.name == "toy_engine.otel_npu"]
    assert len(warnings) == 1
    assert "cannot hook tests.toy_engine.Runner.draft in this toy engine" in warnings[0]
    assert "left out: the draft stage" in warnings[0]
    engine = toy_engine.Engine()
    engine.add(toy_engine.Request("r1", 3))
    run(engine, 1)
    assert otel_npu.flush(5.0)
    (step,) = steps_of(spans)
    assert [s.name for s in spans.children_of(step)] == ["prepare input", "forward", "sample"]
    assert otel_npu.stats()["dropped_total"] == 0


def test_an_engine_error_ends_the_step_with_it_and_propagates(provider, spans, integration, monkeypatch):
    enable(provider, device="cpu")
    integration.install(toy_engine.__version__)
    engine = toy_engine.Engine()
    engine.add(toy_engine.Request("r1", 3))

    def broken(self, logits):
        raise RuntimeError("device lost")

    monkeypatch.setattr(toy_engine.Runner, "sample", broken)  # under the hook: the stage is gone with it
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert otel_npu.flush(5.0)
    (step,) = steps_of(spans)
    assert step.status.status_code.name == "ERROR" and "device lost" in step.status.description
    assert toy_engine_otel._state.step is None  # closed, not left open for the next step


def test_nothing_is_patched_while_otel_npu_is_disabled(integration):
    assert not otel_npu.enabled()
    assert integration.install(toy_engine.__version__) == []
    assert toy_engine.Engine.execute_model.__module__ == "tests.toy_engine"


def test_stages_are_only_those_of_the_thread_that_opened_the_step(provider, spans, integration):
    enable(provider, device="cpu")
    integration.install(toy_engine.__version__)
    engine = toy_engine.Engine()
    engine.add(toy_engine.Request("r1", 3))
    batch = engine.schedule()
    engine.execute_model(batch)
    other = threading.Thread(target=engine.runner.forward, args=([1],))  # another thread: no stage
    other.start()
    other.join()
    engine.sample_tokens(batch)
    assert otel_npu.flush(5.0)
    (step,) = steps_of(spans)
    assert [s.name for s in spans.children_of(step)].count("forward") == 1


def test_an_invalid_otel_propagators_does_not_keep_the_integration_from_loading():
    """``opentelemetry.propagate`` raises at import for a propagator it cannot load; the integration core must
    still import, and read request contexts as W3C ``traceparent``, saying why once."""
    import subprocess
    import sys

    from .support import child_env

    code = (
        "import logging; logging.basicConfig()\n"
        "from otel_npu.integrations import _engine_step as e\n"
        "h = {'traceparent': '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'}\n"
        "ctx = e.client_context(h); ctx2 = e.client_context(h)\n"
        "print(format(ctx.trace_id, '032x'), format(ctx2.span_id, '016x'))\n")
    done = subprocess.run([sys.executable, "-c", code], env=child_env(OTEL_PROPAGATORS="bogus"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"]
    assert done.stderr.count("OTEL_PROPAGATORS") == 1, done.stderr


def test_the_toy_integration_imports_only_the_public_api_and_the_integration_core():
    """What docs/extending.md promises a new engine needs of otel-npu, read from the example's imports."""
    import ast
    import pathlib

    source = pathlib.Path(toy_engine_otel.__file__).read_text()
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            used |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            used.add(node.module)
    ours = {name for name in used if name == "otel_npu" or name.startswith("otel_npu.")}
    assert ours == {"otel_npu", "otel_npu.integrations._engine_step", "otel_npu.integrations._patch"}, ours
