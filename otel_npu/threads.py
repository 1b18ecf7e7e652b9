"""The name the operating system gives otel-npu's background threads.

CPython before 3.14 names a ``threading.Thread`` only for Python: ``top -H``, ``ps -L``, ``perf`` and
``/proc/<pid>/task/<tid>/comm`` show every thread of a serving process under the process's own name, so
the CPU of otel-npu's resolver and exporter cannot be told apart from the engine's. Each of them calls
``name_os_thread`` first, which gives the OS thread the Python name (cut to the kernel's 15 bytes):
``otel-npu-resolver`` shows as ``otel-npu-resolv``, ``otel-npu-exporter`` as ``otel-npu-export``.
"""

from __future__ import annotations

import threading

#: The kernel keeps 15 bytes of a thread's name (16 with the terminating NUL).
OS_NAME_BYTES = 15


def name_os_thread(name: str) -> bool:
    """Give the calling thread ``name`` (its first 15 bytes) as its OS name. Linux only (writes
    ``/proc/self/task/<tid>/comm``); elsewhere, or if the write is refused, nothing changes and it returns
    False. Never raises. Costs one small file write: call it once, when the thread starts."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "wb") as comm:
            comm.write(name.encode("utf-8", "replace")[:OS_NAME_BYTES])
        return True
    except (OSError, AttributeError, ValueError):
        return False
