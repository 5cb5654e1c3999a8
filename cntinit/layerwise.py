"""Layerwise capture: a model's statistics block by block, in the memory of one block.

GPTQ's layer loop, for statistics. The model is built without weights (meta device); what
runs before and after the repeated blocks (embeddings, final norm, a pooler or a vision tower)
is read from the checkpoint's safetensors files first, then each block in turn onto the
device, run over every calibration batch with hooks on its targets, its statistics written to
the store, and freed. Every block's inputs — the hidden states, and whatever else the model
passes it (masks, rotary position embeddings) — are found by intercepting the blocks' calls in
one pass that computes no block; each block's outputs become the next one's hidden states.
Targets outside the blocks are summed in that pass (before the blocks: a projector) or in a
last pass that replays the final hidden states (after them: BERT's pooler).

A checkpoint (block_checkpoint) holds the finished blocks' payloads and the hidden states entering
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

from . import block_checkpoint, console, distributed, models, store
from .console import log
from .errors import CntinitError
from .gradients import GradientSums
from .named_weights import OWN_LOADING, Weights


def find_blocks(root: nn.Module, targets: list[str]) -> str:
    """The path (within `root`) of its list of repeated blocks that holds the targets: a ModuleList
    of two or more modules of one class, the outermost such list (not the experts inside a block)."""
    lists = {name: m for name, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(child) for child in m}) == 1}
    holding = [name for name in lists if any(t.startswith(name + ".") for t in targets)]
    outermost = [name for name in holding if not any(name.startswith(other + ".") for other in holding if other != name)]
    if not outermost:
        raise CntinitError("no target lies in a list of repeated blocks, so there is nothing to capture block by block: "
                           "capture without --layerwise")
    if len(outermost) > 1:
        raise CntinitError(f"the targets lie in {len(outermost)} chains of blocks ({', '.join(outermost)}): --layerwise runs one; "
                           "pick one with --targets re:..., or capture without --layerwise")
    return outermost[0]


def chain(net: nn.Module, root: nn.Module, modules: dict[str, nn.Module]) -> tuple[str, str]:
    """(root's path in `net` with a trailing dot, or "" for `net` itself; the blocks' path within root)."""
    prefix = next(name + "." for name, m in net.named_modules() if m is root) if root is not net else ""
    return prefix, find_blocks(root, [name.removeprefix(prefix) for name in modules])


def outside_blocks(modules: dict[str, nn.Module], prefix: str, path: str) -> dict[str, nn.Module]:
    """The targets that lie in no block of the chain at `prefix` + `path`."""
    return {name: m for name, m in modules.items() if not name.removeprefix(prefix).startswith(path + ".")}


def check_gradient_targets(modules: dict[str, nn.Module], prefix: str, path: str) -> None:
    """--gradients --layerwise runs backward through the blocks only: every target must lie in one."""
    outside = next(iter(outside_blocks(modules, prefix, path)), None)
    if outside:
        raise CntinitError(f"--gradients --layerwise takes targets inside the repeated blocks ({prefix}{path}); {outside} lies "
                           "outside them: leave it out of --targets, or capture without --layerwise")


def materialize(root: nn.Module, names: list[str], prefix: str, weights: Weights, loaded: torch.dtype, device: torch.device,
                run_dtype: torch.dtype, what: str, fix: str = OWN_LOADING) -> None:
    """Put root's tensors `names` on `device` in `run_dtype`: meta ones read from the checkpoint (rounded
    through the dtype from_pretrained would load them in, as the normal capture's are), real ones
    (buffers computed at construction) as `models.place` keeps them (RoPE's float32 frequencies stay)."""
    from accelerate.utils import set_module_tensor_to_device

    tensors = dict(root.named_parameters(remove_duplicate=False)) | dict(root.named_buffers(remove_duplicate=False))
    for name in names:
        tensor = tensors[name]
        if tensor.device.type == "meta":
            value = weights.tensor(prefix + name, tensor, what, fix)
        else:
            value = tensor
        if value.is_floating_point():
            value = value.to(loaded).to(run_dtype) if tensor.device.type == "meta" else value.to(models.buffer_dtype(value, run_dtype))
        set_module_tensor_to_device(root, name, device, value=value, dtype=value.dtype)


@dataclass
class Call:
    """One block call of one batch: the hidden states and everything else it was given."""

    args: tuple
    kwargs: dict
    hidden_key: str | None  # None: the hidden states were the first positional argument

    def run(self, block: nn.Module, hidden: torch.Tensor):
        if self.hidden_key is None:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, **(self.kwargs | {self.hidden_key: hidden}))


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Call]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], Call(args[1:], kwargs, None)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], Call(args, {k: v for k, v in kwargs.items() if k != "hidden_states"}, "hidden_states")
    raise CntinitError("the blocks are not called with their hidden states first (or as hidden_states=): capture without --layerwise")


