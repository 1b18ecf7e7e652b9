"""Reading a traces file, and the per-stage table made from its spans.

The file is what ``OTEL_NPU_TRACES_FILE`` (and the demo) write, and what the OpenTelemetry Collector's
``file`` exporter writes: OTLP/JSON lines, one ``ExportTraceServiceRequest`` per line, trace and span ids in
hex, enums as integers, 64-bit integers as strings (or numbers). Anything else is refused with a
``TraceFileError`` that names the file and the line.

Spans become ``Span`` records, which the demo also makes from the SDK's ``ReadableSpan`` objects (so that
its closing table and ``otel-npu summary`` of its file are computed the same way).

How a step is recognised: an otel-npu span (it has ``otel_npu.device``) with ``otel_npu.kind = "step"``
(files written before that marker existed: one without ``otel_npu.step`` whose children carry
``otel_npu.step`` equal to its name). The stages of a step are its descendants.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Iterable, Iterator

# The attribute names the readers rely on (chrome_trace.py uses them through this module too).
from ..integrations.vllm import ATTR_DP_RANK, ATTR_PP_RANK, ATTR_TP_RANK
from ..spans.attributes import ATTR_CLOCK_ERROR as CLOCK_ERROR_ATTR
from ..spans.attributes import ATTR_DEVICE as DEVICE_ATTR
from ..spans.attributes import ATTR_ERROR_TYPE as ERROR_TYPE_ATTR  # noqa: F401  (used by chrome_trace)
from ..spans.attributes import ATTR_HOST_LEAD as HOST_LEAD_ATTR  # noqa: F401  (used by chrome_trace)
from ..spans.attributes import ATTR_KIND as KIND_ATTR
from ..spans.attributes import ATTR_PID as PID_ATTR  # noqa: F401  (used by chrome_trace)
from ..spans.attributes import ATTR_RANK as RANK_ATTR
from ..spans.attributes import ATTR_STEP as STEP_ATTR
from ..spans.attributes import ATTR_STREAM as STREAM_ATTR  # noqa: F401  (used by chrome_trace)

_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")


class TraceFileError(ValueError):
    """A traces file that cannot be read; the message names the file and the line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


@dataclasses.dataclass
class Span:
    """One span, as much of it as the summary and the Chrome trace need. Ids are lower-case hex."""

    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    links: list[tuple[str, str]]  # (trace_id, span_id)
    status_code: int = 0  # 0 unset, 1 ok, 2 error

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def is_otel_npu(self) -> bool:
        return DEVICE_ATTR in self.attributes


# -- reading ---------------------------------------------------------------------------------------------

