"""Where a model runs and in what dtype: the device, half or full precision, and --offload's spread
of the weights over the device, CPU memory and disk.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CntinitError, not_one_of


@dataclass
class Placement:
    """Where an offloaded model's weights live: accelerate's device map on `device`, then CPU
    memory, then `folder` on disk, within `max_memory` ({"cuda": bytes-or-"20GiB", "cpu": ...};
    a device left out gets what accelerate finds free)."""

    device: torch.device
    dtype: torch.dtype | str
    folder: Path
    max_memory: dict[str, str] = field(default_factory=dict)

    def arguments(self) -> dict:
        from accelerate.utils import get_max_memory

        free = get_max_memory()
        limits = {"cpu": self.max_memory.get("cpu", free["cpu"])}
        if self.device.type == "cuda":  # only this process's GPU, also under torchrun
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            limits = {index: self.max_memory.get("cuda", free[index])} | limits
        return {"device_map": "auto", "max_memory": limits, "offload_folder": str(self.folder), "dtype": self.dtype}


def offload_placement(scratch: contextlib.ExitStack, out: str | Path, offload: bool, max_memory: str | None,
                      device: torch.device, dtype: torch.dtype | str) -> Placement | None:
    """The Placement for --offload (None without it), its disk folder beside `out` (same
    filesystem, same space) and removed when `scratch` closes."""
    if not offload:
        if max_memory is not None:
            raise CntinitError("--max-memory limits where --offload puts the weights: add --offload")
        return None
    limits = parse_max_memory(max_memory)
    if "cuda" in limits and device.type != "cuda":
        raise CntinitError("--max-memory cuda=SIZE limits a GPU, but here --offload keeps the weights in CPU memory and on disk: "
                           "give --max-memory cpu=SIZE")
    parent = Path(out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = scratch.enter_context(tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.offload-", dir=parent))
    return Placement(device, dtype, Path(folder), limits)


def parse_max_memory(text: str | None) -> dict[str, str]:
    """'cuda=20GiB,cpu=64GiB' → {"cuda": "20GiB", "cpu": "64GiB"} (accelerate reads the sizes)."""
    if not text:
        return {}
    limits = {}
    for part in text.split(","):
        device, sep, size = part.strip().partition("=")
        if not sep or device not in ("cuda", "cpu") or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size.strip(), re.IGNORECASE):
            raise CntinitError(f"--max-memory {text}: each entry is cuda=SIZE or cpu=SIZE with SIZE like 20GiB or 500MB, comma-separated")
        limits[device] = size.strip() if not size.strip().isdigit() else int(size)
    return limits


def resolve_device(device: str, option: str = "--device") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CntinitError(f"{option} cuda but no CUDA GPU is visible: use {option} cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise not_one_of(option, device, ("auto", "cpu", "cuda"))
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def place(net: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move `net` to `device` with its weights in `dtype`, as from_pretrained(dtype=...) holds them:
    float32 buffers stay float32. transformers computes RoPE's frequencies in float32 and keeps them
    so; `Module.to(bfloat16)` would round them, and every attention after them, away from the model
    a trainer runs. Half-precision buffers (the checkpoint's dtype) follow the weights."""
    net.to(device)
    for parameter in net.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    for module in net.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(buffer_dtype(buffer, dtype)))


def buffer_dtype(buffer: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating buffer has in a model run in `dtype` (see `place`)."""
    return dtype if buffer.dtype in (torch.bfloat16, torch.float16) else buffer.dtype


def resolve_dtype(dtype: str, checkpoint: torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: the `checkpoint`'s dtype on GPU; float32 on CPU, where half precision is slow."""
    if dtype == "auto":
        return checkpoint if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise not_one_of("--dtype", dtype, ("auto", *DTYPES))
    return DTYPES[dtype]
