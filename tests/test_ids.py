"""Trace and span ids cannot repeat across processes that seed Python's global ``random`` alike (vLLM seeds it
in every worker, ``seed=0`` by default), nor across a fork: otel-npu draws them from an RNG of its own,
seeded from the OS, where the application's TracerProvider uses the SDK's default id generator and in
otel-npu's own pipeline. A custom id generator is used as it is."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

import otel_npu

from .support import child_env, enable

#: A process that seeds the global random as vLLM does, then captures, and prints the ids of its spans.
SEEDED = r"""
import json, random, sys
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import otel_npu

random.seed(0)
exporter = InMemorySpanExporter()
provider = TracerProvider()  # the SDK's default id generator, which draws from the global random
provider.add_span_processor(SimpleSpanProcessor(exporter))
if sys.argv[1] == "app":
    otel_npu.configure(enabled=True, device="cpu", tracer_provider=provider)
else:
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
for _ in range(20):
    with otel_npu.step("Decode"):
        with otel_npu.capture("forward"):
            pass
otel_npu.flush(10.0)
spans = exporter.get_finished_spans()
print(json.dumps([[s.context.trace_id, s.context.span_id] for s in spans]))
"""


def ids_of(spans) -> tuple[set[int], set[int]]:
    return {s.context.trace_id for s in spans}, {s.context.span_id for s in spans}


def seeded_run(pipeline: str, tmp_path, n: int) -> tuple[set[int], set[int]]:
    env = child_env(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    if pipeline == "own":
        env["OTEL_NPU_TRACES_FILE"] = str(tmp_path / f"traces-{n}.jsonl")
    done = subprocess.run([sys.executable, "-c", SEEDED, pipeline], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    if pipeline == "app":
        pairs = json.loads(done.stdout)
    else:
        pairs = []
        for line in (tmp_path / f"traces-{n}.jsonl").read_text().splitlines():
            for rs in json.loads(line)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    pairs += [[int(s["traceId"], 16), int(s["spanId"], 16)] for s in ss["spans"]]
    assert len(pairs) == 40
    return {t for t, _ in pairs}, {s for _, s in pairs}


@pytest.mark.parametrize("pipeline", ["app", "own"])
def test_two_processes_that_seed_random_alike_emit_disjoint_ids(pipeline, tmp_path):
    first, second = seeded_run(pipeline, tmp_path, 1), seeded_run(pipeline, tmp_path, 2)
    assert len(first[0]) == 20 and len(first[1]) == 40  # a trace per step; every span its own id
    assert not first[0] & second[0], "trace ids repeated across processes"
    assert not first[1] & second[1], "span ids repeated across processes"


def test_the_sdks_own_generator_would_repeat_them():
    """What the test above guards against: after ``random.seed(0)``, the SDK's generator draws the same ids."""
    state = random.getstate()
    try:
        drawn = []
        for _ in range(2):
            random.seed(0)
            drawn.append([RandomIdGenerator().generate_trace_id() for _ in range(3)])
    finally:
        random.setstate(state)
    assert drawn[0] == drawn[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_and_its_parent_emit_disjoint_ids(provider, spans):
    enable(provider, device="cpu")
    with otel_npu.capture("before fork"):  # the runtime runs in the parent, the child starts its own
        pass
    assert otel_npu.flush(5.0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: same memory, same RNG state until the fork hook re-seeded it
        try:
            os.close(read)
            for _ in range(10):
                with otel_npu.capture("child"):
                    pass
            otel_npu.flush(5.0)
            ids = [[s.context.trace_id, s.context.span_id] for s in spans.named("child")]
            os.write(write, json.dumps(ids).encode())
        finally:
            os._exit(0)
    os.close(write)
    for _ in range(10):
        with otel_npu.capture("parent"):
            pass
    assert otel_npu.flush(5.0)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read() or "[]")
    os.waitpid(pid, 0)
    assert len(child) == 10, "the child exported its captures"
    parent = ids_of(spans.named("parent"))
    assert not parent[0] & {t for t, _ in child} and not parent[1] & {s for _, s in child}


class CountingIds(IdGenerator):
    def __init__(self) -> None:
        self.n = 0

    def generate_span_id(self) -> int:
        self.n += 1
        return 0x1000 + self.n

    def generate_trace_id(self) -> int:
        self.n += 1
        return 0x2000 + self.n


def test_a_custom_id_generator_is_honoured(provider, spans):
    exporter = InMemorySpanExporter()
    custom = TracerProvider(id_generator=CountingIds())
    custom.add_span_processor(SimpleSpanProcessor(exporter))
    enable((custom, None), device="cpu")
    with otel_npu.step("Decode"):
        with otel_npu.capture("forward"):
            pass
    assert otel_npu.flush(5.0)
    got = exporter.get_finished_spans()
    assert len(got) == 2
    assert all(s.context.trace_id == 0x2001 for s in got)
    assert {s.context.span_id for s in got} == {0x1002, 0x1003}


def test_the_public_id_generator_draws_what_random_seed_does_not_repeat():
    """``otel_npu.IdGenerator`` (what the vLLM plugin gives vLLM's own TracerProvider): an SDK id generator whose
    ids the application's ``random.seed()`` does not repeat, as the SDK's default generator's it does."""
    assert isinstance(otel_npu.IdGenerator(), IdGenerator)
    drawn = {}
    for generator in (otel_npu.IdGenerator(), RandomIdGenerator()):
        ids = []
        for _ in range(2):
            random.seed(0)
            ids.append((generator.generate_trace_id(), generator.generate_span_id()))
        drawn[type(generator)] = ids
    own, sdk = drawn[otel_npu.IdGenerator], drawn[RandomIdGenerator]
    assert sdk[0] == sdk[1]  # the SDK's default: the seed decides
    assert own[0][0] != own[1][0] and own[0][1] != own[1][1] and all(own[0] + own[1])
