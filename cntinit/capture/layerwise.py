"""Layerwise capture: a model's statistics block by block, in the memory of one block.

GPTQ's layer loop, for statistics. The model is built without weights (meta device); what
runs before and after the repeated blocks (embeddings, final norm, a pooler or a vision tower)
is read from the checkpoint's safetensors files first, then each block in turn onto the
device, run over every calibration batch with hooks on its targets, its statistics written to
the store, and freed. Every block's inputs — the hidden states, and whatever else the model
passes it (masks, rotary position embeddings) — are found by intercepting the blocks' calls in
one pass that computes no block (blocks.py); each block's outputs become the next one's hidden states.
Targets outside the blocks are summed in that pass (before the blocks: a projector) or in a
last pass that replays the final hidden states (after them: BERT's pooler).

A checkpoint (storage/block_checkpoint.py) holds the finished blocks' payloads and the hidden states entering
the next block, so a stopped run resumes at that block.

With gradients, the way up keeps each block's inputs and records nothing; the model's head
gives the loss's gradient at the last block's output; the way down recomputes each block from
its inputs with the hooks on and runs its backward, as activation checkpointing does per block.
Checkpoints are made on the way down only (the way up keeps every block's inputs: too much to
save): the finished blocks' payloads and the gradient at the next block's output; a resumed run
goes up again to that block, forward only, and on down from it.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import console, distributed
from ..console import log
from ..errors import CntinitError, Interrupted
from ..models import named_weights
from ..models.named_weights import Weights
from ..storage import block_checkpoint, store
from .blocks import Blocks, Call, Format, call_on, chain, on_device, outside_blocks
from .gradients import GradientSums
from .recorder import Recorder, exact_float32, shared_input_groups
from .signals import agreed_stop, stop_requests


@dataclass
class Batch:
    """What the blocks need of one calibration batch, kept between the passes."""

    bucket: int
    size: int
    mask: torch.Tensor | None
    hidden: torch.Tensor  # entering the current block
    calls: list[Call] = field(default_factory=list)  # one per block
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # --gradients: each block's hidden states, for its backward
    grad: torch.Tensor | None = None  # --gradients: ∂(mean loss)/∂(the current block's output); None when it predicts nothing


@dataclass
class Written:
    """The manifest's records of the statistics summed so far (their tensors went to the payloads)."""

    stats: dict = field(default_factory=dict)  # key -> {"dim", "count", "modules"}
    modules: dict = field(default_factory=dict)  # module -> its store entry


@dataclass
class Setup:
    """What a layerwise capture runs with (besides the model and its data)."""

    dev: torch.device
    run_dtype: torch.dtype
    weights: Weights
    loaded: torch.dtype  # the dtype from_pretrained would load the weights in
    buckets: int
    accumulate: torch.dtype
    sample_max_norm: bool
    sums_on: torch.device
    activations_on: torch.device
    work: Path  # where payload files go until the store is written (the checkpoint, with one)
    saved: Path | None  # the checkpoint
    checkpoint_every: int | None  # blocks between checkpoints
    ident: str  # what a checkpoint must match
    summed: bool = True  # False (--gradients-only): count tokens, sum no statistics


def capture(net: nn.Module, root: nn.Module, modules: dict[str, nn.Module], feed, setup: Setup,
            world: distributed.World, grads: GradientSums | None = None) -> tuple[store.Payloads, Written, int]:
    """Capture `modules` block by block; returns the payloads written into `setup.work` (none but
    rank 0's under torchrun), their manifest records, and this process's real tokens (or samples).

    With `grads` (--gradients; it counts the batches, tokens and loss) the blocks run forward with
    no hooks, keeping each block's input; the model's head turns the last block's output into the
    next-token loss and its gradient; then the blocks run again in reverse, each recomputed from
    its kept input with hooks on its targets (the statistics) and backward from the gradient of
    its output (the targets' weight gradients, and the gradient of its input for the block below).
    """
    return _Capture(net, root, modules, feed, setup, world, grads).run()


