"""The parts of ``benchmarks/vllm_serve.py`` that can be checked without vLLM: the pairing and its statistics,
vLLM's ``/metrics`` histograms, what otel-npu's loss reports say, and the GIL-wait probe (built with gcc and
run under a toy C program and a toy Python program)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from typing import ClassVar

import pytest

from benchmarks import gilprobe
from benchmarks import vllm_serve as bench


def test_pairs_alternate_their_order_abba():
    assert [bench.pair_order(p, ["A", "B"]) for p in range(4)] == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert bench.pair_order(1, ["A", "B", "C"]) == ["C", "B", "A"]


def test_pair_statistics_are_taken_per_pair():
    a = [100.0, 200.0, 50.0, 0.0]
    b = [90.0, 190.0, 50.0, 5.0]
    st = bench.pair_stats(a, b)
    ratios = [0.9, 0.95, 1.0]  # the pair with a = 0 has no ratio, but a difference
    assert st["ratio_pairs"] == 3 and st["ratios"] == pytest.approx(ratios)
    assert st["ratio_mean"] == pytest.approx(sum(ratios) / 3)
    sd = math.sqrt(sum((r - 0.95) ** 2 for r in ratios) / 2)
    assert st["ratio_2se"] == pytest.approx(2 * sd / math.sqrt(3))
    assert st["ratio_median"] == pytest.approx(0.95)
    assert st["diff_pairs"] == 4 and st["diff_mean"] == pytest.approx((-10 - 10 + 0 + 5) / 4)
    single = bench.pair_stats([2.0], [1.0])
    assert single["ratio_mean"] == 0.5 and math.isnan(single["ratio_2se"])


def test_summary_pairs_windows_by_pair_not_by_position():
    windows = []
    for pair, (a, b) in enumerate([(100.0, 50.0), (400.0, 200.0)]):
        for v, tps in bench.pair_order(pair, [("A", a), ("B", b)]):
            w = {m: float("nan") for m, _ in bench.METRICS}
            w.update(pair=pair, variant=v, tokens_per_s=tps)
            windows.append(w)
    summary = bench.summarize(windows, ["A", "B"])
    assert summary["tokens_per_s"]["B/A"]["ratios"] == [0.5, 0.5]
    assert summary["tokens_per_s"]["median"] == {"A": 250.0, "B": 125.0}
    assert "B/A" in bench.markdown({"settings": {"pairs": 2, "window_s": 8.0}, "machine": {},
                                    "configs": {"grpc-eager": {"config": {"streams": 8, "protocol": "grpc",
                                                                          "args": []},
                                                               "variants": {"A": "", "B": ""},
                                                               "windows": windows, "summary": summary}}})


METRICS_TEXT = textwrap.dedent("""\
    # HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
    # TYPE vllm:inter_token_latency_seconds histogram
    vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="tiny"} %d
    vllm:inter_token_latency_seconds_bucket{engine="0",le="0.025",model_name="tiny"} %d
    vllm:inter_token_latency_seconds_bucket{engine="0",le="0.05",model_name="tiny"} %d
    vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} %d
    vllm:inter_token_latency_seconds_count{engine="0",model_name="tiny"} %d
    vllm:inter_token_latency_seconds_sum{engine="0",model_name="tiny"} %f
    vllm:iteration_tokens_total_count{engine="0",model_name="tiny"} %d
    vllm:inter_token_latency_seconds_created{engine="0",model_name="tiny"} 1.79e+09
    """)


def test_histogram_deltas_give_the_windows_mean_and_interpolated_p99():
    before = METRICS_TEXT % (10, 10, 10, 10, 10, 0.05, 7)
    # the window adds 100 latencies: 50 in (0, 10 ms], 40 in (10, 25], 10 in (25, 50]; 2.0 s in all
    after = METRICS_TEXT % (60, 100, 110, 110, 110, 2.05, 57)
    itl = bench.parse_histogram(after, bench.ITL).minus(bench.parse_histogram(before, bench.ITL))
    assert itl.count == 100 and itl.mean() == pytest.approx(0.02)
    assert itl.quantile(0.5) == pytest.approx(0.01)  # rank 50: the top of the first bucket
    assert itl.quantile(0.99) == pytest.approx(0.025 + 0.025 * 9 / 10)  # rank 99: 9 of 10 into (25, 50]
    assert itl.quantile(0.7) == pytest.approx(0.01 + 0.015 * 20 / 40)
    steps = bench.parse_histogram(after, bench.STEPS).count - bench.parse_histogram(before, bench.STEPS).count
    assert steps == 50
    assert math.isnan(bench.Histogram().quantile(0.99))


def test_a_quantile_in_the_inf_bucket_is_the_highest_finite_bound():
    h = bench.Histogram({0.01: 1.0, 0.05: 1.0, math.inf: 10.0}, 5.0, 10.0)
    assert h.quantile(0.99) == 0.05


def test_losses_are_read_from_otel_npus_reports_in_the_servers_log():
    log = textwrap.dedent("""\
        (Worker pid=1) INFO 12-02 19:23:54 [vllm.py:474] otel-npu: vLLM 0.32.0 hooked (pid 1): steps
        otel-npu lost data since its last report: 12 spans (export_queue_full): the export queue was full
        (APIServer pid=2) INFO something else
        otel-npu lost data since its last report: 3 captures (pending_limit): entered while ...; 288 spans \
