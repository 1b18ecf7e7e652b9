"""``StageAggregator``: explicit-bucket histograms of device-measured durations per (stage, step), fed on the
resolver thread without a lock, read by the metrics export thread (see the package docstring for why)."""

from __future__ import annotations

import bisect
import time
from typing import Any, Mapping

from ...record import Record
from ...spans.attributes import ATTR_STAGE, ATTR_STEP

#: Bucket boundaries in ms: 10 µs to 10 s, six per decade (each boundary at most 5/3 of the one before), so a
#: p50/p99 read from the histogram is off by at most the width of one such bucket anywhere in the range.
BOUNDARIES_MS: tuple[float, ...] = tuple(
    round(m * 10.0 ** e, 6) for e in range(-2, 4) for m in (1, 1.5, 2, 3, 5, 7)) + (10000.0,)

#: Exemplars per data point per export interval at most (the slowest of the interval).
EXEMPLARS_PER_POINT = 4

#: Distinct (stage, step) series kept; further ones are folded into one ``otel.metric.overflow`` series, as the
#: SDK does at its cardinality limit. Bounds the aggregator's memory (≈ 0.6 KB per series, ≈ 0.6 MB in all).
MAX_SERIES = 1000
_OVERFLOW = ("\0overflow", None)

def stage_key(r: Record) -> tuple[str, str | None]:
    """The histogram series of a resolved capture: (stage, enclosing step); a step is its own stage."""
    if r.is_step:
        return r.name, r.name
    step = r.step
    return r.name, None if step is None else step.name


class StageAggregator:
    """Explicit-bucket histograms per (stage, step), fed on the resolver thread, read by the export thread."""

    def __init__(self, const_attributes: Mapping[str, Any]) -> None:
        self._const = dict(const_attributes)
        self._series: dict[tuple, list] = {}
        self._width = len(BOUNDARIES_MS) + 1
        self.start_ns = time.time_ns()
        #: Exemplars of the current interval per series: [[value ms, time ns, trace id, span id], ...], at most
        #: EXEMPLARS_PER_POINT, the slowest offered (resolver thread writes; ``snapshot`` swaps the dict).
        self._exemplars: dict[tuple, list] = {}
        self.round_exemplars: dict[tuple, list] = {}

    def exemplar(self, r: Record, with_ids: bool = True) -> None:
        """Offer ``r`` (resolver thread) as an exemplar of its series: kept if it is among the slowest
        ``EXEMPLARS_PER_POINT`` of this interval. ``with_ids``: its span was exported (trace and span ids)."""
        if r.timed_out:
            return
        value = (r.end_ns - r.start_ns) / 1e6
        key = stage_key(r)
        held = self._exemplars.get(key)
        if held is None:
            if len(self._exemplars) >= MAX_SERIES:
                return
            held = self._exemplars[key] = []
        if len(held) < EXEMPLARS_PER_POINT:
            held.append([value, r.end_ns, r.trace_id if with_ids else None, r.span_id if with_ids else None])
            return
        low = 0  # the fastest held (the first of equals), replaced if this one is slower
        for i in range(1, len(held)):
            if held[i][0] < held[low][0]:
                low = i
        if value > held[low][0]:
            held[low] = [value, r.end_ns, r.trace_id if with_ids else None, r.span_id if with_ids else None]

    def record(self, r: Record) -> None:
        """Add ``r``'s device-measured duration (resolver thread only)."""
        if r.timed_out:
            return
        key = stage_key(r)
        value = (r.end_ns - r.start_ns) / 1e6
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key)
        # [sum, min, max, interval min, interval max, bucket counts...]. No lock: this is the only writer, each
        # statement is atomic under the GIL, and readers take the count from the buckets, so a reader that
        # copies the list between two of these lines sees a valid point (the sum or min/max one sample late).
        series[5 + bisect.bisect_left(BOUNDARIES_MS, value)] += 1
        series[0] += value
        if value < series[1]:
            series[1] = value
        if value > series[2]:
            series[2] = value
        if value < series[3]:
            series[3] = value
        if value > series[4]:
            series[4] = value

    def _new_series(self, key: tuple) -> list:
        if len(self._series) >= MAX_SERIES:
            key = _OVERFLOW
            existing = self._series.get(key)
            if existing is not None:
                return existing
        inf = float("inf")
        series = [0.0, inf, -inf, inf, -inf] + [0] * self._width
        self._series[key] = series
        return series

    def attributes(self, key: tuple) -> dict[str, Any]:
        if key is _OVERFLOW or key == _OVERFLOW:
            return {"otel.metric.overflow": True}
        stage, step = key
        attrs = {ATTR_STAGE: stage}
        if step is not None:
            attrs[ATTR_STEP] = step
        attrs.update(self._const)
        return attrs

    def snapshot(self) -> list[tuple[tuple, int, list]]:
        """``[(key, count, [sum, min, max, interval min, interval max, buckets...]), ...]`` (copies; export
        thread). Starts a new interval for the interval min/max (delta temporality)."""
        inf = float("inf")
        out = []
        # The interval's exemplars, for every destination of this round (swapped: an offer racing with this
        # lands in one interval or the other).
        self.round_exemplars, self._exemplars = self._exemplars, {}
        for key, series in list(self._series.items()):  # list(): one C-level copy, safe against an insert
            copy = list(series)
            series[3], series[4] = inf, -inf
            out.append((key, sum(copy[5:]), copy))
        return out
