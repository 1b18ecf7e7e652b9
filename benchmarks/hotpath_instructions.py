"""Instructions per hot-path call, counted by valgrind's callgrind: a deterministic figure where timings on a
shared machine are not (two runs of the same code agree within ≈ 30 instructions per call).

``python -m benchmarks.hotpath_instructions [--n 100000]`` runs, under ``valgrind --tool=callgrind
--separate-threads=yes``, a loop of ``n`` and of ``2n`` iterations of each variant (enabled capture and step on
the CPU backend, disabled capture, ``contextlib.nullcontext`` for scale) and prints, per variant, the main
thread's instructions per iteration: ``(I(2n) - I(n)) / n``, so that start-up and import cancel out. The
resolver is kept asleep for the loop (60 s poll, no pending limit reached), the cyclic GC is off and hash
randomization fixed, so that only the capturing thread's own work is counted. Needs ``valgrind``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

VARIANTS = ("capture", "step", "off", "nullcontext")

LOOP = r"""
import os, sys
os.environ.update({"OTEL_NPU_ENABLED": "1", "OTEL_NPU_DEVICE": "cpu", "OTEL_NPU_PIPELINE": "own",
                   "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
                   "OTEL_NPU_POLL_INTERVAL_MS": "60000", "OTEL_NPU_MAX_PENDING": "10000000"})
import otel_npu
mode, n = sys.argv[1], int(sys.argv[2])
if mode == "off":
    otel_npu.configure(enabled=False)
with otel_npu.capture("warm-up"):
    pass
otel_npu.flush(10.0)
import gc
gc.disable()
capture, step = otel_npu.capture, otel_npu.step
if mode in ("capture", "off"):
    for _ in range(n):
        with capture("forward"):
            pass
elif mode == "step":
    for _ in range(n):
        with step("Decode"):
            pass
else:
    import contextlib
    nullcontext = contextlib.nullcontext
    for _ in range(n):
        with nullcontext():
            pass
sys.stdout.flush()
os._exit(0)
"""


def main_thread_instructions(mode: str, n: int, root: pathlib.Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "cg.out"
        env = dict(os.environ, PYTHONPATH=str(root), PYTHONHASHSEED="0")
        subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
                        sys.executable, "-c", LOOP, mode, str(n)], env=env, check=True, capture_output=True)
        for line in pathlib.Path(f"{out}-01").read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError("callgrind wrote no totals")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="iterations of the shorter loop")
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parent.parent),
                        help="the checkout whose otel_npu is measured (default: this one)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.root)
    print(f"main-thread instructions per iteration (callgrind, n={args.n} vs {2 * args.n}), {root}:")
    for mode in VARIANTS:
        short = main_thread_instructions(mode, args.n, root)
        long = main_thread_instructions(mode, 2 * args.n, root)
        print(f"  {mode:12s} {(long - short) / args.n:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