(export_failed): the collector did not accept them (first error: ExportError: not delivered before shutdown)
        otel-npu lost data since its last report: 5 spans (export_queue_full): the export queue was full
        otel-npu: exporting the stage metrics failed (otlp grpc); retried every 60 s
        """)
    got = bench.losses(log)
    assert got["lost_by_reason"] == {"export_queue_full": 17, "pending_limit": 3, "export_failed": 288}
    assert got["lost_total"] == 308 and len(got["reports"]) == 3 and got["plugin_hooked_in_processes"] == 1
    assert got["other_warnings"] == ["otel-npu: exporting the stage metrics failed (otlp grpc); retried every 60 s"]
    assert bench.losses("nothing here")["lost_total"] == 0


def test_process_cpu_and_context_switches_are_read_from_proc():
    assert bench.cpu_s(os.getpid()) >= 0
    assert bench.nonvoluntary_switches(os.getpid(), os.getpid()) >= 0
    assert math.isnan(bench.cpu_s(2 ** 22 + 1))  # above pid_max: no such process
    assert os.getpid() in bench.session_pids(os.getsid(0))


# ------------------------------------------------------------------------------------------------ gilprobe

@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler")
    return gilprobe.build(tmp_path_factory.mktemp("gilprobe"))


TOY_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    pthread_mutex_lock(&m);
    for (int i = 0; i < 5; i++) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_nsec += 2000000;
        if (t.tv_nsec >= 1000000000) { t.tv_sec++; t.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&c, &m, &t);
    }
    pthread_mutex_unlock(&m);
    printf("%d\n", (int)getpid());
    return 0;
}
"""


def test_the_probe_counts_a_c_programs_condvar_waits_as_other(probe, tmp_path):
    (tmp_path / "toy.c").write_text(TOY_C)
    subprocess.run(["gcc", "-O1", "-o", str(tmp_path / "toy"), str(tmp_path / "toy.c"), "-lpthread"], check=True)
    env = dict(os.environ, LD_PRELOAD=probe, GILPROBE_DIR=str(tmp_path))
    pid = int(subprocess.run([str(tmp_path / "toy")], env=env, capture_output=True, text=True,
                             check=True).stdout)
    threads = gilprobe.read(tmp_path, pid)
    assert list(threads) == [pid]
    waits = threads[pid]
    other = waits.kinds["other"]
    assert other.calls == 5 and other.timeouts == 5
    assert other.ns >= 5 * 2_000_000  # a timed-out wait cannot end before its deadline
    assert sum(other.hist) == 5 and other.hist[0] == 0  # none under 1 µs
    assert waits.gil.calls == 0  # no Python here: no GIL


TOY_PY = """
import os, sys, threading, time
sys.path.insert(0, {root!r})
from benchmarks import gilprobe

def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

before = gilprobe.read(os.environ["GILPROBE_DIR"], os.getpid())
other = threading.Thread(target=spin, args=(0.3,))
other.start()
spin(0.3)
other.join()
after = gilprobe.read(os.environ["GILPROBE_DIR"], os.getpid())
waits = gilprobe.delta(after, before)
main = waits[threading.main_thread().native_id]
print(main.gil.calls, main.gil.ns, main.kinds["take"].calls, other.native_id in waits,
      waits[other.native_id].gil.ns)
"""


