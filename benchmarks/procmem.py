"""Peak memory of the current process, for benchmarks that run each tool in a fresh subprocess."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB) since it started its program.

    Linux's ``VmHWM`` belongs to the address space that ``exec`` created. ``getrusage(RUSAGE_SELF).ru_maxrss``
    does not do: Linux carries the high-water mark of the forked copy of the parent across ``exec``, so
    every child would report at least the (large) benchmark process.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: kilobytes on most systems
