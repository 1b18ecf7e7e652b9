"""``otel-npu demo``: a small serving loop on a real model, with every step's stages as device-timed spans.

The demo plays the serving application (as vLLM does): it owns an SDK TracerProvider for its request spans
(``llm_request``, one trace per request), built by ``otel_npu.export.pipeline.tracer_provider_from_env`` and
installed globally; otel-npu sends its stage spans through that same provider.

The model is Hugging Face transformers' Llama implementation built from a small config with random weights
(nothing is downloaded), with a KV cache per request and greedy decoding. Requests arrive over time, so
steps mix prefill and decode; each step is ``otel_npu.step("Prefill"|"Decode", links=<its requests>)`` with
the four captures vllm-ascend instrumented: "prepare input", "forward", "post process", "sample".

Where the traces go: with ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` or ``OTEL_TRACES_EXPORTER`` set, where
those say; otherwise into ``./otel-npu-traces-<time>.jsonl`` (``OTEL_NPU_TRACES_FILE``), for
``otel-npu summary`` and ``otel-npu chrome-trace``.

torch, transformers and tqdm are imported inside ``run`` so that ``otel-npu --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import sys
import time
from typing import Any

# The SDK's trace package, imported so that no environment variable can make the import fail.
from otel_npu.spans.sdk import export as sdk_export
from otel_npu.spans.sdk import trace as sdk_trace

HELP = "serve a small Llama-style model to several requests and show each step's stage timings"

#: name -> (layers, hidden, intermediate, attention heads, kv heads, vocab)
MODEL_SIZES = {
    "tiny": (2, 128, 344, 4, 2, 2048),
    "small": (4, 256, 688, 4, 2, 4096),
    "base": (8, 512, 1376, 8, 4, 8192),
}
STAGES = ("prepare input", "forward", "post process", "sample")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), default="auto",
                        help="where the model runs and what otel-npu times (auto: npu > cuda > cpu)")
    parser.add_argument("--steps", type=_positive, default=64, help="engine steps to run at most (64)")
    parser.add_argument("--requests", type=_positive, default=8,
                        help="requests, arriving over the first half of the run (8)")
    parser.add_argument("--model-size", choices=tuple(MODEL_SIZES), default="small",
                        help="tiny: 2 layers, hidden 128; small: 4 layers, hidden 256; base: 8 layers, hidden 512")
    parser.add_argument("--per-layer", action="store_true",
                        help="also time every decoder layer and its attention, MLP and norms (instrument_module)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the requests (0)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else 1: see the README)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def choose_threads(flag: int | None, env: Any) -> tuple[int, str]:
    """The demo's torch CPU thread count and why: ``--threads``, else ``OMP_NUM_THREADS`` (what torch itself
    reads), else 1.

    Why 1 and not torch's default (one per core): the demo's model is small (hidden 256, batches of at most 8
    requests), so a step's operators are too short to gain from splitting across cores, while OpenMP threads
    that wait on each other lose badly to any other load: on 2 CPU cores shared with other work, the
    64-step loop took 11 s with 2 threads against 1.3 s with one (28 s in all was reported). On an NPU or GPU
    the host threads matter even less."""
    if flag is not None:
        return flag, "--threads"
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw), "OMP_NUM_THREADS"
    return 1, "the default: a small model gains nothing from more, and they fight other load; --threads N"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclasses.dataclass
class Request:
    id: str
    arrival_step: int
    prompt: list[int]
    max_tokens: int
    span: Any = None
    cache: Any = None
    output: list[int] = dataclasses.field(default_factory=list)
    arrival_ns: int = 0
    first_token_ns: int = 0


def plan_requests(n: int, steps: int, vocab: int, rng: random.Random) -> list[Request]:
    """``n`` requests arriving evenly over the first half of ``steps``, each finishing by the last step."""
    out = []
    for i in range(n):
        arrival = (i * steps) // (2 * n)
        room = steps - arrival  # its prefill step samples the first token, each later step one more
        max_tokens = max(1, room - rng.randint(0, max(0, room // 4)))
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(16, 64))]
        out.append(Request(id=f"req-{i}", arrival_step=arrival, prompt=prompt, max_tokens=max_tokens))
    return out


def configure_destination(env: Any) -> str | None:
    """With no exporter configured, send traces to a new file in the current directory; returns its path
    (``None`` when the environment already says where traces go, or names a file itself). See
    ``otel_npu.config.otel.use_traces_file_unless_configured``."""
    from otel_npu.config import otel

    return otel.use_traces_file_unless_configured(env)


def destination(env: Any, kind: str) -> str:
    """Where the demo's span exporter of ``kind`` (``otlp``, ``console``, ``file``) sends, in words."""
    from otel_npu.config import otel as otel_config

    otel = otel_config.read(env)
    if kind == "console":
        return "printed on stdout (OTEL_TRACES_EXPORTER=console)"
    if kind == "file":
        return f"written to {otel.traces_file}"
    protocol = otel.protocol("TRACES")
    # A variable that is not a URL has been warned about; this is what the exporter was given instead.
    endpoint = otel_config.otlp_endpoint(env, "TRACES", protocol, warn=False)
    if endpoint is None:
        traces = otel.raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        base = otel.raw("OTEL_EXPORTER_OTLP_ENDPOINT")
        if traces:
            endpoint = traces
        elif base:
            endpoint = base if protocol == "grpc" else base.rstrip("/") + "/v1/traces"
        else:
            endpoint = "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318/v1/traces"
    return f"exported over OTLP ({protocol}) to {endpoint}"


