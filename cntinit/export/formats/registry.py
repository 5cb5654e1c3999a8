"""The registry of adapter formats. A format is registered by its module with what export needs to
write it: its file, which models it is for, the options it has no field for, how it names a module's
tensors, how it writes its files, and how a trainer loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...registry import Registry

FORMAT, FORMAT_VERSION = "cntinit.export", 1  # an export directory's manifest: what export wrote, for --check and a later run
BASE_DIR = "base"  # where a residual base is written, beside the adapter


@dataclass
class Adapter:
    """What export hands a format's writer: the solve and the tensors made for its modules."""

    sol: object  # the Solution
    out: Path  # the export's final place (the files are written in a temporary one first)
    tensors: dict[str, torch.Tensor]  # under the format's own keys
    ranks: dict[str, int]  # by the module paths training sees (--module-prefix added)
    alphas: dict[str, float]  # likewise
    alpha: float  # the base α
    rslora: bool
    dora: bool
    residual: bool  # the base is W − BA (or its NF4 form)
    settings: object = None  # what the format's `prepare` made of its own options (PEFT: the task type)


@dataclass(frozen=True)
class Format:
    """One adapter file format, as `cntinit export --format NAME` writes it (METHODS.md, "Export formats")."""

    name: str
    file: str  # the adapter file it writes
    pipelines: bool  # for diffusion pipelines (else for transformers models)
    client: str  # what loads it, and `export --check` loads it with: "PEFT" or "diffusers"
    key: Callable[[str, dict, str], str]  # (module, solve manifest, module prefix) -> the module's key in the file
    tensors: Callable[[str, torch.Tensor, torch.Tensor, float], dict[str, torch.Tensor]]  # (key, B, A, α) -> its tensors
    write: Callable[[Path, Adapter], None]  # the adapter's files into a directory
    how_to_load: Callable[[bool, Path, bool, str | None], str]  # (residual, out, UNet only, layout) -> how a trainer loads it, in words
    lacks: tuple[str, ...] = ()  # export options it has no field for (refused)
    fixed_scale: bool = False  # its client loads every module at α = r (scale 1): --alpha and --fixed-alpha are refused
    writes_base: bool = True  # a residual init's base is written beside it (else the trainer subtracts BA itself)
    b_name: str = "lora_B"  # what its files call B (a mode that freezes B says so by this name)
    prepare: Callable | None = None  # (task type asked for, model record, module prefix) -> Adapter.settings, checked before any work


FORMATS: Registry[Format] = Registry("--format")  # in registration order: the order --format lists them in
register, get = FORMATS.add, FORMATS.named