def read(path: str) -> list[Span]:
    """All spans in the OTLP/JSON file ``path``: ``ExportTraceServiceRequest`` objects one after another, one
    per line (JSON lines, as otel-npu and the Collector's ``file`` exporter write them) or spread over several
    lines (pretty-printed). Read as the OTLP/JSON encoding allows: ids in hex, enums by number or by name,
    64-bit integers as strings or numbers, doubles as numbers or ``"NaN"``/``"Infinity"``/``"-Infinity"``.
    Raises ``TraceFileError`` naming the file, the line (where the offending request begins) and the reason
    for a file that cannot be opened, is not JSON (bare ``NaN`` tokens included: not JSON; a cut-short end
    says so) or not ``ExportTraceServiceRequest`` objects, and for a file without any span."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise TraceFileError(path, None, f"cannot be opened: {exc.strerror or exc}") from None
    with handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TraceFileError(path, line, f"not UTF-8 text (byte {exc.start}): not an OTLP/JSON traces file") from None
    spans: list[Span] = []
    decoder = json.JSONDecoder(parse_constant=_refuse_constant)
    pos, size = 0, len(text)
    while True:
        while pos < size and text[pos] in " \t\r\n":
            pos += 1
        if pos >= size:
            break
        line = text.count("\n", 0, pos) + 1
        try:
            message, pos = decoder.raw_decode(text, pos)
        except _BareConstant as exc:
            raise TraceFileError(path, line, f"not valid JSON: bare {exc} (OTLP/JSON writes a double that is "
                                 f"not a number as the string \"{exc}\")") from None
        except json.JSONDecodeError as exc:
            if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated"):
                raise TraceFileError(path, line, "cut short: the file ends inside a JSON value (it was "
                                     "truncated, or was still being written)") from None
            raise TraceFileError(path, exc.lineno, f"not valid JSON: {exc.msg} at column {exc.colno}") from None
        try:
            spans.extend(_spans_of_request(message))
        except _BadLine as exc:
            raise TraceFileError(path, line, f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    if not spans:
        raise TraceFileError(path, None, "contains no spans")
    return spans


def read_all(paths: Iterable[str]) -> tuple[list[Span], int]:
    """The spans of several files, in order, each span once: ``(spans, duplicates left out)`` (the same
    span in two files: a file given twice, or a copy)."""
    spans: list[Span] = []
    seen: set[tuple[str, str]] = set()
    duplicates = 0
    for path in paths:
        for span in read(path):
            key = (span.trace_id, span.span_id)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            spans.append(span)
    return spans, duplicates


def read_or_report(paths: str | list[str], command: str) -> list[Span] | None:
    """``read_all(paths)``, or ``None`` after printing ``otel-npu COMMAND: FILE:LINE: problem`` on stderr."""
    import sys

    try:
        spans, duplicates = read_all([paths] if isinstance(paths, str) else paths)
    except TraceFileError as exc:
        print(f"otel-npu {command}: {exc}", file=sys.stderr)
        return None
    if duplicates:
        print(f"otel-npu {command}: {duplicates} spans appear more than once (same trace and span id); "
              "each is counted once", file=sys.stderr)
    return spans


class _BareConstant(ValueError):
    pass


def _refuse_constant(token: str) -> Any:
    raise _BareConstant(token)


class _BadLine(Exception):
    pass


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise _BadLine(f"{what} should be a JSON {_KIND_NAMES[kind]}, got {type(value).__name__} {value!r:.60}")
    return value


_KIND_NAMES = {dict: "object", list: "array", str: "string"}


def _spans_of_request(message: Any) -> Iterator[Span]:
    _expect(message, dict, "the line")
    if "resourceSpans" not in message:
        raise _BadLine(f"no \"resourceSpans\" (keys: {', '.join(list(message)[:5]) or 'none'})")
    for i, rs in enumerate(_expect(message["resourceSpans"], list, "resourceSpans")):
        where = f"resourceSpans[{i}]"
        _expect(rs, dict, where)
        resource = _attributes(_expect(rs.get("resource", {}), dict, f"{where}.resource").get("attributes", []),
                               f"{where}.resource.attributes")
        for j, ss in enumerate(_expect(rs.get("scopeSpans", []), list, f"{where}.scopeSpans")):
            _expect(ss, dict, f"{where}.scopeSpans[{j}]")
            for k, span in enumerate(_expect(ss.get("spans", []), list, f"{where}.scopeSpans[{j}].spans")):
                yield _span(span, resource, f"{where}.scopeSpans[{j}].spans[{k}]")


def _span(obj: Any, resource: dict[str, Any], where: str) -> Span:
    _expect(obj, dict, where)
    links = []
    for n, link in enumerate(_expect(obj.get("links", []), list, f"{where}.links")):
        _expect(link, dict, f"{where}.links[{n}]")
        links.append((_id(link, "traceId", _HEX32, f"{where}.links[{n}]"),
                      _id(link, "spanId", _HEX16, f"{where}.links[{n}]")))
    start, end = _nanos(obj, "startTimeUnixNano", where), _nanos(obj, "endTimeUnixNano", where)
    status = obj.get("status") or {}
    return Span(
        trace_id=_id(obj, "traceId", _HEX32, where),
        span_id=_id(obj, "spanId", _HEX16, where),
        parent_id=_id(obj, "parentSpanId", _HEX16, where, optional=True),
        name=_expect(obj.get("name", ""), str, f"{where}.name"),
        start_ns=start,
        end_ns=end,
        attributes=_attributes(obj.get("attributes", []), f"{where}.attributes"),
        resource=resource,
        links=links,
        status_code=_status_code(_expect(status, dict, f"{where}.status"), f"{where}.status"),
    )


_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _status_code(status: dict, where: str) -> int:
    """``status.code``: an enum, by number or by name (the protobuf JSON mapping accepts both)."""
    code = status.get("code", 0)
    if code in _STATUS_NAMES:
        return _STATUS_NAMES[code]
    if code in (0, 1, 2) and not isinstance(code, bool):
        return int(code)
    raise _BadLine(f"{where}.code should be 0, 1, 2 or {', '.join(_STATUS_NAMES)}, got {code!r:.60}")


def _id(obj: dict, key: str, pattern: re.Pattern, where: str, optional: bool = False) -> str:
    value = obj.get(key, "")
    if optional and value == "":
        return ""
    if not isinstance(value, str) or not pattern.match(value.lower()):
        size = 32 if pattern is _HEX32 else 16
        raise _BadLine(f"{where}.{key} should be {size} hex digits (OTLP/JSON ids are hex), got {value!r:.60}")
    return value.lower()


def _nanos(obj: dict, key: str, where: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _BadLine(f"{where}.{key} is missing or not an integer: {value!r:.60}")
    try:
        return int(value)
    except ValueError:
        raise _BadLine(f"{where}.{key} is not an integer: {value!r:.60}") from None


def _attributes(items: Any, where: str) -> dict[str, Any]:
    out = {}
    for n, kv in enumerate(_expect(items, list, where)):
        _expect(kv, dict, f"{where}[{n}]")
        out[_expect(kv.get("key"), str, f"{where}[{n}].key")] = _any_value(kv.get("value", {}), f"{where}[{n}]")
    return out


_DOUBLE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _any_value(value: Any, where: str) -> Any:
    """An ``AnyValue`` as Python: str, bool, int, float (NaN and infinities included), list, dict, bytes
    (kept as their base64 text), ``None`` when empty."""
    _expect(value, dict, f"{where}.value")
    if "stringValue" in value:
        return _expect(value["stringValue"], str, f"{where}.value.stringValue")
    if "boolValue" in value:
        if not isinstance(value["boolValue"], bool):
            raise _BadLine(f"{where}.value.boolValue should be true or false, got {value['boolValue']!r:.60}")
        return value["boolValue"]
    if "intValue" in value:
        raw = value["intValue"]
        try:
            if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                raise ValueError
            number = int(raw)
            if not _INT64[0] <= number <= _INT64[1]:
                raise ValueError
            return number
        except ValueError:
            raise _BadLine(f"{where}.value.intValue should be an int64 (a JSON number or a string of digits), "
                           f"got {raw!r:.60}") from None
    if "doubleValue" in value:
        raw = value["doubleValue"]
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            if raw in _DOUBLE_NAMES:
                return _DOUBLE_NAMES[raw]
            try:
                number = float(raw)  # the protobuf JSON mapping also accepts a number in a string
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return number
        _bad_double(raw, where)
    if "arrayValue" in value:
        array = _expect(value["arrayValue"] or {}, dict, f"{where}.value.arrayValue")
        return [_any_value(v, f"{where}.value.arrayValue.values[{n}]")
                for n, v in enumerate(_expect(array.get("values", []), list, f"{where}.value.arrayValue.values"))]
    if "kvlistValue" in value:
        kvlist = _expect(value["kvlistValue"] or {}, dict, f"{where}.value.kvlistValue")
        return _attributes(kvlist.get("values", []), f"{where}.value.kvlistValue.values")
    if "bytesValue" in value:
        return _expect(value["bytesValue"], str, f"{where}.value.bytesValue")
    return None


def _bad_double(raw: Any, where: str) -> Any:
    raise _BadLine(f"{where}.value.doubleValue should be a number or \"NaN\", \"Infinity\", \"-Infinity\", "
                   f"got {raw!r:.60}")


def from_readable(span: Any) -> Span:
    """A ``Span`` record of an SDK ``ReadableSpan`` (the demo's in-process view of what it exports)."""
    ctx = span.context
    parent = span.parent
    return Span(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{parent.span_id:016x}" if parent is not None else "",
        name=span.name,
        start_ns=span.start_time,
        end_ns=span.end_time,
        attributes=dict(span.attributes or {}),
        resource=dict(span.resource.attributes) if span.resource is not None else {},
        links=[(f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") for link in span.links],
        status_code=int(span.status.status_code.value) if span.status is not None else 0,
    )


# -- structure -------------------------------------------------------------------------------------------

class Forest:
    """Spans indexed by id, with children lists and the steps among them."""

    def __init__(self, spans: Iterable[Span]) -> None:
        self.spans = list(spans)
        self.by_id = {(s.trace_id, s.span_id): s for s in self.spans}
        self.children: dict[tuple[str, str], list[Span]] = {}
        for s in self.spans:
            if s.parent_id:
                self.children.setdefault((s.trace_id, s.parent_id), []).append(s)
        for kids in self.children.values():
            kids.sort(key=lambda s: (s.start_ns, -s.end_ns))
        self.steps = [s for s in self.spans if self.is_step(s)]

    def kids(self, span: Span) -> list[Span]:
        return self.children.get((span.trace_id, span.span_id), [])

    def parent(self, span: Span) -> Span | None:
        return self.by_id.get((span.trace_id, span.parent_id)) if span.parent_id else None

    def is_step(self, span: Span) -> bool:
        if not span.is_otel_npu:
            return False
        if KIND_ATTR in span.attributes:
            return span.attributes[KIND_ATTR] == "step"
        if STEP_ATTR in span.attributes:
            return False
        return any(k.attributes.get(STEP_ATTR) == span.name for k in self.kids(span))

    def descendants(self, span: Span, within_step: bool = False) -> Iterator[Span]:
        """Children before their own children, siblings by start time. ``within_step``: not into a step under
        ``span`` (an engine's step has each rank's step under it: those are steps of their own)."""
        for kid in self.kids(span):
            if within_step and self.is_step(kid):
                continue
            yield kid
            yield from self.descendants(kid, within_step)


# -- the per-stage table ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    step_kind: str
    stage: str  # "(step)" for the step spans themselves
    depth: int  # 0: the step; 1: its stages; 2: captures inside those...
    durations_ms: list[float]
    share: float  # of the summed step time of this kind

    @property
    def count(self) -> int:
        return len(self.durations_ms)

    @property
    def mean(self) -> float:
        return sum(self.durations_ms) / len(self.durations_ms)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (``q`` in 0..100): a value that occurred."""
        ordered = sorted(self.durations_ms)
        rank = max(1, math.ceil(q / 100.0 * len(ordered)))
        return ordered[rank - 1]


def stage_rows(spans: Iterable[Span]) -> list[Row]:
    """Per step kind (in order of first appearance): the step row, then its stages in the order they first
    ran, each followed by the captures nested in it. Stages with the same name at the same place (``forward``
    of every Decode step) are one row. Captures outside any step form the kind ``(no step)``."""
    forest = Forest(spans)
    rows: dict[tuple[str, tuple[str, ...]], Row] = {}
    step_total: dict[str, float] = {}

    def add(kind: str, path: tuple[str, ...], ms: float) -> None:
        row = rows.get((kind, path))
        if row is None:
            row = rows[(kind, path)] = Row(kind, path[-1] if len(path) > 1 else "(step)", len(path) - 1, [], 0.0)
        row.durations_ms.append(ms)

    for step in sorted(forest.steps, key=lambda s: s.start_ns):
        step_total[step.name] = step_total.get(step.name, 0.0) + step.duration_ms
        add(step.name, (step.name,), step.duration_ms)
        paths = {(step.trace_id, step.span_id): (step.name,)}
        for span in forest.descendants(step, within_step=True):
            path = paths[(span.trace_id, span.span_id)] = paths[(span.trace_id, span.parent_id)] + (span.name,)
            add(step.name, path, span.duration_ms)

    in_steps = {(s.trace_id, s.span_id) for step in forest.steps for s in forest.descendants(step, True)}
    loose = [s for s in forest.spans if s.is_otel_npu and not forest.is_step(s)
             and (s.trace_id, s.span_id) not in in_steps]
    loose_ids = {(s.trace_id, s.span_id) for s in loose}
    for span in sorted(loose, key=lambda s: s.start_ns):
        names = [span.name]
        up = forest.parent(span)
        while up is not None and (up.trace_id, up.span_id) in loose_ids:
            names.append(up.name)
            up = forest.parent(up)
        add("(no step)", ("(no step)",) + tuple(reversed(names)), span.duration_ms)

    ordered = _tree_order(rows)
    for row in ordered:
        total = step_total.get(row.step_kind)
        row.share = sum(row.durations_ms) / total if total else float("nan")
    return ordered


def _tree_order(by_key: dict[tuple[str, tuple[str, ...]], Row]) -> list[Row]:
    """Rows grouped by kind, each child right after its parent, siblings in order of first appearance."""
    keys = list(by_key)
    first_seen = {key: n for n, key in enumerate(keys)}
    children: dict[tuple[str, tuple[str, ...]], list[tuple[str, tuple[str, ...]]]] = {}
    roots: list[tuple[str, tuple[str, ...]]] = []
    for key in keys:
        kind, path = key
        parent = (kind, path[:-1])
        if len(path) > 1 and parent in by_key:
            children.setdefault(parent, []).append(key)
        else:
            roots.append(key)
    out: list[Row] = []

    def walk(key: tuple[str, tuple[str, ...]]) -> None:
        out.append(by_key[key])
        for child in sorted(children.get(key, []), key=first_seen.__getitem__):
            walk(child)

    kinds = list(dict.fromkeys(kind for kind, _ in keys))
    for kind in kinds:
        for key in sorted((k for k in roots if k[0] == kind), key=first_seen.__getitem__):
            walk(key)
    return out


def format_table(rows: list[Row]) -> str:
    """The per-stage table as text: count, mean, p50, p99 (ms) and share of the step time of its kind."""
    if not rows:
        return "no otel-npu spans found"
    width = max(len("stage"), *(len(r.stage) + 2 * r.depth for r in rows))
    kind_width = max(len("step kind"), *(len(r.step_kind) for r in rows))
    head = (f"{'step kind':<{kind_width}}  {'stage':<{width}}  {'count':>6}  {'mean':>8}  {'p50':>8}  "
            f"{'p99':>8}  {'share':>6}")
    lines = [head, "-" * len(head)]
    last_kind = None
    for r in rows:
        kind = r.step_kind if r.step_kind != last_kind else ""
        if r.step_kind != last_kind and last_kind is not None:
            lines.append("")
        last_kind = r.step_kind
        share = "" if math.isnan(r.share) else f"{100 * r.share:5.1f}%"
        lines.append(f"{kind:<{kind_width}}  {'  ' * r.depth + r.stage:<{width}}  {r.count:>6}  {r.mean:>8.3f}  "
                     f"{r.percentile(50):>8.3f}  {r.percentile(99):>8.3f}  {share:>6}")
    return "\n".join(lines)


# -- several ranks: per-rank times and the skew between ranks ----------------------------------------------------

#: Attributes that place a span on a rank, read in this order (a vLLM worker's; a launcher's ``RANK``).
RANK_PARTS = ((ATTR_DP_RANK, "dp"), (ATTR_PP_RANK, "pp"), (ATTR_TP_RANK, "tp"))
RANK_ATTRS = (RANK_ATTR,)


def rank_of(span: Span) -> str | None:
    """``"dp0 pp0 tp1"`` for a vLLM worker's span, ``"rank 3"`` for one with only a global rank, else None."""
    parts = [f"{short}{span.attributes[key]}" for key, short in RANK_PARTS if key in span.attributes]
    if parts:
        return " ".join(parts)
    for key in RANK_ATTRS:
        if key in span.attributes:
            return f"rank {span.attributes[key]}"
    return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]


@dataclasses.dataclass
class RankRow:
    step_kind: str
    stage: str  # "(step)" for the step itself
    rank: str
    durations_ms: list[float]


@dataclasses.dataclass
class SkewRow:
    """One stage of one step kind: across the steps run by several ranks at once (children of one engine
    step), the spread of its start and of its end over the ranks (latest minus earliest), in ms."""

    step_kind: str
    stage: str
    start_ms: list[float]
    end_ms: list[float]
    bound_ms: list[float]  # per step: the clock error bound the spread carries (the two largest errors)


def ranked_steps(forest: Forest) -> list[Span]:
    return [s for s in forest.steps if rank_of(s) is not None]


def rank_rows(spans: Iterable[Span]) -> list[RankRow]:
    """Per step kind, per stage (the step's direct children, by name), per rank: the durations. Empty unless
    the steps come from more than one rank."""
    forest = Forest(spans)
    steps = ranked_steps(forest)
    if len({rank_of(s) for s in steps}) < 2:
        return []
    rows: dict[tuple[str, str, str], RankRow] = {}
    for step in sorted(steps, key=lambda s: s.start_ns):
        rank = rank_of(step) or "?"
        for stage, span in [("(step)", step)] + [(k.name, k) for k in forest.kids(step)]:
            row = rows.get((step.name, stage, rank))
            if row is None:
                row = rows[(step.name, stage, rank)] = RankRow(step.name, stage, rank, [])
            row.durations_ms.append(span.duration_ms)
    order = {kind: n for n, kind in enumerate(dict.fromkeys(k for k, _, _ in rows))}
    stage_order = {key: n for n, key in enumerate(dict.fromkeys((k, st) for k, st, _ in rows))}
    return sorted(rows.values(), key=lambda r: (order[r.step_kind], stage_order[(r.step_kind, r.stage)], r.rank))


def skew_rows(spans: Iterable[Span]) -> list[SkewRow]:
    """The rank skew of each (step kind, stage): steps of several ranks under one parent (an engine step) are one
    step run on those ranks; per such step, the spread of each stage's start and end over the ranks."""
    forest = Forest(spans)
    groups: dict[tuple[str, str, str], list[Span]] = {}
    for step in ranked_steps(forest):
        if step.parent_id:
            groups.setdefault((step.trace_id, step.parent_id, step.name), []).append(step)
    rows: dict[tuple[str, str], SkewRow] = {}
    for (_, _, kind), members in sorted(groups.items(), key=lambda kv: min(s.start_ns for s in kv[1])):
        if len({rank_of(s) for s in members}) < 2:
            continue
        stages: dict[str, list[Span]] = {"(step)": members}
        for step in members:
            for kid in forest.kids(step):
                stages.setdefault(kid.name, []).append(kid)
        for stage, found in stages.items():
            if len(found) < 2:
                continue
            row = rows.get((kind, stage))
            if row is None:
                row = rows[(kind, stage)] = SkewRow(kind, stage, [], [], [])
            row.start_ms.append((max(s.start_ns for s in found) - min(s.start_ns for s in found)) / 1e6)
            row.end_ms.append((max(s.end_ns for s in found) - min(s.end_ns for s in found)) / 1e6)
            errors = sorted((float(s.attributes.get(CLOCK_ERROR_ATTR, 0.0) or 0.0) for s in found), reverse=True)
            row.bound_ms.append(sum(errors[:2]) / 1000.0)
    return list(rows.values())


def format_ranks(rank: list[RankRow], skew: list[SkewRow]) -> str:
    """The per-rank table (count, p50, p99 per stage and rank) and the skew table, as text."""
    if not rank:
        return ""
    width = max(len("stage"), *(len(r.stage) for r in rank))
    kind_width = max(len("step kind"), *(len(r.step_kind) for r in rank))
    rank_width = max(len("rank"), *(len(r.rank) for r in rank))
    ranks = sorted({r.rank for r in rank})
    head = (f"{'step kind':<{kind_width}}  {'stage':<{width}}  {'rank':<{rank_width}}  {'count':>6}  {'p50':>8}  "
            f"{'p99':>8}")
    lines = [f"Per rank ({len(ranks)} ranks: {', '.join(ranks)}; ms):", head, "-" * len(head)]
    last = (None, None)
    for r in rank:
        kind = r.step_kind if r.step_kind != last[0] else ""
        stage = r.stage if (r.step_kind, r.stage) != last else ""
        if r.step_kind != last[0] and last[0] is not None:
            lines.append("")
        last = (r.step_kind, r.stage)
        lines.append(f"{kind:<{kind_width}}  {stage:<{width}}  {r.rank:<{rank_width}}  {len(r.durations_ms):>6}  "
                     f"{_percentile(r.durations_ms, 50):>8.3f}  {_percentile(r.durations_ms, 99):>8.3f}")
    if not skew:
        return "\n".join(lines)
    width = max(len("stage"), *(len(r.stage) for r in skew))
    kind_width = max(len("step kind"), *(len(r.step_kind) for r in skew))
    head = (f"{'step kind':<{kind_width}}  {'stage':<{width}}  {'steps':>6}  {'start p50':>9}  {'p99':>8}  "
            f"{'max':>8}  {'end p50':>8}  {'p99':>8}  {'max':>8}  {'± clock µs':>10}")
    lines += ["", "Rank skew: per step run on several ranks, the spread (latest - earliest) of each stage's start and",
              "end across the ranks (ms). Each rank's clock is placed on the wall clock on its own: a spread is",
              "known to within ± clock (µs: the two largest clock error bounds of the ranks, the largest over the",
              "steps).",
              head, "-" * len(head)]
    last_kind = None
    for r in skew:
        kind = r.step_kind if r.step_kind != last_kind else ""
        last_kind = r.step_kind
        lines.append(f"{kind:<{kind_width}}  {r.stage:<{width}}  {len(r.start_ms):>6}  "
                     f"{_percentile(r.start_ms, 50):>9.3f}  {_percentile(r.start_ms, 99):>8.3f}  "
                     f"{max(r.start_ms):>8.3f}  "
                     f"{_percentile(r.end_ms, 50):>8.3f}  {_percentile(r.end_ms, 99):>8.3f}  {max(r.end_ms):>8.3f}  "
                     f"{1000 * max(r.bound_ms):>10.1f}")
    return "\n".join(lines)