class _Stop(Exception):
    """Raised inside the forward pass once the part of it that is needed has run."""


@dataclass
class Format:
    """How a block returns its hidden states: as a tensor, or first in a tuple."""

    extras: tuple | None = None  # None: a bare tensor

    @classmethod
    def of(cls, output) -> "Format":
        if isinstance(output, torch.Tensor):
            return cls()
        if type(output) in (tuple, list) and output and isinstance(output[0], torch.Tensor):
            return cls(tuple(output[1:]))
        raise CntinitError(f"a block returns {type(output).__name__}, not its hidden states: capture without --layerwise")

    def wrap(self, hidden: torch.Tensor):
        return hidden if self.extras is None else (hidden, *self.extras)

    def hidden(self, output) -> torch.Tensor:
        return output if self.extras is None else output[0]


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


class Blocks:
    """The model's blocks with their forwards replaced, for the passes that compute no block: each
    call is kept (index, hidden states, the rest); `run` stops the forward pass after block
    `stop_after`, or — given `final` — lets it go on past the last block with those hidden states."""

    def __init__(self, blocks: nn.ModuleList, form: Format | None):
        self.blocks, self.form = blocks, form
        self.calls: list[tuple[int, torch.Tensor, Call]] = []
        self.final: torch.Tensor | None = None
        self.output = None  # what the model returned, when it ran to its end
        self.stop_after = len(blocks) - 1

    def __enter__(self) -> "Blocks":
        for index, block in enumerate(self.blocks):
            block.forward = lambda *args, index=index, **kwargs: self._called(index, args, kwargs)
        return self

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)  # the class's forward again

    def _called(self, index: int, args: tuple, kwargs: dict):
        hidden, call = _split(args, kwargs)
        if len(self.calls) != index:
            raise CntinitError(f"the blocks do not run once each, in order (block {index} ran after {len(self.calls)} calls): "
                               "capture without --layerwise")
        self.calls.append((index, hidden, call))
        if index == self.stop_after:
            if self.final is None:
                raise _Stop
            hidden = self.final
        return self.form.wrap(hidden)

    def run(self, root: nn.Module, inputs: dict, final: torch.Tensor | None = None, stop_after: int | None = None) -> list:
        self.calls, self.final, self.output = [], final, None
        self.stop_after = len(self.blocks) - 1 if stop_after is None else stop_after
        try:
            self.output = root(**inputs)
        except _Stop:
            pass
        return self.calls


def _to(value, device: torch.device, memo: dict):
    """`value` with its tensors on `device` (nested tuples, lists, dicts), each tensor moved once."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


def _call_to(call: Call, device: torch.device, memo: dict) -> Call:
    return Call(_to(call.args, device, memo), _to(call.kwargs, device, memo), call.hidden_key)


@dataclass
class Written:
    """The manifest's records of the statistics summed so far (their tensors went to the payloads)."""

    stats: dict = field(default_factory=dict)  # key -> {"dim", "count", "modules"}
    modules: dict = field(default_factory=dict)  # module -> its store entry


