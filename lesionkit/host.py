"""What the host offers a run: its CPUs and whether output goes to a terminal.

The lowest layer of the package (no lesionkit imports), so that the data checks and the engine
both ask the same questions the same way.
"""

from __future__ import annotations

import functools
import os
import sys


def on_terminal() -> bool:
    """Whether progress bars should be drawn: stderr is a terminal, not a log file."""
    return sys.stderr.isatty()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("vendor_id", "cpu family", "model name",
    "flags", ...), read once; empty where there is no such file (not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():  # the blank line after the first processor
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


__all__ = ["available_cpus", "cpu_info", "on_terminal"]
