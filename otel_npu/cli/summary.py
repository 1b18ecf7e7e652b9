"""``otel-npu summary FILE...``: the per-stage table of traces files, per step kind."""

from __future__ import annotations

import argparse
import collections

HELP = ("per-stage table (count, mean, p50, p99 ms, share of step time) of traces files, per step kind; with "
        "several ranks, per rank and the skew between ranks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", metavar="FILE", nargs="+",
                        help="traces files: OTLP/JSON (lines or pretty-printed); several are read as one")


def run(args: argparse.Namespace) -> int:
    from . import tracefile

    spans = tracefile.read_or_report(args.files, "summary")
    if spans is None:
        return 2
    print(describe(spans, args.files[0] if len(args.files) == 1 else f"{len(args.files)} files"))
    print()
    print(tracefile.format_table(tracefile.stage_rows(spans)))
    ranks = tracefile.format_ranks(tracefile.rank_rows(spans), tracefile.skew_rows(spans))
    if ranks:  # several ranks (tensor/pipeline parallel workers): each one's times, and how far apart they ran
        print()
        print(ranks)
    return 0


def describe(spans: list, path: str) -> str:
    """One paragraph: how many spans, steps per kind, devices, and the application's own spans."""
    from . import tracefile

    forest = tracefile.Forest(spans)
    kinds = collections.Counter(s.name for s in forest.steps)
    devices = sorted({str(s.attributes[tracefile.DEVICE_ATTR]) for s in spans if s.is_otel_npu})
    others = collections.Counter(s.name for s in spans if not s.is_otel_npu)
    text = (f"{path}: {len(spans)} spans; {sum(kinds.values())} steps ("
            + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + ")"
            + (f" on {', '.join(devices)}" if devices else "; no otel-npu spans"))
    if others:
        text += "; other spans: " + ", ".join(f"{n} {name}" for name, n in others.most_common(5))
    if "cpu" in devices:
        text += "\n(cpu: stage times are host times; on an NPU or GPU they come from device events)"
    return text
