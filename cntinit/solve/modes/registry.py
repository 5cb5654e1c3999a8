"""The registry of modes. A mode is registered by the module of its family with everything a solve,
an export and the report need to know of it: what it reads besides W (Σ or G), how its base is
formed, its own options and their defaults, and one function from a batch to factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple

import torch
from rich.progress import Progress

from ...registry import Registry
from .. import inputs

WEIGHTS, STATISTICS, GRADIENTS = "weights", "statistics", "gradients"  # what a mode reads: W alone, W and Σ, W and G
OFFSET, RESIDUAL = "offset", "residual"  # its base: W (the initial model is W + BA), or W − BA (the pretrained model)
NOTES = ("kept = ‖BA‖²/‖ΔW‖²", "out Δ = tr(BA Σ (BA)ᵀ)/tr(W Σ Wᵀ)")  # the report's footnotes, unless a mode says otherwise


class Factors(NamedTuple):
    """A batch's factors of one rank, (n, k, r) and (n, r, d), and what the split found on the way."""

    b: torch.Tensor
    a: torch.Tensor
    values: torch.Tensor | None = None  # every singular value of the matrix split (VAS, the report's spectrum)
    steps: int | None = None  # Adam steps run (IniLoRA's fit: the report adds its fit error)
    bases: list | None = None  # the NF4 bases the factors were fitted to (LoftQ)


@dataclass(frozen=True)
class Job:
    """What a mode's factor function gets beside the batch."""

    rank: int  # the rank to split at: the batch's largest (VAS cuts each module to its own)
    options: object  # the solve's Options, resolved
    generators: list[torch.Generator]  # one per module, from --seed and its name: its random draws
    layouts: list[tuple[torch.dtype, bool]]  # how each weight is stored (dtype, transposed): a 4-bit base quantizes as the trainer's
    prepared: object  # what the mode's `prepare` computed over every module (IniLoRA's σ), else None
    bar: Progress  # for progress inside a batch (IniLoRA's Adam steps)


def _never(options) -> bool:
    return False


def _split_cost(k: int, d: int) -> int:
    return k * d * min(k, d)


@dataclass(frozen=True)
class Mode:
    """One initialization method, as `cntinit solve --mode NAME` runs it (METHODS.md defines each)."""

    name: str
    reads: str  # WEIGHTS, STATISTICS (a capture) or GRADIENTS (a --gradients capture)
    init: str  # RESIDUAL: BA is a piece of W, so the base must be W − BA; OFFSET: the base stays W unless --init residual
    factor: Callable[[inputs.Batch, Job], Factors] | None  # a batch's factors (None: `solve_all` solves every module at once)
    batches: Callable = inputs.weights  # (stats, modules, options, device, dtype) -> its batches: W by default
    options: Mapping[str, Callable] = field(default_factory=dict)  # its own options: name -> (given, options) -> the value used
    defaults: Mapping[str, Callable] = field(default_factory=dict)  # shared options it sets a default for, likewise
    zero_update: bool = False  # BA = 0 (B = 0, or A = 0): the base stays W, and export folds no scale into the factors
    decompose: str | None = None  # the split of a matrix it makes ("svd", "qr"); None: it splits none
    any_decompose: bool = False  # --decompose may choose the split (CNT)
    vas: str | None = None  # why --vas does not apply to it; None: it does
    minor: Callable[[object], bool] = _never  # whether, given the options, it keeps the smallest of the values it splits at
    buckets: bool = False  # it takes the capture's buckets (the robust estimate; --bucket-weights, --pooled)
    by_key: bool = False  # its work is per statistic (an eigendecomposition of Σ): torchrun shares out statistics, not modules
    picks: int = 1  # it picks r of the first picks·r singular vectors: min(in, out) must reach that
    cost: Callable[[int, int], int] = _split_cost  # the work of one k × d module, to share modules out under torchrun
    prepare: Callable | None = None  # (modules, options) -> what its factor function needs of every module (Job.prepared)
    solve_all: Callable | None = None  # (stats, modules, mine, options, device, dtype, world) -> (ranks, factors, rows): EVA
    floors: bool = False  # its report counts eigen/singular values under the rcond floor
    notes: tuple[str, ...] = NOTES  # the report's footnotes
    peft_variant: str | None = None  # PEFT's init_lora_weights that trains it as its own LoRA variant (B frozen), for export
    label: str = ""  # its name as its paper writes it, where a message names the method

    @property
    def sized_for_scale(self) -> bool:
        """Its factors are sized for the trainer's LoRA scale α/r (--alpha, --rslora), and are its own only there."""
        return "alpha" in self.options


MODES: Registry[Mode] = Registry("--mode")  # in registration order: the order --mode lists them in
register, get = MODES.add, MODES.named


def owners(option: str) -> list[str]:
    """The modes that own `option` (it applies to them alone)."""
    return [name for name, mode in MODES.items() if option in mode.options]
