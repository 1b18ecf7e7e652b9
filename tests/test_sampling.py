"""Step sampling: the sampler called as the SDK calls it, slow steps kept, detail on a budget."""

from __future__ import annotations

import logging
import threading

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link

import otel_npu
from otel_npu import config, runtime
from otel_npu.spans import sampling

from .otlp_receiver import attributes
from .support import ListMetricExporter


class RecordingSampler(Sampler):
    """An application sampler that reads what the SDK hands it (as a real one might: link.context)."""

    def __init__(self):
        self.calls = []

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                      trace_state=None):
        self.calls.append((name, dict(attributes) if attributes is not None else None,
                           [(link.context.trace_id, dict(link.attributes or {})) for link in links or ()]))
        return SamplingResult(Decision.RECORD_AND_SAMPLE)

    def get_description(self):
        return "recording"


def provider_with(sampler):
    exporter = InMemorySpanExporter()
    tp = TracerProvider(sampler=sampler)
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp, exporter


def test_the_sampler_gets_the_spans_attributes_and_links_as_link_objects():
    """As the SDK passes them: the span's attributes and Link objects (it was attributes=None and bare
    SpanContexts, so a sampler reading link.context raised, and the step was lost)."""
    sampler = RecordingSampler()
    tp, exporter = provider_with(sampler)
    request = tp.get_tracer("app").start_span("request")
    otel_npu.configure(enabled=True, device="cpu", tracer_provider=tp)
    with otel_npu.step("Decode", links=[request, Link(request.get_span_context(), {"request.id": "r1"})],
                       attributes={"batch.tokens": 12}):
        with otel_npu.capture("forward"):
            pass
    with otel_npu.capture("alone", attributes={"k": "v"}):
        pass
    assert otel_npu.flush(10.0)
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["Decode", "alone", "forward"], "no span lost to the sampler's reading of link.context"
    calls = {name: (attrs, links) for name, attrs, links in sampler.calls}
    assert set(calls) == {"request", "Decode", "alone"}, "asked once per root, as for a root span"
    step_attrs, step_links = calls["Decode"]
    # As the SDK asks: only the attributes given at the span's start (here attributes=), not otel-npu's own
    # (otel_npu.device, otel_npu.stream, process.pid, ...), which it adds to the span afterwards.
    assert step_attrs == {"batch.tokens": 12}
    trace_id = request.get_span_context().trace_id
    assert [t for t, _ in step_links] == [trace_id, trace_id]
    alone_attrs, alone_links = calls["alone"]
    assert alone_attrs == {"k": "v"} and alone_links == []
    request.end()


STAGES = ("prepare", "forward", "sample")


def run_decode(sim, steps, slow_at, slow_s=0.03, forward_s=lambda i: 0.0005):
    """``steps`` steps of three captures; the forward of the steps in ``slow_at`` takes ``slow_s``, that of
    step ``i`` otherwise ``forward_s(i)`` seconds of device time, the other captures 0.5 ms.

    Each batch of 50 steps is queued behind a gate (a stream op that waits until the whole batch is
    queued), so the simulated device runs a batch back to back on its own schedule: a step's device time is
    the sum of its kernels, whatever the host did meanwhile. Launched straight onto an idle device, a step
    would also hold every stall of the host between its launches (a preempted test thread on a loaded
    machine), and a rule judging steps by their duration would keep ordinary steps at random."""
    stream = sim.current_stream()
    gate = threading.Event()
    for i in range(steps):
        if i % 50 == 0:
            gate = threading.Event()
            stream.call(gate.wait)
        with otel_npu.step("Decode", attributes={"injected_slow": True} if i in slow_at else None):
            for stage in STAGES:
                with otel_npu.capture(stage):
                    if stage != "forward":
                        stream.launch(0.0005)
                    else:
                        stream.launch(slow_s if i in slow_at else forward_s(i))
        if i % 50 == 49 or i == steps - 1:
            gate.set()
            stream.synchronize()  # keep the device near the host (as a real decode loop's sync per token)
            # The resolver polls once a second while it saw nothing in flight, and this loop makes more than
            # the 512 pooled captures in that time: wake it, so that no capture is lost to an empty pool.
            runtime.current().resolver.wake()


