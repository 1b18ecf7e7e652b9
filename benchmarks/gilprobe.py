"""Build and read ``gilprobe.c``: per-thread time spent waiting for the GIL (and on other condition variables).

    lib = gilprobe.build(tmpdir)                       # gcc -O2 -shared -fPIC; None without gcc
    env = dict(os.environ, LD_PRELOAD=lib, GILPROBE_DIR=probe_dir)
    ... start the program with env ...
    before = gilprobe.read(probe_dir, pid)            # {tid: Waits}
    ... load ...
    waits = gilprobe.delta(gilprobe.read(probe_dir, pid), before)

Kinds (see the C file): ``take`` — a thread waiting in CPython's ``take_gil`` for another thread to release the
GIL (condition-variable slices of the switch interval, 5 ms by default: one acquisition may be several calls);
``switch`` — a thread that was asked to drop the GIL waiting in ``drop_gil`` until the asking thread has
actually taken it (forced switching: the waiting thread cannot run Python, nor anything else, meanwhile);
``other`` — any other ``pthread_cond_wait``/``pthread_cond_timedwait`` in the process.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".c")
MAGIC = 0x31424F5250504C47
KINDS = ("take", "switch", "other")
BUCKETS = 32
_HEADER = struct.Struct("<QIIIIiI")
_KIND = struct.Struct(f"<{3 + BUCKETS}Q")
_SLOT_HEAD = struct.Struct("<iI")


@dataclass
class Kind:
    calls: int = 0
    ns: int = 0
    timeouts: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def minus(self, other: Kind) -> Kind:
        return Kind(self.calls - other.calls, self.ns - other.ns, self.timeouts - other.timeouts,
                    [a - b for a, b in zip(self.hist, other.hist)])

    def plus(self, other: Kind) -> Kind:
        return Kind(self.calls + other.calls, self.ns + other.ns, self.timeouts + other.timeouts,
                    [a + b for a, b in zip(self.hist, other.hist)])

    def quantile_us(self, q: float) -> float:
        """The ``q`` quantile of the call durations, in µs, interpolated within its power-of-two bucket."""
        total = sum(self.hist)
        if not total:
            return float("nan")
        rank, seen = q * total, 0
        for b, n in enumerate(self.hist):
            if n and seen + n >= rank:
                lo, hi = (0.0, 1.0) if b == 0 else (float(2 ** (b - 1)), float(2 ** b))
                return lo + (hi - lo) * (rank - seen) / n
            seen += n
        return float(2 ** (BUCKETS - 1))


@dataclass
class Waits:
    """One thread's waits, by kind (cumulative since the thread's first wait, or a delta)."""

    kinds: dict[str, Kind] = field(default_factory=lambda: {k: Kind() for k in KINDS})

    @property
    def gil(self) -> Kind:
        return self.kinds["take"].plus(self.kinds["switch"])

    def minus(self, other: Waits | None) -> Waits:
        if other is None:
            return self
        return Waits({k: self.kinds[k].minus(other.kinds[k]) for k in KINDS})

    def plus(self, other: Waits) -> Waits:
        return Waits({k: self.kinds[k].plus(other.kinds[k]) for k in KINDS})


def build(dest: str | os.PathLike[str], source: Path = SOURCE) -> str | None:
    """Compile the probe into ``dest``; its path, or None when there is no C compiler."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = Path(dest) / "libgilprobe.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wall", "-o", str(out), str(source), "-ldl", "-lpthread"],
                   check=True, capture_output=True)
    return str(out)


def path_of(directory: str | os.PathLike[str], pid: int) -> Path:
    return Path(directory) / f"gilprobe-{pid}"


def read(directory: str | os.PathLike[str], pid: int) -> dict[int, Waits]:
    """The cumulative waits of every thread of process ``pid`` that has waited so far ({} when its file is not
    there: not started under the probe, or not yet loaded)."""
    try:
        with open(path_of(directory, pid), "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (FileNotFoundError, ValueError):  # ValueError: an empty file, being created
        return {}
    try:
        magic, _version, max_slots, used, slot_bytes, _pid, _lost = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            return {}
        threads: dict[int, Waits] = {}
        for i in range(min(used, max_slots)):
            offset = _HEADER.size + i * slot_bytes
            tid, _ = _SLOT_HEAD.unpack_from(data, offset)
            if tid <= 0:
                continue  # slot taken, tid not yet written
            kinds = {}
            for k, name in enumerate(KINDS):
                values = _KIND.unpack_from(data, offset + _SLOT_HEAD.size + k * _KIND.size)
                kinds[name] = Kind(values[0], values[1], values[2], list(values[3:]))
            # A thread id seen twice (a forked child's file reused a slot) is summed.
            threads[tid] = threads[tid].plus(Waits(kinds)) if tid in threads else Waits(kinds)
        return threads
    finally:
        data.close()


def delta(after: dict[int, Waits], before: dict[int, Waits]) -> dict[int, Waits]:
    """Per thread, what was added between two ``read``s."""
    return {tid: w.minus(before.get(tid)) for tid, w in after.items()}
