"""Peak resident memory of *this* process.

``getrusage(RUSAGE_SELF).ru_maxrss`` is not usable for a subprocess on Linux: it carries over the
high-water mark of the forked parent's memory image across ``exec``, so every worker would report at
least its parent's RSS. ``VmHWM`` in /proc/self/status belongs to the process's own address space.
"""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
