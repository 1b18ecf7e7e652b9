"""Who takes the GIL from a serving loop, how often, and what the loop waits for it: otel-npu's threads, per
exporter, per version of the code.

    python -m benchmarks.gil_handoffs --seconds 6 --rounds 3 --out bench-out
    python -m benchmarks.gil_handoffs --repo . --repo /path/to/an/older/checkout    # versions side by side

A child process runs a serving loop on its main thread — steps of five stages, each stage ≈ 100 µs of pure
Python, as a vLLM worker's engine thread runs Python almost all the time — with otel-npu on the CPU device,
under ``benchmarks/gilprobe.c`` (``LD_PRELOAD``: every wait on a condition variable, per thread). Variants:

* ``off``: ``OTEL_NPU_ENABLED`` unset (the loop alone);
* ``none``: enabled, nothing exported (resolution, stage metrics aggregated, no exporter thread);
* ``file``: spans encoded to OTLP/JSON and appended to a file (``OTEL_NPU_TRACES_FILE``);
* ``http`` / ``grpc``: OTLP to a real collector on loopback (rotel-agent, blackhole exporter).

Per variant (medians over rounds, variants interleaved): steps per second and their ratio to ``off`` in the same
round; for the loop's thread, the GIL waits per step (``take``: waiting for another thread to release it;
``switch``: made to drop it and wait until the asking thread has it) in µs; for each of otel-npu's threads,
how many times per second it had to wait for the GIL (each is a hand-off the loop pays for) and its CPU share.
On a machine with other work running, the times (µs, steps/s) are inflated and noisy; the counts per second
much less so. Say which when quoting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks import gilprobe
from benchmarks.common import ROOT, _rotel_agent, machine_info, rotel

VARIANTS = ("off", "none", "file", "http", "grpc")

CHILD = r"""
import json, os, sys, threading, time
seconds, warm, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
import otel_npu

def work(n=1500):
    x = 0
    for i in range(n):
        x += i * i
    return x

def step():
    with otel_npu.step("Decode"):
        for stage in ("prepare input", "forward", "post process", "sample", "bookkeep"):
            with otel_npu.capture(stage):
                work()

for _ in range(50):  # otel-npu starts, its threads come up
    step()
deadline = time.monotonic() + warm
while time.monotonic() < deadline:
    step()
open(out + ".ready", "w").close()
while not os.path.exists(out + ".go"):
    step()
t0 = time.monotonic(); c0 = time.thread_time(); n = 0
end = t0 + seconds
while time.monotonic() < end:
    step(); n += 1
elapsed = time.monotonic() - t0
threads = {t.name: t.native_id for t in threading.enumerate()}
cpu = {}
for name, tid in threads.items():
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
json.dump({"steps": n, "elapsed": elapsed, "threads": threads, "main": threading.main_thread().native_id,
           "cpu": cpu, "stats": otel_npu.stats() if otel_npu.enabled() else {}}, open(out + ".json", "w"),
          default=str)
open(out + ".done", "w").close()
while not os.path.exists(out + ".exit"):
    time.sleep(0.05)
