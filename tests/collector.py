"""A real OpenTelemetry collector for tests: ``rotel-agent`` (Rust), shipped in the ``rotel`` wheel on PyPI.

It listens for OTLP on loopback (gRPC and HTTP) and forwards everything it receives (traces and metrics) over
OTLP to a test receiver (``otlp_receiver.py``), so a test sees what went through a real collector. It can be
killed and restarted on the same ports, for the failure tests.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

from .support import free_port, missing


def agent_path() -> str | None:
    """The ``rotel-agent`` binary of the installed ``rotel`` package (or one on PATH)."""
    try:
        import rotel
    except ImportError:
        return shutil.which("rotel-agent")
    candidate = pathlib.Path(rotel.__file__).parent / "rotel-agent"
    return str(candidate) if candidate.exists() else shutil.which("rotel-agent")


def require_agent() -> str:
    """The agent's path; skips without it, or fails where ``OTEL_NPU_REQUIRE_ROTEL=1`` (CI)."""
    path = agent_path()
    if path is None:
        missing("rotel", "rotel-agent not found: `pip install -e .[test]` installs the rotel collector (.ci/run does)")
    return path


class Collector:
    """``rotel-agent start`` on two free loopback ports, forwarding to ``forward_to`` over ``forward_protocol``
    (``grpc`` or ``http``)."""

    def __init__(self, forward_to: str, forward_protocol: str, workdir: pathlib.Path) -> None:
        self.binary = require_agent()
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.forward_to = forward_to
        self.forward_protocol = forward_protocol
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def endpoint(self, protocol: str) -> str:
        """The OTLP endpoint for otel-npu's ``protocol`` (``grpc`` or ``http/protobuf``)."""
        port = self.grpc_port if protocol == "grpc" else self.http_port
        return f"http://127.0.0.1:{port}"

    def start(self) -> "Collector":
        self.starts += 1
        log = open(self.workdir / f"rotel-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, "start",
             "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
             "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
             "--exporter", "otlp", "--otlp-exporter-endpoint", self.forward_to,
             "--otlp-exporter-protocol", self.forward_protocol,
             "--otlp-exporter-compression", "none",
             "--batch-timeout", "50ms",
             "--pid-file", str(self.workdir / "rotel.pid"), "--log-file", str(self.workdir / "rotel-agent.log")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        for port in (self.grpc_port, self.http_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"rotel-agent did not start: {self.output()}")
                    time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: the collector vanishes without a goodbye, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        path = self.workdir / f"rotel-{self.starts}.log"
        return path.read_text(errors="replace")[-3000:] if os.path.exists(path) else ""
