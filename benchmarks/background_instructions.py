"""Instructions per capture on otel-npu's background threads, counted by valgrind's callgrind: pure Python
against the compiled core (``otel_npu/_compiled.py``), a figure that does not drift with the machine's load.

``python -m benchmarks.background_instructions [--n 2000]`` runs, under ``valgrind --tool=callgrind
--separate-threads=yes``, a loop of ``n`` and of ``2n`` steps (a step and 4 captures each, on the CPU backend),
then waits until everything is resolved and exported, and prints, per variant, the instructions of every
thread but the main one per capture: ``(I(2n) - I(n)) / (5 n)``, so that start-up, import and the threads'
own start cancel out; and the same for the busiest of those threads alone (the resolver, which does the
per-capture work; the exporter works per batch, and when the exporters and the metrics thread run depends on
timing). Variants: resolved only (no exporter), sampled out (``always_off``, no slow-step keeping,
OTLP/HTTP), every capture exported over OTLP/HTTP (both with the stage metrics, as by default); each with
``OTEL_NPU_PURE_PYTHON=1`` and with the compiled core (which must be built: ``pip install -e .`` or
``python setup.py build_ext --inplace``). The collector is a minimal OTLP/HTTP endpoint in a process of its
own (not counted). The cyclic GC is off and hash randomization fixed. Not exact: how many captures a resolver
pass or an export batch takes, and how often the process is seen idle, depend on timing, so two runs of the
same code differ (the resolver thread's figure by a few per cent, all threads' by more). Needs ``valgrind``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

#: name -> the OTEL_* settings of the variant (the endpoint is added for those that export).
VARIANTS: dict[str, dict[str, str]] = {
    "resolved only": {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"},
    # always_off and no slow-step keeping: the same captures are dropped in every run (traceidratio and p99
    # keeping export a random few, each costing as much as a hundred dropped ones: a noisy difference).
    "sampled out": {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_NPU_KEEP_SLOW_STEPS": "off"},
    "exported (OTLP/HTTP)": {"OTEL_TRACES_SAMPLER": "always_on"},
    # The span a vLLM EngineCore hands over per scheduler step (``otel_npu.host_step``): 8 linked requests and
    # 7 small attributes, as the plugin's engine step carries; one span per iteration, not five.
    "engine step, 8 links (OTLP/HTTP)": {"OTEL_TRACES_SAMPLER": "always_on", "BENCH_LOOP": "engine_step"},
}
#: Spans per loop iteration, where not a step and 4 captures.
SPANS_PER_ITERATION = {"engine step, 8 links (OTLP/HTTP)": 1}

LOOP = r"""
import os, sys
import otel_npu
from otel_npu import _compiled, runtime
otel_npu.configure(enabled=True, device="cpu", pipeline="own")
with otel_npu.capture("warm-up"):
    pass
otel_npu.flush(60.0)
want_compiled = os.environ.get("OTEL_NPU_PURE_PYTHON") != "1"
assert (_compiled.describe()["compiled"] != []) == want_compiled, _compiled.describe()
import gc
gc.disable()
n = int(sys.argv[1])
capture, step = otel_npu.capture, otel_npu.step
if os.environ.get("BENCH_LOOP") == "engine_step":
    from opentelemetry.trace import SpanContext, TraceFlags
    links = [SpanContext(0xA000 + i, 0xB000 + i, True, TraceFlags(1)) for i in range(8)]
    counts = {"vllm.scheduled_requests": 8, "vllm.new_requests": 0, "vllm.waiting_requests": 0,
              "vllm.running_requests": 8, "vllm.preempted_requests": 0, "vllm.scheduled_tokens": 8}
    for i in range(n):
        otel_npu.host_step("engine step", 1000 * i, 1000 * i + 500, trace_id=0xC000 + i, span_id=0xD000 + i,
                           sampled=True, links=links, attributes=dict(counts, **{"vllm.kv_cache_usage": 0.25}))
    n = 0
for _ in range(n):
    with step("Decode"):
        with capture("prepare input"):
            pass
        with capture("forward"):
            pass
        with capture("post process"):
            pass
        with capture("sample"):
            pass
rt = runtime.current()
assert rt.resolver.wait(600.0)
for sink in rt.pipeline.sinks:
    assert sink.force_flush(600.0)
stats = otel_npu.stats()
assert stats["dropped_total"] == 0, stats
print(stats["resolved"], stats["spans_emitted"], stats["spans_exported"])
sys.stdout.flush()
os._exit(0)
"""

#: A collector that accepts every OTLP/HTTP request (an empty ExportTraceServiceResponse is zero bytes).
SINK = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def background_instructions(settings: dict[str, str], n: int, root: pathlib.Path) -> tuple[int, int, str]:
    """Instructions of every thread but the main one, and of the busiest of them (the resolver), for ``n``
    steps; and what the loop printed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "cg.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        # No periodic metrics export during the loop (a longer run would otherwise hold one more): the stage
        # histogram is still fed per capture, on the resolver thread.
        env.update(settings, PYTHONPATH=str(root), PYTHONHASHSEED="0", OTEL_NPU_ENABLED="1",
                   OTEL_METRIC_EXPORT_INTERVAL="3600000")
        done = subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes",
                               f"--callgrind-out-file={out}", sys.executable, "-c", LOOP, str(n)],
                              env=env, check=True, capture_output=True, text=True, cwd=tmp)
        threads = []
        for part in pathlib.Path(tmp).glob("cg.out-*"):
            if part.name.endswith("-01"):
                continue  # the main thread: the loop itself
            for line in part.read_text().splitlines():
                if line.startswith(("totals:", "summary:")):
                    threads.append(int(line.split()[1]))
                    break
        return sum(threads), max(threads), done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="steps of the shorter loop (5 captures each)")
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parent.parent),
                        help="the checkout whose otel_npu is measured (default: this one)")
    parser.add_argument("--only", choices=sorted(VARIANTS), action="append", help="these variants only")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.root)
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)])
    try:
        time.sleep(1.0)
        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        print(f"background-thread instructions per capture (callgrind, {args.n} vs {2 * args.n} steps of a step "
              f"and 4 captures; of engine steps, per engine step), {root}:")
        print(f"  {'variant':28s} {'pure':>9s} {'compiled':>9s} {'ratio':>6s}   resolver thread: "
              f"{'pure':>9s} {'compiled':>9s} {'ratio':>6s}")
        for name in args.only or VARIANTS:
            row, busiest = [], []
            for pure in ("1", "0"):
                settings = dict(VARIANTS[name], OTEL_NPU_PURE_PYTHON=pure, **endpoint)
                short, short_max, _ = background_instructions(settings, args.n, root)
                long, long_max, _ = background_instructions(settings, 2 * args.n, root)
                spans = SPANS_PER_ITERATION.get(name, 5) * args.n
                row.append((long - short) / spans)
                busiest.append((long_max - short_max) / spans)
            print(f"  {name:28s} {row[0]:9.0f} {row[1]:9.0f} {row[1] / row[0]:6.2f}   {'':17s}"
                  f"{busiest[0]:9.0f} {busiest[1]:9.0f} {busiest[1] / busiest[0]:6.2f}", flush=True)
    finally:
        sink.terminate()
        sink.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