"""


@contextlib.contextmanager
def collector() -> Iterator[tuple[str, str]]:
    """rotel-agent on loopback (blackhole exporter): ``(http endpoint, grpc endpoint)``."""
    agent = _rotel_agent()
    if agent is None:
        raise SystemExit("rotel-agent not found: pip install rotel (the test extra has it)")
    with rotel(agent) as endpoints:
        yield endpoints["http/protobuf"], endpoints["grpc"]


def variant_env(variant: str, endpoints: tuple[str, str], tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LD_PRELOAD"))}
    if variant == "off":
        return env
    env.update(OTEL_NPU_ENABLED="1", OTEL_NPU_DEVICE="cpu", OTEL_NPU_PIPELINE="own", OTEL_SERVICE_NAME="bench")
    if variant == "none":
        env.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    elif variant == "file":
        env.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none",
                   OTEL_NPU_TRACES_FILE=os.path.join(tmp, "traces.jsonl"))
    else:
        endpoint = endpoints[0] if variant == "http" else endpoints[1]
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                   OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf" if variant == "http" else "grpc")
    return env


def run_one(repo: str, variant: str, endpoints: tuple[str, str], lib: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gil-handoffs-") as tmp:
        env = variant_env(variant, endpoints, tmp)
        env.update(LD_PRELOAD=lib, GILPROBE_DIR=tmp, PYTHONPATH=os.path.abspath(repo))
        out = os.path.join(tmp, "child")
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(seconds), "2.0", out], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            _wait_file(out + ".ready", proc)
            before = gilprobe.read(tmp, proc.pid)
            Path(out + ".go").touch()
            _wait_file(out + ".done", proc)
            waits = gilprobe.delta(gilprobe.read(tmp, proc.pid), before)
            result = json.load(open(out + ".json"))
            Path(out + ".exit").touch()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    steps, elapsed = result["steps"], result["elapsed"]
    by_tid = {tid: name for name, tid in result["threads"].items()}
    main = waits.get(result["main"])
    threads = {}
    for tid, w in waits.items():
        name = by_tid.get(tid)
        if name is None or tid == result["main"]:
            continue
        gil = w.gil
        threads[name] = {"gil_waits_per_s": gil.calls / elapsed, "cpu_share": result["cpu"].get(name, 0.0)}
    return {
        "steps_per_s": steps / elapsed,
        "loop_take_us_per_step": (main.kinds["take"].ns / 1e3 / steps) if main and steps else 0.0,
        "loop_switch_us_per_step": (main.kinds["switch"].ns / 1e3 / steps) if main and steps else 0.0,
        "loop_gil_waits_per_step": (main.gil.calls / steps) if main and steps else 0.0,
        "threads": threads,
        "dropped": (result["stats"] or {}).get("dropped", {}),
    }


def _wait_file(path: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"the child exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the child did not reach {os.path.basename(path)} in {timeout_s} s")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", action="append", help="checkout(s) whose otel_npu to run (default: this one)")
    parser.add_argument("--variant", action="append", choices=VARIANTS)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    repos = args.repo or [ROOT]
    variants = args.variant or list(VARIANTS)
    if "off" not in variants:
        variants = ["off", *variants]
    with tempfile.TemporaryDirectory(prefix="gilprobe-build-") as build_dir, collector() as endpoints:
        lib = gilprobe.build(build_dir)
        if lib is None:
            raise SystemExit("no C compiler: the GIL probe cannot be built")
        runs: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            order = [(repo, v) for repo in repos for v in variants]
            if r % 2:
                order.reverse()
            for repo, variant in order:
                runs.setdefault((repo, variant), []).append(run_one(repo, variant, endpoints, lib, args.seconds))
                print(f"round {r + 1} {os.path.basename(os.path.abspath(repo))} {variant}: "
                      f"{runs[(repo, variant)][-1]['steps_per_s']:.0f} steps/s", file=sys.stderr)
    report = {"machine": machine_info("cpu"), "seconds": args.seconds, "rounds": args.rounds, "results": []}
    lines = ["| code | variant | steps/s | / off | loop GIL waits per step | loop take µs/step | "
             "loop switch µs/step | otel-npu threads: GIL waits/s | dropped |", "|---|---|---|---|---|---|---|---|---|"]
    for repo in repos:
        offs = [x["steps_per_s"] for x in runs[(repo, "off")]]
        for variant in variants:
            xs = runs[(repo, variant)]
            ratios = [x["steps_per_s"] / o for x, o in zip(xs, offs)]
            names = sorted({n for x in xs for n in x["threads"]})
            per_thread = {n: statistics.median(x["threads"].get(n, {}).get("gil_waits_per_s", 0.0) for x in xs)
                          for n in names}
            dropped: dict[str, int] = {}
            for x in xs:
                for k, v in x["dropped"].items():
                    dropped[k] = dropped.get(k, 0) + int(v)
            row = {"code": repo, "variant": variant,
                   "steps_per_s": statistics.median(x["steps_per_s"] for x in xs),
                   "ratio_to_off": statistics.median(ratios), "ratios": ratios,
                   "loop_gil_waits_per_step": statistics.median(x["loop_gil_waits_per_step"] for x in xs),
                   "loop_take_us_per_step": statistics.median(x["loop_take_us_per_step"] for x in xs),
                   "loop_switch_us_per_step": statistics.median(x["loop_switch_us_per_step"] for x in xs),
                   "thread_gil_waits_per_s": per_thread, "dropped": dropped, "raw": xs}
            report["results"].append(row)
            shown = ", ".join(f"{n} {v:.0f}" for n, v in per_thread.items() if n.startswith("otel-npu")) or "—"
            lines.append(f"| {os.path.basename(os.path.abspath(repo))} | {variant} | {row['steps_per_s']:.0f} | "
                         f"{row['ratio_to_off']:.3f} | {row['loop_gil_waits_per_step']:.2f} | "
                         f"{row['loop_take_us_per_step']:.1f} | {row['loop_switch_us_per_step']:.1f} | {shown} | "
                         f"{sum(dropped.values())} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gil-handoffs.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(args.out, "gil-handoffs.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
