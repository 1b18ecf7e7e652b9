"""``ProfileExecuteDuration``: the vllm-ascend drop-in, and the seed's log line."""

from __future__ import annotations

import logging
import re

import pytest

import otel_npu
from otel_npu import ProfileExecuteDuration
from otel_npu.durations import format_line, unique_tags

from .support import enable

LINE = re.compile(r"^Profile execute duration \[(?P<label>[^\]]+)\]:(?P<items>( \[[^\]]+\]:\d+\.\d{2}ms)+)$")


@pytest.fixture
def duration_lines(caplog):
    caplog.set_level(logging.INFO, logger="otel_npu.durations")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "otel_npu.durations"]


def test_format_matches_the_seed():
    line = format_line("Decode", [("post process", 14.171), ("prepare input and forward", 9.566),
                                  ("forward", 4.14)])
    assert line == ("Profile execute duration [Decode]: [post process]:14.17ms "
                    "[prepare input and forward]:9.57ms [forward]:4.14ms")
    assert LINE.match(line)
    assert unique_tags(["a", "b", "a", "a"]) == ["a", "b", "a#2", "a#3"]


def test_singleton():
    assert ProfileExecuteDuration() is ProfileExecuteDuration()


def test_disabled_pop_returns_nothing_and_captures_nothing():
    profiler = ProfileExecuteDuration()
    with profiler.capture_async("forward"):
        pass
    assert profiler.pop_captured_sync() == {}


def test_pop_returns_device_durations_in_capture_order_with_repeated_tags_kept(provider, spans, sim):
    enable(provider, device=sim)
    profiler = ProfileExecuteDuration()
    stream = sim.current_stream()
    stream.launch(0.2)  # the device runs behind the host, so host hiccups do not show in device times
    with profiler.capture_async("prepare input and forward"):
        stream.launch(0.002)
        with profiler.capture_async("forward"):
            stream.launch(0.010)
    for _ in range(2):
        with profiler.capture_async("mtp_forward"):
            stream.launch(0.001)
    durations = profiler.pop_captured_sync()  # blocks until resolved: the device is still busy now
    assert list(durations) == ["prepare input and forward", "forward", "mtp_forward", "mtp_forward#2"]
    assert durations["forward"] == pytest.approx(10.0, abs=0.1)
    assert durations["prepare input and forward"] == pytest.approx(12.0, abs=0.2)
    assert durations["mtp_forward#2"] == pytest.approx(1.0, abs=0.1)
    assert profiler.pop_captured_sync() == {}, "a pop returns only the captures since the last pop"
    otel_npu.flush()
    assert len(spans.named("mtp_forward")) == 2, "the same captures also become spans"


def test_log_line_on_pop_with_label_and_on_step_end(provider, sim, duration_lines):
    enable(provider, device=sim, log_durations=True)
    profiler = ProfileExecuteDuration()
    sim.current_stream().launch(0.2)  # the device runs behind the host (see above)
    with profiler.capture_async("forward"):
        sim.current_stream().launch(0.004)
    profiler.pop_captured_sync(label="Prefill")
    sim.current_stream().launch(0.2)
    with otel_npu.step("Decode"):
        with otel_npu.capture("forward"):
            sim.current_stream().launch(0.003)
        with otel_npu.capture("post process"):
            sim.current_stream().launch(0.001)
    otel_npu.flush()
    lines = duration_lines()
    assert len(lines) == 2, lines
    assert all(LINE.match(line) for line in lines), lines
    assert lines[0].startswith("Profile execute duration [Prefill]: [forward]:4.0")
    assert re.match(r"Profile execute duration \[Decode\]: \[forward\]:3\.0\dms \[post process\]:1\.0\dms$",
                    lines[1])


def test_pop_inside_a_step_uses_the_step_name_and_is_not_logged_twice(provider, sim, duration_lines):
    enable(provider, device=sim, log_durations=True)
    profiler = ProfileExecuteDuration()
    sim.current_stream().launch(0.2)  # the device runs behind the host (see above)
    with otel_npu.step("Decode"):
        with profiler.capture_async("forward"):
            sim.current_stream().launch(0.002)
        profiler.pop_captured_sync(label="ignored when a step encloses the pop")
    otel_npu.flush()
    lines = duration_lines()
    assert len(lines) == 1 and lines[0].startswith("Profile execute duration [Decode]: [forward]:2.0"), lines


def test_no_log_line_without_log_durations(provider, sim, duration_lines):
    enable(provider, device=sim)
    with otel_npu.step("Decode"):
        with otel_npu.capture("forward"):
            pass
    otel_npu.flush()
    assert duration_lines() == []