def describe_destinations(env: Any) -> list[str]:
    """Where the demo's traces go, as the environment configured it."""
    from otel_npu.config import otel as otel_config
    from otel_npu.export import pipeline as telemetry

    otel = otel_config.read(env)
    exporters = telemetry.trace_exporters(otel)
    kinds = [k for k in ("otlp", "console") if k in exporters]
    if otel.traces_file:
        kinds.append("file")
    return [destination(env, kind) for kind in kinds]


class _Counted(sdk_export.SpanExporter):
    """A span exporter of the demo's provider, counting what it delivered (the SDK's BatchSpanProcessor
    calls ``export`` from one thread of its own)."""

    def __init__(self, exporter: Any, place: str) -> None:
        self._exporter = exporter
        self.place = place
        self.delivered = 0
        self.failed = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self._exporter.export(spans)
        except Exception:  # an exporter that raises loses the batch, as the SDK's processor would
            result = SpanExportResult.FAILURE
        if result == SpanExportResult.SUCCESS:
            self.delivered += len(spans)
        else:
            self.failed += len(spans)
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def report(self, ended: int) -> tuple[str, bool]:
        """One line on what reached this destination, and whether everything did."""
        lost = ended - self.delivered
        if not lost:
            return f"Traces {self.place}" + (f": all {ended} spans delivered." if "OTLP" in self.place else "."), True
        why = []
        if self.failed:
            why.append(f"{self.failed} export_failed: " + ("the collector did not accept them" if "OTLP" in self.place
                                                          else "they could not be written"))
        if lost - self.failed:
            why.append(f"{lost - self.failed} not sent before the demo ended (the exporter's queue was full or "
                       "still waiting for the collector)")
        if self.delivered:
            return (f"Traces {self.place}: {self.delivered} of {ended} spans delivered, {lost} lost "
                    f"({'; '.join(why)}).", False)
        return f"Traces NOT {self.place}: {lost} of {ended} spans lost ({'; '.join(why)}).", False


