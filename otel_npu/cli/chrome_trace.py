"""``otel-npu chrome-trace FILE... -o OUT.json``: traces files as Chrome trace-event JSON (Perfetto, chrome://tracing).

Layout, per process (resource ``service.name`` + ``process.pid``):

* one track per device stream (``otel_npu.device`` + ``otel_npu.stream``): steps and their stages as
  nested slices at their device-measured times;
* a ``host`` track: where the host reached each capture point (span start − ``otel_npu.host_lead_us``),
  an instant per capture, with how far ahead of the device the host was;
* the application's own spans (requests: ``llm_request``) on ``requests`` tracks, one trace per lane,
  as few lanes as keep a lane's slices from overlapping;
* a flow arrow from each request to every step linked to it (``step(links=...)``);
* several ranks (a vLLM server with tensor or pipeline parallelism: each rank's spans carry ``vllm.tp_rank``...):
  each rank is its own process, named and ordered by its rank (``dp0 pp0 tp1``) after the engine's process,
  and an arrow goes from each engine step to every rank's step under it: one track per rank under each step.

Times are microseconds from the earliest span; ``otherData.origin_unix_nano`` says when that was. The output is
strict JSON (``JSON.parse`` reads it): attribute values that are not finite numbers are written as the strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"``, as OTLP/JSON writes them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

HELP = "convert a traces file into Chrome trace-event JSON (Perfetto, chrome://tracing)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", metavar="FILE", nargs="+",
                        help="traces files: OTLP/JSON (lines or pretty-printed); several go into one trace")
    parser.add_argument("-o", "--output", metavar="OUT.json", required=True, help="where to write the JSON")


def run(args: argparse.Namespace) -> int:
    from . import tracefile

    spans = tracefile.read_or_report(args.files, "chrome-trace")
    if spans is None:
        return 2
    document = build(spans, source=", ".join(os.path.basename(f) for f in args.files))
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            json.dump(document, out, separators=(",", ":"), allow_nan=False)
    except OSError as exc:
        print(f"otel-npu chrome-trace: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    slices = sum(1 for e in document["traceEvents"] if e["ph"] == "X")
    print(f"wrote {args.output}: {slices} slices from {len(spans)} spans; open it in https://ui.perfetto.dev "
          f"or chrome://tracing")
    return 0


class _Tracks:
    """pid/tid numbers and their metadata events."""

    def __init__(self) -> None:
        self.pids: dict[Any, int] = {}
        self.tids: dict[tuple[int, Any], int] = {}
        self.meta: list[dict] = []

    def pid(self, key: Any, name: str, preferred: Any, order: int | None = None) -> int:
        pid = self.pids.get(key)
        if pid is None:
            taken = set(self.pids.values())
            pid = preferred if isinstance(preferred, int) and preferred > 0 and preferred not in taken else \
                max(taken | {0}) + 1
            self.pids[key] = pid
            self.meta.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
            if order is not None:
                self.meta.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                                  "args": {"sort_index": order}})
        return pid

    def tid(self, pid: int, key: Any, name: str, order: int) -> int:
        tid = self.tids.get((pid, key))
        if tid is None:
            tid = self.tids[(pid, key)] = 1 + sum(1 for p, _ in self.tids if p == pid)
            self.meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            self.meta.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                              "args": {"sort_index": order}})
        return tid


def build(spans: list, source: str = "") -> dict:
    """The Chrome trace-event document for ``spans`` (``tracefile.Span`` records)."""
    from . import tracefile

    origin = min(s.start_ns for s in spans)

    def us(ns: int) -> float:
        return round((ns - origin) / 1000.0, 3)

    tracks = _Tracks()
    events: list[dict] = []
    where: dict[tuple[str, str], tuple[int, int]] = {}  # span -> (pid, tid) of its slice

    def process_key(span: Any) -> tuple[str, str | None]:
        # Other writers may send any AnyValue here (an array, say): shown as text, used as a key as text.
        pid = span.resource.get(tracefile.PID_ATTR)
        return _text(span.resource.get("service.name", "unknown service")), None if pid is None else _text(pid)

    # the rank of each process whose otel-npu spans say one (several ranks: one process each)
    ranks: dict[tuple[str, str | None], str] = {}
    for span in spans:
        if span.is_otel_npu:
            rank = tracefile.rank_of(span)
            if rank is not None:
                ranks.setdefault(process_key(span), rank)
    rank_order = {rank: n + 1 for n, rank in enumerate(sorted(set(ranks.values())))}

    def process_of(span: Any) -> int:
        key = process_key(span)
        service, pid_text = key
        pid = span.resource.get(tracefile.PID_ATTR)
        preferred = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
        rank = ranks.get(key)
        name = service if rank is None else f"{service} {rank}"
        order = None if not rank_order else rank_order.get(rank, 0) if rank is not None else 0
        return tracks.pid(key, f"{name} (pid {pid_text})" if pid is not None else name, preferred, order)

    forest = tracefile.Forest(spans)
    steps = {(s.trace_id, s.span_id) for s in forest.steps}

    # device streams and the host
    for span in (s for s in spans if s.is_otel_npu):
        pid = process_of(span)
        device = str(span.attributes.get(tracefile.DEVICE_ATTR))
        stream = str(span.attributes.get(tracefile.STREAM_ATTR, "?"))
        tid = tracks.tid(pid, ("stream", device, stream), f"{device} {stream}", 1)
        key = (span.trace_id, span.span_id)
        where[key] = (pid, tid)
        args = {k: _finite(v) for k, v in span.attributes.items()
                if k.startswith(("otel_npu.", "vllm.")) or k == tracefile.ERROR_TYPE_ATTR}
        args.update(trace_id=span.trace_id, span_id=span.span_id)
        if span.links:
            args["links"] = [f"{t}/{s}" for t, s in span.links]
        if span.status_code == 2:
            args["status"] = "ERROR"
        events.append({"ph": "X", "name": span.name, "cat": "step" if key in steps else "stage", "pid": pid,
                       "tid": tid, "ts": us(span.start_ns), "dur": round(span.duration_ms * 1000.0, 3),
                       "args": args})
        lead_us = span.attributes.get(tracefile.HOST_LEAD_ATTR)
        if isinstance(lead_us, (int, float)) and not isinstance(lead_us, bool) and math.isfinite(lead_us):
            host = tracks.tid(pid, "host", "host (capture points)", 0)
            events.append({"ph": "i", "s": "t", "name": span.name, "cat": "host", "pid": pid, "tid": host,
                           "ts": us(span.start_ns - round(lead_us * 1000)),
                           "args": {"device_start_after_ms": round(lead_us / 1000, 6)}})

    # the application's spans (requests), one trace per lane
    app = [s for s in spans if not s.is_otel_npu]
    by_trace: dict[tuple[Any, str], list] = {}
    for span in app:
        by_trace.setdefault((process_of(span), span.trace_id), []).append(span)
    lane_ends: dict[int, list[int]] = {}
    for (pid, _), members in sorted(by_trace.items(), key=lambda kv: min(s.start_ns for s in kv[1])):
        begin, end = min(s.start_ns for s in members), max(s.end_ns for s in members)
        ends = lane_ends.setdefault(pid, [])
        lane = next((i for i, last in enumerate(ends) if last <= begin), None)
        if lane is None:
            lane = len(ends)
            ends.append(end)
        else:
            ends[lane] = end
        tid = tracks.tid(pid, ("lane", lane), f"requests {lane + 1}", 100 + lane)
        for span in members:
            where[(span.trace_id, span.span_id)] = (pid, tid)
            args = {k: _finite(v) for k, v in span.attributes.items()}
            args.update(trace_id=span.trace_id, span_id=span.span_id)
            events.append({"ph": "X", "name": span.name, "cat": "request", "pid": pid, "tid": tid,
                           "ts": us(span.start_ns), "dur": round(span.duration_ms * 1000.0, 3), "args": args})

    # request -> step arrows, one per link whose request is in the file
    by_id = forest.by_id
    flow = 0
    for step in forest.steps:
        for link in step.links:
            request = by_id.get(link)
            if request is None or link not in where:
                continue
            flow += 1
            ts = us(min(max(step.start_ns, request.start_ns), request.end_ns))
            pid, tid = where[link]
            events.append({"ph": "s", "id": flow, "name": "served by", "cat": "link", "pid": pid, "tid": tid,
                           "ts": ts})
            pid, tid = where[(step.trace_id, step.span_id)]
            events.append({"ph": "f", "bp": "e", "id": flow, "name": "served by", "cat": "link", "pid": pid,
                           "tid": tid, "ts": us(step.start_ns)})

    # engine step -> each rank's step under it (another process: Perfetto draws no nesting across processes)
    for step in forest.steps:
        parent = forest.parent(step)
        key, up = (step.trace_id, step.span_id), None if parent is None else (parent.trace_id, parent.span_id)
        if up is None or up not in steps or key not in where or up not in where or where[up][0] == where[key][0]:
            continue
        flow += 1
        pid, tid = where[up]
        events.append({"ph": "s", "id": flow, "name": "rank step", "cat": "rank", "pid": pid, "tid": tid,
                       "ts": us(max(parent.start_ns, min(step.start_ns, parent.end_ns)))})
        pid, tid = where[key]
        events.append({"ph": "f", "bp": "e", "id": flow, "name": "rank step", "cat": "rank", "pid": pid,
                       "tid": tid, "ts": us(step.start_ns)})

    events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    return {"traceEvents": tracks.meta + events, "displayTimeUnit": "ms",
            "otherData": {"source": source, "origin_unix_nano": str(origin),
                          "generator": "otel-npu chrome-trace"}}


_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its OTLP/JSON string (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else _NON_FINITE[value]
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(_finite(value))
