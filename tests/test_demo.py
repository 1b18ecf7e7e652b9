"""``otel-npu demo`` end to end (a real transformers Llama on the CPU), and summary / chrome-trace on its file.

One demo run (a subprocess: the demo installs its TracerProvider globally, as an application does) is
shared by the tests of this module.
"""

from __future__ import annotations

import collections
import json
import math
import re
import subprocess
import sys

import pytest

from otel_npu.cli import chrome_trace, demo, tracefile

from .support import child_env

pytest.importorskip("transformers", reason="the demo extra is not installed: pip install -e '.[demo]'")

STEPS, REQUESTS = 12, 4
STAGES = ["prepare input", "forward", "post process", "sample"]


def otel_npu_cli(*args: str, cwd, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_npu", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    done = otel_npu_cli("demo", "--device", "cpu", "--model-size", "tiny", "--steps", str(STEPS), "--requests",
                        str(REQUESTS), "--per-layer", "--no-progress", cwd=cwd,
                        env=child_env(OTEL_NPU_LOG_DURATIONS="1"))
    assert done.returncode == 0, done.stderr
    files = list(cwd.glob("otel-npu-traces-*.jsonl"))
    assert len(files) == 1, files
    return done, files[0], tracefile.read(str(files[0]))


def test_demo_writes_its_traces_to_the_file_it_names(run):
    done, path, _ = run
    assert f"Traces written to {path.name}." in done.stdout
    assert f"otel-npu summary {path.name}" in done.stdout
    assert "CPU backend: stage times are host times" in done.stdout


def test_every_request_has_its_own_trace_and_steps_link_to_their_requests(run):
    _, _, spans = run
    forest = tracefile.Forest(spans)
    requests = [s for s in spans if s.name == "llm_request"]
    assert len(requests) == REQUESTS
    assert len({r.trace_id for r in requests}) == REQUESTS and all(not r.parent_id for r in requests)
    request_ids = {(r.trace_id, r.span_id) for r in requests}
    kinds = collections.Counter(s.name for s in forest.steps)
    assert set(kinds) == {"Prefill", "Decode"} and sum(kinds.values()) <= STEPS
    for step in forest.steps:
        assert step.links and set(step.links) <= request_ids
        assert [k.name for k in forest.kids(step)] == STAGES
        assert step.attributes["demo.batch_size"] == len(step.links)
    # requests are admitted over time: some Prefill step also decodes requests admitted earlier
    assert any(s.name == "Prefill" and len(s.links) > 1 for s in forest.steps)
    for request in requests:  # its first step is a Prefill; each step it is in gives it one token
        served = sorted((s for s in forest.steps if (request.trace_id, request.span_id) in s.links),
                        key=lambda s: s.start_ns)
        assert served[0].name == "Prefill"
        assert len(served) == request.attributes["gen_ai.usage.completion_tokens"]
        assert request.start_ns <= served[0].start_ns and served[-1].end_ns <= request.end_ns


def test_per_layer_captures_nest_under_forward(run):
    _, _, spans = run
    forest = tracefile.Forest(spans)
    forward = next(s for s in spans if s.name == "forward")
    layer_names = [k.name for k in forest.kids(forward)]
    assert {"embed_tokens", "layers.0", "layers.1", "norm"} <= set(layer_names)
    layer = next(k for k in forest.kids(forward) if k.name == "layers.1")
    assert {"layers.1.self_attn", "layers.1.mlp"} <= {k.name for k in forest.kids(layer)}
    assert layer.attributes["otel_npu.module"] == "LlamaDecoderLayer"


def test_duration_lines_are_the_seeds_format(run):
    done, _, spans = run
    lines = [line for line in done.stderr.splitlines() if line.startswith("Profile execute duration")]
    steps = tracefile.Forest(spans).steps
    assert len(lines) == len(steps)
    pattern = re.compile(r"Profile execute duration \[(Prefill|Decode)\]:( \[[^\]]+\]:\d+\.\d\dms)+$")
    assert all(pattern.match(line) for line in lines), lines[:2]
    assert all("[prepare input]:" in line and "[sample]:" in line for line in lines)


def stage_table_from_the_file(path) -> dict[tuple[str, str], list[float]]:
    """Durations (ms) per (step kind, stage directly under a step; "(step)" for the step itself), read from the
    OTLP/JSON lines with nothing but ``json``: the test's own reading, not otel-npu's."""
    spans = {}
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    kind = next((kv["value"].get("stringValue") for kv in s.get("attributes", [])
                                 if kv["key"] == "otel_npu.kind"), None)
                    ms = (int(s["endTimeUnixNano"]) - int(s["startTimeUnixNano"])) / 1e6
                    spans[(s["traceId"], s["spanId"])] = (s["name"], s.get("parentSpanId", ""), ms, kind)
    table: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for (trace_id, _), (name, parent, ms, kind) in spans.items():
        if kind == "step":
            table[(name, "(step)")].append(ms)
        elif (trace_id, parent) in spans and spans[(trace_id, parent)][3] == "step":
            table[(spans[(trace_id, parent)][0], name)].append(ms)
    return table


