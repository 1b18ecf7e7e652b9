"""What capture costs, measured side by side against the alternatives. One command::

    python -m benchmarks.run --out bench-out            # CPU (add --device cuda on a GPU machine)

prints a table of every figure against its target, and writes ``results.json`` and ``chart.png`` to
``--out``. Sections (``--only`` picks some): ``hotpath`` (per-capture host cost), ``cpu`` (total CPU per
capture across all threads), ``decode`` (serving-loop throughput), ``capacity`` (resolver), ``clock``
(clock accuracy on the simulated device), ``sampling`` (background CPU per exported / sampled-out /
file-written capture, 2 ms decode steps, per-layer detail budgets, span volume; run with OMP_NUM_THREADS=1;
``background`` is its first part alone).
Targets are printed, never asserted: a miss is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

import torch

from . import clock_accuracy, sampling
from .alternatives import Device, SeedProfiler, SyncTimer, otel_tracer
from .common import Report, collector, interleaved, machine_info, median, percentile, process_cpu
from .workloads import LlamaDecode, SyntheticDecode, no_timer

STAGES = ("prepare input", "forward", "post process", "sample")


def _otel_npu_on(device: Device, **kwargs: Any) -> Any:
    import otel_npu

    otel_npu.configure(enabled=True, device=device.kind, pipeline="own", **kwargs)
    with otel_npu.capture("warm-up"):  # starts the runtime outside the measured region
        pass
    otel_npu.flush(10.0)
    return otel_npu


def _otel_npu_off() -> None:
    """Shut otel-npu down and forget what configure() set (it keeps settings across calls)."""
    import otel_npu
    from otel_npu import config, runtime

    otel_npu.shutdown(10.0)
    runtime.set_settings(config.from_env())
    otel_npu.configure(enabled=False)


# -- 1. per-capture host cost -------------------------------------------------------------------------------
def hotpath(report: Report, device: Device, quick: bool) -> None:
    """Each capture timed on its own (perf_counter_ns around the ``with``), minus the bare operation.

    A shared machine's speed drifts (the same loop was seen running 2x slower from one second to the next:
    docs/benchmarks.md), so variants run in short blocks, all variants once per round in a shuffled order,
    and each variant's figure is the median over rounds of (its block median − the bare operation's block
    median of the same round).
    otel-npu stays started for the whole section; its "disabled" blocks switch the capture dispatch off
    (what ``configure(enabled=False)`` does, without stopping the runtime), so they cost what a disabled
    ``capture()`` costs.
    """
    from otel_npu import capturing  # its dispatch: what configure(enabled=...) switches

    block = 200
    rounds = 20 if quick else 80
    a = torch.ones(4, device=device.torch_device)
    b = torch.empty_like(a)

    def op() -> None:
        torch.add(a, 1, out=b)

    def timed(factory: Callable[[str], Any] | None, every_5th: Callable[[], Any] | None = None) -> dict:
        pc, tt = time.perf_counter_ns, time.thread_time_ns
        samples = []
        cpu0 = tt()
        for i in range(block):
            t0 = pc()
            if factory is None:
                op()
            else:
                with factory("forward"):
                    op()
                if every_5th is not None and i % 5 == 4:
                    every_5th()
            samples.append(pc() - t0)
        return {"samples": samples, "cpu_ns": (tt() - cpu0) / block}

    tracer_provider, tracer = otel_tracer(None)
    seed = SeedProfiler(device)
    sync = SyncTimer(device)
    otel_npu = _otel_npu_on(device)
    enabled_dispatch = (capturing.hot._capture_cls, capturing.hot._step_cls)

    def run_otel_npu() -> dict:
        capturing._set_dispatch(*enabled_dispatch)
        return timed(otel_npu.capture)

    def run_disabled() -> dict:
        capturing._set_dispatch(None, None)
        try:
            return timed(otel_npu.capture)
        finally:
            capturing._set_dispatch(*enabled_dispatch)

    def run_record_function() -> dict:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            return timed(torch.profiler.record_function)

    def run_seed() -> dict:
        os.environ[SeedProfiler.ENV] = "1"
        try:
            return timed(seed.capture_async, every_5th=seed.pop_captured_sync)
        finally:
            os.environ.pop(SeedProfiler.ENV, None)

    variants = {
        "bare operation": lambda: timed(None),
        "contextlib.nullcontext": lambda: timed(lambda name: contextlib.nullcontext()),
        "otel_npu enabled": run_otel_npu,
        "otel_npu disabled": run_disabled,
        "OTel start_as_current_span": lambda: timed(tracer.start_as_current_span),
        "torch record_function (profiling)": run_record_function,
        "seed pattern (+ pop every 5)": run_seed,
        "synchronize + host time": lambda: timed(sync),
    }
    for _ in range(3):  # warm-up: specialize the interpreter's code paths, fill the pools
        for run in variants.values():
            run()
    results = interleaved(variants, rounds)
    otel_npu.flush(30.0)
    stats = otel_npu.stats()
    _otel_npu_off()
    tracer_provider.shutdown()
    bare = results["bare operation"]
    bare_medians = [median(r["samples"]) for r in bare]
    table = {}
    for name, runs in results.items():
        paired = [median(r["samples"]) - b for r, b in zip(runs, bare_medians)]
        pooled = [s for r in runs for s in r["samples"]]
        table[name] = {
            # The difference within each round (the machine's speed is the same for both), its median over
            # the rounds; the p99 of every sample; the thread CPU per capture, paired the same way.
            "median_us": median(paired) / 1e3,
            "p99_us": (percentile(pooled, 99) - median(bare_medians)) / 1e3,
            "thread_cpu_us": median([r["cpu_ns"] - b["cpu_ns"] for r, b in zip(runs, bare)]) / 1e3,
        }
    null = table["contextlib.nullcontext"]["median_us"]
    for row in table.values():  # in units of the cheapest possible context manager: machine-independent
        row["x_nullcontext"] = row["median_us"] / null if null > 0 else float("nan")
    report.add("hotpath", {"bare_operation_ns": median(bare_medians), "block": block, "rounds": rounds,
                           "variants": table, "otel_npu_dropped": stats.get("dropped")})
    print(f"\nPer-capture host cost (µs, minus the bare operation; {rounds} interleaved rounds of {block} "
          "per variant; median of the per-round differences):")
    print(f"  {'variant':38s} {'median':>9s} {'p99':>9s} {'thread CPU':>11s} {'x nullcontext':>14s}")
    for name, row in table.items():
        print(f"  {name:38s} {row['median_us']:9.3f} {row['p99_us']:9.3f} {row['thread_cpu_us']:11.3f} "
              f"{row['x_nullcontext']:14.2f}")
    on, off = table["otel_npu enabled"], table["otel_npu disabled"]
    span = table["OTel start_as_current_span"]
    if device.kind == "cpu":
        report.check("enabled capture, median host cost", on["median_us"], "µs", "≤ 2 µs", on["median_us"] <= 2.0)
        report.check("enabled capture, thread CPU", on["thread_cpu_us"], "µs", "≤ 2 µs",
                     on["thread_cpu_us"] <= 2.0)
    else:
        report.check("enabled capture, median host cost", on["median_us"], "µs", "(≤ 2 µs on CPU)", None,
                     "includes two cudaEventRecord")
    report.check("enabled capture / OTel span", on["median_us"] / span["median_us"], "x", "≤ 0.1",
                 on["median_us"] / span["median_us"] <= 0.1, f"OTel span {span['median_us']:.1f} µs")
    report.check("disabled capture, median host cost", off["median_us"], "µs", "≤ 0.2 µs", off["median_us"] <= 0.2,
                 f"contextlib.nullcontext: {null:.2f} µs")


# -- 2. total CPU per capture, all threads ------------------------------------------------------------------
def cpu_total(report: Report, device: Device, endpoint: str, collector_name: str, quick: bool) -> None:
    """Process CPU (every thread: hot path, resolver, exporter) per capture, minus the bare loop's."""
    steps = 1000 if quick else 4000
    captures = steps * 5  # a step and four stages
    a = torch.ones(4, device=device.torch_device)
    b = torch.empty_like(a)

    def loop(stage: Callable[..., Any], step: Callable[..., Any]) -> tuple[float, float]:
        c0, t0 = process_cpu(), time.thread_time()
        for _ in range(steps):
            with step("Decode"):
                for name in STAGES:
                    with stage(name):
                        torch.add(a, 1, out=b)
        return c0, t0

    def measure(setup: Callable[[], Any], stage_step: Callable[[Any], tuple], finish: Callable[[Any], Any]):
        def run() -> dict:
            state = setup()
            stage, step = stage_step(state)
            c0, t0 = loop(stage, step)
            t1 = time.thread_time()
            finish(state)  # the background work left (resolve, export) is part of the cost
            return {"total": process_cpu() - c0, "hot": t1 - t0}
        return run

    saved = {k: os.environ[k] for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL")
             if k in os.environ}

    def own(exporter_env: dict) -> Callable[[], dict]:
        def setup() -> Any:
            os.environ.update(exporter_env)
            return _otel_npu_on(device)

        def finish(otel_npu: Any) -> None:
            otel_npu.flush(30.0)
            _otel_npu_off()
            for key in exporter_env:
                os.environ.pop(key, None)
            os.environ.update(saved)
        return measure(setup, lambda m: (m.capture, m.step), finish)

    def app_provider() -> dict:
        import otel_npu

        provider, _ = otel_tracer(None)
        otel_npu.configure(enabled=True, device=device.kind, tracer_provider=provider)
        with otel_npu.capture("warm-up"):
            pass
        otel_npu.flush()
        c0, t0 = loop(otel_npu.capture, otel_npu.step)
        t1 = time.thread_time()
        otel_npu.flush(30.0)
        provider.force_flush()
        out = {"total": process_cpu() - c0, "hot": t1 - t0}
        _otel_npu_off()
        provider.shutdown()
        return out

    variants = {
        "bare loop": measure(lambda: None, lambda s: (no_timer, no_timer), lambda s: None),
        "otel_npu -> OTLP/HTTP collector": own({}),
        "otel_npu, no exporter (resolve only)": own({"OTEL_TRACES_EXPORTER": "none"}),
        "otel_npu -> app TracerProvider (in-memory)": app_provider,
    }
    results = interleaved(variants, 3 if quick else 7)
    # Best of the rounds (as timeit reports): CPU seconds inflate when the machine is slowed by neighbours.
    bare = min(results["bare loop"], key=lambda r: r["total"])
    table = {}
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["total"])  # its hot/background split, from the same round
        total = (best["total"] - bare["total"]) / captures * 1e6
        hot = (best["hot"] - bare["hot"]) / captures * 1e6
        table[name] = {"total_us": total, "hot_thread_us": hot, "background_us": total - hot}
    report.add("cpu_total", {"collector": collector_name, "captures": captures, "variants": table})
    print(f"\nCPU per capture, all threads (µs; {captures} captures; collector: {collector_name}):")
    print(f"  {'variant':44s} {'total':>8s} {'hot thread':>11s} {'background':>11s}")
    for name, row in table.items():
        print(f"  {name:44s} {row['total_us']:8.2f} {row['hot_thread_us']:11.2f} {row['background_us']:11.2f}")
    own_total = table["otel_npu -> OTLP/HTTP collector"]["total_us"]
    report.check("total CPU per capture (to a real collector)", own_total, "µs", "≤ 10 µs", own_total <= 10.0,
                 collector_name)


