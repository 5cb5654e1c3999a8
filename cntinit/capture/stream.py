"""The whole model over every calibration batch, hooks on every target: the capture's loop when the
model fits its device (or --offload streams its weights). A checkpoint is saved every N batches and
on SIGINT/SIGTERM, and a restart resumes from it (storage/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from rich.progress import TextColumn
from torch import nn

from ..console import log, progress, warn
from ..errors import Interrupted
from ..storage import checkpoint
from .feeds.feed import Feed
from .gradients import GradientSums, checkpointed_blocks
from .recorder import Recorder, exact_float32, shared_input_groups
from .signals import stop_requests

clock = time.perf_counter  # of the progress bar's rate


def stream(root: nn.Module, modules: dict[str, nn.Module], feed: Feed, net: nn.Module, buckets: int, accumulate: torch.dtype,
           dev: torch.device, sample_max_norm: bool, sums_on: torch.device, saved: Path | None, ident: str, checkpoint_every: int | None,
           grads: GradientSums | None = None, blocks: nn.ModuleList | None = None, summed: bool = True):
    """The whole model over every batch, hooks on every target: (sums by key, module map, real tokens or samples).
    With `grads`, each batch also runs backward from the next-token loss into those sums (`blocks` checkpointed);
    not `summed`, the hooks count tokens and sum no statistics."""
    probe = {name: value.to(dev) for name, value in feed.probe.items()}
    groups = shared_input_groups(modules, lambda: root(**probe))
    recorder = Recorder(modules, groups, buckets, accumulate, dev, sample_max_norm, sums_on, root, feed.unpadded, summed)
    resumed = checkpoint.load(saved, ident) if saved is not None and saved.exists() else None
    if resumed and not (all(stats.fits(resumed[1], key) for key, stats in recorder.stats.items())
                        and (grads is None or grads.fits(resumed[1]))):
        warn(f"the checkpoint at {saved} is damaged (its sums do not fit this capture): starting from the beginning")
        resumed = None
    skip, done = (resumed[0]["batches"], resumed[0]["done"]) if resumed else (0, 0)
    resumed_done = done
    if resumed:
        for key, stats in recorder.stats.items():
            stats.restore(resumed[1], key)
        if grads is not None:
            grads.restore(resumed[1])
        log(f"resuming from the checkpoint at {saved}: {skip} batches already summed")
    rate = TextColumn("{task.fields[rate]}")
    targets = None  # the current batch's next-token targets

    def forward_and_backward(**inputs):
        grads.step(net, inputs, inputs.get("attention_mask"), targets, recorder.pause)

    forward = forward_and_backward if grads is not None else None
    no_autograd = torch.inference_mode() if grads is None else torch.no_grad()  # inference tensors cannot enter backward
    taking = grads.taking(net) if grads is not None else contextlib.nullcontext()
    remembering = checkpointed_blocks(blocks) if blocks is not None else contextlib.nullcontext()
    with recorder, exact_float32(), no_autograd, taking, remembering, progress(rate) as bar, stop_requests(saved is not None) as stop:
        task = bar.add_task("capture", total=feed.total, rate="")
        for index, (bucket, inputs, mask, targets) in enumerate(feed.batches()):
            size = next(iter(inputs.values())).shape[0]
            if index < skip:
                bar.update(task, advance=size)
                continue
            if index == skip:
                begun = clock()  # the rate counts this run's work, not the checkpoint's
                if resumed and "rng" in resumed[1]:
                    net.generator.set_state(resumed[1]["rng"])  # the noise continues where the checkpoint left it
            done += recorder.run(inputs, mask, bucket, forward)
            bar.update(task, advance=size, rate=f"{(done - resumed_done) / max(clock() - begun, 1e-9):,.1f} {feed.unit}/s")
            if saved is not None and ((index + 1) % checkpoint_every == 0 or stop):
                recorder.check_finite()
                rng = net.generator.get_state() if getattr(net, "generator", None) is not None else None
                held = {n: t for k, st in recorder.stats.items() for n, t in st.state(k).items()}
                if grads is not None:
                    grads.check_finite()
                    held |= grads.state()
                checkpoint.save(saved, ident, index + 1, done, held, rng)
            if stop:
                raise Interrupted(f"stopped by {stop[0]} after {index + 1} batches; the checkpoint at {saved} keeps them: "
                                  "run the same command to resume")
        recorder.check_finite()
        if grads is not None:
            grads.check_finite()
    return recorder.stats, recorder.module_map, done
