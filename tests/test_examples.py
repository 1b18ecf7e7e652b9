"""examples/ stays in sync: each example runs, and what it says it does shows in its traces file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from otel_npu.cli import tracefile

from .support import child_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_model_runner_links_steps_to_requests_from_their_traceparent(tmp_path):
    out = tmp_path / "runner.jsonl"
    env = child_env()
    env.update(OTEL_NPU_TRACES_FILE=str(out), OTEL_TRACES_EXPORTER="none", OTEL_NPU_DEVICE="cpu")
    done = subprocess.run([sys.executable, str(EXAMPLES / "model_runner.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"traces: {out}" in done.stdout
    spans = tracefile.read(str(out))
    requests = [s for s in spans if s.name == "llm_request"]
    # each request span continues the caller's trace from its traceparent
    assert sorted(r.trace_id for r in requests) == [f"{0xABC000 + i:032x}" for i in range(3)]
    assert sorted(r.parent_id for r in requests) == [f"{0xDEF000 + i:016x}" for i in range(3)]
    steps = tracefile.Forest(spans).steps
    assert [s.name for s in sorted(steps, key=lambda s: s.start_ns)] == ["Prefill", "Decode", "Decode", "Decode"]
    for step in steps:
        assert sorted(step.links) == sorted((r.trace_id, r.span_id) for r in requests)


def test_model_runner_run_plainly_is_quiet_and_says_where_its_traces_went(tmp_path):
    # Run with no OTEL_* variable and no collector, it once printed retry errors for 20 s and lost its traces.
    env = child_env()
    env.update(OTEL_NPU_DEVICE="cpu")
    done = subprocess.run([sys.executable, str(EXAMPLES / "model_runner.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower() and "4318" not in done.stderr, done.stderr
    files = list(tmp_path.glob("otel-npu-traces-*.jsonl"))
    assert len(files) == 1 and f"traces: {files[0].name}" in done.stdout, done.stdout
    assert "metrics: none" in done.stdout
    assert len(tracefile.Forest(tracefile.read(str(files[0]))).steps) == 4
