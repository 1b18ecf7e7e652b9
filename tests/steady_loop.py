"""A serving process for the failure tests: a steady step loop on the simulated device, driven over stdin.

Commands (one per line), each answered by one JSON line on stdout:

* ``run N LABEL RATE`` — N records at RATE records/s at most (steps of 1 step + 4 captures named ``LABEL/...``); answers the RSS, the export
  queue and pending lengths seen (max), the longest loop iteration, how many took ``LONG_ITERATION_S`` or
  more, and otel-npu's counters;
* ``flush SECONDS`` — ``otel_npu.flush``; answers whether it finished and how long it took;
* ``exit`` — answers the time, then exits normally: otel-npu's exit hook flushes within its bound, and the
  final counters and the time it finished are printed as one more JSON line (``{"final": ..., "at": ...}``).
"""

from __future__ import annotations

import atexit
import json
import sys
import time

#: An iteration at least this long is counted in ``long_iterations`` (one that waited for an export attempt,
#: which lasts at least OTEL_EXPORTER_OTLP_TIMEOUT = 1 s in the failure tests, would be).
LONG_ITERATION_S = 0.9


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    final: dict = {}
    # Registered before otel-npu's own hook, so it runs after it (atexit is last in, first out).
    # "at": when otel-npu's exit hook had finished, so that the exit's time is otel-npu's, not the interpreter's.
    atexit.register(lambda: print(json.dumps({"final": final.get("rt").stats.snapshot(), "at": time.time()}),
                                  flush=True))

    import otel_npu
    from otel_npu import runtime
    from otel_npu.testing import SimDevice

    sim = SimDevice()
    otel_npu.configure(enabled=True, device=sim, pipeline="own")
    stream = sim.current_stream()
    with otel_npu.capture("warm-up"):
        pass
    rt = final["rt"] = runtime.current()
    sinks = [s for s in rt.pipeline.sinks if hasattr(s, "_queue")]

    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            n, label, rate = int(cmd[1]), cmd[2], float(cmd[3])
            start = time.perf_counter()
            names = [f"{label}/{stage}" for stage in ("prepare", "forward", "post", "sample")]
            worst = rss_max = queue_max = pending_max = long_iterations = 0
            rss_first = None
            rss_samples = []
            done = 0
            while done < n:
                begin = time.perf_counter()
                with otel_npu.step(f"{label}/Decode"):
                    for name in names:
                        with otel_npu.capture(name):
                            stream.launch(0.00001)
                end = time.perf_counter()
                worst = max(worst, end - begin)
                long_iterations += end - begin >= LONG_ITERATION_S
                done += 5
                ahead = start + done / rate - end  # a steady loop: `rate` records per second at most
                if ahead > 0:
                    time.sleep(ahead)
                if done % 5000 == 0:
                    sim.timing_calls.clear()  # the simulator's own log of timing reads (for other tests)
                    rss = rss_bytes()
                    rss_samples.append(rss)
                    rss_first = rss if rss_first is None else rss_first
                    rss_max = max(rss_max, rss)
                    queue_max = max([queue_max] + [len(s._queue) for s in sinks])
                    pending_max = max(pending_max, len(rt.pending))
            print(json.dumps({"done": label, "records": done, "rss_first": rss_first, "rss_max": rss_max,
                              "rss": rss_samples,
                              "queue_max": queue_max, "pending_max": pending_max, "worst_iteration_s": worst,
                              "long_iterations": long_iterations,
                              "stats": rt.stats.snapshot()}), flush=True)
        elif cmd[0] == "flush":
            begin = time.monotonic()
            ok = otel_npu.flush(float(cmd[1]))
            print(json.dumps({"flushed": ok, "took_s": time.monotonic() - begin, "stats": rt.stats.snapshot()}),
                  flush=True)
        elif cmd[0] == "exit":
            print(json.dumps({"exit_at": time.time()}), flush=True)
            return


if __name__ == "__main__":
    main()
