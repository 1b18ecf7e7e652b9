"""A model runner's step loop with otel-npu, standalone: request trace context in, device-timed stages out.

    python examples/model_runner.py                      # no collector: traces to ./otel-npu-traces-*.jsonl
    otel-npu summary otel-npu-traces-*.jsonl
    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 python examples/model_runner.py   # to a collector

Each request arrives with a W3C ``traceparent`` header (here made up by a pretend client); the runner keeps
its span context, and every step links to the requests of its batch. The model is a small torch MLP on
whatever device otel-npu picks (``OTEL_NPU_DEVICE``), so the example needs nothing but otel-npu.
"""

from __future__ import annotations

import os

import torch
from opentelemetry import trace
from opentelemetry.propagate import extract

import otel_npu
from otel_npu.config.otel import use_traces_file_unless_configured
from otel_npu.export.pipeline import tracer_provider_from_env


def client_headers(i: int) -> dict[str, str]:
    """What an HTTP front end would receive: a traceparent made by the caller's own tracing."""
    return {"traceparent": f"00-{0xABC000 + i:032x}-{0xDEF000 + i:016x}-01"}


def main() -> int:
    # Nothing configured: a file, not a collector at localhost:4318 that is probably not there.
    use_traces_file_unless_configured()
    provider = tracer_provider_from_env()  # the serving application's provider (vLLM: init_tracer)
    trace.set_tracer_provider(provider)
    otel_npu.configure(enabled=True)
    device = otel_npu.stats().get("device") or "cpu"
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    tracer = provider.get_tracer("model_runner")

    requests = []
    for i in range(3):
        ctx = extract(client_headers(i))  # W3C traceparent / tracestate
        span = tracer.start_span("llm_request", context=ctx, attributes={"gen_ai.request.id": f"req-{i}"})
        requests.append(span)

    with torch.inference_mode():
        for step_no in range(4):
            with otel_npu.step("Prefill" if step_no == 0 else "Decode",
                               links=[r.get_span_context() for r in requests]):
                with otel_npu.capture("prepare input"):
                    x = torch.randn(len(requests), 64)
                with otel_npu.capture("forward"):
                    hidden = model(x)
                with otel_npu.capture("post process"):
                    logits = hidden.softmax(-1)
                with otel_npu.capture("sample"):
                    tokens = logits.argmax(-1)
            tokens.tolist()
    for span in requests:
        span.end()
    otel_npu.flush()
    metrics = otel_npu.stats().get("metrics")
    provider.shutdown()
    print(f"4 steps for {len(requests)} requests on {device}; traces: "
          f"{os.environ.get('OTEL_NPU_TRACES_FILE') or 'per OTEL_TRACES_EXPORTER'}; stage metrics: {metrics}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
