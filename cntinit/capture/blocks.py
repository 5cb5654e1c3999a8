"""A model's chain of repeated blocks, and the calls that run through it: what a layerwise capture
runs one block at a time, and what --gradient-checkpointing recomputes.

`Blocks` replaces the blocks' forwards for the passes that compute no block: each block call is
kept (its hidden states and whatever else the model passes it: masks, rotary position
embeddings), so a block can later run alone on every batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CntinitError


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


def chain_of_blocks(net: nn.Module, root: nn.Module, modules: dict[str, nn.Module]) -> nn.ModuleList:
    """The model's chain of repeated blocks itself (what --gradient-checkpointing recomputes one at a time)."""
    prefix, path = chain(net, root, modules)
    return net.get_submodule(prefix + path)


def outside_blocks(modules: dict[str, nn.Module], prefix: str, path: str) -> dict[str, nn.Module]:
    """The targets that lie in no block of the chain at `prefix` + `path`."""
    return {name: m for name, m in modules.items() if not name.removeprefix(prefix).startswith(path + ".")}


def check_gradient_targets(modules: dict[str, nn.Module], prefix: str, path: str) -> None:
    """--gradients --layerwise runs backward through the blocks only: every target must lie in one."""
    outside = next(iter(outside_blocks(modules, prefix, path)), None)
    if outside:
        raise CntinitError(f"--gradients --layerwise takes targets inside the repeated blocks ({prefix}{path}); {outside} lies "
                           "outside them: leave it out of --targets, or capture without --layerwise")


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


def split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Call]:
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
        hidden, call = split_call(args, kwargs)
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


def on_device(value, device: torch.device, memo: dict):
    """`value` with its tensors on `device` (nested tuples, lists, dicts), each tensor moved once."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(on_device(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: on_device(v, device, memo) for k, v in value.items()}
    return value


def call_on(call: Call, device: torch.device, memo: dict) -> Call:
    return Call(on_device(call.args, device, memo), on_device(call.kwargs, device, memo), call.hidden_key)
