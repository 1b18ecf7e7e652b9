"""Shared pieces of the benchmarks: the device under test, collectors on loopback, statistics, the report.

Everything is measured side by side in one process and run, variants interleaved (round-robin, order
shuffled each round) so that machine drift hits all of them alike; figures are medians (and p99 where the
tail matters), ratios are taken within a round before the median is taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100.0 * (len(ordered) - 1)))))
    return ordered[index]


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, seed: int = 1) -> dict[str, list[Any]]:
    """Run every variant once per round, in a fresh random order each round; results per variant."""
    rng = random.Random(seed)
    names = list(variants)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            results[name].append(variants[name]())
    return results


@dataclass
class Check:
    """A figure against its target."""

    name: str
    value: float
    unit: str
    target: str
    ok: bool | str | None  # None: no target / not applicable here; "noise": the target is inside the error bars
    note: str = ""

    def row(self) -> str:
        verdict = {True: "meets", False: "MISSES", None: "-", "noise": "within noise"}[self.ok]
        value = f"{self.value:.3f}" if abs(self.value) < 100 else f"{self.value:,.0f}"
        return f"| {self.name} | {value} {self.unit} | {self.target} | {verdict} | {self.note} |"


@dataclass
class Report:
    machine: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def add(self, section: str, data: Any) -> None:
        self.sections[section] = data

    def check(self, *args: Any, **kwargs: Any) -> Check:
        c = Check(*args, **kwargs)
        self.checks.append(c)
        return c

    def table(self) -> str:
        lines = ["| figure | measured | target | verdict | note |", "|---|---|---|---|---|"]
        lines += [c.row() for c in self.checks]
        return "\n".join(lines)

    def write(self, out_dir: str) -> str:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "results.json")
        with open(path, "w") as f:
            json.dump({"machine": self.machine, "sections": self.sections,
                       "checks": [c.__dict__ for c in self.checks]}, f, indent=2, default=str)
        return path


def machine_info(device: str) -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "cpu": _cpu_model(), "platform": platform.platform(), "device": device,
        "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rotel(agent: str, extra_args: tuple[str, ...] = (), **popen: Any) -> Iterator[dict[str, str]]:
    """``rotel-agent`` (the binary ``agent``) with the blackhole exporter, OTLP/gRPC and OTLP/HTTP on loopback,
    in its own process; stopped at the end. Yields ``{"grpc": base URL, "http/protobuf": base URL}``.
    ``popen``: where its output goes (``subprocess.Popen`` keywords; discarded by default)."""
    http_port, grpc_port = free_port(), free_port()
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen([agent, "start", "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
                             "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}", "--exporter", "blackhole",
                             *extra_args], stdin=subprocess.DEVNULL, **popen)
    try:
        _wait_port(http_port)
        _wait_port(grpc_port)
        yield {"grpc": f"http://127.0.0.1:{grpc_port}", "http/protobuf": f"http://127.0.0.1:{http_port}"}
    finally:
        _stop(proc)


@contextlib.contextmanager
def collector() -> Iterator[tuple[str, str]]:
    """A real OTLP collector on loopback, in its own process (its CPU is not ours): ``rotel-agent`` with the
    blackhole exporter when installed, else the tests' Python OTLP/HTTP receiver. Yields (endpoint, what)."""
    agent = _rotel_agent()
    if agent:
        with rotel(agent) as endpoints:
            yield endpoints["http/protobuf"], "rotel-agent (blackhole exporter)"
        return
    code = ("import sys,time; sys.path.insert(0, %r)\n"
            "from tests.otlp_receiver import HttpReceiver\n"
            "r = HttpReceiver(); print(r.port, flush=True); time.sleep(1e9)\n" % ROOT)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        http_port = int(proc.stdout.readline())
        _wait_port(http_port)
        yield f"http://127.0.0.1:{http_port}", "Python OTLP/HTTP receiver (rotel-agent not installed)"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _rotel_agent() -> str | None:
    """The ``rotel-agent`` binary shipped inside the ``rotel`` wheel (``pip install rotel``), or one on PATH."""
    try:
        import rotel
    except ImportError:
        return shutil.which("rotel-agent")
    candidate = os.path.join(os.path.dirname(rotel.__file__), "rotel-agent")
    return candidate if os.path.exists(candidate) else shutil.which("rotel-agent")


def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def process_cpu() -> float:
    """CPU seconds of this process, all threads."""
    return time.process_time()