class _Capture:
    """One layerwise capture: the model's parts, the batches' state between the passes, and the
    statistics written so far."""

    def __init__(self, net: nn.Module, root: nn.Module, modules: dict[str, nn.Module], feed, setup: Setup,
                 world: distributed.World, grads: GradientSums | None):
        self.net, self.root, self.modules, self.feed, self.s, self.world, self.grads = net, root, modules, feed, setup, world, grads
        self.prefix, self.path = chain(net, root, modules)
        self.blocks: nn.ModuleList = root.get_submodule(self.path)
        self.outside = outside_blocks(modules, self.prefix, self.path)
        self.names = list(dict(root.named_parameters(remove_duplicate=False)) | dict(root.named_buffers(remove_duplicate=False)))
        self.accepts_cache = "use_cache" in inspect.signature(root.forward).parameters
        self.batches: list[Batch] = []
        self.groups_by_layout: dict[frozenset, list[list[str]]] = {}
        # what the resume says (run): the save taken, whether on the way down, the first block the way up runs
        self.resumed, self.down, self.first_block, self.top = None, False, 0, len(self.blocks) - 1
        self.payloads: store.Payloads | None = None
        self.written = Written()
        # what the first batch shows (open): the blocks' output form, targets before and after them, blocks with targets
        self.form: Format | None = None
        self.first_inputs: dict = {}
        self.outside_groups: list[list[str]] = []
        self.before: dict[str, nn.Module] = {}
        self.after: dict[str, nn.Module] = {}
        self.targeted: list[int] = []
        self.end = len(self.blocks)  # the way up stops below this block
        self.bar, self.task = None, None  # the progress bar, while the blocks run

    def run(self) -> tuple[store.Payloads, Written, int]:
        s, world = self.s, self.world
        self.load("", "outside the blocks")
        if self.grads is not None:
            self.net.requires_grad_(False)  # only the targets' weights take gradients, each within its block's turn
        resumed = self.resumed = block_checkpoint.resume(s.saved, s.ident, world) if s.saved is not None else None
        self.down = resumed is not None and resumed.get("way") == "down"  # resumed on the way down: the way up runs again to its block
        self.first_block = resumed["block"] if resumed and not self.down else 0
        self.payloads = store.Payloads(s.work, resumed["payloads"] if resumed and world.leader else None)
        self.written = Written(resumed["stats"], resumed["modules"]) if resumed else Written()
        with exact_float32(), torch.no_grad():  # not inference_mode: grouping reads version counters
            self.open()
            done = self.calls_of_every_batch()
            if resumed:
                _check_fit(resumed, self.batches, s.saved)
            if resumed and not self.down:
                for index, batch in enumerate(self.batches):
                    batch.hidden = resumed["tensors"][str(index)].to(s.activations_on)
                self.blocks[0].to("meta")
                log(f"resuming from the checkpoint at {s.saved}: {self.first_block} of {len(self.blocks)} blocks done")
            self.top = resumed["block"] if self.down else len(self.blocks) - 1  # the top block of the way down
            up_to = self.top if self.down else self.end  # the way up runs the blocks below this one
            with console.progress() as bar, stop_requests(s.saved is not None) as stop:
                backward = self.top + 1 - self.targeted[0] if self.grads is not None else 0
                self.bar = bar
                self.task = bar.add_task(f"blocks of {self.path}" + (", then back down" if backward else ""),
                                         total=(up_to + backward) * len(self.batches), completed=self.first_block * len(self.batches))
                if self.down:
                    log(f"resuming from the checkpoint at {s.saved}: {len(self.blocks) - 1 - self.top} of "
                        f"{len(self.blocks) - self.targeted[0]} blocks done on the way down; the way up runs again to block {self.top}")
                self.up(up_to, stop)
                if self.grads is not None:
                    self.back_down(stop)
            if self.after:
                self.targets_after()
        return self.payloads, self.written, done

    def load(self, part: str, what: str) -> None:
        """Read the tensors of `part` (a block's path; "" for everything outside the blocks) onto the device."""
        s, path = self.s, self.path
        inside = [n for n in self.names if n.startswith(part + ".")] if part else [n for n in self.names if not n.startswith(path + ".")]
        named_weights.materialize(self.root, inside, self.prefix, s.weights, s.loaded, s.dev, s.run_dtype, what)

    def inputs_of(self, raw: dict) -> dict:
        return {name: value.to(self.s.dev) for name, value in raw.items()} | ({"use_cache": False} if self.accepts_cache else {})

    def recorder(self, targets: dict, groups: list[list[str]]) -> Recorder:
        s = self.s
        return Recorder(targets, groups, s.buckets, s.accumulate, s.dev, s.sample_max_norm, s.sums_on, summed=s.summed)

    def open(self) -> None:
        """The first batch up to block 0 shows which targets outside the blocks run before them (the
        others run after), and block 0's call on it how the blocks return their hidden states."""
        self.first_inputs = self.inputs_of(next(iter(self.feed.batches()))[1])
        opening, ran = [], set()

        def open_first():
            with Blocks(self.blocks, None) as stubs:
                opening[:] = stubs.run(self.root, self.first_inputs, stop_after=0)

        self.outside_groups = shared_input_groups(self.outside, open_first, ran)
        if not opening:
            raise CntinitError(f"the model never called its blocks ({self.path}): capture without --layerwise")
        self.load(f"{self.path}.0", f"block 0 of {self.path}")
        _, hidden, call = opening[0]
        self.form = Format.of(call.run(self.blocks[0], hidden))
        self.before = {n: m for n, m in self.outside.items() if n in ran}
        self.after = {n: m for n, m in self.outside.items() if n not in ran}
        self.targeted = [i for i in range(len(self.blocks)) if any(n.startswith(f"{self.prefix}{self.path}.{i}.") for n in self.modules)]
        # blocks past the last target need not run (but for the loss)
        self.end = len(self.blocks) if self.after or self.grads is not None else self.targeted[-1] + 1

    def calls_of_every_batch(self) -> int:
        """One pass that computes no block: every block's call for every batch, and the targets before
        the blocks. Returns the real tokens (or samples) of this process."""
        s, blocks = self.s, self.blocks
        done = 0
        early = self.recorder(self.before, [g for g in self.outside_groups if g[0] in self.before]) if self.before and not self.resumed \
            else None
        counter = early or self.recorder({}, [])
        with Blocks(blocks, self.form) as stubs, (early or contextlib.nullcontext()):
            for bucket, raw, mask, _ in self.feed.batches():
                size = next(iter(raw.values())).shape[0]
                done += counter.begin(size, mask, bucket)
                calls = stubs.run(self.root, self.inputs_of(raw))
                if len(calls) != len(blocks):
                    raise CntinitError(f"the model called {len(calls)} of its {len(blocks)} blocks ({self.path}): capture without --layerwise")
                memo: dict = {}
                self.batches.append(Batch(bucket, size, mask, on_device(calls[0][1], s.activations_on, memo),
                                          [call_on(c, s.activations_on, memo) for _, _, c in calls]))
        if early is not None:
            self.finish(early)
        return done

    def targets_in(self, index: int) -> tuple[dict[str, nn.Module], list[list[str]]]:
        """Block `index`'s targets and their groups by shared input (loaded, with its inputs in batches[0])."""
        local = f"{self.prefix}{self.path}.{index}."
        targets = {name: m for name, m in self.modules.items() if name.startswith(local)}
        layout = frozenset(name.removeprefix(local) for name in targets)
        if layout not in self.groups_by_layout:  # blocks of one class share their inputs alike: grouped once
            sample = self.batches[0]
            hidden = sample.inputs.get(index, sample.hidden)
            dev = self.s.dev
            groups = shared_input_groups(targets, lambda: call_on(sample.calls[index], dev, {}).run(self.blocks[index], hidden.to(dev)))
            self.groups_by_layout[layout] = [[name.removeprefix(local) for name in g] for g in groups]
        return targets, [[local + name for name in g] for g in self.groups_by_layout[layout]]

    def up(self, up_to: int, stop: list[str]) -> None:
        """Each block over every batch, from the first not done to `up_to`: with hooks on its targets,
        or — with gradients — keeping each block's inputs for the way down."""
        s, grads, first_target = self.s, self.grads, self.targeted[0]
        for index in range(self.first_block, up_to):
            block = self.blocks[index]
            if index > 0:
                self.load(f"{self.path}.{index}", f"block {index} of {self.path}")
            targets, groups = self.targets_in(index) if grads is None else ({}, [])  # with grads: on the way back
            with self.recorder(targets, groups) as record:
                for batch in self.batches:
                    record.begin(batch.size, batch.mask, batch.bucket)
                    if grads is not None and index >= first_target:
                        batch.inputs[index] = batch.hidden
                    output = call_on(batch.calls[index], s.dev, {}).run(block, batch.hidden.to(s.dev))
                    batch.hidden = self.form.hidden(output).to(s.activations_on)
                    if grads is None or index < first_target:
                        batch.calls[index] = None  # this block's masks and positions are done with
                    self.bar.advance(self.task)
            self.finish(record)
            self.release(block)
            if index + 1 == self.end:
                break
            halt = agreed_stop(stop, self.world) if s.saved is not None else None
            if grads is not None:  # the way up saves nothing: every block's inputs are too much to keep
                if halt:
                    raise Interrupted(f"stopped by {halt} on the way up, after block {index + 1} of {up_to}; " + (
                        f"the checkpoint at {s.saved} still keeps the way down's blocks: run the same command to resume" if self.down else
                        "checkpoints begin on the way down, so none was made: run the same command to start again"))
                continue
            if s.saved is not None and (halt or (index + 1 - self.first_block) % (s.checkpoint_every or 1) == 0):
                block_checkpoint.save(s.saved, s.ident, "up", index + 1, {str(j): batch.hidden for j, batch in enumerate(self.batches)},
                                      self.payloads, self.written, self.world)
            if halt:
                raise Interrupted(f"stopped by {halt} after block {index + 1} of {self.end}; the checkpoint at {s.saved} "
                                  "keeps them: run the same command to resume")

    def back_down(self, stop: list[str]) -> None:
        """--gradients: the loss and its gradient, then each block again from the top down to the first
        target, recomputed from its kept inputs with hooks on, and backward from its output's gradient."""
        s, grads, top, first_target = self.s, self.grads, self.top, self.targeted[0]
        if self.down:
            grads.batches, grads.tokens, grads.loss = (self.resumed["gradients"][k] for k in ("batches", "tokens", "loss"))
            for j, batch in enumerate(self.batches):
                batch.inputs[top], batch.hidden, batch.grad = batch.hidden, None, self.resumed["tensors"].get(str(j))
                batch.calls[top + 1:] = [None] * (len(self.blocks) - top - 1)  # blocks done: their masks and positions are not needed
        else:
            _loss_gradients(self.net, self.blocks, self.form, self.batches, self.feed, self.inputs_of, grads, s)
        for index in reversed(range(first_target, top + 1)):
            self.load(f"{self.path}.{index}", f"block {index} of {self.path}")
            block = self.blocks[index]
            targets, groups = self.targets_in(index)
            taken = GradientSums(targets, s.accumulate, s.sums_on)
            with self.recorder(targets, groups) as record, taken.taking(block), torch.enable_grad():
                for batch in self.batches:
                    record.begin(batch.size, batch.mask, batch.bucket)
                    hidden = batch.inputs.pop(index).to(s.dev).requires_grad_(index > first_target)
                    output = self.form.hidden(call_on(batch.calls[index], s.dev, {}).run(block, hidden))
                    if batch.grad is not None:
                        output.backward(batch.grad.to(s.dev))
                    batch.grad = hidden.grad.to(s.activations_on) if batch.grad is not None and index > first_target else None
                    batch.calls[index] = None
                    self.bar.advance(self.task)
            self.finish(record, taken)
            self.release(block)
            if index == first_target:
                break
            halt = agreed_stop(stop, self.world) if s.saved is not None else None
            if s.saved is not None and (halt or (top + 1 - index) % (s.checkpoint_every or 1) == 0):
                counters = {"batches": grads.batches, "tokens": grads.tokens, "loss": grads.loss}
                grads_out = {str(j): b.grad for j, b in enumerate(self.batches) if b.grad is not None}
                block_checkpoint.save(s.saved, s.ident, "down", index - 1, grads_out, self.payloads, self.written, self.world, counters)
            if halt:
                raise Interrupted(f"stopped by {halt} on the way down, after block {index}; the checkpoint at {s.saved} "
                                  "keeps the blocks done: run the same command to resume")

    def targets_after(self) -> None:
        """Targets after the blocks, from the last block's outputs."""
        s, sample = self.s, self.batches[0]
        with Blocks(self.blocks, self.form) as stubs:
            groups = shared_input_groups(self.after, lambda: stubs.run(self.root, self.first_inputs, final=sample.hidden.to(s.dev)))
            with self.recorder(self.after, groups) as late:
                for batch, (_, raw, _, _) in zip(self.batches, self.feed.batches()):
                    late.begin(batch.size, batch.mask, batch.bucket)
                    stubs.run(self.root, self.inputs_of(raw), final=batch.hidden.to(s.dev))
            self.finish(late)

    def finish(self, record: Recorder, taken: GradientSums | None = None) -> None:
        """Sum `record` across processes, check it, hand its statistics (and `taken`'s gradients,
        beside their key's) to the payloads and free them."""
        world, written = self.world, self.written
        if world.size > 1:
            distributed.add_across_ranks(world, record.stats, [], taken, last=False)
        if not record.stats:  # a block without targets, run for the hidden states it passes on
            return
        record.check_finite()
        if taken is not None:
            taken.check_finite()
        silent = [name for name, entry in record.module_map.items() if sum(record.stats[entry["key"]].count) == 0]
        if silent:
            raise CntinitError(f"targets never ran in the forward pass: {', '.join(silent[:5])}: drop them from --targets")
        for key, stats in record.stats.items():
            written.stats[key] = {"dim": stats.dim, "count": sum(stats.count),
                                  "modules": [n for n, e in record.module_map.items() if e["key"] == key]}
            if world.leader:
                readers = written.stats[key]["modules"] if taken is not None else []
                self.payloads.add(key, stats.tensors(key) | {n: t for name in readers for n, t in taken.tensors(name).items()})
        if world.leader:
            self.payloads.flush()  # a file per block: host memory holds one block's statistics at most
        written.modules |= record.module_map
        record.stats.clear()

    def release(self, block: nn.Module) -> None:
        block.to("meta")
        _give_back_freed_memory()
        if self.s.dev.type == "cuda":
            torch.cuda.empty_cache()


