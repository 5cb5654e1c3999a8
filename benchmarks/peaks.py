"""Peak memory of this process, for the benchmarks that run each setting in a child process; and one
timed row with the device's peak memory, for the benchmarks that run their settings side by side."""

from __future__ import annotations

import resource
import time
from typing import Callable


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


def measured(what: str, device: str, work: Callable[[], object]) -> dict:
    """A table row: the seconds `work()` takes, all it does (loading included), and on CUDA the peak
    device memory it reaches, counted from its start (GiB; "-" elsewhere)."""
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device == "cuda" else "-"
    return {"what": what, "seconds": f"{seconds:.2f}", "peak GiB": peak}