class _Collect(sdk_trace.SpanProcessor):
    """A span processor keeping every finished span, for the closing table (runs on the resolver thread
    for otel-npu's spans: it only appends)."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def on_end(self, span: Any) -> None:
        self.spans.append(span)


def _log_through(write: Any) -> None:
    """Send log lines (otel-npu's warnings, the duration lines) through ``write`` so that they do not
    break the progress bar; only when the application has not configured logging itself."""
    root = logging.getLogger()
    if root.handlers:
        return

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                write(self.format(record))
            except Exception:  # pragma: no cover - logging must never raise into the loop
                self.handleError(record)

    handler = Handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from otel_npu.config import process_env

    env = process_env()  # the demo is the program: its environment is the process's
    started = time.monotonic()
    try:  # the demo extra: said plainly, before anything is set up or written
        import tqdm as _tqdm  # noqa: F401
        import transformers as _transformers  # noqa: F401
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        print(f"otel-npu demo needs the demo extra ({missing} is missing): pip install 'otel-npu[demo]' "
              "(from a checkout: pip install -e '.[demo]')", file=sys.stderr)
        return 2
    from otel_npu.export import registry as _registry

    if env.get("OTEL_TRACES_EXPORTER", "").strip():
        # As the library reads it (config.env.keep_known): unknown names are left out, and a variable naming
        # no known exporter reads as unset, which for the demo means its traces file. Said once, here; the
        # variable is rewritten to what is left, so that nothing reads the unknown names again.
        from otel_npu.config import env as _env

        named = _env.env_names(env, "OTEL_TRACES_EXPORTER", "otlp")
        known = [name for name in named if name in _registry.names(_registry.SPAN_EXPORTERS)]
        for name in (name for name in named if name not in _registry.names(_registry.SPAN_EXPORTERS)):
            consequence = (f"ignored; using {', '.join(known)}" if known else
                           "ignored, as if OTEL_TRACES_EXPORTER were not set: the demo writes its traces to a file")
            print("otel-npu demo: " + _env.unknown_name_message("OTEL_TRACES_EXPORTER", name, _registry.names(_registry.SPAN_EXPORTERS),
                                                                 consequence), file=sys.stderr)
        if known:
            env["OTEL_TRACES_EXPORTER"] = ",".join(known)
        else:
            del env["OTEL_TRACES_EXPORTER"]
    file_path = configure_destination(env)
    env.setdefault("OTEL_SERVICE_NAME", "otel-npu-demo")

    from tqdm import tqdm

    _log_through(lambda line: tqdm.write(line, file=sys.stderr))

    import otel_npu
    from otel_npu import devices
    from otel_npu.export import pipeline as telemetry
    from otel_npu.cli import tracefile

    try:
        backend, passed_over = devices.select(args.device)
    except devices.DeviceUnavailable as exc:
        print(f"otel-npu demo: --device {args.device} is not usable here: {exc}", file=sys.stderr)
        return 2
    kind, device_label = backend.kind, backend.label()
    backend.close()

    import torch
    import transformers
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    transformers.logging.set_verbosity_error()
    threads, threads_why = choose_threads(args.threads, env)
    torch.set_num_threads(threads)
    layers, hidden, intermediate, heads, kv_heads, vocab = MODEL_SIZES[args.model_size]

    destinations: list[_Counted] = []

    def counted(exporter: Any, kind: str) -> _Counted:
        destinations.append(_Counted(exporter, destination(env, kind)))
        return destinations[-1]

    provider = telemetry.tracer_provider_from_env(wrap_exporter=counted)
    collected = _Collect()
    provider.add_span_processor(collected)
    trace.set_tracer_provider(provider)
    tracer = provider.get_tracer("otel_npu.demo", otel_npu.__version__)
    otel_npu.configure(enabled=True, device=kind, pipeline="auto")

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config).to(device_label).eval()
    params = sum(p.numel() for p in model.parameters())
    cache_kw = "cache" if "cache" in _parameters(model.model.forward) else "past_key_values"

    print(f"otel-npu demo: Llama-style model ({layers} layers, hidden {hidden}, vocab {vocab}, "
          f"{params / 1e6:.1f} M parameters, random weights), {_plural(args.requests, 'request')}, up to "
          f"{_plural(args.steps, 'step')}, device {device_label}, {_plural(threads, 'torch thread')} "
          f"({threads_why})")
    switch = next((var for var in ("OTEL_NPU_ENABLED", "VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE")
                   if env.get(var, "").strip()), None)
    if switch is not None and env[switch].strip().lower() not in ("1", "true"):
        print(f"  ({switch}={env[switch]!r}: the demo enables otel-npu itself, whatever that variable says)")
    if kind == "cpu":
        skipped = "; ".join(passed_over)
        print("  CPU backend: stage times are host times (the CPU is the device); on an NPU or GPU they come "
              "from device events." + (f"\n  ({skipped})" if skipped and args.device == "auto" else ""))
    sys.stdout.flush()

    def forward(input_ids: Any, cache: Any) -> Any:
        return model.model(input_ids=input_ids, use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]

    with torch.inference_mode():
        forward(torch.tensor([[1, 2, 3]], device=device_label), transformers.DynamicCache(config=config))  # warm-up, outside any step
        hooks = otel_npu.instrument_module(model.model, depth=2) if args.per_layer else None

        rng = random.Random(args.seed)
        waiting = plan_requests(args.requests, args.steps, vocab, rng)
        running: list[Request] = []
        finished: list[Request] = []
        kinds = {"Prefill": 0, "Decode": 0}
        loop_start = time.monotonic()
        bar = tqdm(total=args.steps, unit="step", disable=True if args.no_progress else None, file=sys.stderr,
                   dynamic_ncols=True)
        step_no = 0
        for step_no in range(args.steps):
            while waiting and waiting[0].arrival_step <= step_no:
                req = waiting.pop(0)
                req.arrival_ns = time.time_ns()
                req.cache = transformers.DynamicCache(config=config)
                req.span = tracer.start_span(
                    "llm_request", context=otel_context.Context(), kind=SpanKind.SERVER,
                    start_time=req.arrival_ns, attributes={
                        "gen_ai.request.id": req.id, "gen_ai.response.model": f"llama-{args.model_size}-random",
                        "gen_ai.request.max_tokens": req.max_tokens,
                        "gen_ai.usage.prompt_tokens": len(req.prompt)})
                running.append(req)
            if not running:
                if not waiting:
                    break
                bar.update(1)
                continue
            batch = list(running)
            step_kind = "Decode" if all(r.output for r in batch) else "Prefill"
            kinds[step_kind] += 1
            with otel_npu.step(step_kind, links=[r.span for r in batch],
                               attributes={"demo.batch_size": len(batch)}):
                with otel_npu.capture("prepare input"):
                    inputs = [torch.tensor([r.output[-1:] if r.output else r.prompt], device=device_label)
                              for r in batch]
                with otel_npu.capture("forward"):
                    last_hidden = [forward(ids, r.cache) for ids, r in zip(inputs, batch)]
                with otel_npu.capture("post process"):
                    logits = model.lm_head(torch.cat(last_hidden))
                with otel_npu.capture("sample"):
                    next_tokens = logits.argmax(dim=-1)
            tokens = next_tokens.tolist()  # the loop's own wait for the device, as a serving engine has one
            now = time.time_ns()
            for req, token in zip(batch, tokens):
                if not req.output:
                    req.first_token_ns = now
                req.output.append(token)
                if len(req.output) >= req.max_tokens:
                    _finish(req, now, "length")
                    running.remove(req)
                    finished.append(req)
            bar.update(1)
            bar.set_postfix(running=len(running), done=len(finished), refresh=False)
            if not running and not waiting:
                break
        if bar.n < args.steps:  # every request finished before --steps ran out
            bar.total = bar.n
            bar.refresh()
        bar.close()
        for req in running:  # --steps ran out first
            _finish(req, time.time_ns(), "steps")
            finished.append(req)
        loop_s = time.monotonic() - loop_start
        if hooks is not None:
            hooks.remove()

    delivered = otel_npu.flush(10.0)
    stats = otel_npu.stats()
    otel_npu.shutdown(5.0)
    final = otel_npu.stats()  # after the last metrics export, which shutdown makes
    provider.force_flush(10_000)
    provider.shutdown()

    records = [tracefile.from_readable(s) for s in collected.spans]
    tokens_out = sum(len(r.output) for r in finished)
    print(f"served {len(finished)} requests ({tokens_out} tokens) in {kinds['Prefill'] + kinds['Decode']} steps "
          f"({kinds['Prefill']} Prefill, {kinds['Decode']} Decode) in {loop_s:.1f} s; "
          f"{len(records)} spans")
    print()
    print(f"Stage times on {device_label} (ms; share = of the summed step time of that kind):")
    print(tracefile.format_table(tracefile.stage_rows(records)))
    print()
    all_there = True
    lost = final.get("dropped_total", 0)
    if lost or not delivered:
        all_there = False
        print(f"otel-npu lost {lost} captures/spans: {final.get('dropped')}" if lost else
              "otel-npu: not everything was delivered within the flush time-out")
    for place in destinations:
        line, ok = place.report(len(records))
        all_there &= ok
        print(line)
    if not destinations:
        print("Traces went nowhere (no exporter configured).")
    target = file_path or env.get("OTEL_NPU_TRACES_FILE", "").strip()
    if target:
        print(f"  otel-npu summary {target}")
        print(f"  otel-npu chrome-trace {target} -o trace.json   # open in https://ui.perfetto.dev or "
              "chrome://tracing")
    metrics = stats.get("metrics", "none")
    exported, failed = final.get("metrics_exported", 0), final.get("metrics_export_failed", 0)
    if metrics.startswith("none"):
        print("Stage metrics were not exported (no collector configured; the table above has the same durations).")
    elif failed and not exported:
        all_there = False
        print(f"Stage metrics were not delivered to {metrics}: {failed} export(s) failed.")
    else:
        print(f"Stage metrics went to {metrics}" + (f" ({failed} of {exported + failed} exports failed)" if failed
                                                     else "") + ".")
    print(f"({time.monotonic() - started:.1f} s in all)")
    if not all_there:
        print("otel-npu demo: not everything was delivered (see above); exit status 1")
        return 1
    return 0


def _finish(req: Request, now: int, reason: str) -> None:
    req.span.set_attributes({
        "gen_ai.usage.completion_tokens": len(req.output),
        "gen_ai.response.finish_reasons": [reason],
        "gen_ai.latency.time_to_first_token": (req.first_token_ns - req.arrival_ns) / 1e9 if req.output else 0.0,
        "gen_ai.latency.e2e": (now - req.arrival_ns) / 1e9,
    })
    req.span.end(end_time=now)
    req.cache = None


def _parameters(fn: Any) -> Any:
    import inspect

    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