def _tensor_names(root: nn.Module) -> list[str]:
    return list(dict(root.named_parameters(remove_duplicate=False)) | dict(root.named_buffers(remove_duplicate=False)))


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
    from .capture import Interrupted, Recorder, _stop_requests, exact_float32, shared_input_groups

    s = setup
    prefix, path = chain(net, root, modules)
    blocks: nn.ModuleList = root.get_submodule(path)
    outside = outside_blocks(modules, prefix, path)
    names = _tensor_names(root)

    def load(part: str, what: str) -> None:
        inside = [n for n in names if n.startswith(part + ".")] if part else [n for n in names if not n.startswith(path + ".")]
        materialize(root, inside, prefix, s.weights, s.loaded, s.dev, s.run_dtype, what)

    load("", "outside the blocks")
    if grads is not None:
        net.requires_grad_(False)  # only the targets' weights take gradients, each within its block's turn
    accepts_cache = "use_cache" in inspect.signature(root.forward).parameters
    resumed = block_checkpoint.resume(s.saved, s.ident, world) if s.saved is not None else None
    down = resumed is not None and resumed.get("way") == "down"  # resumed on the way down: the way up runs again to its block
    first_block = resumed["block"] if resumed and not down else 0
    payloads = store.Payloads(s.work, resumed["payloads"] if resumed and world.leader else None)
    written = Written(resumed["stats"], resumed["modules"]) if resumed else Written()

    def inputs_of(raw: dict) -> dict:
        return {name: value.to(s.dev) for name, value in raw.items()} | ({"use_cache": False} if accepts_cache else {})

    def recorder(targets: dict, groups: list[list[str]]) -> Recorder:
        return Recorder(targets, groups, s.buckets, s.accumulate, s.dev, s.sample_max_norm, s.sums_on)

    def finish(record: Recorder, taken: GradientSums | None = None) -> None:
        """Sum `record` across processes, check it, hand its statistics (and `taken`'s gradients,
        beside their key's) to the payloads and free them."""
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
                payloads.add(key, stats.tensors(key) | {n: t for name in readers for n, t in taken.tensors(name).items()})
        if world.leader:
            payloads.flush()  # a file per block: host memory holds one block's statistics at most
        written.modules |= record.module_map
        record.stats.clear()

    with exact_float32(), torch.no_grad():  # not inference_mode: grouping reads version counters
        # The first batch up to block 0 shows which targets outside the blocks run before them (the
        # others run after), and block 0's call on it how the blocks return their hidden states.
        first_inputs = inputs_of(next(iter(feed.batches()))[1])
        opening, ran = [], set()

        def open_first():
            with Blocks(blocks, None) as stubs:
                opening[:] = stubs.run(root, first_inputs, stop_after=0)

        outside_groups = shared_input_groups(outside, open_first, ran)
        if not opening:
            raise CntinitError(f"the model never called its blocks ({path}): capture without --layerwise")
        load(f"{path}.0", f"block 0 of {path}")
        _, hidden, call = opening[0]
        form = Format.of(call.run(blocks[0], hidden))
        before = {n: m for n, m in outside.items() if n in ran}
        after = {n: m for n, m in outside.items() if n not in ran}
        targeted = [i for i in range(len(blocks)) if any(n.startswith(f"{prefix}{path}.{i}.") for n in modules)]
        end = len(blocks) if after or grads is not None else targeted[-1] + 1  # blocks past the last target need not run (but for the loss)

        # One pass that computes no block: every block's call for every batch, and the targets before the blocks.
        batches: list[Batch] = []
        done = 0
        early = recorder(before, [g for g in outside_groups if g[0] in before]) if before and not resumed else None
        counter = early or recorder({}, [])
        with Blocks(blocks, form) as stubs, (early or contextlib.nullcontext()):
            for bucket, raw, mask, _ in feed.batches():
                size = next(iter(raw.values())).shape[0]
                done += counter.begin(size, mask, bucket)
                calls = stubs.run(root, inputs_of(raw))
                if len(calls) != len(blocks):
                    raise CntinitError(f"the model called {len(calls)} of its {len(blocks)} blocks ({path}): capture without --layerwise")
                memo: dict = {}
                batches.append(Batch(bucket, size, mask, _to(calls[0][1], s.activations_on, memo),
                                     [_call_to(c, s.activations_on, memo) for _, _, c in calls]))
        if early is not None:
            finish(early)
        if resumed:
            _check_fit(resumed, batches, s.saved)
        if resumed and not down:
            for index, batch in enumerate(batches):
                batch.hidden = resumed["tensors"][str(index)].to(s.activations_on)
            blocks[0].to("meta")
            log(f"resuming from the checkpoint at {s.saved}: {first_block} of {len(blocks)} blocks done")

        # Each block over every batch.
        groups_by_layout: dict[frozenset, list[list[str]]] = {}

        def targets_in(index: int) -> tuple[dict[str, nn.Module], list[list[str]]]:
            """Block `index`'s targets and their groups by shared input (loaded, with its inputs in batches[0])."""
            local = f"{prefix}{path}.{index}."
            targets = {name: m for name, m in modules.items() if name.startswith(local)}
            layout = frozenset(name.removeprefix(local) for name in targets)
            if layout not in groups_by_layout:  # blocks of one class share their inputs alike: grouped once
                sample = batches[0]
                hidden = sample.inputs.get(index, sample.hidden)
                groups = shared_input_groups(targets, lambda: _call_to(sample.calls[index], s.dev, {}).run(blocks[index], hidden.to(s.dev)))
                groups_by_layout[layout] = [[name.removeprefix(local) for name in g] for g in groups]
            return targets, [[local + name for name in g] for g in groups_by_layout[layout]]

        def release(block: nn.Module) -> None:
            block.to("meta")
            _give_back_freed_memory()
            if s.dev.type == "cuda":
                torch.cuda.empty_cache()
        top = resumed["block"] if down else len(blocks) - 1  # the top block of the way down
        up_to = top if down else end  # the way up runs the blocks below this one
        with console.progress() as bar, _stop_requests(s.saved is not None) as stop:
            backward = top + 1 - targeted[0] if grads is not None else 0
            task = bar.add_task(f"blocks of {path}" + (", then back down" if backward else ""), total=(up_to + backward) * len(batches),
                                completed=first_block * len(batches))
            if down:
                log(f"resuming from the checkpoint at {s.saved}: {len(blocks) - 1 - top} of {len(blocks) - targeted[0]} blocks done "
                    f"on the way down; the way up runs again to block {top}")
            for index in range(first_block, up_to):
                block = blocks[index]
                if index > 0:
                    load(f"{path}.{index}", f"block {index} of {path}")
                targets, groups = targets_in(index) if grads is None else ({}, [])  # with grads: on the way back
                with recorder(targets, groups) as record:
                    for batch in batches:
                        record.begin(batch.size, batch.mask, batch.bucket)
                        if grads is not None and index >= targeted[0]:
                            batch.inputs[index] = batch.hidden
                        output = _call_to(batch.calls[index], s.dev, {}).run(block, batch.hidden.to(s.dev))
                        batch.hidden = form.hidden(output).to(s.activations_on)
                        if grads is None or index < targeted[0]:
                            batch.calls[index] = None  # this block's masks and positions are done with
                        bar.advance(task)
                finish(record)
                release(block)
                if index + 1 == end:
                    break
                halt = _agreed_stop(stop, world) if s.saved is not None else None
                if grads is not None:  # the way up saves nothing: every block's inputs are too much to keep
                    if halt:
                        raise Interrupted(f"stopped by {halt} on the way up, after block {index + 1} of {up_to}; " + (
                            f"the checkpoint at {s.saved} still keeps the way down's blocks: run the same command to resume" if down else
                            "checkpoints begin on the way down, so none was made: run the same command to start again"))
                    continue
                if s.saved is not None and (halt or (index + 1 - first_block) % (s.checkpoint_every or 1) == 0):
                    block_checkpoint.save(s.saved, s.ident, "up", index + 1, {str(j): batch.hidden for j, batch in enumerate(batches)},
                                          payloads, written, world)
                if halt:
                    raise Interrupted(f"stopped by {halt} after block {index + 1} of {end}; the checkpoint at {s.saved} "
                                      "keeps them: run the same command to resume")
            # --gradients: the loss and its gradient, then each block again from the top down, to the first target.
            if grads is not None:
                if down:
                    grads.batches, grads.tokens, grads.loss = (resumed["gradients"][k] for k in ("batches", "tokens", "loss"))
                    for j, batch in enumerate(batches):
                        batch.inputs[top], batch.hidden, batch.grad = batch.hidden, None, resumed["tensors"].get(str(j))
                        batch.calls[top + 1:] = [None] * (len(blocks) - top - 1)  # blocks done: their masks and positions are not needed
                else:
                    _loss_gradients(net, blocks, form, batches, feed, inputs_of, grads, s)
                for index in reversed(range(targeted[0], top + 1)):
                    load(f"{path}.{index}", f"block {index} of {path}")
                    block = blocks[index]
                    targets, groups = targets_in(index)
                    taken = GradientSums(targets, s.accumulate, s.sums_on)
                    with recorder(targets, groups) as record, taken.taking(block), torch.enable_grad():
                        for batch in batches:
                            record.begin(batch.size, batch.mask, batch.bucket)
                            hidden = batch.inputs.pop(index).to(s.dev).requires_grad_(index > targeted[0])
                            output = form.hidden(_call_to(batch.calls[index], s.dev, {}).run(block, hidden))
                            if batch.grad is not None:
                                output.backward(batch.grad.to(s.dev))
                            batch.grad = hidden.grad.to(s.activations_on) if batch.grad is not None and index > targeted[0] else None
                            batch.calls[index] = None
                            bar.advance(task)
                    finish(record, taken)
                    release(block)
                    if index == targeted[0]:
                        break
                    halt = _agreed_stop(stop, world) if s.saved is not None else None
                    if s.saved is not None and (halt or (top + 1 - index) % (s.checkpoint_every or 1) == 0):
                        counters = {"batches": grads.batches, "tokens": grads.tokens, "loss": grads.loss}
                        grads_out = {str(j): b.grad for j, b in enumerate(batches) if b.grad is not None}
                        block_checkpoint.save(s.saved, s.ident, "down", index - 1, grads_out, payloads, written, world, counters)
                    if halt:
                        raise Interrupted(f"stopped by {halt} on the way down, after block {index}; the checkpoint at {s.saved} "
                                          "keeps the blocks done: run the same command to resume")

        # Targets after the blocks, from the last block's outputs.
        if after:
            sample = batches[0]
            with Blocks(blocks, form) as stubs:
                groups = shared_input_groups(after, lambda: stubs.run(root, first_inputs, final=sample.hidden.to(s.dev)))
                with recorder(after, groups) as late:
                    for batch, (_, raw, _, _) in zip(batches, feed.batches()):
                        late.begin(batch.size, batch.mask, batch.bucket)
                        stubs.run(root, inputs_of(raw), final=batch.hidden.to(s.dev))
                finish(late)
    return payloads, written, done


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


def _agreed_stop(stop: list[str], world: distributed.World) -> str | None:
    """The signal that stops the capture after this block, alike on every process: under torchrun a
    SIGTERM may reach the processes on either side of a block's end (or reach one of them only), and
    each must save its checkpoint at the same block for a resume to take them."""
    return next(filter(None, distributed.everyone(world, stop[0] if stop else None)), None)


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