def test_the_probe_sees_two_busy_python_threads_wait_for_the_gil(probe, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LD_PRELOAD=probe, GILPROBE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", TOY_PY.format(root=root)], env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    calls, ns, take_calls, other_seen, other_ns = int(out[0]), int(out[1]), int(out[2]), out[3], int(out[4])
    # Two threads that both only run Python for 0.3 s share the GIL: each waits for it, repeatedly.
    assert calls > 0 and take_calls > 0 and ns > 0
    assert other_seen == "True" and other_ns > 0


def test_reading_a_process_without_a_probe_file_gives_nothing(tmp_path):
    assert gilprobe.read(tmp_path, 12345) == {}
    (tmp_path / "gilprobe-12345").write_bytes(b"")
    assert gilprobe.read(tmp_path, 12345) == {}


def test_the_histogram_quantile_interpolates_within_powers_of_two():
    k = gilprobe.Kind(hist=[0] * gilprobe.BUCKETS)
    k.hist[3] = 10  # [4, 8) µs
    assert k.quantile_us(0.5) == pytest.approx(6.0)
    assert math.isnan(gilprobe.Kind().quantile_us(0.5))


def test_a_windows_figures_come_from_the_snapshots_around_it():
    def waits(take_ns: int, switch_ns: int, calls: int) -> gilprobe.Waits:
        w = gilprobe.Waits()
        w.kinds["take"] = gilprobe.Kind(calls, take_ns, 0, [0] * gilprobe.BUCKETS)
        w.kinds["switch"] = gilprobe.Kind(calls, switch_ns, 0, [0] * gilprobe.BUCKETS)
        return w

    itl = bench.parse_histogram(METRICS_TEXT % (0, 0, 0, 0, 0, 0.0, 0), bench.ITL)
    before = {"itl": itl, "steps": 100.0, "worker_cpu": 10.0, "server_cpu": 20.0, "csw": 5.0,
              "gil": {7: {7: waits(1_000, 0, 1), 8: waits(0, 0, 0)}}}
    after = {"itl": bench.parse_histogram(METRICS_TEXT % (60, 100, 110, 110, 110, 2.2, 0), bench.ITL),
             "steps": 300.0, "worker_cpu": 11.0, "server_cpu": 22.0, "csw": 45.0,
             "gil": {7: {7: waits(401_000, 100_000, 21), 8: waits(3_000_000, 0, 5), 9: waits(0, 0, 0)}}}
    f = bench.window_figures(before, after, tokens_in=4000, tokens_all=5000, seconds=2.0)
    assert f["tokens_per_s"] == 2000.0
    assert f["itl_mean_ms"] == pytest.approx(20.0)
    assert f["worker_cpu_us_per_token"] == pytest.approx(200.0)  # 1 s of CPU over 5000 tokens
    assert f["server_cpu_us_per_token"] == pytest.approx(400.0)
    assert f["engine_nonvol_csw_per_step"] == pytest.approx(40 / 200)
    # the engine thread (tid = pid): 400 µs take + 100 µs switch over 200 steps, 40 waits
    assert f["engine_gil_wait_us_per_step"] == pytest.approx(500 / 200)
    assert f["engine_gil_switch_us_per_step"] == pytest.approx(100 / 200)
    assert f["engine_gil_waits_per_step"] == pytest.approx(40 / 200)
    assert f["other_threads_gil_wait_ms"] == pytest.approx(3.0)
    assert f["threads_gil_waits_ms"] == {"7/7": [40, 0.5], "7/8": [10, 3.0]}
    idle = bench.window_figures(before, dict(after, steps=100.0), 0, 0, 2.0)
    assert math.isnan(idle["engine_gil_wait_us_per_step"]) and math.isnan(idle["worker_cpu_us_per_token"])


class FakeServer:
    def __init__(self, log_path):
        self.log_path = log_path
        self.requests = 0

    def complete(self, prompt, max_tokens, traceparent=None, stream=False, timeout_s=120.0):
        assert traceparent and traceparent.startswith("00-")
        self.requests += 1
        time.sleep(0.002)
        return {"usage": {"completion_tokens": max_tokens}}

    def log(self):
        return self.log_path.read_text()


class FakeBench:
    """A server that answers at once and reads nothing from /proc: run_config's loop without vLLM."""

    made: ClassVar[dict] = {}

    def __init__(self, name, python, model, workdir, config, endpoints, probe, probe_dir):
        self.name, self.workers, self.worker_exit, self.stopped = name, [1], "running", False
        log = workdir / f"{name}.log"
        lost = "otel-npu lost data since its last report: 2 spans (export_queue_full): full\n" if name == "B" else ""
        log.write_text(lost)
        self.server = FakeServer(log)
        FakeBench.made[name] = self

    def ready(self, timeout_s):
        return 1.0

    def server_cpu(self):
        return 0.0

    def snapshot(self):
        used = 0.001 * self.server.requests  # the API server: 1 ms of CPU per request
        return {"itl": bench.Histogram(), "steps": float(self.server.requests), "worker_cpu": 0.0,
                "server_cpu": 0.0, "csw": 0.0, "gil": {},
                "cpu_by_role": {"api": used, "engine_core": 0.0, "workers": 0.0, "other": 0.0},
                "threads": {"worker/main": 2 * used, "worker/otel-npu-export": used}}

    def stop(self, timeout_s=60.0):
        self.stopped, self.worker_exit = True, "exited"


def test_run_config_alternates_the_servers_and_stops_them(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "Bench", FakeBench)
    args = argparse.Namespace(with_off=True, ready_timeout_s=10, window_s=0.05, pairs=2)
    config = bench.Config("grpc", streams=2)
    got = bench.run_config("grpc-eager", config, args, "python", tmp_path / "model", tmp_path, {}, None,
                           tmp_path / "out")
    assert [(w["pair"], w["variant"]) for w in got["windows"]] == [
        (0, "A"), (0, "B"), (0, "C"), (1, "C"), (1, "B"), (1, "A")]
    assert all(w["tokens_with_drain"] >= w["tokens_in_window"] > 0 for w in got["windows"])
    assert all(b.stopped for b in FakeBench.made.values())
    assert all(w["cpu_cores_by_role"]["api"] > 0 == w["cpu_cores_by_role"]["workers"] for w in got["windows"])
    table = bench.markdown({"settings": {"pairs": 2, "window_s": 0.05}, "machine": {},
                            "configs": {"grpc-eager": dict(got, config={"streams": 2, "protocol": "grpc",
                                                                         "args": []})}})
    assert "- A's processes, median cores during its windows: api " in table
    assert "- B's threads (worker/..., engine_core/...), median cores during its windows: worker/main " in table
    assert all(w["cores_by_thread"]["worker/main"] == 2 * w["cores_by_thread"]["worker/otel-npu-export"] > 0
               for w in got["windows"])
    assert got["losses"]["B"]["lost_by_reason"] == {"export_queue_full": 2}
    assert got["losses"]["A"]["lost_total"] == 0 and got["losses"]["A"]["worker_exit"] == "exited"
    assert (tmp_path / "out" / "logs" / "grpc-eager-B.log").exists()
    assert got["summary"]["tokens_per_s"]["B/A"]["ratio_pairs"] == 2


def test_run_delay_reads_the_schedulers_wait_of_every_thread():
    import threading

    stop = threading.Event()
    spinners = [threading.Thread(target=lambda: [None for _ in iter(lambda: stop.is_set(), True)])
                for _ in range(3)]
    for t in spinners:
        t.start()
    try:
        time.sleep(0.2)  # three spinning threads and this one on the machine's cores
        delay = bench.run_delay_s(os.getpid())
        time.sleep(0.2)
        later = bench.run_delay_s(os.getpid())
    finally:
        stop.set()
        for t in spinners:
            t.join()
    assert math.isfinite(delay) and delay >= 0
    assert later >= delay  # a running total over the threads alive
    assert math.isnan(bench.run_delay_s(2**22 + 7))  # no such process


def test_thread_cpu_by_name_tells_a_named_thread_from_the_main_one():
    import threading

    from otel_npu.threads import name_os_thread

    spun, stop = threading.Event(), threading.Event()

    def spin():
        name_os_thread("bench-spinner")
        while not stop.is_set():
            if time.thread_time() > 0.05:
                spun.set()

    t = threading.Thread(target=spin)
    before = bench.thread_cpu_by_name(os.getpid())
    t.start()
    try:
        assert spun.wait(30)
        during = bench.thread_cpu_by_name(os.getpid())
    finally:
        stop.set()
        t.join()
    assert during.get("bench-spinner", 0.0) > 0.0, during  # read while it ran: a thread that ended drops out
    assert "bench-spinner" not in before and during["main"] >= before["main"] > 0
    assert bench.thread_cpu_by_name(2**22 + 7) == {}  # no such process
