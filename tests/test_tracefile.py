"""Reading traces files (and refusing bad ones, naming file and line) and the per-stage table's arithmetic."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import otel_npu
from otel_npu.cli import main, tracefile
from otel_npu.export.sinks.file import JsonLinesSpanExporter


#: Spans the ``traces_file`` fixture writes, counted from its own loops: three steps of three stages, and the
#: request span.
SPANS_IN_TRACES_FILE = 3 * (1 + 3) + 1


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
        "truncated.jsonl": ("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], ":4: cut short"),
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


# -- OTLP/JSON written by others, and several files -----------------------------------------------------------

def _kv(key, value):
    return {"key": key, "value": value}


def foreign_request(trace="0123456789abcdef0123456789abcdef", *, status=None, lead=None) -> dict:
    """An ExportTraceServiceRequest as other writers make it: enums by name, array-valued resource
    attributes, int64 as a JSON number, doubles as "NaN"/"Infinity" strings (the protobuf JSON mapping)."""
    device = {"stringValue": "cpu"}
    step = {"traceId": trace, "spanId": "00000000000000a1", "name": "Decode", "kind": "SPAN_KIND_INTERNAL",
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": 1700000000004000000,
            "status": status if status is not None else {"code": "STATUS_CODE_ERROR", "message": "boom"},
            "attributes": [_kv("otel_npu.device", device), _kv("otel_npu.kind", {"stringValue": "step"}),
                           _kv("otel_npu.host_lead_us", lead or {"doubleValue": "NaN"}),
                           _kv("weird", {"doubleValue": "-Infinity"}), _kv("big", {"intValue": 12}),
                           _kv("flag", {"boolValue": True}), _kv("raw", {"bytesValue": "AAE="}),
                           _kv("nested", {"kvlistValue": {"values": [_kv("a", {"doubleValue": "Infinity"})]}})]}
    child = {"traceId": trace, "spanId": "00000000000000a2", "parentSpanId": "00000000000000a1",
             "name": "forward", "kind": 1, "startTimeUnixNano": "1700000000001000000",
             "endTimeUnixNano": "1700000000003000000", "status": {},
             "attributes": [_kv("otel_npu.device", device), _kv("otel_npu.step", {"stringValue": "Decode"}),
                            _kv("otel_npu.host_lead_us", {"doubleValue": 12.5})]}
    resource = {"attributes": [_kv("service.name", {"arrayValue": {"values": [{"stringValue": "a"},
                                                                               {"stringValue": "b"}]}}),
                               _kv("process.pid", {"arrayValue": {"values": [{"intValue": "7"}]}})]}
    return {"resourceSpans": [{"resource": resource, "scopeSpans": [{"scope": {"name": "x"}, "spans": [step, child]}]}]}


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"bare {token} in the Chrome trace JSON")
    return json.loads(text, parse_constant=refuse)


def test_valid_otlp_json_written_by_others_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lines.jsonl").write_text(json.dumps(foreign_request()) + "\n")
    # pretty-printed: one request over many lines, and a second one after it
    (tmp_path / "pretty.json").write_text(json.dumps(foreign_request(), indent=2) + "\n"
                                          + json.dumps(foreign_request("f" * 32), indent=2) + "\n")
    for name, count in (("lines.jsonl", 2), ("pretty.json", 4)):
        spans = tracefile.read(name)
        assert len(spans) == count
        step = next(s for s in spans if s.name == "Decode")
        assert step.status_code == 2 and math.isnan(step.attributes["otel_npu.host_lead_us"])
        assert step.attributes["weird"] == -math.inf and step.attributes["nested"] == {"a": math.inf}
        assert step.resource["service.name"] == ["a", "b"]
        assert main(["summary", name]) == 0
        assert "Decode" in capsys.readouterr().out
        assert main(["chrome-trace", name, "-o", "out.json"]) == 0, capsys.readouterr().err
        document = strict_json((tmp_path / "out.json").read_text())  # JSON.parse accepts it: no bare NaN
        slices = [e for e in document["traceEvents"] if e["ph"] == "X"]
        assert len(slices) == count
        decode = next(e for e in slices if e["name"] == "Decode")
        assert decode["args"]["otel_npu.host_lead_us"] == "NaN" and decode["args"]["status"] == "ERROR"
        process = next(e for e in document["traceEvents"] if e["name"] == "process_name")
        assert process["args"]["name"] == '["a", "b"] (pid [7])'


@pytest.mark.parametrize("content, line, reason", [
    ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "x", "value": {"doubleValue": NaN}}]'
     '}]}]}]}', 1, "not valid JSON: bare NaN"),
    (json.dumps(foreign_request(status={"code": "STATUS_CODE_MAYBE"})), 1,
     "status.code should be 0, 1, 2 or STATUS_CODE_UNSET, STATUS_CODE_OK, STATUS_CODE_ERROR, got 'STATUS_CODE_MAYBE'"),
    (json.dumps(foreign_request(lead={"doubleValue": "fast"})), 1,
     "doubleValue should be a number or \"NaN\", \"Infinity\", \"-Infinity\", got 'fast'"),
    ("\n\n" + json.dumps(foreign_request(), indent=2)[:300], 3, "cut short"),
    (json.dumps(foreign_request(), indent=2).replace('"boolValue": true', '"boolValue": "yes"'), 1,
     "boolValue should be true or false, got 'yes'"),
])
def test_invalid_otlp_json_is_refused_with_file_line_and_reason(content, line, reason, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["summary", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}: " in err and reason in err, err


def test_several_files_as_the_readmes_glob_gives_them(traces_file, tmp_path, capsys):
    # The README's `otel-npu summary otel-npu-traces-*.jsonl` once the demo has run twice.
    first = tmp_path / "otel-npu-traces-20260101-000000.jsonl"
    second = tmp_path / "otel-npu-traces-20260101-000100.jsonl"
    first.write_text(traces_file.read_text())
    second.write_text(json.dumps(foreign_request()) + "\n")
    total = SPANS_IN_TRACES_FILE + 2  # and the foreign request's step and child
    for command in ("otel-npu summary otel-npu-traces-*.jsonl",
                    "otel-npu chrome-trace otel-npu-traces-*.jsonl -o trace.json"):
        done = subprocess.run(command.replace("otel-npu", f"{sys.executable} -m otel_npu", 1), shell=True,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{total} spans" in done.stdout, done.stdout
    slices = [e for e in strict_json((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == total
    # the same file twice: its spans once
    capsys.readouterr()
    assert main(["summary", str(first), str(first)]) == 0
    out = capsys.readouterr().out
    assert f": {SPANS_IN_TRACES_FILE} spans;" in out and f"{2 * SPANS_IN_TRACES_FILE} spans" not in out, out


# -- several ranks: per-rank table, skew, one track per rank -------------------------------------------------

def two_rank_server(steps: int = 20):
    """An engine step per step, with a Decode step of each of two TP ranks (separate processes) under it, each
    with a forward stage; rank 1 starts its forward 0.5 ms later and ends it 1 ms later in every step."""
    spans, ids, t = [], iter(range(1, 100_000)), 0.0
    for n in range(steps):
        trace = f"{n + 1:032x}"
        engine = make_span("engine step", next(ids), 0, t, 10.0, **{"otel_npu.kind": "step"})
        engine.trace_id = trace
        engine.resource = {"service.name": "vllm", "process.pid": 100}
        spans.append(engine)
        for rank in (0, 1):
            ranks = {"vllm.tp_rank": rank, "vllm.pp_rank": 0, "vllm.dp_rank": 0, "otel_npu.rank": rank,
                     "otel_npu.clock_error_us": 20.0 + rank}
            step = make_span("Decode", next(ids), int(engine.span_id, 16), t + 1, 8.0 + rank,
                             **{"otel_npu.kind": "step"}, **ranks)
            forward = make_span("forward", next(ids), int(step.span_id, 16), t + 2 + 0.5 * rank, 5.0 + 0.5 * rank,
                                **{"otel_npu.step": "Decode"}, **ranks)
            for span in (step, forward):
                span.trace_id = trace
                span.resource = {"service.name": "vllm", "process.pid": 200 + rank}
            spans += [step, forward]
        t += 12.0
    return spans


def test_the_engine_steps_table_leaves_the_ranks_steps_to_theirs():
    rows = tracefile.stage_rows(two_rank_server())
    assert [(r.step_kind, r.stage, r.count) for r in rows] == [
        ("engine step", "(step)", 20), ("Decode", "(step)", 40), ("Decode", "forward", 40)]


def test_per_rank_times_and_the_skew_between_ranks_with_its_clock_bound():
    spans = two_rank_server()
    rank = tracefile.rank_rows(spans)
    assert [(r.step_kind, r.stage, r.rank, len(r.durations_ms)) for r in rank] == [
        ("Decode", "(step)", "dp0 pp0 tp0", 20), ("Decode", "(step)", "dp0 pp0 tp1", 20),
        ("Decode", "forward", "dp0 pp0 tp0", 20), ("Decode", "forward", "dp0 pp0 tp1", 20)]
    assert {round(d, 6) for d in rank[3].durations_ms} == {5.5}
    skew = {(r.step_kind, r.stage): r for r in tracefile.skew_rows(spans)}
    forward = skew[("Decode", "forward")]
    assert len(forward.start_ms) == 20
    assert {round(v, 6) for v in forward.start_ms} == {0.5} and {round(v, 6) for v in forward.end_ms} == {1.0}
    assert {round(v, 6) for v in forward.bound_ms} == {0.041}  # 20 µs + 21 µs: each rank's clock on its own
    assert {round(v, 6) for v in skew[("Decode", "(step)")].end_ms} == {1.0}
    text = tracefile.format_ranks(rank, list(skew.values()))
    assert "2 ranks: dp0 pp0 tp0, dp0 pp0 tp1" in text and "± clock" in text
    line = next(l for l in text.splitlines() if l.split()[:2] == ["forward", "20"])
    assert line.split()[2:] == ["0.500", "0.500", "0.500", "1.000", "1.000", "1.000", "41.0"]
    # one rank only: no per-rank view
    assert tracefile.rank_rows([s for s in spans if s.attributes.get("vllm.tp_rank") != 1]) == []


def test_summary_prints_the_rank_view_and_chrome_trace_gives_each_rank_its_process(monkeypatch, capsys):
    from otel_npu.cli import chrome_trace

    spans = two_rank_server(3)
    monkeypatch.setattr(tracefile, "read_or_report", lambda files, command: spans)
    assert main(["summary", "server.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "Per rank (2 ranks" in out and "Rank skew" in out and "engine step" in out
    document = chrome_trace.build(spans)
    names = {e["pid"]: e["args"]["name"] for e in document["traceEvents"] if e.get("name") == "process_name"}
    assert sorted(names.values()) == ["vllm (pid 100)", "vllm dp0 pp0 tp0 (pid 200)", "vllm dp0 pp0 tp1 (pid 201)"]
    order = {names[e["pid"]]: e["args"]["sort_index"] for e in document["traceEvents"]
             if e.get("name") == "process_sort_index"}
    assert order["vllm (pid 100)"] < order["vllm dp0 pp0 tp0 (pid 200)"] < order["vllm dp0 pp0 tp1 (pid 201)"]
    arrows = [e for e in document["traceEvents"] if e.get("cat") == "rank"]
    starts = [e for e in arrows if e["ph"] == "s"]
    assert len(starts) == 6 and {e["pid"] for e in starts} == {100}
    assert sorted(e["pid"] for e in arrows if e["ph"] == "f") == [200, 200, 200, 201, 201, 201]
