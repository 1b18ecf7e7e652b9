"""Helpers shared by the tests (one copy each): the environment a test runs in, ports, the simulated device's
truth, and the switches that turn a missing real part into a failure in CI.

Test modules import from here, never from one another or from ``conftest``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any, Iterator, Mapping

import pytest
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

# -- the environment -------------------------------------------------------------------------------------
#: Variables the shell may pass on to the tests: what finding programs, libraries, certificates and caches
#: needs. Everything else (OTEL_*, VLLM_*, RANK/LOCAL_RANK, OMP_NUM_THREADS, proxies, ...) is left out, so that
#: a sampler, an endpoint or a rank set in the shell cannot change what a test sees.
KEEP = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TMP", "TEMP",
    "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    # Which implementation runs, not what it does: CI's second pass runs the tests (and their processes) with
    # the pure-Python modules instead of the compiled core (otel_npu/_compiled.py).
    "OTEL_NPU_PURE_PYTHON",
})
KEEP_PREFIXES = ("LC_", "PIP_", "XDG_", "CUDA_", "NVIDIA_", "ASCEND_", "HF_")
#: The tests' own switches (not otel-npu settings): where vLLM and Phoenix are, what CI requires, where the
#: GPU check writes. They stay in the tests' environment, and are not passed to the processes tests start.
TEST_KNOBS = frozenset({"OTEL_NPU_VLLM_PYTHON", "OTEL_NPU_VLLM_V2_PATH", "OTEL_NPU_PHOENIX", "OTEL_NPU_SCREENSHOT",
                        "OTEL_NPU_COMPILE_BACKEND", "OTEL_NPU_GPU_CHECK_OUT", "OTEL_NPU_SOURCES_CACHE",
                        "OTEL_NPU_PYPI_JSON"})
REQUIRE_PREFIX = "OTEL_NPU_REQUIRE_"


def kept(name: str) -> bool:
    return name in KEEP or name.startswith(KEEP_PREFIXES) or is_knob(name)


def is_knob(name: str) -> bool:
    return name in TEST_KNOBS or name.startswith(REQUIRE_PREFIX)


def clean_environ(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` reduced to what ``kept`` lets through."""
    return {k: v for k, v in env.items() if kept(k)}