_ROW = re.compile(r"^(?P<kind>\S+)?\s+(?P<stage>\(step\)|\S.*?)\s+(?P<count>\d+)\s+(?P<mean>\d+\.\d{3})\s+"
                  r"(?P<p50>\d+\.\d{3})\s+\d+\.\d{3}\s+(?P<share>\d+\.\d)%$")


def printed_rows(text: str) -> dict[tuple[str, str], dict]:
    """The rows of a printed stage table: (step kind, stage) -> count, mean, p50, share (%)."""
    rows, kind = {}, None
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            kind = m["kind"] or kind
            rows.setdefault((kind, m["stage"]), {"count": int(m["count"]), "mean": float(m["mean"]),
                                                  "p50": float(m["p50"]), "share": float(m["share"])})
    return rows


def test_the_demo_table_and_summary_of_its_file_agree_with_the_file(run, tmp_path):
    """Both tables (the demo's and ``otel-npu summary``'s) against the numbers the test computes from the
    file itself: count, mean, nearest-rank p50 and share of each stage directly under a step."""
    done, path, _ = run
    summary = otel_npu_cli("summary", str(path), cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    expected = stage_table_from_the_file(path)
    assert {kind for kind, _ in expected} == {"Prefill", "Decode"}
    for printed in (printed_rows(done.stdout), printed_rows(summary.stdout)):
        for (kind, stage), durations in expected.items():
            row = printed[(kind, stage)]
            ordered = sorted(durations)
            assert row["count"] == len(durations), (kind, stage)
            assert row["mean"] == pytest.approx(sum(durations) / len(durations), abs=0.0005), (kind, stage)
            assert row["p50"] == pytest.approx(ordered[math.ceil(len(ordered) / 2) - 1], abs=0.0005), (kind, stage)
            share = 100 * sum(durations) / sum(expected[(kind, "(step)")])
            assert row["share"] == pytest.approx(share, abs=0.05), (kind, stage)
        assert {key for key in printed if key[1] == "(step)"} == {key for key in expected if key[1] == "(step)"}


def test_chrome_trace_has_a_track_per_stream_and_the_host_nested_stages_and_request_arrows(run, tmp_path):
    _, path, spans = run
    out = tmp_path / "trace.json"
    done = otel_npu_cli("chrome-trace", str(path), "-o", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = json.loads(out.read_text())["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "cpu thread:MainThread" in names.values() and "host (capture points)" in names.values()
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(spans)
    by_track = collections.defaultdict(list)
    for e in slices:
        by_track[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    for track, intervals in by_track.items():  # a track's slices nest or are disjoint (1 ns of rounding)
        for a0, a1 in intervals:
            for b0, b1 in intervals:
                assert a1 <= b0 + 0.001 or b1 <= a0 + 0.001 or (a0 <= b0 and b1 <= a1 + 0.001) or \
                    (b0 <= a0 and a1 <= b1 + 0.001), (names[track], (a0, a1), (b0, b1))
    otel = [s for s in spans if s.is_otel_npu]
    assert sum(e["ph"] == "i" for e in events) == len(otel)
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert set(starts) == set(ends) and len(starts) == sum(len(s.links) for s in tracefile.Forest(spans).steps)
    for flow_id, start in starts.items():
        assert names[(start["pid"], start["tid"])].startswith("requests ")
        assert any(e["ts"] <= start["ts"] <= e["ts"] + e["dur"] and e["name"] == "llm_request"
                   for e in slices if (e["pid"], e["tid"]) == (start["pid"], start["tid"]))
        end = ends[flow_id]
        assert any(e["ts"] == end["ts"] and e["cat"] == "step" for e in slices
                   if (e["pid"], e["tid"]) == (end["pid"], end["tid"]))


def test_explicit_device_that_is_missing_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = otel_npu_cli("demo", "--device", "cuda", cwd=tmp_path, env=child_env())
    assert done.returncode == 2
    assert "--device cuda is not usable here" in done.stderr
    assert not list(tmp_path.glob("*.jsonl"))


def test_destination_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env: dict[str, str] = {}
    path = demo.configure_destination(env)
    assert env == {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_NPU_TRACES_FILE": path}
    assert path.startswith("otel-npu-traces-") and path.endswith(".jsonl")
    assert demo.describe_destinations(env) == [f"written to {path}"]

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert demo.configure_destination(env) is None and "OTEL_NPU_TRACES_FILE" not in env
    assert "OTEL_METRICS_EXPORTER" not in env, "with a collector, the stage metrics go there too"
    assert demo.describe_destinations(env) == ["exported over OTLP (http/protobuf) to http://collector:4318/v1/traces"]
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert demo.describe_destinations(env) == ["exported over OTLP (grpc) to http://collector:4317"]

    env = {"OTEL_NPU_TRACES_FILE": "mine.jsonl"}
    assert demo.configure_destination(env) is None and env["OTEL_TRACES_EXPORTER"] == "none"


def test_chrome_trace_builder_needs_no_file(run):
    _, _, spans = run
    document = chrome_trace.build(spans, source="x.jsonl")
    assert document["otherData"]["origin_unix_nano"] == str(min(s.start_ns for s in spans))
