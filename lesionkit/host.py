"""What the host offers a run: its CPUs and whether output goes to a terminal.

The lowest layer of the package (no lesionkit imports), so that the data checks and the engine
both ask the same questions the same way.
"""

from __future__ import annotations

import os
import sys


def on_terminal() -> bool:
    """Whether progress bars should be drawn: stderr is a terminal, not a log file."""
    return sys.stderr.isatty()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = ["available_cpus", "on_terminal"]
