"""Reading traces files (and refusing bad ones, naming file and line) and the per-stage table's arithmetic."""

from __future__ import annotations

import math
import random

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import otel_npu
from otel_npu.cli import main, tracefile
from otel_npu.export.sinks import JsonLinesSpanExporter


@pytest.fixture
def traces_file(tmp_path):
    """A real file: otel-npu spans and a request span through JsonLinesSpanExporter, one line per span."""
    path = tmp_path / "traces.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(str(path))))
    otel_npu.configure(enabled=True, device="cpu", tracer_provider=provider)
    request = provider.get_tracer("app").start_span("llm_request")
    for kind in ("Prefill", "Decode", "Decode"):
        with otel_npu.step(kind, links=[request]):
            for stage in ("prepare input", "forward", "sample"):
                with otel_npu.capture(stage):
                    sum(range(1000))
    request.end()
    assert otel_npu.flush()
    provider.shutdown()
    return path


def test_a_real_file_reads_back_with_ids_parents_links_and_attributes(traces_file):
    spans = tracefile.read(str(traces_file))
    forest = tracefile.Forest(spans)
    assert sorted(s.name for s in forest.steps) == ["Decode", "Decode", "Prefill"]
    request = next(s for s in spans if s.name == "llm_request")
    for step in forest.steps:
        assert step.links == [(request.trace_id, request.span_id)]
        assert [k.name for k in forest.kids(step)] == ["prepare input", "forward", "sample"]
        assert all(k.attributes["otel_npu.step"] == step.name and k.parent_id == step.span_id
                   for k in forest.kids(step))
    assert all(len(s.trace_id) == 32 and len(s.span_id) == 16 and s.end_ns >= s.start_ns for s in spans)
    assert all(s.attributes["process.pid"] > 0 for s in spans if s.is_otel_npu)
    assert request.resource["service.name"].startswith("unknown_service")


@pytest.mark.parametrize("command", [["summary"], ["chrome-trace", "-o", "out.json"]])
def test_bad_files_get_an_error_naming_file_and_line(command, traces_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = traces_file.read_text().splitlines(keepends=True)
    cases = {
        "truncated.jsonl": ("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], ":4: the line is cut short"),
        "garbage.jsonl": (lines[0] + "hello world\n" + "".join(lines[1:]), ":2: not valid JSON"),
        "not-otlp.jsonl": (lines[0] + '{"resourceMetrics": []}\n', ':2: not an OTLP/JSON ExportTraceServiceRequest: '
                                                                   'no "resourceSpans"'),
        "base64-ids.jsonl": (lines[0].replace('"spanId":"', '"spanId":"AA=', 1),
                             ":1: not an OTLP/JSON ExportTraceServiceRequest: resourceSpans[0].scopeSpans[0]."
                             "spans[0].spanId should be 16 hex digits"),
        "empty.jsonl": ("\n", ": contains no spans"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        assert main([command[0], name, *command[1:]]) == 2
        err = capsys.readouterr().err
        assert f"{name}{message}" in err, err
    assert main([command[0], "missing.jsonl", *command[1:]]) == 2
    assert "missing.jsonl: cannot be opened: No such file or directory" in capsys.readouterr().err
    assert main([command[0], str(traces_file), *command[1:]]) == 0


def make_span(name: str, span_id: int, parent: int, start_ms: float, ms: float, **attrs) -> tracefile.Span:
    return tracefile.Span(trace_id="ab" * 16, span_id=f"{span_id:016x}", parent_id=f"{parent:016x}" if parent else "",
                          name=name, start_ns=int(start_ms * 1e6), end_ns=int((start_ms + ms) * 1e6),
                          attributes={"otel_npu.device": "cpu", **attrs}, resource={}, links=[])


def test_table_statistics_and_shares():
    rng = random.Random(7)
    forward_ms = [rng.uniform(1, 50) for _ in range(100)]
    spans, ids, t = [], iter(range(1, 10_000)), 0.0
    for ms in forward_ms:
        step = make_span("Decode", next(ids), 0, t, 2 * ms)
        spans.append(step)
        spans.append(make_span("forward", next(ids), int(step.span_id, 16), t, ms, **{"otel_npu.step": "Decode"}))
        t += 3 * ms
    spans.append(make_span("warm-up", next(ids), 0, t, 5.0))  # a capture outside any step
    rows = tracefile.stage_rows(spans)
    assert [(r.step_kind, r.stage, r.depth) for r in rows] == [
        ("Decode", "(step)", 0), ("Decode", "forward", 1), ("(no step)", "warm-up", 1)]
    forward = rows[1]
    ordered = sorted(forward_ms)
    assert forward.count == 100
    assert forward.mean == pytest.approx(sum(forward_ms) / 100, rel=1e-6)
    assert forward.percentile(50) == pytest.approx(ordered[49], rel=1e-6)  # nearest rank: ceil(0.5 * 100)
    assert forward.percentile(99) == pytest.approx(ordered[98], rel=1e-6)
    assert forward.share == pytest.approx(0.5, rel=1e-6)
    assert rows[0].share == pytest.approx(1.0) and math.isnan(rows[2].share)
    text = tracefile.format_table(rows)
    assert "Decode" in text.splitlines()[2] and "  forward" in text and "50.0%" in text