# -- 3. serving-loop throughput ------------------------------------------------------------------------------
def decode(report: Report, device: Device, endpoint: str, workload: Any, label: str, steps: int,
           rounds: int) -> None:
    """Tokens/s of the same loop timed each way; ratio to the uninstrumented run of the same round.

    Two views: wall-clock throughput (what a user sees; includes waiting for the GIL, noisy on a shared
    machine) and process CPU per token (every thread, background work included; steadier where the
    machine's speed drifts). Work left at the end of a run (resolving and exporting the last captures, the
    OTel spans' export) is done inside the measured time.
    """
    from otel_npu import runtime

    tracer_provider, tracer = otel_tracer(endpoint)
    seed = SeedProfiler(device)
    sync = SyncTimer(device)
    tokens = steps * workload.tokens_per_step
    # otel-npu is started once and runs through the whole section, as in serving (starting it per round
    # would charge its start-up to each round: measured at ≈ 4 % of a 1 s round). Its rounds end by resolving
    # and exporting everything they captured, inside the measured time, so no work spills into another
    # variant's round. The stage metrics are exported by their own thread once a minute, as in production.
    otel_npu = _otel_npu_on(device)
    rt = runtime.current()

    def measured(body: Callable[[], Any], setup: Callable[[], Any] | None = None,
                 teardown: Callable[[], Any] | None = None) -> Callable[[], dict]:
        def run() -> dict:
            state = setup() if setup else None
            try:
                c0, t0 = process_cpu(), time.perf_counter()
                body() if state is None else body(state)
                return {"rate": tokens / (time.perf_counter() - t0), "cpu": (process_cpu() - c0) / tokens}
            finally:
                if teardown:
                    teardown()
        return run

    def otel_npu_steps() -> None:
        workload.run(steps, otel_npu.capture, otel_npu.step)
        rt.resolver.wait(30.0)
        for sink in rt.pipeline.sinks:
            sink.force_flush(30.0)

    def span_steps() -> None:
        span = tracer.start_as_current_span
        workload.run(steps, span, span)
        tracer_provider.force_flush()

    def profiled_steps() -> None:
        rf = torch.profiler.record_function
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.kind == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities):
            workload.run(steps, rf, rf)

    def seed_steps() -> None:
        os.environ[SeedProfiler.ENV] = "1"
        try:
            workload.run(steps, seed.capture_async, no_timer, after_step=seed.pop_captured_sync)
        finally:
            os.environ.pop(SeedProfiler.ENV, None)

    variants = {
        "uninstrumented": measured(lambda: workload.run(steps, no_timer, no_timer)),
        "otel_npu (4 stages + step)": measured(otel_npu_steps),
        "OTel spans on the hot path": measured(span_steps),
        "synchronize + host timing": measured(lambda: workload.run(steps, sync, no_timer)),
        "torch.profiler": measured(profiled_steps),
        "seed pattern": measured(seed_steps),
    }
    workload.run(max(5, steps // 10), no_timer, no_timer)  # warm-up
    otel_npu_steps()
    try:
        results = interleaved(variants, rounds)
    finally:
        _otel_npu_off()
        tracer_provider.shutdown()
    # The cost of otel-npu merely running (its threads waking up), apart: not started vs started and idle.
    def idle(started: bool) -> Callable[[], dict]:
        def setup() -> None:
            if started:
                _otel_npu_on(device)
                time.sleep(0.3)  # past its start-up
        return measured(lambda: workload.run(steps, no_timer, no_timer), setup, _otel_npu_off if started else None)
    idle_runs = interleaved({"not started": idle(False), "started, idle": idle(True)}, max(5, rounds // 3))
    results["otel_npu started, nothing captured"] = [
        {"rate": r["rate"] / b["rate"] * b0["rate"], "cpu": r["cpu"] / b["cpu"] * b0["cpu"]}
        for r, b, b0 in zip(idle_runs["started, idle"], idle_runs["not started"], results["uninstrumented"])]
    base = results["uninstrumented"]
    table = {}
    for name, runs in results.items():
        ratios = sorted(r["rate"] / b["rate"] for r, b in zip(runs, base))
        cpu_ratios = sorted(b["cpu"] / r["cpu"] for r, b in zip(runs, base))
        n = len(ratios)
        spread = statistics.stdev(ratios) / n ** 0.5 if n > 1 else float("nan")
        table[name] = {"tokens_per_s": median([r["rate"] for r in runs]), "ratio": median(ratios),
                       "mean_ratio": statistics.fmean(ratios), "stderr": spread,
                       "ratio_iqr": (percentile(ratios, 25), percentile(ratios, 75)),
                       "cpu_ratio": median(cpu_ratios),
                       "cpu_us_per_token": median([r["cpu"] for r in runs]) * 1e6}
    report.add(f"decode:{label}", {"steps": steps, "rounds": rounds, "variants": table})
    print(f"\nServing-loop throughput, {label} ({steps} steps x {rounds} interleaved rounds; ratios to the "
          "uninstrumented run of the same round, median and interquartile range):")
    print(f"  {'variant':38s} {'tokens/s':>9s} {'median':>7s} {'mean ± 2 s.e.':>15s} {'IQR':>13s} "
          f"{'CPU/token':>10s} {'CPU ratio':>9s}")
    for name, row in table.items():
        lo, hi = row["ratio_iqr"]
        print(f"  {name:38s} {row['tokens_per_s']:9.1f} {row['ratio']:7.3f} {row['mean_ratio']:8.3f} ± "
              f"{2 * row['stderr']:.3f} {lo:6.3f}-{hi:6.3f} {row['cpu_us_per_token']:8.0f}µs {row['cpu_ratio']:9.3f}")
    row = table["otel_npu (4 stages + step)"]
    low, high = row["mean_ratio"] - 2 * row["stderr"], row["mean_ratio"] + 2 * row["stderr"]
    verdict = True if low >= 0.99 else False if high < 0.99 else "noise"
    report.check(f"throughput with otel_npu, {label}", row["mean_ratio"] * 100, "%", "≥ 99 %", verdict,
                 f"mean of {len(base)} paired rounds, ± {200 * row['stderr']:.1f} % (2 s.e.); "
                 f"median {row['ratio'] * 100:.1f} %, CPU/token ratio {row['cpu_ratio'] * 100:.1f} %")


# -- 4. resolver capacity ------------------------------------------------------------------------------------
def capacity(report: Report, device: Device, quick: bool) -> None:
    """Captures per second the resolver (with OTLP export) sustains.

    (a) *Drain*: captures queued while the resolver sleeps, then resolved and exported as fast as it can:
    its raw capacity. (b) *Paced*: a producer thread offering captures at fixed rates while releasing the
    GIL between bursts, as a serving loop does (torch releases it in every op); the backlog is sampled:
    a rate is sustained if the backlog does not grow.
    """
    from otel_npu import runtime

    otel_npu = _otel_npu_on(device, max_pending=10_000_000, poll_interval_s=3600.0)
    rt = runtime.current()
    n = 50_000 if quick else 200_000
    for _ in range(n // 100):
        for _ in range(100):
            with otel_npu.capture("stage"):
                pass
    t0 = time.perf_counter()
    otel_npu.flush(300.0)
    drain = n / (time.perf_counter() - t0)
    _otel_npu_off()

    paced = {}
    for rate in ((10_000, 40_000) if quick else (10_000, 20_000, 40_000, 80_000)):
        otel_npu = _otel_npu_on(device, max_pending=10_000_000)
        rt = runtime.current()
        stop = threading.Event()

        def producer(rate: int = rate, otel_npu: Any = otel_npu, stop: threading.Event = stop) -> None:
            capture, burst = otel_npu.capture, 50
            period = burst / rate
            next_t = time.perf_counter()
            while not stop.is_set():
                for _ in range(burst):
                    with capture("stage"):
                        pass
                next_t += period
                pause = next_t - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)

        thread = threading.Thread(target=producer)
        thread.start()
        backlog = []
        duration = 2.0 if quick else 4.0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duration:
            time.sleep(duration / 8)
            backlog.append(len(rt.pending) + sum(len(q) for q in list(rt.resolver._queues.values())))
        stop.set()
        thread.join()
        # Sustained: at the end, less than a tenth of a second of captures waits, and the backlog is not
        # climbing (the last sample within 1.5x of the middle one, or small).
        small = rate * 0.1
        sustained = backlog[-1] <= small or (backlog[-1] <= 1.5 * backlog[len(backlog) // 2] and backlog[-1] <= rate)
        paced[rate] = {"backlog": backlog, "sustained": sustained}
        _otel_npu_off()
    sustained = max([r for r, v in paced.items() if v["sustained"]], default=0)
    report.add("capacity", {"drain_per_s": drain, "paced": paced})
    print(f"\nResolver capacity: drains {drain:,.0f} captures/s (resolve + OTLP encode + export); paced "
          "producer: " + ", ".join(f"{r:,}/s {'sustained' if v['sustained'] else 'backlog grows'} "
                                   f"(backlog {v['backlog'][-1]:,})" for r, v in paced.items()))
    report.check("resolver capacity, drain (captures/s, incl. OTLP export)", drain, "/s", "≥ 20,000",
                 drain >= 20_000)
    report.check("resolver capacity, paced producer sustained", sustained, "/s", "≥ 20,000", sustained >= 20_000,
                 "highest rate tried whose backlog stayed flat")


# -- chart ---------------------------------------------------------------------------------------------------
def chart(report: Report, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[bench]')")
        return None
    panels = [k for k in ("hotpath",) if k in report.sections] + \
        [k for k in report.sections if k.startswith("decode:")] + [k for k in ("clock",) if k in report.sections]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)))
    axes = axes if len(panels) > 1 else [axes]
    for ax, key in zip(axes, panels):
        data = report.sections[key]
        if key == "hotpath":
            names = [n for n in data["variants"] if n != "bare operation"]  # the baseline subtracted from all
            values = [max(data["variants"][n]["median_us"], 0.01) for n in names]
            ax.barh(names, values, color=["#2a9d8f" if "otel_npu" in n else "#999999" for n in names])
            ax.set_xscale("log")
            ax.set_xlabel("host cost per capture, µs (median, log scale)")
        elif key == "clock":
            horizons = data["horizons_s"]
            for policy, errors in data["max_error_us"].items():
                ax.plot(horizons, errors, marker="o", label=policy)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axhline(20, color="red", linestyle=":", label="target 20 µs")
            ax.set_xlabel("simulated time since start, s")
            ax.set_ylabel("max |error|, µs")
            ax.legend(fontsize=7)
        else:
            names = [n for n in data["variants"] if n != "uninstrumented"]
            values = [data["variants"][n]["mean_ratio"] * 100 for n in names]
            errors = [data["variants"][n]["stderr"] * 200 for n in names]
            ax.barh(names, values, xerr=errors, capsize=3,
                    color=["#2a9d8f" if "otel_npu" in n else "#999999" for n in names])
            ax.axvline(100, color="black", linewidth=0.8)
            ax.axvline(99, color="red", linestyle=":")
            ax.set_xlim(min(v - e for v, e in zip(values, errors)) - 2, max(v + e for v, e in zip(values, errors)) + 2)
            ax.set_xlabel(f"{key[7:]}: throughput, % of the uninstrumented run of the same round "
                          "(mean, ± 2 standard errors)")
        ax.tick_params(axis="y", labelsize=8)
    machine = report.machine
    fig.suptitle(f"otel-npu benchmarks — {machine.get('gpu') or machine['cpu']} ({machine['cpus']} CPUs), "
                 f"{machine['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out", help="folder for results.json and chart.png")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default="hotpath,cpu,decode,capacity,sampling,clock",
                        help="comma-separated sections (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier)")
    parser.add_argument("--llama", action="store_true", help="also run the decode loop on a small Llama "
                        "(transformers) model")
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    device = Device(args.device)
    report = Report(machine_info(device.kind))
    print(f"otel-npu benchmarks on {report.machine.get('gpu') or report.machine['cpu']}, "
          f"{report.machine['cpus']} CPUs, torch {report.machine['torch']} ({device.kind})")
    with collector() as (endpoint, collector_name):
        # otel-npu's own pipeline (every otel_npu variant below) exports to this collector.
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
        if "hotpath" in sections:
            hotpath(report, device, args.quick)
        if "cpu" in sections:
            cpu_total(report, device, endpoint, collector_name, args.quick)
        if "decode" in sections:
            # Short rounds, many of them: a shared machine's speed drifts by more than the 1 % to be seen, and
            # a ratio within a round (variants run back to back) cancels most of that drift.
            steps, rounds = (30, 11) if args.quick else (30, 81)
            decode(report, device, endpoint, SyntheticDecode(device), "synthetic 5 ms decode step", steps, rounds)
            if args.llama:
                try:
                    model = LlamaDecode(device)
                except ImportError as exc:
                    print(f"\n(skipping the Llama loop: {exc})")
                else:
                    decode(report, device, endpoint, model, "small Llama (transformers)", steps, rounds)
        if "capacity" in sections:
            capacity(report, device, args.quick)
        if "sampling" in sections:
            sampling.run(report, device, args.out, args.quick)
        elif "background" in sections:  # sampling's first part alone
            sampling.background(report, device, args.out, args.quick)
    if "clock" in sections:
        clock_accuracy.run(report, quick=args.quick)
    print("\n" + report.table())
    path = report.write(args.out)
    png = chart(report, os.path.join(args.out, "chart.png"))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