def exported_steps(receiver):
    """{step index order: (step span, [its child spans])} of what the receiver got, by trace."""
    spans = [span for _, span in receiver.spans()]
    steps = {s.trace_id: s for s in spans if s.name == "Decode"}
    children = {}
    for s in spans:
        if s.name != "Decode":
            children.setdefault(s.trace_id, []).append(s)
    return steps, children


@pytest.mark.parametrize("rule", ["p99", "10ms"])
def test_ratio_sampling_keeps_every_slow_step_with_its_captures(monkeypatch, receiver, sim, rule):
    """traceidratio 0.05 and injected slow steps: about 5 % of the ordinary steps and
    every slow step exported with all its captures; the histogram counts every step."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.05")
    monkeypatch.setenv("OTEL_NPU_KEEP_SLOW_STEPS", rule)
    runtime_settings = config.from_env()
    assert runtime_settings.keep_slow_steps == rule
    otel_npu.configure(enabled=True, device=sim, pipeline="own", keep_slow_steps=rule, poll_interval_s=0.02)
    steps = 1500
    slow_at = set(range(300, steps, 120))  # 10 slow steps, after the p99 window has its first estimate
    # Each ordinary step 1 µs shorter than the one before (2 ms down to 0.5 ms of forward): none can exceed a
    # percentile of the steps before it, whatever the clock placement's rounding (well under 1 µs), so no
    # ordinary step is kept as slow and none takes the allowance of the slow ones. (With equal durations
    # the 99th percentile would sit on that rounding, and runs of ordinary steps would exceed it.)
    run_decode(sim, steps, slow_at, forward_s=lambda i: 0.0005 + (steps - 1 - i) * 1e-6)
    assert otel_npu.flush(30.0)
    step_spans, children = exported_steps(receiver)
    # (Marked by an attribute: on a busy machine an ordinary step can be slow too, when the host stalled.)
    slow = [s for s in step_spans.values() if attributes(s.attributes).get("injected_slow")]
    assert len(slow) == len(slow_at), "every slow step is exported"
    assert all(s.end_time_unix_nano - s.start_time_unix_nano > 30e6 for s in slow)
    for s in slow:
        attrs = attributes(s.attributes)
        if attrs.get("otel_npu.kept") is not None:
            assert attrs["otel_npu.kept"] == "slow" and attrs["otel_npu.slow_threshold_ms"] > 0
    kept = [s for s in slow if attributes(s.attributes).get("otel_npu.kept") == "slow"]
    # The sampler keeps each slow step with probability 0.05 by itself: 6 or more of the 10 about once in
    # 400,000 runs; the others it dropped, and they were kept for slowness.
    assert len(kept) >= len(slow_at) - 5, "most slow steps were dropped by the sampler and kept for slowness"
    for s in step_spans.values():  # every exported step has all its captures, parented to it
        mine = children.get(s.trace_id, [])
        assert sorted(c.name for c in mine) == sorted(STAGES)
        assert all(c.parent_span_id == s.span_id for c in mine)
    ordinary = [s for s in step_spans.values() if not attributes(s.attributes).get("injected_slow")]
    by_sampler = [s for s in ordinary if attributes(s.attributes).get("otel_npu.kept") is None]
    kept_ordinary = [s for s in ordinary if attributes(s.attributes).get("otel_npu.kept") == "slow"]
    assert len(by_sampler) + len(kept_ordinary) == len(ordinary), "an ordinary step is sampled or kept as slow"
    # traceidratio 0.05 of 1490 steps with random trace ids: binomial, mean 74.5, s.d. 8.4; 37..113 is
    # ± 4.5 s.d. (outside it about once in 150,000 runs).
    assert 37 <= len(by_sampler) <= 113, f"{len(by_sampler)} ordinary steps sampled by traceidratio 0.05"
    assert kept_ordinary == [], ("no ordinary step is slower than the steps before it",
                                 [(s.end_time_unix_nano - s.start_time_unix_nano) / 1e6 for s in kept_ordinary])
    histogram = receiver.wait_for_metric(
        "otel_npu.stage.duration",
        lambda m: sum(p.count for p in m.histogram.data_points
                      if attributes(p.attributes)["otel_npu.stage"] == "Decode") == steps)
    stats = otel_npu.stats()
    last = receiver.wait_for_metric("otel_npu.stage.duration", timeout_s=0)
    assert histogram is not None, ("the histogram counts every step, exported or not", stats["dropped"],
                                   last and sum(p.count for p in last.histogram.data_points
                                                if attributes(p.attributes)["otel_npu.stage"] == "Decode"))
    assert stats["spans_emitted"] == 4 * len(step_spans)
    assert stats["spans_emitted"] + stats["spans_unsampled"] == 4 * steps, "every capture counted once"


def test_keep_off_exports_only_what_the_sampler_keeps(monkeypatch, receiver, sim):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    otel_npu.configure(enabled=True, device=sim, pipeline="own", keep_slow_steps="off")
    run_decode(sim, 50, {10, 20}, slow_s=0.02)
    assert otel_npu.flush(10.0)
    assert receiver.spans() == []
    assert otel_npu.stats()["spans_unsampled"] == 200


def test_a_step_under_an_unsampled_request_follows_the_request(sim):
    """Keeping a slow step whose parent span is not exported would leave an orphan: it is not kept."""
    tp, exporter = provider_with(ALWAYS_OFF)
    otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, keep_slow_steps="1ms")
    with tp.get_tracer("app").start_as_current_span("request"):
        with otel_npu.step("Decode"):
            with otel_npu.capture("forward"):
                sim.current_stream().launch(0.005)
    with otel_npu.step("Decode"):  # the same, beginning its own trace: kept
        with otel_npu.capture("forward"):
            sim.current_stream().launch(0.005)
    assert otel_npu.flush(10.0)
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["Decode", "forward"]
    step = [s for s in spans if s.name == "Decode"][0]
    assert step.parent is None and step.attributes["otel_npu.kept"] == "slow"
    assert step.attributes["otel_npu.slow_threshold_ms"] == 1.0


def test_a_burst_of_slow_steps_is_bounded_and_counted(sim):
    tp, exporter = provider_with(ALWAYS_OFF)
    otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, keep_slow_steps="0.1ms")
    stream = sim.current_stream()
    # All slow and back to back on the device: queued behind a gate, so that they run on the device's own
    # schedule (35 x 0.3 ms: 10.5 ms of step time, 0.02 of a step's allowance refilled) however long the host
    # takes to queue them; launched onto an idle device, every host stall would be step time, and refill.
    gate = threading.Event()
    stream.call(gate.wait)
    for _ in range(sampling.BURST + 15):
        with otel_npu.step("Decode"):
            stream.launch(0.0003)
    gate.set()
    assert otel_npu.flush(10.0)
    kept = len(exporter.get_finished_spans())
    assert kept == sampling.BURST
    assert otel_npu.stats()["slow_steps_not_kept"] == sampling.BURST + 15 - kept


def test_percentile_rule_follows_each_step_name():
    from otel_npu.accounting import Stats

    rule = sampling.SlowSteps(config.parse_keep_slow("p99"), Stats())
    kept = 0
    for i in range(1000):  # Decode ≈ 1 ms, Prefill ≈ 50 ms, each step a little slower than the one before
        threshold = rule.observe("Decode", 1_000_000 + i, i * 10_000_000, True)
        if i < 100:
            assert threshold is None, f"step {i}: no threshold before a tenth of the window (100 steps) was seen"
        elif threshold is not None:
            assert threshold < 1_000_000 + i, "kept: slower than the threshold it exceeded"
            kept += 1
        rule.observe("Prefill", 50_000_000 + i, i * 10_000_000, True)
    # Each step past the first 100 is the slowest yet: all over the threshold, kept while the burst lasts.
    assert kept >= sampling.BURST
    # Past the window's p99 of its own name: kept; a Decode-slow Prefill is not.
    assert rule.observe("Decode", 5_000_000, 10**10 + 1, True) is not None
    assert rule.observe("Prefill", 5_000_000, 10**10 + 2, True) is None
    assert rule.observe("Decode", 5_000_000, 10**10 + 3, False) is None, "only dropped steps are kept"


@pytest.mark.parametrize("raw,expected", [("off", None), ("p99", ("p99", 0.99)), ("p999", ("p999", 0.999)),
                                          ("25ms", ("threshold", 25e6)), ("25", ("threshold", 25e6)),
                                          ("0.5s", ("threshold", 5e8)), ("800us", ("threshold", 8e5))])
def test_keep_slow_steps_values(raw, expected):
    assert config.parse_keep_slow(raw) == expected


@pytest.mark.parametrize("raw", ["p50", "fast", "-3ms", "0", "25 hours"])
def test_bad_keep_slow_steps_warns_and_keeps_p99(raw, caplog):
    if raw == "0":
        assert config.parse_keep_slow(raw) is None  # "0" means off
        return
    with caplog.at_level(logging.WARNING, logger="otel_npu"):
        settings = config.from_env({"OTEL_NPU_KEEP_SLOW_STEPS": raw})
    assert settings.keep_slow_steps == "p99"
    assert "OTEL_NPU_KEEP_SLOW_STEPS" in caplog.text and raw in caplog.text and "p999" in caplog.text
    with pytest.raises(ValueError, match="keep_slow_steps"):
        otel_npu.configure(keep_slow_steps=raw)


def test_bad_detail_every_warns_and_uses_1(caplog):
    with caplog.at_level(logging.WARNING, logger="otel_npu"):
        assert config.from_env({"OTEL_NPU_DETAIL_EVERY": "zero"}).detail_every == 1
    assert "OTEL_NPU_DETAIL_EVERY" in caplog.text and "'zero'" in caplog.text
    assert config.from_env({"OTEL_NPU_DETAIL_EVERY": "10"}).detail_every == 10
    with pytest.raises(ValueError, match="detail_every"):
        otel_npu.configure(detail_every=0)


def test_sampled_out_captures_get_no_span_ids(sim):
    """The cheap path: under a dropped step nothing is identified (ids are only drawn for exported spans)."""
    tp, _ = provider_with(ALWAYS_OFF)
    otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, keep_slow_steps="off")
    seen = []
    rt = None
    with otel_npu.step("Decode") as s:
        with otel_npu.capture("forward") as c:
            pass
    rt = runtime.current()
    original = rt.pipeline.emit

    def spy(r):
        original(r)
        seen.append(r)
    rt.resolver._emit = spy
    with otel_npu.step("Decode") as s:
        with otel_npu.capture("forward") as c:
            pass
    assert otel_npu.flush(10.0)
    assert c in seen and s in seen
    assert c.sampled is False and not hasattr(c, "span_id")
    assert s.sampled is False and hasattr(s, "trace_id"), "the root is given a trace id for the sampler"


class TestDetailBudget:
    def run(self, sim, steps, every, **kwargs):
        tp, exporter = provider_with(kwargs.pop("sampler", None) or TraceIdRatioBased(1.0))
        otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, detail_every=every, **kwargs)
        stream = sim.current_stream()
        for _ in range(steps):
            with otel_npu.step("Decode"):
                with otel_npu.capture("forward"):
                    for layer in range(3):
                        with otel_npu.capture(f"layers.{layer}", detail=True):
                            stream.launch(0.00002)
        assert otel_npu.flush(10.0)
        return exporter.get_finished_spans()

    def test_detail_captures_in_one_step_in_n(self, sim):
        spans = self.run(sim, 20, 5)
        steps = sorted((s for s in spans if s.name == "Decode"), key=lambda s: s.start_time)
        assert len(steps) == 20
        with_detail = [i for i, s in enumerate(steps)
                       if any(x.name.startswith("layers.") and x.context.trace_id == s.context.trace_id
                              for x in spans)]
        assert with_detail == [0, 5, 10, 15]
        assert sum(s.name.startswith("layers.") for s in spans) == 12
        assert sum(s.name == "forward" for s in spans) == 20, "ordinary captures are not on the budget"

    def test_skipped_detail_captures_record_no_device_events(self, sim):
        self.run(sim, 1, 2)  # starts the runtime; this first step takes detail
        records = sum(sim.records_made.values())
        pool = runtime.current().pool
        free = len(pool)
        with otel_npu.step("Decode"):  # the second step: over budget
            with otel_npu.capture("layers.0", detail=True) as c:
                pass
            again = otel_npu.capture("layers.0", detail=True)
            assert len(pool) == free - 2, "only the step's two events were taken"
        assert again is c, "the shared do-nothing object of its name: nothing made per use"
        assert otel_npu.flush(10.0)
        assert sum(sim.records_made.values()) - records == 2, "only the step's start and end were recorded"

    def test_a_step_with_detail_is_exported_even_when_the_sampler_drops_it(self, sim):
        spans = self.run(sim, 9, 3, sampler=ALWAYS_OFF, keep_slow_steps="off")
        steps = [s for s in spans if s.name == "Decode"]
        assert len(steps) == 3 and all(s.attributes["otel_npu.kept"] == "detail" for s in steps)
        assert sum(s.name.startswith("layers.") for s in spans) == 9
        assert sum(s.name == "forward" for s in spans) == 3, "with all the step's captures"

    def test_default_detail_follows_the_sampler(self, sim):
        spans = self.run(sim, 4, 1, sampler=ALWAYS_OFF, keep_slow_steps="off")
        assert list(spans) == []

    @pytest.mark.parametrize("made_while", ["enabled", "disabled"])
    def test_a_detail_capture_used_as_a_decorator_stays_a_detail_capture(self, sim, made_while):
        """Saw it fail: the decorator made ordinary captures, taken in every step."""
        tp, exporter = provider_with(TraceIdRatioBased(1.0))
        if made_while == "enabled":
            otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, detail_every=3)

        @otel_npu.capture("layer", detail=True)
        def layer():
            sim.current_stream().launch(0.00002)

        if made_while == "disabled":
            otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, detail_every=3)
        for _ in range(6):
            with otel_npu.step("Decode"):
                layer()
        assert otel_npu.flush(10.0)
        names = [s.name for s in exporter.get_finished_spans()]
        assert names.count("Decode") == 6 and names.count("layer") == 2

    def test_instrument_module_hooks_are_detail_captures(self, sim):
        torch = pytest.importorskip("torch")
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        tp, exporter = provider_with(TraceIdRatioBased(1.0))
        otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, detail_every=4)
        handle = otel_npu.instrument_module(model)
        x = torch.ones(1, 4)
        for _ in range(8):
            with otel_npu.step("Decode"):
                model(x)
        assert otel_npu.flush(10.0)
        names = [s.name for s in exporter.get_finished_spans()]
        assert names.count("0") == 2 and names.count("1") == 2 and names.count("Decode") == 8
        handle.remove()


# -- exemplars ------------------------------------------------------------------------------------------------
def exemplar_env(monkeypatch, receiver, sampler_arg, **extra):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", sampler_arg)
    for key, value in extra.items():
        monkeypatch.setenv(key, value)


def decode_with_varied_forward(sim, steps=40):
    stream = sim.current_stream()
    for i in range(steps):
        with otel_npu.step("Decode"):
            with otel_npu.capture("forward"):
                stream.launch(0.0002 + 0.00005 * (i % 7))
    stream.synchronize()


def forward_point(receiver):
    metric = receiver.wait_for_metric("otel_npu.stage.duration")
    (point,) = [p for p in metric.histogram.data_points if attributes(p.attributes)["otel_npu.stage"] == "forward"]
    return point


def test_exemplars_point_at_exported_spans_and_favour_the_slowest(monkeypatch, receiver, sim):
    exemplar_env(monkeypatch, receiver, "0.5")
    otel_npu.configure(enabled=True, device=sim, pipeline="own", keep_slow_steps="off")
    decode_with_varied_forward(sim)
    assert otel_npu.flush(10.0)
    exported = {(s.trace_id, s.span_id): s for _, s in receiver.spans() if s.name == "forward"}
    assert 5 <= len(exported) <= 35
    forward_point(receiver)  # the flush's round arrived
    from otel_npu.export.metrics.aggregate import EXEMPLARS_PER_POINT

    # Exemplars are per export interval, and a round may also go out when the process goes idle (before the
    # flush's): every round's forward point, each with at most EXEMPLARS_PER_POINT, the slowest of its interval.
    points = [p for _, m in receiver.metrics() if m.name == "otel_npu.stage.duration"
              for p in m.histogram.data_points if attributes(p.attributes)["otel_npu.stage"] == "forward"]
    assert all(len(p.exemplars) <= EXEMPLARS_PER_POINT for p in points), "bounded per point per interval"
    exemplars = list({(e.trace_id, e.span_id): e for p in points for e in p.exemplars}.values())
    durations = sorted(((s.end_time_unix_nano - s.start_time_unix_nano) / 1e6 for s in exported.values()),
                       reverse=True)
    for e in exemplars:
        span = exported.get((e.trace_id, e.span_id))
        assert span is not None, "an exemplar points at a span that was exported"
        assert e.as_double == pytest.approx((span.end_time_unix_nano - span.start_time_unix_nano) / 1e6)
        assert e.time_unix_nano == span.end_time_unix_nano
    # The slowest exported spans overall are each among the slowest of their own interval.
    assert sorted((e.as_double for e in exemplars), reverse=True)[:EXEMPLARS_PER_POINT] == pytest.approx(
        durations[:EXEMPLARS_PER_POINT]), "the slowest exported spans"


@pytest.mark.parametrize("exemplar_filter", ["always_off", "always_on"])
def test_exemplar_filter_is_honoured(monkeypatch, receiver, sim, exemplar_filter):
    exemplar_env(monkeypatch, receiver, "0", OTEL_METRICS_EXEMPLAR_FILTER=exemplar_filter)
    otel_npu.configure(enabled=True, device=sim, pipeline="own", keep_slow_steps="off")
    decode_with_varied_forward(sim, 10)
    assert otel_npu.flush(10.0)
    assert receiver.spans() == []
    forward_point(receiver)  # the flush's round arrived
    # Every round's point (one may also go out when the process goes idle, before the flush's).
    points = [p for _, m in receiver.metrics() if m.name == "otel_npu.stage.duration"
              for p in m.histogram.data_points if attributes(p.attributes)["otel_npu.stage"] == "forward"]
    if exemplar_filter == "always_off":
        assert all(list(p.exemplars) == [] for p in points)
    else:  # every measurement may be an exemplar; none was exported, so none carries a trace
        # 10 measurements over at most two intervals: one of them had 5 or more, so 4 exemplars
        assert max(len(p.exemplars) for p in points) == 4
        assert all(not e.trace_id and not e.span_id for p in points for e in p.exemplars)


class EveryOtherStep(Sampler):
    """Samples the first step of every two (a count, not a ratio over random trace ids: the test knows which
    steps were exported), none once ``keep`` is False."""

    def __init__(self):
        self.steps = 0
        self.keep = True

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                      trace_state=None):
        self.steps += 1
        keep = self.keep and self.steps % 2 == 1
        return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP)

    def get_description(self):
        return "every other step"


def test_exemplars_through_the_applications_meter_provider(monkeypatch, sim):
    """Exemplars reach the application's MeterProvider and point at exported spans only. Exemplars belong to the
    round (collection) that saw their measurement, and a round also goes out when the process goes idle, at a
    time the test does not choose: they are looked for in every round, and a last round holding only captures
    whose spans were not exported (none of its own) is made on purpose. (Looking at the last round only failed
    when an idle round had taken every exported capture.)"""
    from opentelemetry import metrics as metrics_api
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader

    for reader_kind in ("periodic", "pull"):
        exporter = ListMetricExporter()
        reader = (PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
                  if reader_kind == "periodic" else InMemoryMetricReader())
        meter_provider = MeterProvider(metric_readers=[reader])
        monkeypatch.setattr(metrics_api._internal, "_METER_PROVIDER", meter_provider)
        sampler = EveryOtherStep()
        tp, span_exporter = provider_with(sampler)
        otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, keep_slow_steps="off")
        decode_with_varied_forward(sim, 20)  # 10 steps exported, 10 not
        assert otel_npu.flush(10.0)
        sampler.keep = False
        decode_with_varied_forward(sim, 2)  # a round of unexported captures only
        assert otel_npu.flush(10.0)
        rounds = exporter.batches if reader_kind == "periodic" else [reader.get_metrics_data()]
        points = [p for data in rounds for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                  if m.name == "otel_npu.stage.duration"
                  for p in m.data.data_points if p.attributes["otel_npu.stage"] == "forward"]
        assert points[-1].count == 22, reader_kind  # every capture measured, exported or not
        exported = {(s.context.trace_id, s.context.span_id) for s in span_exporter.get_finished_spans()
                    if s.name == "forward"}
        assert len(exported) == 10, reader_kind
        exemplars = [(e.trace_id, e.span_id) for p in points for e in p.exemplars]
        assert exemplars, reader_kind
        assert set(exemplars) <= exported, reader_kind
        otel_npu.shutdown(5.0)
        meter_provider.shutdown()


def test_a_capture_resolved_while_its_step_with_attributes_is_still_open():
    """The sampler is asked about the step when its first capture is resolved, which can be before the step
    itself is (the step still open): its attributes must not need what only its resolution sets (saw it fail:
    AttributeError '_HostStep' object has no attribute 'step', every span of such a step lost)."""
    sampler = RecordingSampler()
    tp, exporter = provider_with(sampler)
    otel_npu.configure(enabled=True, device="cpu", tracer_provider=tp)
    with otel_npu.step("Decode", attributes={"demo.batch_size": 2}):
        with otel_npu.capture("prepare input"):
            pass
        assert otel_npu.flush(5.0)  # resolves the capture; the step is still open
    assert otel_npu.flush(5.0)
    assert sorted(s.name for s in exporter.get_finished_spans()) == ["Decode", "prepare input"]
    assert otel_npu.stats()["dropped"] == {}
    (name, attrs, _), = sampler.calls
    assert name == "Decode" and attrs == {"demo.batch_size": 2}


def test_a_kept_step_exports_only_captures_it_can_parent(monkeypatch, sim):
    """With the held-steps bound reached, a step's first capture may not be held while a later one is (on
    another stream, a child can resolve after its parent): when the step is kept, such a child has no exported
    parent; it is counted, not sent half-identified (saw it fail: emit_failed, AttributeError on trace_id)."""
    from otel_npu.export.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "MAX_HELD_STEPS", 1)
    tp, exporter = provider_with(ALWAYS_OFF)
    otel_npu.configure(enabled=True, device=sim, tracer_provider=tp, keep_slow_steps="0.001ms")
    import threading

    other = sim.new_stream("other")
    opened, release, closed = threading.Event(), threading.Event(), threading.Event()

    def s0_thread():  # a step held open on another thread
        with otel_npu.step("S0"):
            with otel_npu.capture("c0"):
                sim.current_stream().launch(0.0001)
            opened.set()
            release.wait(10)
        closed.set()

    thread = threading.Thread(target=s0_thread)
    thread.start()
    assert opened.wait(10)
    assert otel_npu.flush(5.0)  # c0 held for S0, which is still open: the one held step
    with otel_npu.step("S1"):
        with otel_npu.capture("outer"):
            with otel_npu.capture("inner", stream=other):
                gate = threading.Event()
                other.call(lambda: gate.wait(30))  # "inner" runs until the test lets it end
        assert otel_npu.flush(0.02) is False  # "outer" resolved (not held: the bound), "inner" still running
        gate.set()
        release.set()
        assert closed.wait(10)
        thread.join()
        assert otel_npu.flush(5.0)  # S0 kept and released; "inner" resolved now: held for S1
    assert otel_npu.flush(5.0)
    names = sorted(s.name for s in exporter.get_finished_spans())
    stats = otel_npu.stats()
    assert names == ["S0", "S1", "c0"], repr(stats)
    assert stats["dropped"] == {} and stats["spans_unsampled"] == 2  # outer and inner


def test_stats_say_how_steps_are_sampled(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own", keep_slow_steps="p999", detail_every=10)
    with otel_npu.capture("x"):
        pass
    text = otel_npu.stats()["sampling"]
    assert "TraceIdRatioBased{0.01}" in text and "p999 of the last 10000" in text and "1 step in 10" in text
