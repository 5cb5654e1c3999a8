"""Peak memory of this process, for the benchmarks that run each setting in a child process."""

from __future__ import annotations

import resource


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which starts afresh at exec. (Linux's
    ru_maxrss does not: a child keeps the peak of the parent it was forked from, so a parent that
    built a large model would raise every later child's figure.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
