"""The ``otel-npu`` command (also ``python -m otel_npu``).

Each subcommand is a module of this package with ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules keep heavy imports (torch, transformers) inside ``run`` so that ``--help`` and
the other subcommands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: subcommand -> module. A module that does not exist yet is simply not offered.
COMMANDS = {
    "demo": "otel_npu.cli.demo",
    "summary": "otel_npu.cli.summary",
    "chrome-trace": "otel_npu.cli.chrome_trace",
    "doctor": "otel_npu.cli.doctor",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otel-npu", description="Device-measured stage timings as "
                                     "OpenTelemetry spans: tools.")
    from otel_npu import __version__

    parser.add_argument("--version", action="version", version=f"otel-npu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``otel-npu summary FILE | head``): what it wanted was written. Quietly, as a
        # command killed by SIGPIPE ends; stdout goes to devnull so that the interpreter's own flush at exit
        # does not report it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