#: The session's environment once cleaned (conftest replaces ``os.environ`` with it before otel-npu is imported).
SESSION_ENV: dict[str, str] = clean_environ(os.environ)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: the session's clean environment without the test knobs,
    plus ``extra``. Nothing the test itself set in ``os.environ`` leaks in unless it is passed here."""
    env = {k: v for k, v in SESSION_ENV.items() if not is_knob(k)}
    env.update(extra)
    return env


# -- real parts that may be missing -----------------------------------------------------------------------
def required(part: str) -> bool:
    """Whether ``OTEL_NPU_REQUIRE_<PART>=1`` asks for ``part`` (CI sets it: a missing part fails there)."""
    return os.environ.get(REQUIRE_PREFIX + part.upper()) == "1"


def missing(part: str, why: str) -> None:
    """Skip for a missing real part, or fail when CI requires it (``OTEL_NPU_REQUIRE_<PART>=1``)."""
    if required(part):
        pytest.fail(f"{why} ({REQUIRE_PREFIX}{part.upper()}=1: required here)")
    pytest.skip(why)


# -- ports, clocks, the simulated device's truth ------------------------------------------------------------
def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Stated bound on |span time - simulated device time| in these tests, when the device clock does not drift:
#: anchor placement (launch latency 5 µs + the record call) + float32 ms rounding + host clock sampling.
TIME_BOUND_NS = 50_000


def wall_of(mono_ns: int) -> int:
    """Host monotonic ns -> Unix epoch ns, as a test's own reference (the tightest of five samples)."""
    best = None
    for _ in range(5):
        a = time.perf_counter_ns()
        w = time.time_ns()
        b = time.perf_counter_ns()
        if best is None or b - a < best[0]:
            best = (b - a, w - (a + b) // 2)
    return mono_ns + best[1]


def truth(c: Any) -> tuple[int, int]:
    """Wall-clock times at which the simulated device ran a capture's two events: the records the capture made
    (the first of each event's at or after the host time it read just before recording), not the events'
    latest. Once the capture is resolved its events go back to the pool, and the next capture or clock anchor
    records them again: a test that reads later (a loaded machine) still gets this capture's times."""
    start, end = c.start.ran_at(c.host_start), c.end.ran_at(c.host_end)
    assert start is not None and end is not None, "truth read before the device ran the capture's events"
    return wall_of(start), wall_of(end)


class ListMetricExporter(MetricExporter):
    """An SDK ``MetricExporter`` that keeps every batch it is given (``batches``)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[Any] = []

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        self.batches.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def enable(provider: tuple[Any, Any], **kwargs: Any) -> None:
    """Turn otel-npu on with spans going to the in-memory provider (the ``provider`` fixture)."""
    import otel_npu

    otel_npu.configure(enabled=True, tracer_provider=provider[0], **kwargs)


# -- the resolver's passes, counted instead of waited for --------------------------------------------------
class ResolverPasses:
    """Counts the passes of a running resolver (``runtime.current().resolver``), so that a test waits for a
    number of passes instead of sleeping for a time a loaded machine may not give the resolver; ``held()``
    keeps passes from running while the test does something that must reach the resolver all at once."""

    def __init__(self, resolver: Any) -> None:
        self.count = 0
        self._cond = threading.Condition()
        self._run = threading.Event()
        self._run.set()
        original = resolver._guarded_pass

        def counted_pass() -> None:
            self._run.wait()
            original()
            with self._cond:
                self.count += 1
                self._cond.notify_all()

        resolver._guarded_pass = counted_pass  # the resolver's loop looks it up on the instance each time

    def wait_for_more(self, n: int, timeout_s: float = 60.0) -> None:
        """Block until ``n`` more passes ran (a deadline for a stuck resolver, not a measurement)."""
        with self._cond:
            target = self.count + n
            assert self._cond.wait_for(lambda: self.count >= target, timeout_s), (
                f"the resolver made {self.count - target + n} of {n} passes in {timeout_s} s")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No pass begins inside the block (one already running finishes)."""
        self._run.clear()
        try:
            yield
        finally:
            self._run.set()


# -- vLLM's scheduler output, as the worker receives it ------------------------------------------------------
def new_request(req_id: str, prompt_len: int, traceparent: str | None = None) -> Any:
    """A ``NewRequestData`` stand-in (what the plugin reads of it)."""
    from types import SimpleNamespace as NS

    return NS(req_id=req_id, prompt_token_ids=list(range(prompt_len)), prompt_embeds=None,
              trace_headers={"traceparent": traceparent} if traceparent else None)


def scheduler_output(new: Any = (), cached: Any = (), finished: Any = ()) -> Any:
    """A ``SchedulerOutput`` stand-in. ``cached``: (req_id, num_computed_tokens, tokens scheduled now)."""
    from types import SimpleNamespace as NS

    scheduled = {r.req_id: len(r.prompt_token_ids) for r in new}
    scheduled.update({req_id: n for req_id, _, n in cached})
    return NS(scheduled_new_reqs=list(new), num_scheduled_tokens=scheduled,
              total_num_scheduled_tokens=sum(scheduled.values()), finished_req_ids=set(finished),
              scheduled_cached_reqs=NS(req_ids=[c[0] for c in cached], num_computed_tokens=[c[1] for c in cached]))


# -- one test, every device kind ------------------------------------------------------------------------------
class DeviceKind:
    """What a test needs of one device kind (PyTorch's ``instantiate_device_type_tests`` is the model): how to
    turn otel-npu on for it, how to queue work that takes at least a given time there, the label its spans
    carry, and whether its times are the device's (True) or the host's (the CPU)."""

    def __init__(self, name: str, configure: dict, work: Any, label: str, device_timed: bool,
                 close: Any = None) -> None:
        self.name, self.configure, self.work, self.label = name, configure, work, label
        self.device_timed, self.close = device_timed, close

    def __repr__(self) -> str:
        return f"DeviceKind({self.name})"


#: The kinds ``device_kind`` (conftest) runs a test on; "cuda" only where a real GPU is present.
DEVICE_KINDS = ("sim-npu", "sim-cuda", "cpu", "cuda")


def make_device_kind(name: str, install_torch_npu: Any) -> DeviceKind:
    """A fresh device of kind ``name`` (skips "cuda" without a GPU)."""
    if name in ("sim-npu", "sim-cuda"):
        from otel_npu.testing import SimDevice

        sim = SimDevice(api=name[4:])
        if name == "sim-npu":
            install_torch_npu(sim)  # found as torch_npu: otel-npu's NPU backend, as on an Ascend host
            configure = {"device": "npu"}
        else:
            configure = {"device": sim}
        return DeviceKind(name, configure, lambda s: sim.current_stream().launch(s), "sim:0" if name == "sim-cuda"
                          else "npu:0", True, sim.close)
    if name == "cpu":
        return DeviceKind(name, {"device": "cpu"}, time.sleep, "cpu", False)
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    # _sleep spins cycles: at most 2 GHz on current GPUs, so 2e9 cycles per second is at least that long.
    return DeviceKind(name, {"device": "cuda"}, lambda s: torch.cuda._sleep(int(s * 2e9)), "cuda:0", True)
