"""Stopping a checkpointed capture cleanly: SIGINT and SIGTERM (what Slurm sends before killing a
job) become a request the loop reads between batches (or blocks), so it saves what it has first."""

from __future__ import annotations

import contextlib
import signal
import threading

from .. import distributed


@contextlib.contextmanager
def stop_requests(active: bool):
    """While `active`, SIGINT and SIGTERM (what Slurm sends before killing a job) only set a flag
    (the list holds the signal's name) that the capture loop reads after each batch."""
    requested: list[str] = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda number, frame: requested.append(signal.Signals(number).name))
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def agreed_stop(stop: list[str], world: distributed.World) -> str | None:
    """The signal that stops the capture after this block, alike on every process: under torchrun a
    SIGTERM may reach the processes on either side of a block's end (or reach one of them only), and
    each must save its checkpoint at the same block for a resume to take them."""
    return next(filter(None, distributed.everyone(world, stop[0] if stop else None)), None)