def _loss_gradients(net: nn.Module, blocks: nn.ModuleList, form: Format, batches: list[Batch], feed, inputs_of, grads: GradientSums,
                    s: Setup) -> None:
    """Each batch's next-token loss from the last block's output, through what follows the blocks
    (final norm, output layer), and its gradient with respect to that output: `batch.grad`."""
    with Blocks(blocks, form) as stubs, torch.enable_grad():
        for batch, (_, raw, mask, targets) in zip(batches, feed.batches()):
            final = batch.hidden.to(s.dev).requires_grad_()
            inputs = inputs_of(raw)
            stubs.run(net, inputs, final=final)
            loss, count = grads.loss_of(stubs.output.logits, inputs["input_ids"], mask, targets)
            if count:
                (loss / count).backward()
            batch.grad = final.grad.to(s.activations_on) if count else None
            batch.hidden = None


def _check_fit(resumed: dict, batches: list[Batch], saved: Path) -> None:
    """A checkpoint's tensors are one hidden state per batch (a gradient per batch that predicts
    something, on the way down), each the shape and dtype of the batch's: anything else is a
    damaged or altered checkpoint, which would give wrong statistics without a word."""
    tensors = resumed["tensors"]
    expected = {str(j): batch.hidden for j, batch in enumerate(batches)}
    needed = expected if resumed.get("way", "up") == "up" else {}  # on the way down, a batch that predicts nothing has none
    unfit = sorted(key for key in tensors.keys() | needed.keys() if key not in tensors or key not in expected
                   or tensors[key].shape != expected[key].shape or tensors[key].dtype != expected[key].dtype)
    if unfit:
        raise CntinitError(f"the checkpoint at {saved} does not fit this capture's batches (its tensor {unfit[0]!r}): delete it to "
                           "start from the beginning")


def _give_back_freed_memory() -> None:
    """Return a freed block's host memory to the system. glibc keeps freed mid-sized tensors in its
    heap (its mmap threshold rises after large frees), so without a trim host memory would grow by
    about a block per block (measured: 1.27 GB instead of 0.45 at 32 blocks of width 512)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
