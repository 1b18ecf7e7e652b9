"""The seed's log line, for people who read durations in their logs::

    Profile execute duration [Decode]: [post process]:14.17ms [prepare input and forward]:9.57ms [forward]:4.14ms

Written (with ``OTEL_NPU_LOG_DURATIONS=1``) when a step's span is complete, and by the compat
``pop_captured_sync``. Each capture appears in one line only: whichever of the two comes first logs it.
Repeated tags are kept apart as ``tag``, ``tag#2``, ``tag#3`` (the seed's dict kept only the last one).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Iterable

from .record import Record

log = logging.getLogger("otel_npu.durations")
_claim_lock = threading.Lock()


def ensure_visible() -> None:
    """Make INFO lines of ``otel_npu.durations`` reach stderr when the application configured no logging."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def unique_tags(tags: Iterable[str]) -> list[str]:
    """``["a", "b", "a"]`` -> ``["a", "b", "a#2"]``."""
    seen: dict[str, int] = {}
    out = []
    for tag in tags:
        n = seen.get(tag, 0) + 1
        seen[tag] = n
        out.append(tag if n == 1 else f"{tag}#{n}")
    return out


def duration_ms(r: Record) -> float:
    return (r.end_ns - r.start_ns) / 1e6


def format_line(label: str, items: Iterable[tuple[str, float]]) -> str:
    return f"Profile execute duration [{label}]: " + " ".join(f"[{tag}]:{ms:.2f}ms" for tag, ms in items)


def claim(records: Iterable[Record]) -> list[Record]:
    """The records not yet written to a line, now marked as written (step end and pop race for them)."""
    with _claim_lock:
        out = []
        for r in records:
            if getattr(r, "compat", None) != "logged":
                r.compat = "logged"
                out.append(r)
        return out


def log_step(step: Record, children: list[Record]) -> None:
    """Resolver callback: one line for the captures of a finished step (in capture order)."""
    records = claim(children)
    if records:
        tags = unique_tags(r.name for r in records)
        log.info("%s", format_line(step.name, zip(tags, (duration_ms(r) for r in records))))
